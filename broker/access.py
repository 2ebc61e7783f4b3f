"""Who is calling, and the gates through which views reach registry objects.

A view never queries a protected model directly: it asks a gate, which answers
``NotFound`` both for a missing object and for one the caller may not see.

Until the sharing decision arrives (access requests, tokens), registry *metadata* is
visible as follows; images are never reachable through the registry:
- an institution's system (API key): the manifests its institution published, and the
  patients known under its institution's identifiers;
- a regional administrator: everything;
- a clinician (referring doctor, radiologist, teleradiologist, emergency doctor) or an
  admissions clerk: patients known at one of their institutions; clinicians also see
  those patients' manifests (the care-team rule of the region);
- an institution administrator: their institution's published manifests;
- a DPO: no manifests or patients here (the DPO reads the audit trail).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Exists, OuterRef, Q, QuerySet

from audit.services import Actor
from broker.errors import NotFound, PermissionDenied
from broker.models import (
    CLINICAL_ROLES,
    Institution,
    LinkCandidate,
    Manifest,
    Membership,
    Patient,
    PatientIdentifier,
    Role,
)


@dataclass(frozen=True)
class InstitutionSystem:
    """The principal behind an institution's API key (its PACS or integration engine)."""

    institution: Institution
    key_prefix: str
    is_authenticated: bool = True
    is_anonymous: bool = False
    is_active: bool = True
    is_staff: bool = False
    pk: None = None
    id: None = None
    memberships: tuple[Membership, ...] = field(default=())

    def get_username(self) -> str:
        return f"system:{self.institution.finess}:{self.key_prefix}"

    def __str__(self) -> str:
        return self.get_username()


def client_address(request: object) -> str:
    meta = getattr(request, "META", {})
    return str(meta.get("REMOTE_ADDR", ""))


def memberships_of(user: object) -> list[Membership]:
    """The user's active memberships in active institutions (an institution taken out of
    the region gives its staff no rights), cached on the user object for the request."""
    professional = getattr(user, "professional", None) if getattr(user, "pk", None) else None
    if professional is None:
        return []
    cached = getattr(user, "_relais_memberships", None)
    if cached is None:
        cached = list(
            Membership.objects.filter(
                professional=professional, active=True, institution__active=True
            ).select_related("institution")
        )
        user._relais_memberships = cached  # type: ignore[attr-defined]
    return cached


def is_region_admin(user: object) -> bool:
    if isinstance(user, InstitutionSystem) or not getattr(user, "is_authenticated", False):
        return False
    if getattr(user, "is_superuser", False):
        return True
    professional = getattr(user, "professional", None)
    return bool(professional and professional.is_region_admin)


def institutions_with_roles(user: object, roles: frozenset[str] | set[str]) -> list[int]:
    return [m.institution_id for m in memberships_of(user) if m.role in roles]


def actor_for(request: object) -> Actor:
    """The audit trail's view of whoever made this request."""
    user = getattr(request, "user", None)
    address = client_address(request)
    if isinstance(user, InstitutionSystem):
        return Actor(
            kind="institution",
            user_id=None,
            username=user.get_username(),
            institution=user.institution.finess,
            role="institution_system",
            address=address,
        )
    if user is None or not getattr(user, "is_authenticated", False):
        return Actor.anonymous(address)
    memberships = memberships_of(user)
    return Actor(
        kind="user",
        user_id=user.pk,  # type: ignore[attr-defined]
        username=user.get_username(),  # type: ignore[attr-defined]
        institution=",".join(sorted({m.institution.finess for m in memberships})),
        role=",".join(sorted({m.role for m in memberships}))
        or ("region_admin" if is_region_admin(user) else ""),
        address=address,
    )


# ---------------------------------------------------------------------------
# Gates


def manifests_visible_to(user: object) -> QuerySet[Manifest]:
    manifests = Manifest.objects.all()
    if isinstance(user, InstitutionSystem):
        return manifests.filter(source_institution=user.institution)
    if not getattr(user, "is_authenticated", False):
        return manifests.none()
    if is_region_admin(user):
        return manifests
    clinical = institutions_with_roles(user, CLINICAL_ROLES)
    admin = institutions_with_roles(user, {Role.INSTITUTION_ADMIN})
    condition = Q(pk__in=[])
    if clinical:
        condition |= Q(
            Exists(
                PatientIdentifier.objects.filter(
                    patient_id=OuterRef("source_identifier__patient_id"),
                    institution_id__in=clinical,
                )
            )
        )
    if admin:
        condition |= Q(source_institution_id__in=admin)
    return manifests.filter(condition)


