"""Manifests for registry tests, built with the broker's own KOS builder."""

from __future__ import annotations

import datetime as dt

from broker.dicom.kos import (
    INS_NIR_TEST_OID,
    OtherPatientId,
    PatientInfo,
    ReferencedInstance,
    SeriesDescription,
    StudyDescription,
    build_kos,
)
from broker.models import Institution

UID_ROOT = "1.2.826.0.1.3680043.10.999."
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)


def study_uid(n: int) -> str:
    return f"{UID_ROOT}{n}"


def kos_for(
    institution: Institution,
    patient_id: str,
    *,
    study: int,
    family: str = "DUPONT",
    given: str = "Marie",
    birth: dt.date | None = dt.date(1985, 3, 12),
    sex: str = "F",
    ins: str | None = None,
    ins_oid: str = INS_NIR_TEST_OID,
    issuer: str | None = "default",
    series: tuple[tuple[str, str, int], ...] = (("CT", CT, 3),),
    study_date: dt.date | None = dt.date(2026, 10, 1),
    sop_instance_uid: str | None = None,
    series_variant: int = 0,
) -> bytes:
    """A KOS manifest of study ``study`` published by ``institution`` for ``patient_id``."""
    uid = study_uid(study)
    patient = PatientInfo(
        patient_id=patient_id,
        issuer=institution.patient_id_issuer if issuer == "default" else issuer,
        issuer_oid=None,
        family_name=family,
        given_names=given,
        birth_name=family,
        birth_date=birth,
        sex=sex,
        other_ids=(
            (OtherPatientId(value=ins, issuer=None, issuer_oid=ins_oid, type_of_patient_id="TEXT"),)
            if ins
            else ()
        ),
    )
    description = StudyDescription(
        patient=patient,
        study_instance_uid=uid,
        accession_number=f"ACC{study}",
        study_date=study_date,
        study_time=dt.time(8, 15),
        study_description="Scanner thoracique",
        series=tuple(
            SeriesDescription(
                series_instance_uid=f"{uid}.{index + series_variant * 100}",
                modality=modality,
                body_part="CHEST",
                instances=tuple(
                    ReferencedInstance(
                        sop_class_uid=sop_class, sop_instance_uid=f"{uid}.{index}.{n}"
                    )
                    for n in range(1, count + 1)
                ),
            )
            for index, (modality, sop_class, count) in enumerate(series, start=1)
        ),
        retrieve_ae_title=institution.ae_title or None,
        retrieve_url=institution.dicomweb_url or None,
        retrieve_location_uid=None
        if (institution.ae_title or institution.dicomweb_url)
        else "1.2.826.0.1.3680043.10.999.7",
    )
    return build_kos(description, now=NOW, sop_instance_uid=sop_instance_uid, uid_root=UID_ROOT)
