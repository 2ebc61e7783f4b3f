"""Reading sharing: tickets, the approver's inbox, token introspection, a ticket's story."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet

from audit.events import EventCode, Outcome
from audit.models import AuditEvent
from audit.services import Actor, audit_record
from broker.models import ManifestInstance, ManifestSeries, Professional
from sharing import tokens
from sharing.keystore import verification_keys
from sharing.models import AccessRequest, DutyShift, EmergencyReview, IssuedToken, RequestState
from sharing.permissions import ANSWER, tickets_user_may_decide

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
    return bool(user.has_perm(ANSWER, ticket)) or may_revoke(user, ticket)


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
    return reviews.order_by("reviewed_at", "created_at", "id")


def shifts(*, institution_ids: list[int] | None) -> QuerySet[DutyShift]:
    found = DutyShift.objects.select_related("teleradiologist__user").prefetch_related(
        "institutions"
    )
    if institution_ids is not None:
        found = found.filter(institutions__in=institution_ids).distinct()
    return found.order_by("-starts_at", "-id")


# ---------------------------------------------------------------------------
# Introspection (RFC 7662) and Orthanc's authorization plugin


def token_introspect(*, token: str, actor: Actor, now: dt.datetime) -> dict[str, Any]:
    """What a token is worth now, checked against the database (not the per-process
    revocation copy): signature, time, recorded issuance, revocation, the ticket's state.
    Audited (the token's hash, never the token)."""
    answer, why, issued = _introspect(token, now)
    with transaction.atomic():
        audit_record(
            code=EventCode.TOKEN_INTROSPECT,
            actor=actor,
            now=now,
            outcome=Outcome.SUCCESS if answer["active"] else Outcome.MINOR_FAILURE,
            objects=(
                [{"type": "access-request", "id": str(issued.request.public_id)}] if issued else []
            ),
            correlation_id=issued.request.public_id if issued else None,
            purpose_of_use=issued.request.purpose if issued else "",
            details={
                "token_sha256": tokens.token_hash(token),
                "active": answer["active"],
                "why": why,
            },
        )
    return answer


def _introspect(token: str, now: dt.datetime) -> tuple[dict[str, Any], str, IssuedToken | None]:
    try:
        claims = tokens.token_verify(
            token,
            public_keys=verification_keys(),
            issuer=settings.RELAIS_TOKEN_ISSUER,
            audience=settings.RELAIS_TOKEN_AUDIENCE,
            now=now,
        )
    except tokens.TokenError as exc:
        return {"active": False}, exc.code, None
    issued = (
        IssuedToken.objects.select_related("request__shift")
        .filter(token_id=claims.token_id, token_sha256=tokens.token_hash(token))
        .first()
    )
    if issued is None:
        return {"active": False}, "token:not-issued", None
    ticket = issued.request
    if issued.revoked_at is not None:
        return {"active": False}, "token:revoked", issued
    if ticket.state != RequestState.APPROVED or (ticket.not_after and ticket.not_after <= now):
        return {"active": False}, f"ticket:{ticket.state}", issued
    if ticket.shift is not None and ticket.shift.cancelled_at is not None:
        return {"active": False}, "duty:cancelled", issued
    return (
        {
            "active": True,
            "token_type": tokens.TOKEN_TYPE,
            "iss": claims.issuer,
            "aud": claims.audience,
            "sub": claims.subject,
            "jti": claims.token_id,
            "iat": int(claims.issued_at.timestamp()),
            "nbf": int(claims.not_before.timestamp()),
            "exp": int(claims.expires_at.timestamp()),
            "scope": " ".join(f"study:{uid}" for uid in claims.studies),
            "studies": list(claims.studies),
            "purpose": claims.purpose,
            "ticket": claims.ticket,
        },
        "active",
        issued,
    )


def study_of_resource(level: str, dicom_uid: str) -> str | None:
    """The Study Instance UID of a DICOM resource the registry knows (Orthanc's levels)."""
    if level == "study":
        return dicom_uid
    if level == "series":
        return (
            ManifestSeries.objects.filter(series_instance_uid=dicom_uid)
            .values_list("study_instance_uid", flat=True)
            .first()
        )
    if level == "instance":
        return (
            ManifestInstance.objects.filter(sop_instance_uid=dicom_uid)
            .values_list("series__study_instance_uid", flat=True)
            .first()
        )
    return None  # patient or system level: a token is about studies, never a whole patient


def orthanc_validate(*, body: dict[str, Any], actor: Actor, now: dt.datetime) -> dict[str, Any]:
    """Orthanc's authorization plugin contract: ``POST`` of the resource and the token,
    answered ``{"granted": bool, "validity": seconds}``. Granted only when the token is
    active and its scope holds the study of the resource; cached by Orthanc at most one
    second, so a revocation reaches it as fast as any gateway."""
    token = str(body.get("token-value") or "")
    introspection = token_introspect(token=token, actor=actor, now=now) if token else {}
    if not introspection.get("active"):
        return {"granted": False, "validity": 0}
    study = study_of_resource(str(body.get("level") or ""), str(body.get("dicom-uid") or ""))
    granted = study is not None and study in introspection["studies"]
    validity = min(1, max(0, introspection["exp"] - int(now.timestamp())))
    return {"granted": granted, "validity": validity if granted else 0}