def patients_visible_to(user: object) -> QuerySet[Patient]:
    patients = Patient.objects.all()
    if isinstance(user, InstitutionSystem):
        institution_ids = [user.institution.id]
    elif not getattr(user, "is_authenticated", False):
        return patients.none()
    elif is_region_admin(user):
        return patients
    else:
        institution_ids = institutions_with_roles(user, CLINICAL_ROLES | {Role.ADMISSIONS_CLERK})
    if not institution_ids:
        return patients.none()
    return patients.filter(
        Exists(
            PatientIdentifier.objects.filter(
                patient_id=OuterRef("pk"), institution_id__in=institution_ids
            )
        )
    )


def access_manifest_by_uid(user: object, sop_instance_uid: str) -> Manifest:
    manifest = (
        manifests_visible_to(user)
        .filter(sop_instance_uid=sop_instance_uid)
        .select_related("source_institution", "source_identifier__patient")
        .first()
    )
    if manifest is None:
        raise NotFound(f"No manifest {sop_instance_uid}")
    return manifest


def access_patient(user: object, public_id: object) -> Patient:
    patient = patients_visible_to(user).filter(public_id=public_id).first()
    if patient is None:
        raise NotFound("No such patient")
    return patient


def access_institution(finess: str) -> Institution:
    """Institutions are the region's directory: every signed-in caller may read them."""
    institution = Institution.objects.filter(finess=finess).first()
    if institution is None:
        raise NotFound(f"No institution with FINESS {finess}")
    return institution


def institutions_directory() -> QuerySet[Institution]:
    """The region's institutions: a directory every signed-in caller may read."""
    return Institution.objects.order_by("name")


def require_region_admin(user: object) -> None:
    if not is_region_admin(user):
        raise PermissionDenied("Only a regional administrator may do this")


def can_administer_institution(user: object, institution: Institution) -> bool:
    if is_region_admin(user):
        return True
    # One source of truth: an active administrator membership of this institution.
    return institution.id in institutions_with_roles(user, {Role.INSTITUTION_ADMIN})


def can_deprecate_manifest(user: object, manifest: Manifest) -> bool:
    if isinstance(user, InstitutionSystem):
        return user.institution.id == manifest.source_institution_id
    return can_administer_institution(user, manifest.source_institution)


def can_manage_identity(user: object, patient: Patient) -> bool:
    """Identity vigilance: regional administrators, or an administrator of an institution
    holding one of the patient's identifiers."""
    if is_region_admin(user):
        return True
    admin = institutions_with_roles(user, {Role.INSTITUTION_ADMIN})
    return bool(admin) and patient.identifiers.filter(institution_id__in=admin).exists()


def access_identifier_for_identity(user: object, *, issuer: str, value: str) -> PatientIdentifier:
    """An identifier the caller may unlink; "not found" otherwise.

    A regional administrator may unlink any identifier; an institution administrator only
    their own institution's local IDs (never another hospital's, never the INS)."""
    identifier = (
        PatientIdentifier.objects.filter(issuer=issuer, value=value)
        .select_related("patient")
        .first()
    )
    if identifier is None:
        raise NotFound("No such identifier")
    if is_region_admin(user):
        return identifier
    if identifier.institution_id not in institutions_with_roles(user, {Role.INSTITUTION_ADMIN}):
        raise NotFound("No such identifier")
    return identifier


def candidates_visible_to(user: object, *, limit: int = 500) -> list[LinkCandidate]:
    """Pending candidate links the caller may decide: both patients must be theirs to
    manage (the same rule as ``access_candidate``), so a candidate never shows one
    hospital's patient to another hospital's administrator."""
    admin = institutions_with_roles(user, {Role.INSTITUTION_ADMIN})
    if not is_region_admin(user) and not admin:
        return []
    candidates = (
        LinkCandidate.objects.filter(status=LinkCandidate.Status.PENDING)
        .select_related(
            "identifier_a__institution",
            "identifier_b__institution",
            "identifier_a__patient",
            "identifier_b__patient",
        )
        .order_by("id")
    )
    if is_region_admin(user):
        return list(candidates[:limit])
    both = Q(
        Exists(
            PatientIdentifier.objects.filter(
                patient_id=OuterRef("identifier_a__patient_id"), institution_id__in=admin
            )
        )
    ) & Q(
        Exists(
            PatientIdentifier.objects.filter(
                patient_id=OuterRef("identifier_b__patient_id"), institution_id__in=admin
            )
        )
    )
    return list(candidates.filter(both)[:limit])


def access_candidate(user: object, candidate_id: int) -> LinkCandidate:
    """A candidate whose two patients the caller may both manage; "not found" otherwise."""
    candidate = (
        LinkCandidate.objects.filter(pk=candidate_id)
        .select_related("identifier_a__patient", "identifier_b__patient")
        .first()
    )
    if candidate is None or not (
        can_manage_identity(user, candidate.identifier_a.patient)
        and can_manage_identity(user, candidate.identifier_b.patient)
    ):
        raise NotFound("No such candidate")
    return candidate
