"""Sharing: access requests (tickets), duty shifts, retrieval tokens and their revocation.

An :class:`AccessRequest` is one ticket from request to images: who asks, for which
patient and studies, for what purpose, on what grounds; who approved it and until when;
the tokens issued under it. Its ``public_id`` is the ticket ID and the correlation ID of
every audit event it causes (consent evaluations, decisions, tokens), so one query of the
audit trail tells its whole story.

Nothing here is edited in place except a ticket's state, which only moves forward
(pending -> approved / denied / cancelled -> expired / revoked), each step by a service
of :mod:`sharing.services` with its audit event.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from broker.models import Institution, Patient, Professional


class Purpose(models.TextChoices):
    """Why access is asked for (the values of ``consent.policy.Purpose``)."""

    AVIS = "avis", _("Second opinion (avis)")
    TREATMENT = "treatment", _("Treatment")
    TELERADIOLOGY = "teleradiology", _("Teleradiology (duty)")
    EMERGENCY = "emergency", _("Emergency (break-the-glass)")


class RequestState(models.TextChoices):
    PENDING = "pending", _("Pending")
    APPROVED = "approved", _("Approved")
    DENIED = "denied", _("Denied")
    CANCELLED = "cancelled", _("Cancelled")
    EXPIRED = "expired", _("Expired")
    REVOKED = "revoked", _("Revoked")


# The states a ticket may move to from each state; anything else is refused.
TRANSITIONS: dict[str, frozenset[str]] = {
    RequestState.PENDING: frozenset(
        {RequestState.APPROVED, RequestState.DENIED, RequestState.CANCELLED, RequestState.EXPIRED}
    ),
    RequestState.APPROVED: frozenset(
        {RequestState.CANCELLED, RequestState.EXPIRED, RequestState.REVOKED}
    ),
    RequestState.DENIED: frozenset(),
    RequestState.CANCELLED: frozenset(),
    RequestState.EXPIRED: frozenset(),
    RequestState.REVOKED: frozenset(),
}


class DutyShift(models.Model):
    """A teleradiologist's shift (permanence des soins) covering some institutions."""

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    teleradiologist = models.ForeignKey(
        Professional, on_delete=models.PROTECT, related_name="duty_shifts"
    )
    institutions = models.ManyToManyField(
        Institution, related_name="duty_shifts", verbose_name=_("covered institutions")
    )
    starts_at = models.DateTimeField(_("start"))
    ends_at = models.DateTimeField(_("end"))
    agreement_reference = models.CharField(
        _("agreement"), max_length=128, help_text=_("The teleradiology agreement it runs under.")
    )
    created_by = models.CharField(max_length=150)
    created_at = models.DateTimeField()
    cancelled_at = models.DateTimeField(null=True, blank=True)
    cancelled_by = models.CharField(max_length=150, blank=True, default="")

    class Meta:
        ordering = ["starts_at", "id"]
        constraints = [
            models.CheckConstraint(
                name="sharing_shift_ends_after_start",
                condition=Q(ends_at__gt=models.F("starts_at")),
            ),
        ]
        indexes = [
            models.Index(fields=["teleradiologist", "starts_at"], name="sharing_shift_who_idx")
        ]

    def __str__(self) -> str:
        return f"{self.teleradiologist} {self.starts_at:%Y-%m-%d %H:%M} to {self.ends_at:%H:%M}"


