"""The access decision: may this person have a retrieval token for these studies, now?

One function, :func:`access_decide`, composes in order: authentication, role,
relationship (care team, duty, approved ticket, emergency), object scope, and the
patient's consent (``consent.services.consent_decide_for_issuance``, which holds the
patient's row until the issuing transaction ends). It answers permit or deny with every
reason, and writes the decision to the audit trail in the caller's transaction, permit or
deny. Anything unexpected denies (fail closed), and that denial is audited too.

The caller (a service issuing a token) must not raise inside its transaction after a
denial, or the audit record would be rolled back with it: it returns the decision out of
the ``atomic`` block and refuses there.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from audit.events import EventCode, Outcome
from audit.services import Actor, PatientRef, audit_record
from broker.models import (
    CLINICAL_ROLES,
    Manifest,
    ManifestStatus,
    Membership,
    PatientIdentifier,
    Professional,
    Role,
)
from consent import policy
from consent.services import consent_decide_for_issuance
from sharing.models import AccessRequest, Purpose, RequestState

logger = logging.getLogger(__name__)

# Roles that never obtain a retrieval token, whatever other role the person also holds.
NEVER_TOKEN_ROLES = frozenset({Role.DPO, Role.INSTITUTION_ADMIN})
# Who may act, per purpose, at the institution the ticket names.
REQUESTER_ROLES: dict[str, frozenset[str]] = {
    Purpose.TREATMENT: frozenset({Role.REFERRING_DOCTOR, Role.RADIOLOGIST, Role.EMERGENCY_DOCTOR}),
    Purpose.AVIS: frozenset({Role.REFERRING_DOCTOR, Role.RADIOLOGIST, Role.EMERGENCY_DOCTOR}),
    Purpose.TELERADIOLOGY: frozenset({Role.TELERADIOLOGIST}),
}
# The recipient of an avis: a specialist (a radiologist, or a doctor of another speciality).
RECIPIENT_ROLES = frozenset({Role.RADIOLOGIST, Role.REFERRING_DOCTOR, Role.TELERADIOLOGIST})


def break_the_glass_roles() -> frozenset[str]:
    return frozenset(settings.RELAIS_BREAK_THE_GLASS_ROLES) & CLINICAL_ROLES


@dataclass(frozen=True)
class Reason:
    code: str
    text: str


@dataclass(frozen=True)
class AccessDecision:
    permit: bool
    reasons: tuple[Reason, ...]
    relationship: str = ""
    studies: tuple[str, ...] = ()  # what a permit covers (consent obligations applied)
    not_after: dt.datetime | None = None  # no token outlives it
    consent: policy.Decision | None = field(default=None, compare=False)

    @property
    def code(self) -> str:
        """The code of the rule that decided (the first reason's)."""
        return self.reasons[0].code if self.reasons else "sharing:decision:error"


class _Deny(Exception):
    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.reason = Reason(code, text)


def _rows(sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    """Plain SQL for the decision's hot reads: every access decision runs them, and the
    ORM's own cost was about a millisecond of this machine's CPU per query against a fifth
    of that for the query itself (docs/performance.md). Text and integers only."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def professional_of(user: Any) -> Professional | None:
    if not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        return None
    return getattr(user, "professional", None) if getattr(user, "pk", None) else None


def active_memberships(professional: Professional) -> list[Membership]:
    return list(
        Membership.objects.filter(
            professional=professional, active=True, institution__active=True
        ).select_related("institution")
    )


def policy_professional_id(professional: Professional) -> str:
    """How the consent policy names a professional (directives of scope professional)."""
    return professional.rpps or f"account:{professional.user.get_username()}"


def institution_knows_patient(institution_id: int, patient_id: int) -> bool:
    """Care team: the institution holds the patient (an identifier of theirs is its IPP)."""
    return PatientIdentifier.objects.filter(
        patient_id=patient_id, institution_id=institution_id
    ).exists()


def access_decide(
    *,
    user: Any,
    ticket: AccessRequest,
    studies: Sequence[str] | None,
    actor: Actor,
    now: dt.datetime,
) -> AccessDecision:
    """Whether ``user`` may have a token for ``studies`` (None: all) of ``ticket``, now.

    Runs inside the issuing transaction; audits its answer there (``sharing:access:decide``).
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("access_decide runs inside the issuing transaction")
    identifiers = PatientIdentifiers.of(ticket.patient_id)
    try:
        with transaction.atomic():  # a savepoint: a database error leaves the audit possible
            decision = _decide(user, ticket, studies, identifiers, now)
    except _Deny as refusal:
        decision = AccessDecision(False, (refusal.reason,))
    except Exception:  # fail closed: an error is a denial, recorded as such
        logger.exception("access decision failed for ticket %s", ticket.public_id)
        decision = AccessDecision(
            False, (Reason("sharing:decision:error", "the decision could not be made"),)
        )
    _audit(decision, ticket, studies, identifiers.ref(ticket.patient), actor, now)
    return decision


@dataclass(frozen=True)
class PatientIdentifiers:
    """A patient's identifiers, read once: the audit's view of the patient, and where the
    patient is known (the care team)."""

    rows: tuple[tuple[str, str, str, int | None], ...]

    @classmethod
    def of(cls, patient_id: int) -> PatientIdentifiers:
        return cls(
            tuple(
                _rows(
                    "SELECT issuer, value, kind, institution_id FROM broker_patientidentifier "
                    "WHERE patient_id = %s ORDER BY id",
                    [patient_id],
                )
            )
        )

    def known_at(self, institution_id: int | None) -> bool:
        return institution_id is not None and any(row[3] == institution_id for row in self.rows)

    def ref(self, patient: Any) -> PatientRef:
        return PatientRef(
            patient_id=str(patient.public_id),
            identifiers=tuple(
                {"issuer": issuer, "value": value, "kind": kind}
                for issuer, value, kind, _ in self.rows
            ),
        )


def _decide(
    user: Any,
    ticket: AccessRequest,
    studies: Sequence[str] | None,
    identifiers: PatientIdentifiers,
    now: dt.datetime,
) -> AccessDecision:
    professional = professional_of(user)
    if professional is None or getattr(user, "is_superuser", False):
        raise _Deny("sharing:auth:not-a-professional", "not a signed-in professional")
    memberships = _rows(
        "SELECT m.institution_id, i.finess, m.role FROM broker_membership m "
        "JOIN broker_institution i ON i.id = m.institution_id "
        "WHERE m.professional_id = %s AND m.active AND i.active",
        [professional.pk],
    )
    never = {role for _, _, role in memberships} & NEVER_TOKEN_ROLES
    if never or professional.is_region_admin:
        what = ", ".join(sorted(never)) or "regional administrator"
        raise _Deny("sharing:role:never-token", f"a {what} never obtains a retrieval token")

    holder = ticket.recipient_id if ticket.purpose == Purpose.AVIS else ticket.requester_id
    if holder != professional.pk:
        raise _Deny("sharing:relationship:not-holder", "the ticket is not addressed to you")
    acting_at = (
        ticket.recipient_institution_id
        if ticket.purpose == Purpose.AVIS
        else ticket.requester_institution_id
    )
    allowed = (
        RECIPIENT_ROLES
        if ticket.purpose == Purpose.AVIS
        else break_the_glass_roles()
        if ticket.purpose == Purpose.EMERGENCY
        else REQUESTER_ROLES[ticket.purpose]
    )
    if not any(at == acting_at and role in allowed for at, _, role in memberships):
        raise _Deny(
            "sharing:role:not-allowed",
            f"no role at the ticket's institution allows {ticket.purpose} access",
        )

    if ticket.state != RequestState.APPROVED:
        raise _Deny("sharing:ticket:not-approved", f"the ticket is {ticket.state}")
    not_after = ticket.not_after
    if not_after is None or not_after <= now:
        raise _Deny("sharing:ticket:ended", "the ticket's grant has ended")
    shift = ticket.shift
    if ticket.purpose == Purpose.TELERADIOLOGY:
        if shift is None or shift.cancelled_at is not None:
            raise _Deny("sharing:duty:no-shift", "no duty shift (cancelled)")
        if not (shift.starts_at <= now < shift.ends_at):
            raise _Deny("sharing:duty:off-shift", "outside the duty shift")
        if shift.teleradiologist_id != professional.pk:
            raise _Deny("sharing:duty:not-on-duty", "the shift is someone else's")
        not_after = min(not_after, shift.ends_at)

    relationship = ticket_relationship(ticket, identifiers.known_at(acting_at))
    refs = _scope(ticket, studies)
    consent = consent_decide_for_issuance(
        patient=ticket.patient,
        requester=policy.Requester(
            policy_professional_id(professional),
            next(finess for at, finess, _ in memberships if at == acting_at),
        ),
        relationship=relationship,
        purpose=policy.Purpose(ticket.purpose),
        studies=refs,
        now=now,
    )
    consent_reasons = tuple(Reason(r.rule.value, r.text) for r in consent.reasons)
    if not consent.permit:
        return AccessDecision(False, consent_reasons, relationship.value, consent=consent)
    return AccessDecision(
        True,
        (
            Reason("sharing:access:permit", f"{ticket.purpose} ticket, {relationship.value}"),
            *consent_reasons,
        ),
        relationship.value,
        consent.studies,
        not_after,
        consent,
    )


def ticket_relationship(ticket: AccessRequest, known_where_acting: bool) -> policy.Relationship:
    """How the ticket's holder stands to the patient (``known_where_acting``: the patient is
    known at the institution the holder acts for)."""
    if ticket.purpose == Purpose.AVIS:
        return policy.Relationship.AVIS_RECIPIENT
    if ticket.purpose == Purpose.TELERADIOLOGY:
        return policy.Relationship.DUTY
    if known_where_acting:
        return policy.Relationship.CARE_TEAM
    return policy.Relationship.NONE


def ticket_studies(ticket: AccessRequest) -> list[policy.StudyRef]:
    """The studies a ticket reaches, as the consent policy names them (plain rows)."""
    if ticket.purpose != Purpose.TELERADIOLOGY:
        sql = (
            "SELECT m.study_instance_uid, i.finess FROM broker_manifest m "
            "JOIN broker_patientidentifier p ON p.id = m.source_identifier_id "
            "JOIN broker_institution i ON i.id = m.source_institution_id "
            "WHERE p.patient_id = %s AND m.status = %s"
        )
        params: list[object] = [ticket.patient_id, ManifestStatus.APPROVED.value]
        if not ticket.all_studies:
            if not ticket.studies:
                return []
            sql += f" AND m.study_instance_uid IN ({', '.join(['%s'] * len(ticket.studies))})"
            params.extend(ticket.studies)
        if ticket.source_institution_id is not None:
            sql += " AND m.source_institution_id = %s"
            params.append(ticket.source_institution_id)
        return [policy.StudyRef(uid, finess) for uid, finess in _rows(sql, params)]
    return [
        policy.StudyRef(m.study_instance_uid, m.source_institution.finess)
        for m in ticket_manifests(ticket)
    ]


def ticket_manifests(ticket: AccessRequest) -> list[Manifest]:
    """The approved manifests a ticket reaches: its studies (or all the patient's, from its
    source when named); for a duty ticket, those of the covered institutions made during the
    shift."""
    manifests = (
        Manifest.objects.filter(
            source_identifier__patient_id=ticket.patient_id, status=ManifestStatus.APPROVED
        )
        .select_related("source_institution")
        .defer("kos_bytes")
    )
    if not ticket.all_studies:
        manifests = manifests.filter(study_instance_uid__in=ticket.studies)
    if ticket.source_institution_id is not None:
        manifests = manifests.filter(source_institution_id=ticket.source_institution_id)
    if ticket.purpose == Purpose.TELERADIOLOGY and ticket.shift is not None:
        covered = set(ticket.shift.institutions.values_list("pk", flat=True))
        return [
            m
            for m in manifests.filter(source_institution_id__in=covered)
            if _during(m, ticket.shift.starts_at, ticket.shift.ends_at)
        ]
    return list(manifests)


def _during(manifest: Manifest, start: dt.datetime, end: dt.datetime) -> bool:
    """A study of the shift's period: its date and time (local time of the region), or,
    without both, when its manifest reached the registry."""
    if manifest.study_date is None or manifest.study_time is None:
        moment = manifest.registered_at  # undated or untimed: when it reached the registry
    else:
        moment = timezone.make_aware(dt.datetime.combine(manifest.study_date, manifest.study_time))
    return start <= moment < end


def _scope(ticket: AccessRequest, studies: Sequence[str] | None) -> tuple[policy.StudyRef, ...]:
    reachable = {ref.study_instance_uid: ref for ref in ticket_studies(ticket)}
    if studies is not None:
        outside = sorted(set(studies) - set(reachable))
        if outside:
            raise _Deny(
                "sharing:scope:outside-ticket",
                f"not within the ticket: {', '.join(outside[:5])}",
            )
        reachable = {uid: reachable[uid] for uid in studies}
    if not reachable:
        raise _Deny("sharing:scope:no-study", "no registered study within the ticket")
    return tuple(reachable[uid] for uid in sorted(reachable))


def _audit(
    decision: AccessDecision,
    ticket: AccessRequest,
    studies: Sequence[str] | None,
    patient: PatientRef,
    actor: Actor,
    now: dt.datetime,
) -> None:
    audit_record(
        code=EventCode.ACCESS_DECIDE,
        actor=actor,
        now=now,
        outcome=Outcome.SUCCESS if decision.permit else Outcome.MINOR_FAILURE,
        patient=patient,
        objects=[{"type": "access-request", "id": str(ticket.public_id)}],
        purpose_of_use=ticket.purpose,
        correlation_id=ticket.public_id,
        details={
            "permit": decision.permit,
            "reasons": [{"code": r.code, "text": r.text} for r in decision.reasons],
            "relationship": decision.relationship,
            "asked": sorted(studies) if studies is not None else "all",
            "studies": list(decision.studies),
            "excluded": sorted(decision.consent.excluded) if decision.consent else [],
            "not_after": decision.not_after.isoformat() if decision.not_after else None,
        },
    )
