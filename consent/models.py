"""What patients have said about the sharing of their images: directives, versioned.

A directive hangs off the *local identifier* it was recorded under (like a manifest), so it
belongs to whichever regional patient that identifier belongs to: it follows links, and an
unlink leaves it with its identifier. Nothing is edited or deleted: a change or a
withdrawal is a new `DirectiveVersion`; the latest version is the directive's state.
"""

from __future__ import annotations

from django.db import models
from django.db.models import F, Q
from django.utils.translation import gettext_lazy as _

from broker.models import Institution, PatientIdentifier


class DirectiveKind(models.TextChoices):
    OPPOSITION = "opposition", _("Opposition to sharing")
    CONSENT = "consent", _("Consent to sharing outside the care team")
    MASK = "mask", _("Masking of one study")


class DirectiveScope(models.TextChoices):
    ALL = "all", _("Everyone")
    INSTITUTION = "institution", _("One institution")
    PROFESSIONAL = "professional", _("One professional")
    STUDY = "study", _("One study")


class Evidence(models.Model):
    """A signed form (PDF, PNG or JPEG), encrypted at rest with AES-256-GCM."""

    sha256 = models.CharField(max_length=64, help_text=_("of the document in clear"))
    content_type = models.CharField(max_length=32)
    size = models.PositiveIntegerField()
    nonce = models.BinaryField()
    ciphertext = models.BinaryField()
    created_at = models.DateTimeField()

    class Meta:
        verbose_name = _("consent evidence")
        constraints = [
            models.CheckConstraint(
                name="consent_evidence_type_valid",
                condition=Q(content_type__in=["application/pdf", "image/png", "image/jpeg"]),
            )
        ]

    def __str__(self) -> str:
        return f"{self.content_type}, {self.size} bytes, sha256 {self.sha256[:12]}…"


class Directive(models.Model):
    """One directive of a patient, across its versions."""

    identifier = models.ForeignKey(
        PatientIdentifier, on_delete=models.PROTECT, related_name="consent_directives"
    )
    kind = models.CharField(max_length=16, choices=DirectiveKind.choices)
    created_at = models.DateTimeField()

    class Meta:
        verbose_name = _("consent directive")
        constraints = [
            models.CheckConstraint(
                name="consent_directive_kind_valid", condition=Q(kind__in=DirectiveKind.values)
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk}"


class DirectiveVersion(models.Model):
    """One version of a directive, as recorded: never edited."""

    directive = models.ForeignKey(Directive, on_delete=models.PROTECT, related_name="versions")
    version = models.PositiveIntegerField()
    scope = models.CharField(max_length=16, choices=DirectiveScope.choices)
    value = models.CharField(
        max_length=64, blank=True, default="", help_text=_("FINESS, professional ID or study UID")
    )
    purposes = models.JSONField(default=list, blank=True)
    valid_from = models.DateTimeField(null=True, blank=True)
    valid_until = models.DateTimeField(null=True, blank=True)
    withdrawn = models.BooleanField(default=False)
    # Who recorded it, where, when, on what evidence.
    recorded_by = models.CharField(max_length=150)
    recorded_by_user_id = models.BigIntegerField(null=True, blank=True)
    recorded_at_institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="+"
    )
    recorded_at = models.DateTimeField()
    evidence = models.ForeignKey(Evidence, on_delete=models.PROTECT, null=True, blank=True)
    note = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["directive_id", "version"]
        verbose_name = _("consent directive version")
        constraints = [
            models.UniqueConstraint(fields=["directive", "version"], name="consent_version_unique"),
            models.CheckConstraint(
                name="consent_version_scope_valid", condition=Q(scope__in=DirectiveScope.values)
            ),
            models.CheckConstraint(
                name="consent_version_dates_ordered",
                condition=Q(valid_from__isnull=True)
                | Q(valid_until__isnull=True)
                | Q(valid_until__gt=F("valid_from")),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.directive} v{self.version}"
