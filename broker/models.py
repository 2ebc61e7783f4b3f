"""The regional registry: institutions, the patient index and study manifests.

Images never live here: a manifest (a DICOM KOS) points to a study that stays in the
source institution's archive. Manifests hang off the *local* patient identifier they
were published under, so linking or unlinking identities moves no manifest.
"""

from __future__ import annotations

import datetime
import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce
from django.utils.translation import gettext_lazy as _
from rest_framework_api_key.models import AbstractAPIKey

FINESS_VALIDATOR = RegexValidator(
    r"^(?:\d{2}|2A|2B)\d{7}$", _("A FINESS number is 9 characters: 2 digits (or 2A/2B) then 7.")
)
AE_TITLE_VALIDATOR = RegexValidator(
    r"^[\x21-\x5b\x5d-\x7e](?:[\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$",
    _(
        "An AE title is 1 to 16 printable ASCII characters, "
        "with no backslash and no leading or trailing space."
    ),
)


class Institution(models.Model):
    """A hospital of the region (identified by its FINESS number) and its archive."""

    finess = models.CharField(_("FINESS"), max_length=9, unique=True, validators=[FINESS_VALIDATOR])
    name = models.CharField(_("name"), max_length=200)
    patient_id_issuer = models.CharField(
        _("patient ID issuer"),
        max_length=64,
        unique=True,
        help_text=_("IssuerOfPatientID (0010,0021) of the institution's local patient IDs (IPP)."),
    )
    patient_id_issuer_oid = models.CharField(
        _("patient ID issuer OID"),
        max_length=64,
        blank=True,
        default="",
        help_text=_("UniversalEntityID of the IPP domain, when the archive sends it."),
    )
    ae_title = models.CharField(
        _("archive AE title"),
        max_length=16,
        blank=True,
        default="",
        validators=[AE_TITLE_VALIDATOR],
    )
    dicom_host = models.CharField(_("archive DICOM host"), max_length=255, blank=True, default="")
    dicom_port = models.PositiveIntegerField(
        _("archive DICOM port"),
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
    )
    dicomweb_url = models.URLField(_("archive DICOMweb base URL"), blank=True, default="")
    dicom_tls_subject = models.CharField(
        _("archive TLS certificate"),
        max_length=255,
        blank=True,
        default="",
        help_text=_(
            "Common Name of the certificate the archive presents over DICOM TLS; when set, an "
            "association of its AE title with another certificate is refused."
        ),
    )
    archive_transport = models.CharField(
        _("archive transport"),
        max_length=8,
        blank=True,
        default="",
        choices=[("", _("automatic")), ("dicomweb", "DICOMweb"), ("dimse", "DIMSE")],
        help_text=_(
            "How the broker queries and retrieves from the archive; automatic: DICOMweb when a "
            "URL is set, else DIMSE."
        ),
    )
    active = models.BooleanField(_("active"), default=True)
    created_at = models.DateTimeField(_("created at"))
    updated_at = models.DateTimeField(_("updated at"))

    class Meta:
        ordering = ["name"]
        verbose_name = _("institution")
        verbose_name_plural = _("institutions")
        constraints = [
            models.CheckConstraint(
                name="broker_institution_dicom_endpoint_complete",
                condition=(Q(ae_title="", dicom_host="", dicom_port__isnull=True))
                | (~Q(ae_title="") & ~Q(dicom_host="") & Q(dicom_port__isnull=False)),
            ),
            models.CheckConstraint(
                name="broker_institution_port_range",
                condition=Q(dicom_port__isnull=True) | Q(dicom_port__gte=1, dicom_port__lte=65535),
            ),
            models.UniqueConstraint(
                fields=["patient_id_issuer_oid"],
                condition=~Q(patient_id_issuer_oid=""),
                name="broker_institution_issuer_oid_unique",
            ),
            models.CheckConstraint(
                name="broker_institution_transport_valid",
                condition=Q(archive_transport__in=["", "dicomweb", "dimse"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.finess})"

    @property
    def has_dimse(self) -> bool:
        return bool(self.ae_title and self.dicom_host and self.dicom_port)

    @property
    def transport(self) -> str:
        """The archive transport in use: the one chosen, or DICOMweb when it has a URL."""
        if self.archive_transport:
            return self.archive_transport
        return "dicomweb" if self.dicomweb_url else "dimse"


class Role(models.TextChoices):
    REFERRING_DOCTOR = "referring_doctor", _("Referring doctor")
    RADIOLOGIST = "radiologist", _("Radiologist")
    TELERADIOLOGIST = "teleradiologist", _("Teleradiologist")
    EMERGENCY_DOCTOR = "emergency_doctor", _("Emergency doctor")
    ADMISSIONS_CLERK = "admissions_clerk", _("Admissions clerk")
    INSTITUTION_ADMIN = "institution_admin", _("Institution administrator")
    DPO = "dpo", _("Data protection officer")


CLINICAL_ROLES = frozenset(
    {Role.REFERRING_DOCTOR, Role.RADIOLOGIST, Role.TELERADIOLOGIST, Role.EMERGENCY_DOCTOR}
)


class Professional(models.Model):
    """A person who uses the broker, with their national professional ID (RPPS) if any."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="professional"
    )
    rpps = models.CharField(
        _("RPPS"),
        max_length=11,
        blank=True,
        default="",
        validators=[RegexValidator(r"^\d{11}$", _("An RPPS number is 11 digits."))],
    )
    is_region_admin = models.BooleanField(_("regional administrator"), default=False)

    class Meta:
        verbose_name = _("professional")
        constraints = [
            models.UniqueConstraint(
                fields=["rpps"], condition=~Q(rpps=""), name="broker_professional_rpps_unique"
            )
        ]

    def __str__(self) -> str:
        return self.user.get_full_name() or self.user.get_username()


class Membership(models.Model):
    """A professional's role at one institution."""

    professional = models.ForeignKey(
        Professional, on_delete=models.CASCADE, related_name="memberships"
    )
    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="members")
    role = models.CharField(_("role"), max_length=32, choices=Role.choices)
    active = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["professional", "institution", "role"],
                name="broker_membership_unique_role",
            ),
            models.CheckConstraint(
                name="broker_membership_role_valid", condition=Q(role__in=Role.values)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.professional} — {self.get_role_display()} @ {self.institution.finess}"


