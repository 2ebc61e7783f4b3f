"""Reading sharing: tickets, the approver's inbox, token introspection, a ticket's story."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, QuerySet

from audit.events import EventCode, Outcome
from audit.models import AuditEvent
from audit.services import Actor, audit_record
from broker.models import (
    Institution,
    Manifest,
    ManifestInstance,
    ManifestSeries,
    ManifestStatus,
    Professional,
)
from sharing import tokens
from sharing.keystore import verification_keys
from sharing.models import AccessRequest, DutyShift, EmergencyReview, IssuedToken, RequestState
from sharing.permissions import may_answer, may_decide, tickets_user_may_decide

TICKET_RELATED = (
    "patient",
    "requester__user",
    "requester_institution",
    "recipient__user",
    "recipient_institution",
    "source_institution",
    "shift",
)


def tickets_of(*, professional: Professional) -> QuerySet[AccessRequest]:
    """The tickets someone asked for or received."""
    return (
        AccessRequest.objects.filter(Q(requester=professional) | Q(recipient=professional))
        .select_related(*TICKET_RELATED)
        .order_by("-created_at", "-id")
    )


def inbox(*, user: Any) -> QuerySet[AccessRequest]:
    """What waits for ``user``: requests to approve or deny, avis to answer."""
    decidable = tickets_user_may_decide(user).filter(state=RequestState.PENDING)
    to_answer = AccessRequest.objects.filter(
        purpose="avis",
        state=RequestState.APPROVED,
        answered_at__isnull=True,
        recipient__user=user,
    )
    ids = set(decidable.values_list("pk", flat=True)) | set(to_answer.values_list("pk", flat=True))
    return (
        AccessRequest.objects.filter(pk__in=ids)
        .select_related(*TICKET_RELATED)
        .order_by("created_at", "id")
    )


def may_see_ticket(user: Any, ticket: AccessRequest) -> bool:
    """The requester, the recipient, an approver, or whoever may revoke it."""
    from sharing.services import may_revoke

    professional = getattr(user, "professional", None) if getattr(user, "pk", None) else None
    if professional is not None and professional.pk in (ticket.requester_id, ticket.recipient_id):
        return True
    return may_answer(user, ticket) or may_decide(user, ticket) or may_revoke(user, ticket)


def ticket_story(*, ticket: AccessRequest) -> QuerySet[AuditEvent]:
    """Every audit event the ticket caused, in order (its correlation ID)."""
    return AuditEvent.objects.filter(correlation_id=ticket.public_id).order_by("sequence")


def emergency_reviews(*, institution_ids: list[int] | None) -> QuerySet[EmergencyReview]:
    """The break-the-glass queue: of the patients known at ``institution_ids`` (a DPO's),
    or all (None: the region's administrator)."""
    reviews = EmergencyReview.objects.select_related(
        "request__patient", "request__requester__user", "request__requester_institution"
    )
    if institution_ids is not None:
        reviews = reviews.filter(
            Q(request__requester_institution_id__in=institution_ids)
            | Q(request__patient__identifiers__institution_id__in=institution_ids)
        ).distinct()
    return reviews.order_by(F("reviewed_at").asc(nulls_first=True), "created_at", "id")


def shifts(*, institution_ids: list[int] | None) -> QuerySet[DutyShift]:
    found = DutyShift.objects.select_related("teleradiologist__user").prefetch_related(
        "institutions"
    )
    if institution_ids is not None:
        found = found.filter(institutions__in=institution_ids).distinct()
    return found.order_by("-starts_at", "-id")


# ---------------------------------------------------------------------------
# Introspection (RFC 7662) and Orthanc's authorization plugin


@dataclass(frozen=True)
class Introspection:
    answer: dict[str, Any]
    why: str
    issued: IssuedToken | None = None


def token_introspect(
    *, token: str, institution: Institution, actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    """RFC 7662 for ``institution``'s system: what the token is worth now, checked against the
    database (not the per-process revocation copy): signature, time, recorded issuance,
    revocation, the ticket's state and shift. Active only for an institution that holds one
    of the token's studies, and then about those studies only. Audited (the token's hash,
    never the token)."""
    return _introspect_audited(token, institution, actor, now).answer


def _introspect_audited(
    token: str, institution: Institution, actor: Actor, now: dt.datetime
) -> Introspection:
    found = _introspect(token, institution, now)
    issued = found.issued
    with transaction.atomic():
        audit_record(
            code=EventCode.TOKEN_INTROSPECT,
            actor=actor,
            now=now,
            outcome=Outcome.SUCCESS if found.answer["active"] else Outcome.MINOR_FAILURE,
            objects=(
                [{"type": "access-request", "id": str(issued.request.public_id)}] if issued else []
            ),
            correlation_id=issued.request.public_id if issued else None,
            purpose_of_use=issued.request.purpose if issued else "",
            details={
                "token_sha256": tokens.token_hash(token),
                "active": found.answer["active"],
                "why": found.why,
                "for": institution.finess,
            },
        )
    return found


def _introspect(token: str, institution: Institution, now: dt.datetime) -> Introspection:
    inactive = {"active": False}
    if not token.isascii():
        return Introspection(inactive, "token:invalid")
    try:
        claims = tokens.token_verify(
            token,
            public_keys=verification_keys(),
            issuer=settings.RELAIS_TOKEN_ISSUER,
            audience=settings.RELAIS_TOKEN_AUDIENCE,
            now=now,
        )
    except tokens.TokenError as exc:
        return Introspection(inactive, exc.code)
    issued = (
        IssuedToken.objects.select_related("request__shift")
        .filter(token_id=claims.token_id, token_sha256=tokens.token_hash(token))
        .first()
    )
    if issued is None:
        return Introspection(inactive, "token:not-issued")
    ticket = issued.request
    if issued.revoked_at is not None:
        return Introspection(inactive, "token:revoked", issued)
    if ticket.state != RequestState.APPROVED or (ticket.not_after and ticket.not_after <= now):
        return Introspection(inactive, f"ticket:{ticket.state}", issued)
    if ticket.shift is not None and ticket.shift.cancelled_at is not None:
        return Introspection(inactive, "duty:cancelled", issued)
    held = sorted(
        Manifest.objects.filter(
            source_institution=institution,
            status=ManifestStatus.APPROVED,
            source_identifier__patient_id=ticket.patient_id,
            study_instance_uid__in=claims.studies,
        )
        .values_list("study_instance_uid", flat=True)
        .distinct()
    )
    if not held:
        return Introspection(inactive, "token:not-your-studies", issued)
    answer = {
        "active": True,
        "token_type": tokens.TOKEN_TYPE,
        "iss": claims.issuer,
        "aud": claims.audience,
        "sub": claims.subject,
        "jti": claims.token_id,
        "iat": int(claims.issued_at.timestamp()),
        "nbf": int(claims.not_before.timestamp()),
        "exp": int(claims.expires_at.timestamp()),
        "scope": " ".join(f"study:{uid}" for uid in held),
        "studies": held,
        "purpose": claims.purpose,
        "ticket": claims.ticket,
    }
    return Introspection(answer, "active", issued)


def study_of_resource(
    level: str, dicom_uid: str, *, institution: Institution, patient_id: int
) -> str | None:
    """The Study Instance UID of a resource (Orthanc's levels) among the approved manifests
    ``institution`` published for the patient; None when unknown or ambiguous."""
    scope = {
        "source_institution": institution,
        "status": ManifestStatus.APPROVED,
        "source_identifier__patient_id": patient_id,
    }
    if level == "study":
        found = Manifest.objects.filter(study_instance_uid=dicom_uid, **scope).values_list(
            "study_instance_uid", flat=True
        )
    elif level == "series":
        found = ManifestSeries.objects.filter(
            series_instance_uid=dicom_uid, **{f"manifest__{k}": v for k, v in scope.items()}
        ).values_list("study_instance_uid", flat=True)
    elif level == "instance":
        found = ManifestInstance.objects.filter(
            sop_instance_uid=dicom_uid, **{f"series__manifest__{k}": v for k, v in scope.items()}
        ).values_list("series__study_instance_uid", flat=True)
    else:
        return None  # patient or system level: a token is about studies, never a whole patient
    studies = set(found[:2])
    return studies.pop() if len(studies) == 1 else None


def orthanc_validate(
    *, body: dict[str, Any], institution: Institution, actor: Actor, now: dt.datetime
) -> dict[str, Any]:
    """Orthanc's authorization plugin contract: ``POST`` of the resource and the token,
    answered ``{"granted": bool, "validity": seconds}``. Granted only to read (``get``) a
    study, series or instance of the token's studies that the calling archive itself holds
    for that patient; cached by Orthanc one second at most, so a revocation reaches it as
    fast as any gateway."""
    denied = {"granted": False, "validity": 0}
    token = str(body.get("token-value") or "").strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    if not token:
        return denied
    found = _introspect_audited(token, institution, actor, now)
    if not found.answer["active"] or found.issued is None:
        return denied
    if str(body.get("method") or "").lower() != "get":
        return denied  # a retrieval token reads; it never changes nor deletes
    study = study_of_resource(
        str(body.get("level") or ""),
        str(body.get("dicom-uid") or ""),
        institution=institution,
        patient_id=found.issued.request.patient_id,
    )
    if study is None or study not in found.answer["studies"]:
        return denied
    return {"granted": True, "validity": min(1, max(0, found.answer["exp"] - int(now.timestamp())))}
