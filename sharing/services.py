"""Sharing services: every step of a ticket, duty shifts, break-the-glass, tokens.

Each service checks who may act, changes the state in one transaction and writes its
audit event there, correlated by the ticket's ID. A refusal of access (a request or a
break-the-glass that may not be, a token denied) is audited too, in its own committed
transaction, before the error reaches the caller.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from audit.events import EventCode, Outcome
from audit.services import Actor, audit_record
from broker.errors import Conflict, DomainError, InvalidInput, NotFound, PermissionDenied
from broker.identity import patient_ref
from broker.models import (
    Institution,
    Manifest,
    ManifestStatus,
    Patient,
    Professional,
    Role,
)
from consent import policy
from consent.selectors import consent_evaluate
from consent.services import lock_patient_row
from sharing import permissions, tokens
from sharing.decision import (
    NEVER_TOKEN_ROLES,
    RECIPIENT_ROLES,
    REQUESTER_ROLES,
    AccessDecision,
    access_decide,
    active_memberships,
    break_the_glass_roles,
    institution_knows_patient,
    policy_professional_id,
    professional_of,
    ticket_relationship,
    ticket_studies,
)
from sharing.keystore import current_signing_key
from sharing.models import (
    TRANSITIONS,
    AccessRequest,
    DutyShift,
    EmergencyReview,
    IssuedToken,
    PatientNotification,
    Purpose,
    RequestState,
    ReviewOutcome,
    Revocation,
)

MAX_SHIFT = dt.timedelta(days=7)
MAX_SHIFT_BACKDATE = dt.timedelta(hours=1)
MAX_TEXT = 4000


class AccessRefused(PermissionDenied):
    """A refused access decision; ``decision`` holds every reason."""

    def __init__(self, decision: AccessDecision) -> None:
        super().__init__(
            "; ".join(r.text for r in decision.reasons) or "access denied",
            code=decision.code,
            reasons=[{"code": r.code, "text": r.text} for r in decision.reasons],
        )
        self.decision = decision


# ---------------------------------------------------------------------------
# Requests


def request_create(
    *,
    user: Any,
    purpose: str,
    patient: Patient,
    institution: Institution,
    studies: Sequence[str] | None,
    justification: str,
    question: str = "",
    recipient: Professional | None = None,
    recipient_institution: Institution | None = None,
    source_institution: Institution | None = None,
    actor: Actor,
    now: dt.datetime,
) -> AccessRequest:
    """Open a ticket (avis, treatment, teleradiology) acting at ``institution``.

    Treatment within the care team, and teleradiology during the requester's shift, are
    approved by the regional policy at once; otherwise the ticket waits for its approver
    (the avis's recipient, or a radiologist of the source institution).
    """
    if purpose not in REQUESTER_ROLES:
        raise InvalidInput(
            f"purpose {purpose!r}: one of {', '.join(sorted(REQUESTER_ROLES))} "
            "(an emergency is a break-the-glass)",
            code="sharing:request:purpose",
        )
    professional = _acting_professional(
        user, institution, REQUESTER_ROLES[purpose], patient, purpose, actor, now
    )
    justification = _text("justification", justification, required=True)
    question = _text("question", question, required=purpose == Purpose.AVIS)
    manifests = _named_manifests(patient, studies)
    shift = None
    if purpose == Purpose.TREATMENT:
        source_institution = _treatment_source(manifests, source_institution, studies)
    elif purpose == Purpose.AVIS:
        if not institution_knows_patient(institution.pk, patient.pk):
            # An avis is asked about one's own patient: its recipient reads as care team, so
            # asking it must not be a way round the consent outside the care team.
            _refuse(
                "sharing:avis:not-care-team",
                f"an avis is asked about a patient known at {institution.finess}",
                actor=actor,
                now=now,
                patient=patient,
                purpose=purpose,
            )
        recipient, recipient_institution = _avis_recipient(
            professional, recipient, recipient_institution
        )
        source_institution = None
    else:
        shift = _current_shift(professional, manifests, source_institution, now)
        if shift is None:
            _refuse(
                "sharing:duty:off-shift",
                "no duty shift of yours covers these studies now",
                actor=actor,
                now=now,
                patient=patient,
                purpose=purpose,
            )
    with transaction.atomic():
        ticket = AccessRequest.objects.create(
            purpose=purpose,
            state=RequestState.PENDING,
            patient=patient,
            all_studies=studies is None,
            studies=sorted(set(studies)) if studies is not None else [],
            source_institution=source_institution,
            requester=professional,
            requester_institution=institution,
            recipient=recipient,
            recipient_institution=recipient_institution,
            question=question,
            justification=justification,
            shift=shift,
            created_at=now,
        )
        _audit(EventCode.REQUEST_CREATE, ticket, actor, now, _ticket_details(ticket))
        if shift is not None:
            _approve(ticket, None, shift.ends_at, "during the duty shift", actor, now)
        elif (
            purpose == Purpose.TREATMENT
            and settings.RELAIS_AUTO_APPROVE_CARE_TEAM
            and institution_knows_patient(institution.pk, patient.pk)
        ):
            _approve_care_team(ticket, professional, actor, now)
        else:
            permissions.grant_decision(ticket)
    return ticket


def _approve_care_team(
    ticket: AccessRequest, professional: Professional, actor: Actor, now: dt.datetime
) -> None:
    """The care team is approved by the policy, unless the patient's directives deny."""
    refs = tuple(ticket_studies(ticket))
    consent = None
    if refs:  # none registered yet: each token's decision checks the studies it covers
        consent = consent_evaluate(
            patient=ticket.patient,
            requester=policy.Requester(
                policy_professional_id(professional), ticket.requester_institution.finess
            ),
            relationship=policy.Relationship.CARE_TEAM,
            purpose=policy.Purpose.TREATMENT,
            studies=refs,
            now=now,
        )
    if consent is None or consent.permit:
        end = now + dt.timedelta(days=settings.RELAIS_GRANT_DAYS)
        _approve(ticket, None, end, "care team", actor, now)
    else:
        ticket.decided_at = now
        ticket.automatic = True
        ticket.decision_note = "; ".join(r.text for r in consent.reasons)
        _move(ticket, RequestState.DENIED, actor, now, EventCode.REQUEST_DENY, by=None)


def request_approve(
    *, user: Any, ticket: AccessRequest, note: str = "", actor: Actor, now: dt.datetime
) -> AccessRequest:
    """The approver (the avis's recipient, a radiologist of the source) approves."""
    professional = _decider(user, ticket)
    with transaction.atomic():
        ticket = _locked(ticket)
        if ticket.created_at <= now - dt.timedelta(days=settings.RELAIS_REQUEST_PENDING_DAYS):
            raise Conflict(
                "the request waited too long: it has expired", code="sharing:request:state"
            )
        if ticket.purpose == Purpose.AVIS and ticket.recipient_id is None:
            ticket.recipient = professional  # who took the avis sent to the department
            ticket.save(update_fields=["recipient"])
            permissions.grant_taken(ticket, user)
        end = now + dt.timedelta(days=settings.RELAIS_GRANT_DAYS)
        _approve(ticket, professional, end, _text("note", note), actor, now)
    return ticket


def request_deny(
    *, user: Any, ticket: AccessRequest, note: str, actor: Actor, now: dt.datetime
) -> AccessRequest:
    professional = _decider(user, ticket)
    note = _text("note", note, required=True)
    with transaction.atomic():
        ticket = _locked(ticket)
        ticket.decided_at, ticket.decided_by, ticket.decision_note = now, professional, note
        _move(ticket, RequestState.DENIED, actor, now, EventCode.REQUEST_DENY, by=professional)
    return ticket


def request_cancel(
    *, user: Any, ticket: AccessRequest, note: str = "", actor: Actor, now: dt.datetime
) -> AccessRequest:
    """The requester withdraws the ticket (a break-the-glass ends here too)."""
    professional = professional_of(user)
    if professional is None or professional.pk != ticket.requester_id:
        raise NotFound("No such request")
    with transaction.atomic():
        ticket = _locked(ticket)
        ticket.end_reason = _text("note", note)
        _move(ticket, RequestState.CANCELLED, actor, now, EventCode.REQUEST_CANCEL, by=professional)
        _revoke_ticket_tokens(ticket, "cancelled", now)
        if ticket.purpose == Purpose.EMERGENCY:
            _audit(EventCode.EMERGENCY_STOP, ticket, actor, now, {"why": "stopped by the doctor"})
    return ticket


def request_revoke(
    *, user: Any, ticket: AccessRequest, reason: str, actor: Actor, now: dt.datetime
) -> AccessRequest:
    """End an approved ticket and every token issued under it (its approver, a DPO of an
    institution where the patient is known, the region's administrator)."""
    if not may_revoke(user, ticket):
        raise NotFound("No such request")
    reason = _text("reason", reason, required=True)
    with transaction.atomic():
        ticket = _locked(ticket)
        _revoke(ticket, reason, actor, now, by=getattr(user, "get_username", lambda: "")())
    return ticket


def may_revoke(user: Any, ticket: AccessRequest) -> bool:
    from broker.access import institutions_with_roles, is_region_admin

    if is_region_admin(user) or permissions.may_decide(user, ticket):
        return True
    dpo_at = institutions_with_roles(user, {Role.DPO})
    return bool(dpo_at) and ticket.patient.identifiers.filter(institution_id__in=dpo_at).exists()


def avis_answer(
    *, user: Any, ticket: AccessRequest, answer: str, actor: Actor, now: dt.datetime
) -> AccessRequest:
    """The specialist's written answer, attached to the ticket."""
    if ticket.purpose != Purpose.AVIS or not permissions.may_answer(user, ticket):
        raise NotFound("No such request")
    answer = _text("answer", answer, required=True, limit=20000)
    with transaction.atomic():
        ticket = _locked(ticket)
        if ticket.state != RequestState.APPROVED:
            raise Conflict(
                f"the avis is {ticket.state}: answer it once accepted",
                code="sharing:avis:not-accepted",
            )
        if ticket.answered_at is not None:
            raise Conflict("the avis is already answered", code="sharing:avis:answered")
        if ticket.not_after is not None and ticket.not_after <= now:
            raise Conflict("the avis has expired", code="sharing:request:state")
        ticket.answer, ticket.answered_at = answer, now
        ticket.answered_by = professional_of(user)
        ticket.save(update_fields=["answer", "answered_at", "answered_by"])
        _audit(EventCode.AVIS_ANSWER, ticket, actor, now, {"answer_length": len(answer)})
        # The avis ends with its answer: the specialist's access ends with it.
        ticket.end_reason = "answered"
        _move(ticket, RequestState.EXPIRED, actor, now, EventCode.REQUEST_EXPIRE, by=None)
        _revoke_ticket_tokens(ticket, "answered", now)
    return ticket


def requests_expire(*, now: dt.datetime, actor: Actor | None = None) -> int:
    """Move tickets past their end to expired (approved past ``not_after``, pending past
    the approver's delay); an emergency window that ends records its Override Stopped."""
    actor = actor or Actor.system("expire-requests")
    waited = now - dt.timedelta(days=settings.RELAIS_REQUEST_PENDING_DAYS)
    due = AccessRequest.objects.filter(
        Q(state=RequestState.APPROVED, not_after__lte=now)
        | Q(state=RequestState.PENDING, created_at__lte=waited)
    ).values_list("pk", flat=True)
    count = 0
    for pk in list(due):
        with transaction.atomic():
            ticket = AccessRequest.objects.select_for_update().get(pk=pk)
            if ticket.state not in (RequestState.APPROVED, RequestState.PENDING):
                continue
            ticket.end_reason = "the grant ended" if ticket.not_after else "never decided"
            _move(ticket, RequestState.EXPIRED, actor, now, EventCode.REQUEST_EXPIRE, by=None)
            if ticket.purpose == Purpose.EMERGENCY:
                _audit(EventCode.EMERGENCY_STOP, ticket, actor, now, {"why": "window ended"})
            count += 1
    return count


# ---------------------------------------------------------------------------
# Break-the-glass


def emergency_start(
    *,
    user: Any,
    patient: Patient,
    institution: Institution,
    justification: str,
    actor: Actor,
    now: dt.datetime,
) -> AccessRequest:
    """Emergency access to a patient's studies without consent (never against an
    opposition): a role the region allows, a written justification, a window of
    ``RELAIS_BREAK_THE_GLASS_HOURS``. Security Alert (Emergency Override Started), the DPO's
    review queue and a notification to the patient come with it."""
    professional = _acting_professional(
        user, institution, break_the_glass_roles(), patient, Purpose.EMERGENCY, actor, now
    )
    text = (justification or "").strip()
    minimum = settings.RELAIS_BREAK_THE_GLASS_MIN_JUSTIFICATION
    if len(text) < minimum:
        _refuse(
            "sharing:emergency:justification",
            f"a break-the-glass needs a written justification of {minimum} characters at least",
            actor=actor,
            now=now,
            patient=patient,
            purpose=Purpose.EMERGENCY,
            error=InvalidInput,
        )
    justification = _text("justification", text, required=True)
    knows = institution_knows_patient(institution.pk, patient.pk)
    relationship = policy.Relationship.CARE_TEAM if knows else policy.Relationship.NONE
    studies = tuple(
        policy.StudyRef(m.study_instance_uid, m.source_institution.finess)
        for m in Manifest.objects.filter(
            source_identifier__patient=patient, status=ManifestStatus.APPROVED
        ).select_related("source_institution")
    )
    if not studies:
        _refuse(
            "sharing:scope:no-study",
            "no registered study for this patient",
            actor=actor,
            now=now,
            patient=patient,
            purpose=Purpose.EMERGENCY,
            error=NotFound,
        )
    consent = consent_evaluate(
        patient=patient,
        requester=policy.Requester(policy_professional_id(professional), institution.finess),
        relationship=relationship,
        purpose=policy.Purpose.EMERGENCY,
        studies=studies,
        now=now,
    )
    if not consent.permit:
        _refuse(
            consent.rule.value,
            "; ".join(r.text for r in consent.reasons),
            actor=actor,
            now=now,
            patient=patient,
            purpose=Purpose.EMERGENCY,
        )
    window_end = now + dt.timedelta(hours=settings.RELAIS_BREAK_THE_GLASS_HOURS)
    with transaction.atomic():
        ticket = AccessRequest.objects.create(
            purpose=Purpose.EMERGENCY,
            state=RequestState.APPROVED,
            patient=patient,
            all_studies=True,
            requester=professional,
            requester_institution=institution,
            justification=justification,
            created_at=now,
            decided_at=now,
            automatic=True,
            not_after=window_end,
        )
        EmergencyReview.objects.create(request=ticket, created_at=now)
        PatientNotification.objects.create(
            patient=patient, request=ticket, kind="emergency-access", created_at=now
        )
        _audit(
            EventCode.EMERGENCY_START,
            ticket,
            actor,
            now,
            {
                **_ticket_details(ticket),
                "window_end": window_end.isoformat(),
                "consent_rule": consent.rule.value,
            },
        )
    return ticket


def emergency_review(
    *,
    user: Any,
    review: EmergencyReview,
    outcome: str,
    comment: str,
    actor: Actor,
    now: dt.datetime,
) -> EmergencyReview:
    """The DPO's review of a break-the-glass: justified or not, with a comment."""
    if outcome not in ReviewOutcome.values:
        raise InvalidInput(
            f"outcome: one of {', '.join(ReviewOutcome.values)}", code="sharing:review:outcome"
        )
    comment = _text("comment", comment, required=outcome == ReviewOutcome.UNJUSTIFIED)
    with transaction.atomic():
        review = EmergencyReview.objects.select_for_update().get(pk=review.pk)
        if review.reviewed_at is not None:
            raise Conflict("already reviewed", code="sharing:review:done")
        review.reviewed_at, review.reviewed_by = now, user.get_username()
        review.outcome, review.comment = outcome, comment
        review.save()
        _audit(
            EventCode.EMERGENCY_REVIEW,
            review.request,
            actor,
            now,
            {"outcome": outcome, "comment": comment},
        )
    return review


# ---------------------------------------------------------------------------
# Duty shifts


def shift_create(
    *,
    user: Any,
    teleradiologist: Professional,
    institutions: Sequence[Institution],
    starts_at: dt.datetime,
    ends_at: dt.datetime,
    agreement_reference: str,
    actor: Actor,
    now: dt.datetime,
) -> DutyShift:
    """Put a teleradiologist on duty for ``institutions`` (their administrators, each of
    the institutions, or the region's administrator)."""
    _require_admin_of(user, institutions)
    if not institutions:
        raise InvalidInput("a shift covers at least one institution", code="sharing:shift:empty")
    if ends_at <= starts_at:
        raise InvalidInput("a shift ends after it starts", code="sharing:shift:dates")
    if ends_at - starts_at > MAX_SHIFT:
        raise InvalidInput("a shift lasts 7 days at most", code="sharing:shift:dates")
    if ends_at <= now:
        raise InvalidInput("the shift is already over", code="sharing:shift:dates")
    if starts_at < now - MAX_SHIFT_BACKDATE:
        # A shift opens the studies of its period: recording one long after it began would
        # open past studies nobody read on duty.
        raise InvalidInput(
            "a shift starts at most an hour before it is recorded", code="sharing:shift:dates"
        )
    if not teleradiologist.memberships.filter(
        role=Role.TELERADIOLOGIST, active=True, institution__active=True
    ).exists():
        raise InvalidInput(
            f"{teleradiologist} is not a teleradiologist of the region",
            code="sharing:shift:not-teleradiologist",
        )
    reference = _text("agreement_reference", agreement_reference, required=True, limit=128)
    with transaction.atomic():
        shift = DutyShift.objects.create(
            teleradiologist=teleradiologist,
            starts_at=starts_at,
            ends_at=ends_at,
            agreement_reference=reference,
            created_by=user.get_username(),
            created_at=now,
        )
        shift.institutions.set(institutions)
        audit_record(
            code=EventCode.SHIFT_CREATE,
            actor=actor,
            now=now,
            objects=[{"type": "duty-shift", "id": str(shift.public_id)}],
            details=_shift_details(shift),
        )
    return shift


def shift_cancel(*, user: Any, shift: DutyShift, actor: Actor, now: dt.datetime) -> DutyShift:
    """Cancel a shift: its tickets are revoked with their tokens."""
    _require_admin_of(user, list(shift.institutions.all()))
    with transaction.atomic():
        shift = DutyShift.objects.select_for_update().get(pk=shift.pk)
        if shift.cancelled_at is not None:
            raise Conflict("the shift is already cancelled", code="sharing:shift:cancelled")
        tickets = list(
            shift.requests.select_for_update(of=("self",))
            .select_related("patient")
            .filter(state=RequestState.APPROVED)
            .order_by("pk")
        )  # rows locked before the audit chain's lock, as every sharing service does
        shift.cancelled_at, shift.cancelled_by = now, user.get_username()
        shift.save(update_fields=["cancelled_at", "cancelled_by"])
        audit_record(
            code=EventCode.SHIFT_CANCEL,
            actor=actor,
            now=now,
            objects=[{"type": "duty-shift", "id": str(shift.public_id)}],
            details=_shift_details(shift),
        )
        for ticket in tickets:
            _revoke(ticket, "the duty shift was cancelled", actor, now, by=user.get_username())
    return shift


def _require_admin_of(user: Any, institutions: Iterable[Institution]) -> None:
    from broker.access import institutions_with_roles, is_region_admin

    if is_region_admin(user):
        return
    administered = set(institutions_with_roles(user, {Role.INSTITUTION_ADMIN}))
    if not administered or not {i.pk for i in institutions} <= administered:
        raise PermissionDenied(
            "only the administrators of every covered institution manage its duty shifts",
            code="sharing:shift:not-admin",
        )


def _current_shift(
    professional: Professional,
    manifests: list[Manifest] | None,
    source: Institution | None,
    now: dt.datetime,
) -> DutyShift | None:
    sources = {m.source_institution_id for m in manifests} if manifests else set()
    if source is not None:
        sources.add(source.pk)
    if not sources:
        return None
    for shift in DutyShift.objects.filter(
        teleradiologist=professional,
        cancelled_at__isnull=True,
        starts_at__lte=now,
        ends_at__gt=now,
    ).prefetch_related("institutions"):
        if sources <= {i.pk for i in shift.institutions.all()}:
            return shift
    return None


# ---------------------------------------------------------------------------
# Tokens


def token_issue_for_ticket(
    *,
    user: Any,
    ticket: AccessRequest,
    studies: Sequence[str] | None = None,
    actor: Actor,
    now: dt.datetime,
) -> tuple[str, IssuedToken]:
    """A retrieval token for ``studies`` (None: all the ticket permits) of ``ticket``.

    The decision (with the consent evaluation, which holds the patient's row) and the
    token are one transaction; a denial is audited and committed, then refused.
    """
    if studies is not None and not studies:
        raise InvalidInput("name at least one study, or none for all", code="sharing:token:studies")
    try:
        token, issued, decision = _issue(user, ticket, studies, actor, now)
    except DomainError:
        raise
    except Exception:
        # Nothing was issued (the transaction rolled back, its permit with it): say so.
        _audit_refusal(
            "sharing:token:error",
            "the token could not be issued",
            actor,
            now,
            ticket.patient,
            ticket.purpose,
            outcome=Outcome.SERIOUS_FAILURE,
            ticket=ticket,
        )
        raise
    if not decision.permit:
        raise AccessRefused(decision)
    assert token is not None
    assert issued is not None
    return token, issued


def _issue(
    user: Any,
    ticket: AccessRequest,
    studies: Sequence[str] | None,
    actor: Actor,
    now: dt.datetime,
) -> tuple[str | None, IssuedToken | None, AccessDecision]:
    token: str | None = None
    issued: IssuedToken | None = None
    with transaction.atomic():
        # The patient's row first (as directive changes take it), then the ticket's: a
        # revocation or a consent change either commits first and is seen, or waits.
        lock_patient_row(ticket.patient_id)
        ticket = (
            AccessRequest.objects.select_for_update(of=("self",))
            .select_related("patient", "shift")
            .get(pk=ticket.pk)
        )
        decision = access_decide(user=user, ticket=ticket, studies=studies, actor=actor, now=now)
        if decision.permit:
            assert decision.not_after is not None
            key = current_signing_key()
            token, claims = tokens.token_issue(
                key=key,
                grant=tokens.Grant(
                    subject=user.get_username(),
                    studies=decision.studies,
                    purpose=ticket.purpose,
                    ticket=str(ticket.public_id),
                    not_after=decision.not_after,
                ),
                issuer=settings.RELAIS_TOKEN_ISSUER,
                audience=settings.RELAIS_TOKEN_AUDIENCE,
                now=now,
                lifetime=dt.timedelta(seconds=settings.RELAIS_TOKEN_LIFETIME_SECONDS),
            )
            issued = IssuedToken.objects.create(
                token_id=uuid.UUID(claims.token_id),
                request=ticket,
                subject=professional_of(user),
                token_sha256=tokens.token_hash(token),
                studies=list(claims.studies),
                issued_at=claims.issued_at,
                expires_at=claims.expires_at,
            )
            _audit(
                EventCode.TOKEN_ISSUE,
                ticket,
                actor,
                now,
                {
                    "token_sha256": issued.token_sha256,
                    "jti": claims.token_id,
                    "kid": key.kid,
                    "studies": list(claims.studies),
                    "expires_at": claims.expires_at.isoformat(),
                },
            )
    return token, issued, decision


def token_revoke(
    *, user: Any, issued: IssuedToken, reason: str, actor: Actor, now: dt.datetime
) -> IssuedToken:
    """Revoke one token (its holder, the ticket's requester or approver, a regional
    administrator)."""
    from broker.access import is_region_admin

    professional = professional_of(user)
    ticket = issued.request
    allowed = (
        is_region_admin(user)
        or (
            professional is not None and professional.pk in (issued.subject_id, ticket.requester_id)
        )
        or permissions.may_decide(user, ticket)
    )
    if not allowed:
        raise NotFound("No such token")
    reason = _text("reason", reason, required=True, limit=64)
    with transaction.atomic():
        issued = IssuedToken.objects.select_for_update().get(pk=issued.pk)
        if issued.revoked_at is None:
            issued.revoked_at = now
            issued.save(update_fields=["revoked_at"])
            Revocation.objects.create(token_id=issued.token_id, revoked_at=now, reason=reason)
            _audit(
                EventCode.TOKEN_REVOKE,
                ticket,
                actor,
                now,
                {"token_sha256": issued.token_sha256, "jti": str(issued.token_id), "why": reason},
            )
    return issued


# ---------------------------------------------------------------------------
# Consent changes (called inside the directive's transaction, see consent.signals)


def grants_recheck_consent(*, patient_id: int, now: dt.datetime) -> list[AccessRequest]:
    """Re-decide the patient's approved tickets on the directives just changed: a ticket
    now denied is revoked with its tokens; a token reaching a study now masked is revoked.
    Runs in the directive's transaction (which holds the patient's row), so both commit
    together or not at all. Tickets, then tokens, are locked before anything is audited:
    the order every sharing service takes (patient, ticket, token, audit chain)."""
    actor = Actor.system("consent-recheck")
    tickets = list(
        AccessRequest.objects.select_for_update(of=("self",))
        .select_related(
            "patient",
            "requester__user",
            "recipient__user",
            "requester_institution",
            "recipient_institution",
            "shift",
        )
        .filter(patient_id=patient_id, state=RequestState.APPROVED, not_after__gt=now)
        .order_by("pk")
    )
    live_tokens = list(
        IssuedToken.objects.select_for_update()
        .filter(request__in=tickets, revoked_at__isnull=True, expires_at__gt=now)
        .order_by("pk")
    )
    revoked = []
    for ticket in tickets:
        holder = ticket.recipient if ticket.purpose == Purpose.AVIS else ticket.requester
        acting_at = (
            ticket.recipient_institution
            if ticket.purpose == Purpose.AVIS
            else ticket.requester_institution
        )
        refs = tuple(ticket_studies(ticket))
        if holder is None or acting_at is None or not refs:
            continue
        relationship = ticket_relationship(
            ticket, institution_knows_patient(acting_at.pk, ticket.patient_id)
        )
        consent = consent_evaluate(
            patient=ticket.patient,
            requester=policy.Requester(policy_professional_id(holder), acting_at.finess),
            relationship=relationship,
            purpose=policy.Purpose(ticket.purpose),
            studies=refs,
            now=now,
        )
        if not consent.permit:
            _revoke(ticket, f"consent: {consent.rule.value}", actor, now, by="consent-recheck")
            revoked.append(ticket)
            continue
        for issued in live_tokens:
            if issued.request_id == ticket.pk and consent.excluded & set(issued.studies):
                issued.revoked_at = now
                issued.save(update_fields=["revoked_at"])
                Revocation.objects.create(
                    token_id=issued.token_id, revoked_at=now, reason="consent:mask"
                )
                _audit(
                    EventCode.TOKEN_REVOKE,
                    ticket,
                    actor,
                    now,
                    {"token_sha256": issued.token_sha256, "why": "a study is now masked"},
                )
    return revoked


# ---------------------------------------------------------------------------
# Helpers


def _acting_professional(
    user: Any,
    institution: Institution,
    roles: frozenset[str],
    patient: Patient,
    purpose: str,
    actor: Actor,
    now: dt.datetime,
) -> Professional:
    """The professional behind ``user``, holding one of ``roles`` at ``institution`` and
    none of the roles that never see images; a refusal is audited."""
    professional = professional_of(user)
    if professional is None:
        _refuse(
            "sharing:auth:not-a-professional", "not a professional", actor, now, patient, purpose
        )
    assert professional is not None
    memberships = active_memberships(professional)
    never = {m.role for m in memberships} & NEVER_TOKEN_ROLES
    if never or professional.is_region_admin:
        _refuse(
            "sharing:role:never-token",
            "a DPO or an administrator never obtains access to images",
            actor,
            now,
            patient,
            purpose,
        )
    if not any(m.institution_id == institution.pk and m.role in roles for m in memberships):
        _refuse(
            "sharing:role:not-allowed",
            f"no role of yours at {institution.finess} allows {purpose} access",
            actor,
            now,
            patient,
            purpose,
        )
    return professional


def _refuse(
    code: str,
    text: str,
    actor: Actor,
    now: dt.datetime,
    patient: Patient,
    purpose: str,
    error: type[DomainError] = PermissionDenied,
) -> None:
    """Audit a refused access (committed) and raise it."""
    _audit_refusal(code, text, actor, now, patient, purpose)
    raise error(text, code=code)


def _audit_refusal(
    code: str,
    text: str,
    actor: Actor,
    now: dt.datetime,
    patient: Patient,
    purpose: str,
    *,
    outcome: Outcome = Outcome.MINOR_FAILURE,
    ticket: AccessRequest | None = None,
) -> None:
    with transaction.atomic():
        audit_record(
            code=EventCode.ACCESS_DECIDE,
            actor=actor,
            now=now,
            outcome=outcome,
            patient=patient_ref(patient),
            purpose_of_use=purpose,
            objects=[{"type": "access-request", "id": str(ticket.public_id)}] if ticket else [],
            correlation_id=ticket.public_id if ticket else None,
            details={"permit": False, "reasons": [{"code": code, "text": text}]},
        )


def _named_manifests(patient: Patient, studies: Sequence[str] | None) -> list[Manifest] | None:
    if studies is None:
        return None
    wanted = set(studies)
    if not wanted:
        raise InvalidInput(
            "name the studies, or ask for all of the patient's", code="sharing:request:studies"
        )
    manifests = list(
        Manifest.objects.filter(
            source_identifier__patient=patient,
            status=ManifestStatus.APPROVED,
            study_instance_uid__in=wanted,
        ).select_related("source_institution")
    )
    unknown = wanted - {m.study_instance_uid for m in manifests}
    if unknown:
        raise InvalidInput(
            f"no registered study of this patient: {', '.join(sorted(unknown)[:5])}",
            code="sharing:request:unknown-study",
        )
    return manifests


def _treatment_source(
    manifests: list[Manifest] | None,
    source: Institution | None,
    studies: Sequence[str] | None,
) -> Institution:
    if manifests is not None:
        sources = {m.source_institution for m in manifests}
        if len(sources) > 1:
            raise InvalidInput(
                "a treatment request asks one source institution: split it",
                code="sharing:request:sources",
            )
        (held_by,) = sources
        if source is not None and source != held_by:
            raise InvalidInput(
                f"the studies are held by {held_by.finess}", code="sharing:request:sources"
            )
        return held_by
    if source is None:
        raise InvalidInput(
            "asking for all the patient's studies names the institution that holds them",
            code="sharing:request:source",
        )
    return source


def _avis_recipient(
    requester: Professional,
    recipient: Professional | None,
    institution: Institution | None,
) -> tuple[Professional | None, Institution]:
    if recipient is None:
        if institution is None:
            raise InvalidInput(
                "an avis names its recipient: a specialist or an institution's department",
                code="sharing:avis:recipient",
            )
        return None, institution
    if recipient.pk == requester.pk:
        raise InvalidInput("an avis is asked of someone else", code="sharing:avis:recipient")
    places = {
        m.institution
        for m in active_memberships(recipient)
        if m.role in RECIPIENT_ROLES and (institution is None or m.institution == institution)
    }
    if len(places) != 1:
        raise InvalidInput(
            f"{recipient} is not a specialist"
            + (f" at {institution.finess}" if institution else " of one institution: name it"),
            code="sharing:avis:recipient",
        )
    return recipient, places.pop()


def _decider(user: Any, ticket: AccessRequest) -> Professional:
    professional = professional_of(user)
    if professional is None or not permissions.may_decide(user, ticket):
        raise NotFound("No such request")
    if professional.pk == ticket.requester_id:
        raise PermissionDenied("nobody approves their own request", code="sharing:request:own")
    return professional


def _locked(ticket: AccessRequest) -> AccessRequest:
    return (
        AccessRequest.objects.select_for_update(of=("self",))
        .select_related("patient", "requester_institution", "recipient_institution", "shift")
        .get(pk=ticket.pk)
    )


def _approve(
    ticket: AccessRequest,
    by: Professional | None,
    end: dt.datetime,
    note: str,
    actor: Actor,
    now: dt.datetime,
) -> None:
    ticket.decided_at, ticket.decided_by, ticket.decision_note = now, by, note
    ticket.automatic = by is None
    ticket.not_after = end
    _move(ticket, RequestState.APPROVED, actor, now, EventCode.REQUEST_APPROVE, by=by)


def _move(
    ticket: AccessRequest,
    state: str,
    actor: Actor,
    now: dt.datetime,
    code: EventCode,
    *,
    by: Professional | None,
) -> None:
    if state not in TRANSITIONS[ticket.state]:
        raise Conflict(
            f"the request is {ticket.state}: it cannot become {state}",
            code="sharing:request:state",
        )
    previous = ticket.state
    ticket.state = state
    if state in (RequestState.CANCELLED, RequestState.EXPIRED, RequestState.REVOKED):
        ticket.ended_at = now
        ticket.ended_by = by.user.get_username() if by else actor.username
    ticket.save()
    _audit(
        code,
        ticket,
        actor,
        now,
        {
            "from": previous,
            "to": state,
            "automatic": by is None and state != RequestState.CANCELLED,
            "not_after": ticket.not_after.isoformat() if ticket.not_after else None,
            "note": ticket.decision_note if code != EventCode.REQUEST_REVOKE else ticket.end_reason,
        },
    )


def _revoke(ticket: AccessRequest, reason: str, actor: Actor, now: dt.datetime, *, by: str) -> None:
    ticket.end_reason = reason
    _move(ticket, RequestState.REVOKED, actor, now, EventCode.REQUEST_REVOKE, by=None)
    ticket.ended_by = by
    ticket.save(update_fields=["ended_by"])
    _revoke_ticket_tokens(ticket, reason[:64], now)
    if ticket.purpose == Purpose.EMERGENCY:
        _audit(EventCode.EMERGENCY_STOP, ticket, actor, now, {"why": f"revoked: {reason}"})


def _revoke_ticket_tokens(ticket: AccessRequest, reason: str, now: dt.datetime) -> None:
    ticket.tokens.filter(revoked_at__isnull=True).update(revoked_at=now)
    Revocation.objects.create(request_id=ticket.public_id, revoked_at=now, reason=reason[:64])


def _audit(
    code: EventCode,
    ticket: AccessRequest,
    actor: Actor,
    now: dt.datetime,
    details: dict[str, Any],
) -> None:
    audit_record(
        code=code,
        actor=actor,
        now=now,
        patient=patient_ref(ticket.patient),
        objects=[{"type": "access-request", "id": str(ticket.public_id)}],
        purpose_of_use=ticket.purpose,
        correlation_id=ticket.public_id,
        details=details,
    )


def _ticket_details(ticket: AccessRequest) -> dict[str, Any]:
    return {
        "purpose": ticket.purpose,
        "studies": "all" if ticket.all_studies else list(ticket.studies),
        "source": ticket.source_institution.finess if ticket.source_institution else None,
        "requester": ticket.requester.user.get_username(),
        "requester_institution": ticket.requester_institution.finess,
        "recipient": ticket.recipient.user.get_username() if ticket.recipient else None,
        "recipient_institution": (
            ticket.recipient_institution.finess if ticket.recipient_institution else None
        ),
        "shift": str(ticket.shift.public_id) if ticket.shift else None,
        "justification": ticket.justification,
    }


def _shift_details(shift: DutyShift) -> dict[str, Any]:
    return {
        "teleradiologist": shift.teleradiologist.user.get_username(),
        "institutions": sorted(i.finess for i in shift.institutions.all()),
        "starts_at": shift.starts_at.isoformat(),
        "ends_at": shift.ends_at.isoformat(),
        "agreement": shift.agreement_reference,
        "cancelled_at": shift.cancelled_at.isoformat() if shift.cancelled_at else None,
    }


def _text(name: str, value: str, *, required: bool = False, limit: int = MAX_TEXT) -> str:
    text = (value or "").strip()
    if required and not text:
        raise InvalidInput(f"{name} is required", code=f"sharing:request:{name}")
    if len(text) > limit:
        raise InvalidInput(f"{name} is longer than {limit} characters", code="sharing:request:long")
    return text
