"""Gates of the consent interfaces: who may see a patient's directives, who may diagnose."""

from __future__ import annotations

from django.db.models import Exists, OuterRef

from broker.access import institutions_with_roles, is_region_admin
from broker.errors import NotFound
from broker.models import CLINICAL_ROLES, Institution, Patient, PatientIdentifier, Role
from consent.models import Directive

READER_ROLES = frozenset({*CLINICAL_ROLES, Role.ADMISSIONS_CLERK, Role.DPO})
DIAGNOSIS_ROLES = frozenset({Role.DPO})


def _patient_where(user: object, public_id: object, roles: frozenset[str]) -> Patient:
    patients = Patient.objects.filter(public_id=public_id)
    if not is_region_admin(user):
        institution_ids = institutions_with_roles(user, roles)
        patients = patients.filter(
            Exists(
                PatientIdentifier.objects.filter(
                    patient_id=OuterRef("pk"), institution_id__in=institution_ids
                )
            )
        )
    patient = patients.first()
    if patient is None:
        raise NotFound("No such patient")
    return patient


def access_patient_directives(user: object, public_id: object) -> Patient:
    """A patient whose directives ``user`` may read: a clinician, clerk or DPO of an
    institution where the patient is known, or a regional administrator."""
    return _patient_where(user, public_id, READER_ROLES)


def access_patient_for_diagnosis(user: object, public_id: object) -> Patient:
    """A patient whose consent state ``user`` may evaluate and export: the DPO of an
    institution where the patient is known, or a regional administrator."""
    return _patient_where(user, public_id, DIAGNOSIS_ROLES)


def access_directive(patient: Patient, directive_id: int) -> Directive:
    directive = (
        Directive.objects.filter(pk=directive_id, identifier__patient=patient)
        .select_related("identifier__patient")
        .first()
    )
    if directive is None:
        raise NotFound("No such directive")
    return directive


def access_recording_institution(finess: str) -> Institution:
    institution = Institution.objects.filter(finess=finess).first()
    if institution is None:
        raise NotFound(f"No institution with FINESS {finess}")
    return institution