class InstitutionAPIKey(AbstractAPIKey):
    """The key an institution's system (its PACS, its integration engine) calls the API with."""

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="api_keys")

    class Meta(AbstractAPIKey.Meta):
        verbose_name = _("institution API key")
        verbose_name_plural = _("institution API keys")


class Patient(models.Model):
    """A regional patient: the person behind one or more local identifiers."""

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    created_at = models.DateTimeField()

    class Meta:
        verbose_name = _("regional patient")

    def __str__(self) -> str:
        return str(self.public_id)


class IdentifierKind(models.TextChoices):
    IPP = "IPP", _("Local patient ID (IPP)")
    INS_NIR = "INS-NIR", _("INS (NIR)")
    INS_NIA = "INS-NIA", _("INS (NIA)")


class PatientIdentifier(models.Model):
    """One identifier of a patient in one domain (a hospital's IPP, or the national INS)."""

    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="identifiers")
    issuer = models.CharField(max_length=64)
    value = models.CharField(max_length=64)
    kind = models.CharField(max_length=8, choices=IdentifierKind.choices)
    institution = models.ForeignKey(
        Institution,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="patient_identifiers",
        help_text=_("The institution whose domain issued it (IPP only)."),
    )
    qualified = models.BooleanField(default=False, help_text=_("A qualified INS (strict traits)."))
    test = models.BooleanField(default=False, help_text=_("An INS of the national test domain."))
    # Traits as last published under this identifier (each source keeps its own).
    family_name = models.CharField(max_length=128, blank=True, default="")
    given_names = models.CharField(max_length=128, blank=True, default="")
    birth_name = models.CharField(max_length=128, blank=True, default="")
    birth_date = models.DateField(null=True, blank=True)
    sex = models.CharField(max_length=1, blank=True, default="")
    # Traits folded for matching (upper case, no accents or punctuation): candidate search.
    family_key = models.CharField(max_length=128, blank=True, default="")
    birth_name_key = models.CharField(max_length=128, blank=True, default="")
    given_key = models.CharField(
        max_length=128, blank=True, default="", help_text=_("First given name.")
    )
    auto_link_blocked = models.BooleanField(
        default=False,
        help_text=_("Set by an unlink: a shared INS no longer links it automatically."),
    )
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["issuer", "value"], name="broker_identifier_unique"),
            models.CheckConstraint(
                name="broker_identifier_kind_valid", condition=Q(kind__in=IdentifierKind.values)
            ),
            models.CheckConstraint(
                name="broker_identifier_ipp_has_institution",
                condition=Q(kind="IPP", institution__isnull=False) | ~Q(kind="IPP"),
            ),
            models.CheckConstraint(
                name="broker_identifier_only_ins_qualified",
                condition=Q(qualified=False) | ~Q(kind="IPP"),
            ),
        ]
        indexes = [
            # Candidate search on demographics (birth date + first given name, then names).
            models.Index(fields=["birth_date", "given_key"], name="broker_identifier_demo_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.value}^^^{self.issuer}"

    @property
    def is_ins(self) -> bool:
        return self.kind != IdentifierKind.IPP


class IdentifierLinkHistory(models.Model):
    """Every move of an identifier from one regional patient to another, never edited."""

    class Reason(models.TextChoices):
        CREATED = "created", _("created")
        INS_MATCH = "ins_match", _("linked by a shared qualified INS")
        CANDIDATE_CONFIRMED = "candidate_confirmed", _("candidate link confirmed")
        MANUAL_LINK = "manual_link", _("linked by hand")
        UNLINK = "unlink", _("unlinked")

    identifier = models.ForeignKey(
        PatientIdentifier, on_delete=models.PROTECT, related_name="history"
    )
    from_patient = models.ForeignKey(
        Patient, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    to_patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="+")
    reason = models.CharField(max_length=32, choices=Reason.choices)
    actor = models.CharField(max_length=150)
    comment = models.TextField(blank=True, default="")
    correlation_id = models.UUIDField()
    at = models.DateTimeField()

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.identifier} -> {self.to_patient} ({self.reason})"


class LinkCandidate(models.Model):
    """Two identifiers whose traits match without a shared INS: a person must decide."""

    class Status(models.TextChoices):
        PENDING = "pending", _("pending review")
        CONFIRMED = "confirmed", _("confirmed")
        REJECTED = "rejected", _("rejected")

    identifier_a = models.ForeignKey(
        PatientIdentifier, on_delete=models.PROTECT, related_name="candidates_as_a"
    )
    identifier_b = models.ForeignKey(
        PatientIdentifier, on_delete=models.PROTECT, related_name="candidates_as_b"
    )
    matched_on = models.JSONField(default=list)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField()
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.CharField(max_length=150, blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["identifier_a", "identifier_b"], name="broker_linkcandidate_pair_unique"
            ),
            models.CheckConstraint(
                name="broker_linkcandidate_ordered_pair",
                condition=Q(identifier_a__lt=models.F("identifier_b")),
            ),
            models.CheckConstraint(
                name="broker_linkcandidate_status_valid",
                condition=Q(status__in=["pending", "confirmed", "rejected"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.identifier_a} ~ {self.identifier_b} ({self.status})"


# Manifests are listed newest study first, undated ones last: the sort key never is NULL,
# so the same index and keyset work on PostgreSQL and SQLite (which order NULLs differently).
UNDATED = datetime.date(1, 1, 1)
STUDY_DATE_SORT = Coalesce(F("study_date"), Value(UNDATED), output_field=models.DateField())


class ManifestStatus(models.TextChoices):
    APPROVED = "Approved", _("Approved")
    DEPRECATED = "Deprecated", _("Deprecated")


class Manifest(models.Model):
    """A registered KOS manifest of one study (or several) held in a source archive."""

    sop_instance_uid = models.CharField(max_length=64, unique=True)
    study_instance_uid = models.CharField(
        max_length=64, help_text=_("The (first) referenced study.")
    )
    accession_number = models.CharField(max_length=64, blank=True, default="")
    study_date = models.DateField(null=True, blank=True)
    study_time = models.TimeField(null=True, blank=True)
    study_description = models.CharField(max_length=256, blank=True, default="")
    modalities = models.JSONField(default=list)
    body_parts = models.JSONField(default=list)
    series_count = models.PositiveIntegerField()
    instance_count = models.PositiveIntegerField()
    source_institution = models.ForeignKey(
        Institution, on_delete=models.PROTECT, related_name="manifests"
    )
    source_identifier = models.ForeignKey(
        PatientIdentifier,
        on_delete=models.PROTECT,
        related_name="manifests",
        help_text=_("The patient ID the manifest was published under (sourcePatientId)."),
    )
    retrieve_ae_title = models.CharField(max_length=64, blank=True, default="")
    retrieve_location_uid = models.CharField(max_length=64, blank=True, default="")
    retrieve_url = models.CharField(max_length=1024, blank=True, default="")
    status = models.CharField(
        max_length=10, choices=ManifestStatus.choices, default=ManifestStatus.APPROVED
    )
    replaced_by = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="replaces"
    )
    kos_bytes = models.BinaryField()
    kos_sha256 = models.CharField(max_length=64)
    kos_size = models.PositiveIntegerField()
    registered_at = models.DateTimeField()
    deprecated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                name="broker_manifest_status_valid", condition=Q(status__in=ManifestStatus.values)
            ),
            models.UniqueConstraint(
                fields=["source_institution", "study_instance_uid"],
                condition=Q(status="Approved"),
                name="broker_manifest_one_approved_per_study",
            ),
            models.CheckConstraint(
                name="broker_manifest_deprecated_has_time",
                condition=Q(status="Approved", deprecated_at__isnull=True)
                | Q(status="Deprecated", deprecated_at__isnull=False),
            ),
            models.CheckConstraint(
                name="broker_manifest_has_retrieve_location",
                condition=~Q(retrieve_ae_title="", retrieve_location_uid="", retrieve_url=""),
            ),
            models.CheckConstraint(
                name="broker_manifest_sha256_length",
                condition=Q(kos_sha256__regex=r"^[0-9a-f]{64}$"),
            ),
        ]
        indexes = [
            # "All manifests of a patient", newest study first (keyset on study_date, id).
            models.Index(
                F("source_identifier"),
                STUDY_DATE_SORT.desc(),
                F("id").desc(),
                name="broker_manifest_patient_idx",
            ),
            # "The approved manifest of this study" (gateway, replacement).
            models.Index(fields=["study_instance_uid"], name="broker_manifest_study_idx"),
            # "Manifests of an institution by date" (harvest, administrators).
            models.Index(
                F("source_institution"),
                STUDY_DATE_SORT.desc(),
                F("id").desc(),
                name="broker_manifest_source_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.sop_instance_uid} ({self.status})"


class ManifestSeries(models.Model):
    """A series a manifest references, with where to retrieve it."""

    manifest = models.ForeignKey(Manifest, on_delete=models.PROTECT, related_name="series")
    study_instance_uid = models.CharField(max_length=64)
    series_instance_uid = models.CharField(max_length=64)
    modality = models.CharField(max_length=16, blank=True, default="")
    body_part = models.CharField(max_length=64, blank=True, default="")
    retrieve_ae_title = models.CharField(max_length=64, blank=True, default="")
    retrieve_location_uid = models.CharField(max_length=64, blank=True, default="")
    retrieve_url = models.CharField(max_length=1024, blank=True, default="")
    instance_count = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["manifest", "study_instance_uid", "series_instance_uid"],
                name="broker_manifestseries_unique",
            )
        ]
        indexes = [
            # "Is this series in a manifest?" (the gateway's scope check).
            models.Index(
                fields=["study_instance_uid", "series_instance_uid"],
                name="broker_series_scope_idx",
            )
        ]

    def __str__(self) -> str:
        return self.series_instance_uid


