"""The audit trail: one append-only table of hash-chained events.

Written only by :func:`audit.services.audit_record`. Each row carries what an IHE ATNA /
DICOM audit message (PS3.15 A.5) needs: EventIdentification (``event_id``, ``action``,
``recorded_at``, ``outcome``, ``event_type``), the requesting ActiveParticipant
(``actor_*``), ParticipantObjects (``patient_*`` and ``participant_objects``) and the
purpose of use; the stable ``code`` says which broker operation it was.

The database refuses UPDATE and DELETE (see :mod:`audit.triggers`); the model refuses
them too, so a mistake fails before reaching the database.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.functions import Length
from django.db.models.lookups import Exact

from audit.events import Action, Outcome
from audit.types import ActorKind, AuditImmutable

# Every column the hash covers: all of them but the two hashes. Adding a column means
# deciding how rows hashed before it verify (tests check this list is complete).
HASHED_FIELDS = (
    "sequence",
    "recorded_at",
    "code",
    "event_id",
    "event_type",
    "action",
    "outcome",
    "actor_kind",
    "actor_user_id",
    "actor_username",
    "actor_institution",
    "actor_role",
    "actor_address",
    "patient_id",
    "patient_identifiers",
    "participant_objects",
    "purpose_of_use",
    "correlation_id",
    "details",
)


class AuditEventQuerySet(models.QuerySet["AuditEvent"]):
    def update(self, **kwargs: Any) -> int:
        raise AuditImmutable("audit events are never updated")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AuditImmutable("audit events are never deleted")

    def bulk_create(self, *args: Any, **kwargs: Any) -> list[AuditEvent]:
        raise AuditImmutable("audit events are written one by one by audit_record")


class AuditEvent(models.Model):
    # The position in the one global chain: 1, 2, 3... with no gap.
    sequence = models.BigIntegerField(primary_key=True, editable=False)
    recorded_at = models.DateTimeField(help_text="When it happened (UTC).")
    code = models.CharField(
        max_length=64, help_text="Stable event code, source:subject:action (audit.events)."
    )
    event_id = models.CharField(
        max_length=16, help_text="DICOM EventID code value (DCM), e.g. 110107 Import."
    )
    event_type = models.CharField(
        max_length=16, blank=True, help_text="DICOM EventTypeCode value (DCM), if any."
    )
    action = models.CharField(max_length=1, choices=[(a.value, a.name.title()) for a in Action])
    outcome = models.SmallIntegerField(
        choices=[(o.value, o.name.replace("_", " ").title()) for o in Outcome]
    )

    actor_kind = models.CharField(max_length=16, choices=[(k.value, k.value) for k in ActorKind])
    actor_user_id = models.BigIntegerField(
        null=True, blank=True, help_text="The account's id when it acted (not a foreign key)."
    )
    actor_username = models.TextField(blank=True)
    actor_institution = models.TextField(blank=True, help_text="FINESS number(s).")
    actor_role = models.TextField(blank=True)
    actor_address = models.CharField(
        max_length=255, blank=True, help_text="Network access point: IP address or host name."
    )

    patient_id = models.CharField(
        max_length=64, blank=True, help_text="Regional patient id, for access reports."
    )
    patient_identifiers = models.JSONField(
        default=list, blank=True, help_text="[{issuer, value, kind}] known for the patient."
    )
    participant_objects = models.JSONField(
        default=list,
        blank=True,
        help_text='What the event was about: [{"type": "study", "uid": ..., ...}].',
    )
    purpose_of_use = models.CharField(max_length=64, blank=True)
    correlation_id = models.UUIDField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True)

    prev_hash = models.CharField(max_length=64, editable=False)
    hash = models.CharField(max_length=64, editable=False)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        db_table = "audit_auditevent"  # named in audit.triggers
        verbose_name = "audit event"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(sequence__gte=1), name="audit_auditevent_sequence_positive"
            ),
            models.CheckConstraint(
                condition=models.Q(outcome__in=[o.value for o in Outcome]),
                name="audit_auditevent_outcome_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(action__in=[a.value for a in Action]),
                name="audit_auditevent_action_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(actor_kind__in=[k.value for k in ActorKind]),
                name="audit_auditevent_actor_kind_valid",
            ),
            models.CheckConstraint(
                condition=~models.Q(actor_kind=ActorKind.USER.value)
                | models.Q(actor_user_id__isnull=False),
                name="audit_auditevent_user_actor_has_id",
            ),
            models.CheckConstraint(
                condition=Exact(Length("hash"), 64), name="audit_auditevent_hash_sha256"
            ),
            models.CheckConstraint(
                condition=Exact(Length("prev_hash"), 64),
                name="audit_auditevent_prev_hash_sha256",
            ),
        ]
        indexes = [
            # audit_events_for_patient: who accessed this patient's data, when (GDPR art. 15).
            models.Index(fields=["patient_id", "recorded_at"], name="audit_events_for_patient"),
            # audit_events_for_correlation: everything one request or exchange caused.
            models.Index(
                fields=["correlation_id"],
                name="audit_events_for_correlation",
                condition=models.Q(correlation_id__isnull=False),
            ),
            # audit_events_filter(actor_user_id=...): what one professional did (reviews).
            models.Index(
                fields=["actor_user_id", "recorded_at"],
                name="audit_events_by_actor",
                condition=models.Q(actor_user_id__isnull=False),
            ),
            # audit_events_filter(code=...): e.g. every refused key or break-the-glass.
            models.Index(fields=["code", "recorded_at"], name="audit_events_by_code"),
        ]

    def __str__(self) -> str:
        return f"#{self.sequence} {self.code} {self.recorded_at:%Y-%m-%d %H:%M:%S}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AuditImmutable(f"audit event {self.sequence} is recorded: it never changes")
        kwargs["force_insert"] = True
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AuditImmutable(f"audit event {self.sequence} is recorded: it is never deleted")

    def chain_record(self) -> dict[str, object]:
        """The hashed content (audit.chain), as stored."""
        return {name: getattr(self, name) for name in HASHED_FIELDS}
