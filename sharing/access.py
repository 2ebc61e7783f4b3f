"""Gates of the sharing interfaces: the same 404 for "missing" and "not yours"."""

from __future__ import annotations

from typing import Any

from broker.access import institutions_with_roles, is_region_admin, memberships_of
from broker.errors import InvalidInput, NotFound, PermissionDenied
from broker.models import CLINICAL_ROLES, Institution, Patient, Professional, Role
from sharing.models import AccessRequest, DutyShift, EmergencyReview, IssuedToken
from sharing.selectors import TICKET_RELATED, may_see_ticket


def access_ticket(user: Any, public_id: object) -> AccessRequest:
    ticket = (
        AccessRequest.objects.select_related(*TICKET_RELATED).filter(public_id=public_id).first()
    )
    if ticket is None or not may_see_ticket(user, ticket):
        raise NotFound("No such request")
    return ticket


def access_patient_for_request(user: Any, public_id: object) -> Patient:
    """Any clinician of the region may name a patient (by the regional ID) in a request; the
    decision, not the gate, says whether anything is shared."""
    if not institutions_with_roles(user, CLINICAL_ROLES):
        raise NotFound("No such patient")
    patient = Patient.objects.filter(public_id=public_id).first()
    if patient is None:
        raise NotFound("No such patient")
    return patient


def acting_institution(user: Any, finess: str | None, roles: frozenset[str]) -> Institution:
    """The institution the caller acts at: the one named, or their only one with ``roles``."""
    places = [m.institution for m in memberships_of(user) if m.role in roles]
    if finess:
        for institution in places:
            if institution.finess == finess:
                return institution
        found = Institution.objects.filter(finess=finess).first()
        if found is None:
            raise InvalidInput(f"No institution with FINESS {finess}", code="sharing:institution")
        return found  # the service refuses (and audits) a role the caller does not hold there
    unique = {i.pk: i for i in places}
    if len(unique) != 1:
        raise InvalidInput(
            "name the institution you act for (FINESS)", code="sharing:institution:ambiguous"
        )
    return next(iter(unique.values()))


def named_institution(finess: str | None) -> Institution | None:
    if not finess:
        return None
    institution = Institution.objects.filter(finess=finess, active=True).first()
    if institution is None:
        raise InvalidInput(f"No institution with FINESS {finess}", code="sharing:institution")
    return institution


def named_professional(rpps: str | None) -> Professional | None:
    if not rpps:
        return None
    professional = Professional.objects.select_related("user").filter(rpps=rpps).first()
    if professional is None:
        raise InvalidInput(f"No professional with RPPS {rpps}", code="sharing:professional")
    return professional


def access_issued_token(user: Any, *, token_id: object = None, sha256: str = "") -> IssuedToken:
    found = IssuedToken.objects.select_related("request__patient")
    issued = (
        found.filter(token_id=token_id).first()
        if token_id is not None
        else found.filter(token_sha256=sha256).first()
    )
    if issued is None:
        raise NotFound("No such token")
    return issued


def dpo_scope(user: Any) -> list[int] | None:
    """The institutions whose emergency accesses a DPO reviews (None: the whole region)."""
    if is_region_admin(user):
        return None
    institutions = institutions_with_roles(user, {Role.DPO})
    if not institutions:
        raise NotFound("Not found")
    return institutions


def access_review(user: Any, review_id: int) -> EmergencyReview:
    from sharing.selectors import emergency_reviews

    review = emergency_reviews(institution_ids=dpo_scope(user)).filter(pk=review_id).first()
    if review is None:
        raise NotFound("No such review")
    return review


def shift_scope(user: Any) -> list[int] | None:
    """The institutions whose shifts an administrator manages (None: the whole region)."""
    if is_region_admin(user):
        return None
    institutions = institutions_with_roles(user, {Role.INSTITUTION_ADMIN})
    if not institutions:
        raise PermissionDenied("Duty shifts are managed by administrators")
    return institutions


def access_shift(user: Any, public_id: object) -> DutyShift:
    from sharing.selectors import shifts

    shift = shifts(institution_ids=shift_scope(user)).filter(public_id=public_id).first()
    if shift is None:
        raise NotFound("No such shift")
    return shift
