"""Real Orthanc archives: the fixtures work, and what Orthanc 1.10.1 really answers.

The INS travels in OtherPatientIDsSequence. Recorded here: Orthanc returns it in C-FIND
answers and in WADO-RS metadata, but QIDO-RS drops it even when asked for with includefield,
and neither filters on it (PEERS.md trap 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from broker.dicom.kos import INS_NIA_OID, INS_NIR_OID
from broker.dicom.network import NODELAY_HANDLERS
from tests.dicom_factories import NIR
from tests.peers import orthanc
from tests.peers.fixtures import BROKER_MODALITY, OrthancFactory, OrthancRegion, require_orthanc
from tests.peers.studies import (
    CHUB_AE,
    CHUB_ISSUER,
    DUPONT_CHUB_IPP,
    DUPONT_PORTMAEL_IPP,
    MARIE_DUPONT,
    PORTMAEL_AE,
    PORTMAEL_ISSUER,
    SyntheticStudy,
    make_study,
    region_studies,
)

DICOM_JSON = {"Accept": "application/dicom+json"}
OTHER_PATIENT_IDS_SEQUENCE = "00101002"
PATIENT_ID = "00100020"
STUDY_INSTANCE_UID = "0020000D"
ISSUER_QUALIFIERS = "00100024"
UNIVERSAL_ENTITY_ID = "00400032"
PENDING = (0xFF00, 0xFF01)


def dupont_ct_at_chub(region: OrthancRegion) -> SyntheticStudy:
    return region.studies[CHUB_AE][0]


def values(item: dict[str, Any], tag: str) -> list[Any]:
    """The values of a DICOM JSON attribute, [] when absent or empty."""
    attribute_values: list[Any] = item.get(tag, {}).get("Value", [])
    return attribute_values


# --------------------------------------------------------------------------- the fixtures


def test_without_orthanc_tests_are_skipped_or_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(orthanc, "ORTHANC_BINARY", tmp_path / "Orthanc")
    assert "Orthanc" in (orthanc.orthanc_available() or "")

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_orthanc()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_orthanc()


# --------------------------------------------------------------------------- the region


def test_region_has_the_same_person_under_two_local_ids_and_one_ins() -> None:
    studies = region_studies()
    dupont = [
        study
        for aet in (CHUB_AE, PORTMAEL_AE)
        for study in studies[aet]
        if study.patient == MARIE_DUPONT
    ]
    assert {(study.issuer, study.patient_id) for study in dupont} == {
        (CHUB_ISSUER, DUPONT_CHUB_IPP),
        (PORTMAEL_ISSUER, DUPONT_PORTMAEL_IPP),
    }
    assert MARIE_DUPONT.ins == NIR
    patients = {study.patient for aet_studies in studies.values() for study in aet_studies}
    assert any(patient.ins is None for patient in patients)
    assert any(patient.ins_kind == "NIA" and patient.ins for patient in patients)
    assert len(studies[CHUB_AE]) >= 6
    assert len(studies[PORTMAEL_AE]) >= 4
    assert sum(study.instance_count for s in studies.values() for study in s) < 150


def test_region_archives_hold_the_region_studies(orthanc_region: OrthancRegion) -> None:
    for aet, archive in orthanc_region.archives.items():
        studies = orthanc_region.studies[aet]
        statistics = archive.statistics()
        assert archive.study_count() == len(studies)
        assert statistics["CountSeries"] == sum(len(study.series_uids) for study in studies)
        assert statistics["CountInstances"] == sum(study.instance_count for study in studies)
        system = archive.http.get("/system").json()
        assert system["DicomAet"] == aet
        assert system["DicomPort"] == archive.dicom_port
        modalities = archive.http.get("/modalities", params={"expand": ""}).json()
        assert modalities[BROKER_MODALITY]["AET"] == BROKER_MODALITY
        assert modalities[BROKER_MODALITY]["Port"] == orthanc_region.broker_port


def test_qido_finds_a_study_by_local_patient_id(orthanc_region: OrthancRegion) -> None:
    archive = orthanc_region.archives[PORTMAEL_AE]
    expected = {
        study.study_instance_uid
        for study in orthanc_region.studies[PORTMAEL_AE]
        if study.patient_id == DUPONT_PORTMAEL_IPP
    }

    response = archive.http.get(
        f"{archive.dicomweb_url}/studies",
        params={"PatientID": DUPONT_PORTMAEL_IPP},
        headers=DICOM_JSON,
    )

    response.raise_for_status()
    assert {values(item, STUDY_INSTANCE_UID)[0] for item in response.json()} == expected
    # The CHU's ID of the same person is unknown at Port-Maël.
    other = archive.http.get(
        f"{archive.dicomweb_url}/studies", params={"PatientID": DUPONT_CHUB_IPP}
    )
    assert other.status_code == 200
    assert other.json() == []


def test_qido_does_not_decode_percent_escapes(orthanc_region: OrthancRegion) -> None:
    """DICOMweb 1.7 matches query values as sent: httpx's `params=` escapes `*` and `^`
    (%2A, %5E), so wildcard and full-name queries find nothing. Send them unescaped."""
    archive = orthanc_region.archives[CHUB_AE]
    studies_url = f"{archive.dicomweb_url}/studies"

    def found(url: httpx.URL | str, **kwargs: Any) -> int:
        response = archive.http.get(url, headers=DICOM_JSON, **kwargs)
        response.raise_for_status()
        return len(response.json())

    assert found(studies_url, params={"PatientName": "DUP*"}) == 0  # sent as DUP%2A
    assert found(studies_url, params={"PatientName": "DUPONT^Marie"}) == 0  # DUPONT%5EMarie
    assert found(httpx.URL(studies_url, query=b"PatientName=DUP*")) == 2
    assert found(httpx.URL(studies_url, query=b"PatientName=DUPONT^Marie")) == 2
    assert found(httpx.URL(studies_url, query=b"PatientID=CHU%30012345")) == 0  # CHU0012345


# --------------------------------------------------------------------------- fresh archives


def test_an_uploaded_instance_comes_back_byte_for_byte(orthanc_factory: OrthancFactory) -> None:
    archive = orthanc_factory("TEST_PACS")
    instance = fresh_ct_instances()[0]
    archive.upload(instance)

    response = archive.http.get("/instances")
    response.raise_for_status()
    (orthanc_id,) = response.json()
    stored = archive.http.get(f"/instances/{orthanc_id}/file")

    stored.raise_for_status()
    assert "content-encoding" not in stored.headers
    assert stored.content == instance


def test_delete_series_and_study(orthanc_factory: OrthancFactory) -> None:
    archive = orthanc_factory("TEST_PACS")
    study = region_studies()[CHUB_AE][0]
    archive.upload_many(study.instances)
    first_series, *other_series = study.series_uids

    archive.delete_series(first_series)

    statistics = archive.statistics()
    assert statistics["CountSeries"] == len(other_series)
    assert statistics["CountInstances"] == study.instances_per_series * len(other_series)
    assert archive.lookup(first_series, "Series") == []

    archive.delete_study(study.study_instance_uid)

    assert archive.study_count() == 0


def fresh_ct_instances() -> list[bytes]:
    """A small study of Marie DUPONT, random UIDs, for archives a test may change."""
    return make_study(
        patient=MARIE_DUPONT,
        patient_id=DUPONT_CHUB_IPP,
        issuer=CHUB_ISSUER,
        modality="CT",
        study_date=region_studies()[CHUB_AE][0].study_date,
        study_time=None,
        accession_number="TEST0001",
        description="TDM THORAX",
        series_count=1,
        instances_per_series=2,
        body_part="CHEST",
    )


# --------------------------------------------------------------------------- the INS


def test_qido_does_not_return_other_patient_ids_sequence(orthanc_region: OrthancRegion) -> None:
    """DICOMweb 1.7 drops the sequence from QIDO answers, includefield or not."""
    archive = orthanc_region.archives[CHUB_AE]
    study = dupont_ct_at_chub(orthanc_region)

    studies = archive.http.get(
        f"{archive.dicomweb_url}/studies",
        params={"PatientID": study.patient_id, "includefield": "OtherPatientIDsSequence"},
        headers=DICOM_JSON,
    ).json()
    instances = archive.http.get(
        f"{archive.dicomweb_url}/studies/{study.study_instance_uid}/instances",
        params=[("includefield", "OtherPatientIDsSequence"), ("includefield", "00101002")],
        headers=DICOM_JSON,
    ).json()

    assert len(studies) == 2
    assert len(instances) == study.instance_count
    assert all(OTHER_PATIENT_IDS_SEQUENCE not in item for item in studies + instances)
    # Other includefield attributes are honoured, and patient attributes come with each instance.
    assert all(values(item, PATIENT_ID) == [study.patient_id] for item in instances)


def test_wado_rs_metadata_carries_the_ins(orthanc_region: OrthancRegion) -> None:
    archive = orthanc_region.archives[CHUB_AE]
    study = dupont_ct_at_chub(orthanc_region)
    series_uid = study.series_uids[0]
    sop_uid = study.sop_instance_uids(1)[0]

    response = archive.http.get(
        f"{archive.dicomweb_url}/studies/{study.study_instance_uid}/series/{series_uid}"
        f"/instances/{sop_uid}/metadata",
        headers=DICOM_JSON,
    )

    response.raise_for_status()
    (metadata,) = response.json()
    (ins,) = values(metadata, OTHER_PATIENT_IDS_SEQUENCE)
    assert values(ins, PATIENT_ID) == [NIR]
    (qualifiers,) = values(ins, ISSUER_QUALIFIERS)
    assert values(qualifiers, UNIVERSAL_ENTITY_ID) == [INS_NIR_OID]


@pytest.fixture
def chub_find(orthanc_region: OrthancRegion) -> Iterator[Association]:
    """A C-FIND association of the broker (calling AE RELAIS) with CHUB_PACS."""
    archive = orthanc_region.archives[CHUB_AE]
    ae = AE(ae_title=BROKER_MODALITY)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    association = ae.associate(
        "127.0.0.1", archive.dicom_port, ae_title=CHUB_AE, evt_handlers=NODELAY_HANDLERS
    )
    assert association.is_established
    yield association
    association.release()


def c_find(association: Association, query: Dataset) -> list[Dataset]:
    answers = []
    for status, identifier in association.send_c_find(
        query, StudyRootQueryRetrieveInformationModelFind
    ):
        if status.Status in PENDING and identifier is not None:
            answers.append(identifier)
        else:
            assert status.Status == 0x0000, f"C-FIND failed: 0x{status.Status:04X}"
    return answers


def test_c_find_returns_the_ins_at_study_level_but_does_not_filter_on_it(
    orthanc_region: OrthancRegion, chub_find: Association
) -> None:
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 192"
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = ""
    query.PatientName = ""
    query.IssuerOfPatientID = ""
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedInstances = ""
    query.OtherPatientIDsSequence = Sequence([Dataset()])
    query.OtherPatientIDsSequence[0].PatientID = "000000000000000"  # matches nobody

    answers = c_find(chub_find, query)

    # The filter inside the sequence is ignored ("sequence matching only on worklists").
    assert len(answers) == len(orthanc_region.studies[CHUB_AE])
    by_study = {answer.StudyInstanceUID: answer for answer in answers}
    for study in orthanc_region.studies[CHUB_AE]:
        answer = by_study[study.study_instance_uid]
        assert answer.IssuerOfPatientID == CHUB_ISSUER
        assert int(answer.NumberOfStudyRelatedInstances) == study.instance_count
        # Orthanc answers in its DefaultEncoding (Latin-1), whatever the query asked for.
        assert answer.SpecificCharacterSet == "ISO_IR 100"
        assert str(answer.PatientName) == study.patient.dicom_name
        if study.patient.ins is None:
            assert not answer.get("OtherPatientIDsSequence")
            continue
        (ins,) = answer.OtherPatientIDsSequence
        assert ins.PatientID == study.patient.ins
        oid = ins.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID
        assert oid == {"NIR": INS_NIR_OID, "NIA": INS_NIA_OID}[study.patient.ins_kind]


def test_c_find_returns_the_ins_and_image_attributes_at_image_level(
    orthanc_region: OrthancRegion, chub_find: Association
) -> None:
    study = dupont_ct_at_chub(orthanc_region)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study.study_instance_uid
    query.SeriesInstanceUID = ""
    query.SOPInstanceUID = ""
    query.SOPClassUID = ""
    query.Modality = ""
    query.BodyPartExamined = ""
    query.PatientID = ""
    query.PatientBirthDate = ""
    query.OtherPatientIDs = ""
    query.OtherPatientIDsSequence = Sequence([Dataset()])

    answers = c_find(chub_find, query)

    assert len(answers) == study.instance_count
    assert {answer.SeriesInstanceUID for answer in answers} == set(study.series_uids)
    for answer in answers:
        assert answer.SOPClassUID == study.sop_class_uid
        assert answer.Modality == study.modality
        assert answer.BodyPartExamined == study.body_part
        assert answer.PatientID == study.patient_id
        assert answer.PatientBirthDate == study.patient.birth_date.strftime("%Y%m%d")
        assert answer.OtherPatientIDs == ""  # the flat, retired-style attribute: not in the files
        assert [item.PatientID for item in answer.OtherPatientIDsSequence] == [NIR]