class AccessRequest(models.Model):
    """One ticket: a request for access to a patient's studies, from asking to images."""

    public_id = models.UUIDField(
        default=uuid.uuid4,
        unique=True,
        editable=False,
        help_text=_("The ticket ID; the correlation ID of everything it causes."),
    )
    purpose = models.CharField(max_length=16, choices=Purpose.choices)
    state = models.CharField(max_length=16, choices=RequestState.choices)
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="access_requests")
    all_studies = models.BooleanField(
        default=False, help_text=_("Every study of the patient (at the source, when named).")
    )
    studies = models.JSONField(default=list, help_text=_("Study Instance UIDs asked for."))
    source_institution = models.ForeignKey(
        Institution,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        help_text=_("Treatment: the institution that holds the studies."),
    )
    requester = models.ForeignKey(
        Professional, on_delete=models.PROTECT, related_name="access_requests"
    )
    requester_institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="+"
    )
    recipient = models.ForeignKey(
        Professional,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="requests_received",
        help_text=_("Avis: the specialist asked (or who took a request sent to a department)."),
    )
    recipient_institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    question = models.TextField(blank=True, default="")
    justification = models.TextField()
    shift = models.ForeignKey(
        DutyShift, on_delete=models.PROTECT, null=True, blank=True, related_name="requests"
    )
    created_at = models.DateTimeField()
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        Professional, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    decision_note = models.TextField(blank=True, default="")
    automatic = models.BooleanField(
        default=False, help_text=_("Approved by the regional policy (care team, duty).")
    )
    not_after = models.DateTimeField(
        null=True, blank=True, help_text=_("End of the grant; no token outlives it.")
    )
    ended_at = models.DateTimeField(null=True, blank=True)
    ended_by = models.CharField(max_length=150, blank=True, default="")
    end_reason = models.TextField(blank=True, default="")
    answer = models.TextField(blank=True, default="")
    answered_at = models.DateTimeField(null=True, blank=True)
    answered_by = models.ForeignKey(
        Professional, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [
            ("decide_accessrequest", "Approve or deny an access request"),
            ("answer_accessrequest", "Answer an avis request"),
        ]
        constraints = [
            models.CheckConstraint(
                name="sharing_request_state_valid", condition=Q(state__in=RequestState.values)
            ),
            models.CheckConstraint(
                name="sharing_request_purpose_valid", condition=Q(purpose__in=Purpose.values)
            ),
            models.CheckConstraint(
                name="sharing_request_studies_named",
                condition=Q(all_studies=True) | ~Q(studies=[]),
            ),
            models.CheckConstraint(
                name="sharing_request_avis_has_recipient",
                condition=~Q(purpose="avis")
                | Q(recipient__isnull=False)
                | Q(recipient_institution__isnull=False),
            ),
            models.CheckConstraint(
                name="sharing_request_duty_has_shift",
                condition=~Q(purpose="teleradiology") | Q(shift__isnull=False),
            ),
            models.CheckConstraint(
                name="sharing_request_approved_has_end",
                condition=~Q(state="approved") | Q(not_after__isnull=False),
            ),
            models.CheckConstraint(
                name="sharing_request_justified", condition=~Q(justification="")
            ),
        ]
        indexes = [
            models.Index(fields=["requester", "-created_at"], name="sharing_request_mine_idx"),
            models.Index(fields=["patient", "state"], name="sharing_request_patient_idx"),
            models.Index(fields=["state", "not_after"], name="sharing_request_expiry_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.get_purpose_display()} {self.public_id} ({self.state})"


class IssuedToken(models.Model):
    """A retrieval token issued under a ticket: its ID and hash, never the token."""

    token_id = models.UUIDField(unique=True, help_text=_("The token's jti."))
    request = models.ForeignKey(AccessRequest, on_delete=models.PROTECT, related_name="tokens")
    subject = models.ForeignKey(Professional, on_delete=models.PROTECT, related_name="+")
    token_sha256 = models.CharField(max_length=64, unique=True)
    studies = models.JSONField()
    issued_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                name="sharing_token_expires_after_issue",
                condition=Q(expires_at__gt=models.F("issued_at")),
            ),
        ]

    def __str__(self) -> str:
        return str(self.token_id)


class Revocation(models.Model):
    """An append-only feed of revocations (of one token, or of every token of a ticket).

    Every process that checks tokens reads it incrementally (``id`` greater than the last
    it saw) at most every ``RELAIS_REVOCATION_POLL_SECONDS``.
    """

    id = models.BigAutoField(primary_key=True)
    token_id = models.UUIDField(null=True, blank=True)
    request_id = models.UUIDField(null=True, blank=True, help_text=_("A ticket's public ID."))
    revoked_at = models.DateTimeField()
    reason = models.CharField(max_length=64)

    class Meta:
        constraints = [
            models.CheckConstraint(
                name="sharing_revocation_one_target",
                condition=Q(token_id__isnull=False, request_id__isnull=True)
                | Q(token_id__isnull=True, request_id__isnull=False),
            ),
        ]
        indexes = [models.Index(fields=["revoked_at"], name="sharing_revocation_at_idx")]

    def __str__(self) -> str:
        return f"revocation of {self.token_id or self.request_id}"


class ReviewOutcome(models.TextChoices):
    JUSTIFIED = "justified", _("Justified")
    UNJUSTIFIED = "unjustified", _("Not justified")


class EmergencyReview(models.Model):
    """A break-the-glass access in the DPO's review queue."""

    request = models.OneToOneField(
        AccessRequest, on_delete=models.PROTECT, related_name="emergency_review"
    )
    created_at = models.DateTimeField()
    reviewed_at = models.DateTimeField(null=True, blank=True)
    reviewed_by = models.CharField(max_length=150, blank=True, default="")
    outcome = models.CharField(max_length=16, choices=ReviewOutcome.choices, blank=True)
    comment = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.CheckConstraint(
                name="sharing_review_outcome_when_reviewed",
                condition=Q(reviewed_at__isnull=True, outcome="")
                | Q(reviewed_at__isnull=False, outcome__in=ReviewOutcome.values),
            ),
        ]

    def __str__(self) -> str:
        return f"review of {self.request.public_id}"


class PatientNotification(models.Model):
    """A notification owed to a patient (an emergency access to their record), queued."""

    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="notifications")
    request = models.ForeignKey(
        AccessRequest, on_delete=models.PROTECT, related_name="notifications"
    )
    kind = models.CharField(max_length=32)
    created_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(
                fields=["created_at"],
                name="sharing_notification_queue_idx",
                condition=Q(sent_at__isnull=True),
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} for {self.patient_id}"