class ManifestInstance(models.Model):
    """A SOP instance a manifest references."""

    series = models.ForeignKey(ManifestSeries, on_delete=models.PROTECT, related_name="instances")
    sop_instance_uid = models.CharField(max_length=64)
    sop_class_uid = models.CharField(max_length=64)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["series", "sop_instance_uid"], name="broker_manifestinstance_unique"
            )
        ]

    def __str__(self) -> str:
        return self.sop_instance_uid


class IntakeItem(models.Model):
    """A manifest received over DIMSE, validated, and waiting for its registration.

    The C-STORE is answered once the item is committed here; a registrar registers the
    queue in batches (``broker.intake``) and deletes each item in the transaction that
    registers it, so that every received manifest is registered exactly once, even across
    a crash.
    """

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="+")
    received_at = models.DateTimeField()
    sop_instance_uid = models.CharField(max_length=64)
    sha256 = models.CharField(max_length=64)
    data = models.BinaryField()
    parsed = models.BinaryField(
        null=True,
        blank=True,
        help_text=_(
            "the check's parse of data (kos.dump_parsed_kos): registered without parsing again"
        ),
    )
    actor_username = models.CharField(max_length=150)
    actor_address = models.CharField(max_length=255, blank=True, default="")
    correlation_id = models.UUIDField(help_text=_("the association that received it"))
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    failed_at = models.DateTimeField(
        null=True, blank=True, help_text=_("set aside after repeated failures: for an operator")
    )

    class Meta:
        ordering = ["id"]
        verbose_name = _("manifest waiting for registration")
        indexes = [
            # An institution's oldest waiting manifests, without reading the whole queue (a
            # backlog): which institution comes next, and its next batch.
            models.Index(
                fields=["institution", "id"],
                condition=Q(failed_at__isnull=True),
                name="broker_intake_waiting_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.sop_instance_uid} from {self.actor_username}"


class HarvestStatus(models.TextChoices):
    RUNNING = "running", _("running")
    COMPLETED = "completed", _("completed")
    FAILED = "failed", _("failed")


class HarvestCheckpoint(models.Model):
    """Where the harvest of one archive, over one date range, has got to.

    Studies are harvested in (study date, study UID) order; the cursor is the last study
    whose manifest is committed. A run that finds its checkpoint ``running`` (interrupted)
    resumes after the cursor, over either transport (the archive's studies, and their order,
    are the same over both); one that finds it ``completed`` starts again from the top.
    """

    institution = models.ForeignKey(Institution, on_delete=models.PROTECT, related_name="+")
    transport = models.CharField(max_length=8, help_text=_("the last run's"))
    date_range = models.CharField(max_length=32, help_text=_("since..until, empty for open"))
    status = models.CharField(max_length=16, choices=HarvestStatus.choices)
    cursor_study_date = models.DateField(null=True, blank=True)
    cursor_study_uid = models.CharField(max_length=64, blank=True, default="")
    counts = models.JSONField(default=dict)
    failed_studies = models.JSONField(
        default=list,
        blank=True,
        help_text=_(
            "Study Instance UIDs that failed and were not harvested since: a resumed run "
            "tries them again"
        ),
    )
    total = models.PositiveIntegerField(default=0)
    owner = models.CharField(
        max_length=255, blank=True, default="", help_text=_("host:pid of the run holding it")
    )
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["institution", "date_range"],
                name="broker_harvest_checkpoint_one_per_range",
            ),
            models.CheckConstraint(
                name="broker_harvest_status_valid",
                condition=Q(status__in=["running", "completed", "failed"]),
            ),
        ]

    def __str__(self) -> str:
        return f"harvest {self.transport} {self.date_range or '..'}: {self.status}"
