"""Manifests (KOS): what the broker accepts, what it refuses and why, and what it writes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import io
import json
import pickle
import warnings
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode

from broker.dicom import kos as kos_module
from broker.dicom.kos import (
    INS_NIA_OID,
    INS_NIA_TEST_OID,
    INS_NIR_OID,
    INS_NIR_TEST_OID,
    KOS_SOP_CLASS_UID,
    MANIFEST_TITLE,
    KOSError,
    KOSErrorCode,
    OtherPatientId,
    ParsedKOS,
    ReferencedInstance,
    ResolvedPatientId,
    StudyDescription,
    build_kos,
    derive_kos_uids,
    dump_parsed_kos,
    load_parsed_kos,
    national_ids,
    normalise_ins_matricule,
    parse_kos,
    parse_kos_dataset,
    resolve_patient_id,
)
from tests.dicom_factories import (
    CT_IMAGE_STORAGE,
    GSPS_STORAGE,
    HOPITAL_A_AE,
    HOPITAL_A_ISSUER,
    HOPITAL_A_OID,
    MR_IMAGE_STORAGE,
    NIA,
    NIR,
    NIR_CORSICA_2A,
    NIR_CORSICA_2B,
    NIR_WITHOUT_KEY,
    NOW,
    SECONDARY_CAPTURE_STORAGE,
    STUDY_UID,
    UID_ROOT,
    dataset_to_bytes,
    make_kos_bytes,
    make_kos_dataset,
    make_patient,
    make_series,
    make_study_description,
    replace_patient,
    set_raw,
)
from tests.unit.test_kos_fuzz import mutated_bytes, mutated_datasets

EVIDENCE = "CurrentRequestedProcedureEvidenceSequence"
ECG_STORAGE = "1.2.840.10008.5.1.4.1.1.9.1.1"  # 12-lead ECG Waveform


def parse(ds: Dataset, **encoding: bool) -> ParsedKOS:
    return parse_kos(dataset_to_bytes(ds, **encoding))


def refusal(data: bytes) -> KOSError:
    with pytest.raises(KOSError) as caught:
        parse_kos(data)
    return caught.value


def first_series_item(ds: Dataset) -> Dataset:
    item: Dataset = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return item


def resolve(kos: ParsedKOS, *, oid: str | None = HOPITAL_A_OID) -> ResolvedPatientId:
    return resolve_patient_id(kos, institution_issuer=HOPITAL_A_ISSUER, institution_issuer_oid=oid)


# --------------------------------------------------------------------------- round trip


def test_a_built_manifest_parses_back_to_the_study_it_describes() -> None:
    study = make_study_description(
        patient=make_patient(
            birth_name="MARTIN",
            other_ids=(OtherPatientId(NIR, None, INS_NIR_OID, "TEXT"),),
            issuer_oid=HOPITAL_A_OID,
        ),
        retrieve_location_uid=f"{UID_ROOT}.77",
        retrieve_url="https://pacs.hopital-a.example/dicom-web",
    )

    kos = parse_kos(build_kos(study, now=NOW))

    assert kos.patient == study.patient
    assert kos.study_instance_uid == study.study_instance_uid
    assert kos.study_date == study.study_date
    assert kos.study_time == study.study_time
    assert kos.study_description == study.study_description
    assert kos.accession_number == study.accession_number
    assert kos.institution_name == "Hôpital A"
    assert kos.content_datetime == NOW
    assert kos.document_title == MANIFEST_TITLE
    assert kos.modalities == ("CT",)
    assert kos.body_parts == ("CHEST",)
    assert kos.specific_character_set == "ISO_IR 192"
    assert kos.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
    [referenced] = kos.studies
    assert referenced.study_instance_uid == study.study_instance_uid
    assert referenced.accession_number == study.accession_number
    assert len(referenced.series) == len(study.series)
    for parsed, described in zip(referenced.series, study.series, strict=True):
        assert parsed.series_instance_uid == described.series_instance_uid
        assert parsed.modality == described.modality
        assert parsed.body_part == described.body_part
        assert parsed.instances == described.instances
        assert parsed.retrieve_ae_title == HOPITAL_A_AE
        assert parsed.retrieve_location_uid == f"{UID_ROOT}.77"
        assert parsed.retrieve_url == "https://pacs.hopital-a.example/dicom-web"
    assert (kos.series_count, kos.instance_count) == (2, 6)
    assert kos.primary_study is referenced


def test_a_study_without_optional_values_round_trips_with_their_absence() -> None:
    study = make_study_description(
        patient=make_patient(issuer=None, birth_date=None, sex="", given_names=""),
        accession_number=None,
        study_date=None,
        study_time=None,
        study_description="",
        institution_name="",
        series=(make_series(STUDY_UID, 1, body_part=None),),
    )

    kos = parse_kos(build_kos(study, now=NOW.replace(tzinfo=None)))

    assert kos.patient == study.patient
    assert (kos.accession_number, kos.primary_study.accession_number) == (None, None)
    assert (kos.study_date, kos.study_time, kos.study_description) == (None, None, "")
    assert kos.institution_name == ""
    assert kos.body_parts == ()
    assert kos.content_datetime == NOW.replace(tzinfo=None)


def test_building_the_same_study_twice_gives_identical_bytes() -> None:
    assert make_kos_bytes() == make_kos_bytes()


def test_a_changed_study_gets_a_new_manifest_uid_in_the_same_ko_series() -> None:
    before = make_study_description()
    after = dataclasses.replace(before, series=(*before.series, make_series(STUDY_UID, 3)))

    sop_before, series_before = derive_kos_uids(before)
    sop_after, series_after = derive_kos_uids(after)

    assert sop_before != sop_after
    assert series_before == series_after
    assert parse_kos(build_kos(after, now=NOW)).sop_instance_uid == sop_after


def test_the_uids_are_derived_from_what_dataclasses_asdict_gives() -> None:
    """`derive_kos_uids` serialises a description without `asdict` (its deep copies cost a
    fifth of a manifest's build); the text hashed must stay the same."""
    patient = make_patient(
        family_name="DUPONT-LÉGER",
        birth_date=None,
        other_ids=(OtherPatientId("258037512345653", None, "1.2.250.1.213.1.4.8", "TEXT"),),
    )
    for study in (
        make_study_description(),
        make_study_description(patient=patient, study_time=None, accession_number=None),
    ):
        options: dict[str, Any] = {"sort_keys": True, "default": str, "ensure_ascii": False}
        expected = json.dumps(dataclasses.asdict(study), **options)
        assert json.dumps(kos_module._plain(study), **options) == expected


def test_default_uids_are_valid_uuid_derived_uids_or_live_under_the_given_root() -> None:
    sop_uid, series_uid = derive_kos_uids(make_study_description())
    rooted = derive_kos_uids(make_study_description(), uid_root="1.2.250.1.999")

    assert sop_uid.startswith("2.25.")
    assert series_uid.startswith("2.25.")
    assert all(uid.startswith("1.2.250.1.999.") and len(uid) <= 64 for uid in rooted)
    assert all(pydicom.uid.UID(uid).is_valid for uid in (sop_uid, series_uid, *rooted))


@pytest.mark.parametrize("uid_root", ["1.2.abc", "1.2." + "3" * 40], ids=["invalid", "too-long"])
def test_a_bad_uid_root_is_refused(uid_root: str) -> None:
    with pytest.raises(KOSError) as caught:
        derive_kos_uids(make_study_description(), uid_root=uid_root)

    assert caught.value.code == "kos:invalid-value"


def test_uids_given_to_build_kos_are_used_as_they_are() -> None:
    kos = parse_kos(
        make_kos_bytes(sop_instance_uid=f"{UID_ROOT}.5.1", series_instance_uid=f"{UID_ROOT}.5")
    )

    assert (kos.sop_instance_uid, kos.series_instance_uid) == (f"{UID_ROOT}.5.1", f"{UID_ROOT}.5")


def test_the_built_manifest_is_a_key_object_selection_document_titled_manifest() -> None:
    ds = make_kos_dataset()

    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == KOS_SOP_CLASS_UID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == KOS_SOP_CLASS_UID
    assert ds.Modality == "KO"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.StudyInstanceUID == STUDY_UID
    assert ds.ValueType == "CONTAINER"
    assert ds.ContinuityOfContent == "SEPARATE"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == MANIFEST_TITLE
    template = ds.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2010")
    assert len(ds.ContentSequence) == 6
    assert {item.ValueType for item in ds.ContentSequence} == {"IMAGE"}
    assert {item.RelationshipType for item in ds.ContentSequence} == {"CONTAINS"}
    assert list(ds.ModalitiesInStudy) == ["CT"] or ds.ModalitiesInStudy == "CT"
    assert first_series_item(ds).Modality == "CT"
    assert first_series_item(ds).BodyPartExamined == "CHEST"
    assert ds.ReferencedRequestSequence[0].AccessionNumber == "A24011500042"


def test_non_image_instances_are_referenced_as_composite_content() -> None:
    study = make_study_description(
        series=(make_series(STUDY_UID, 1, modality="PR", sop_class_uid=GSPS_STORAGE),)
    )

    ds = pydicom.dcmread(io.BytesIO(build_kos(study, now=NOW)))

    assert {item.ValueType for item in ds.ContentSequence} == {"COMPOSITE"}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"patient": make_patient(sex="X")}, "PatientSex"),
        ({"patient": make_patient(family_name="DU^PONT")}, "'^'"),
        ({"study_description": "D" * 65}, "StudyDescription"),
        ({"study_instance_uid": "1.2.03"}, "not a valid UID"),
        ({"series": ()}, "ReferencedSeriesSequence"),
        ({"retrieve_ae_title": None}, "retrieve location"),
    ],
)
def test_build_kos_refuses_a_description_that_cannot_make_a_valid_manifest(
    change: dict[str, object], fragment: str
) -> None:
    with pytest.raises(KOSError) as caught:
        build_kos(make_study_description(**change), now=NOW)

    assert fragment in caught.value.message


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    "encoding",
    [
        {"implicit_vr": True},
        {"big_endian": True},
        {"deflated": True},
        {"preamble": False},
    ],
    ids=["implicit-vr", "big-endian", "deflated", "no-preamble"],
)
def test_a_manifest_in_another_encoding_reads_the_same(encoding: dict[str, bool]) -> None:
    expected = parse_kos(make_kos_bytes())

    kos = parse(make_kos_dataset(), **encoding)

    assert dataclasses.replace(kos, transfer_syntax_uid=expected.transfer_syntax_uid) == expected


def test_a_manifest_without_specific_character_set_decodes_latin1_bytes() -> None:
    ds = make_kos_dataset()
    del ds.SpecificCharacterSet
    set_raw(ds, "PatientName", b"H\xc9BERT^H\xe9l\xe8ne")
    set_raw(ds, "InstitutionName", b"H\xf4pital A")

    kos = parse(ds)

    assert (kos.patient.family_name, kos.patient.given_names) == ("HÉBERT", "Hélène")
    assert kos.institution_name == "Hôpital A"
    assert kos.specific_character_set is None


def test_a_latin1_manifest_that_says_so_is_decoded() -> None:
    ds = make_kos_dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "MÜLLER^Hélène"

    assert parse(ds).patient.family_name == "MÜLLER"


def test_bytes_that_are_not_utf8_under_iso_ir_192_are_read_without_failing() -> None:
    ds = make_kos_dataset()
    set_raw(ds, "StudyDescription", b"TDM \xe9paule \xff")

    assert parse(ds).study_description.startswith("TDM ")


# --------------------------------------------------------------------------- liberal reading


def test_a_manifest_referencing_several_studies_keeps_each_with_its_accession_number() -> None:
    second_uid = f"{UID_ROOT}.1.20231002.7"
    ds = make_kos_dataset()
    other = make_kos_dataset(
        study_instance_uid=second_uid,
        accession_number="B23100200007",
        retrieve_ae_title="PACS_HOPB",
        series=(make_series(second_uid, 1, modality="MR", sop_class_uid=MR_IMAGE_STORAGE),),
    )
    ds.CurrentRequestedProcedureEvidenceSequence.extend(
        other.CurrentRequestedProcedureEvidenceSequence
    )
    ds.ReferencedRequestSequence.extend(other.ReferencedRequestSequence)

    kos = parse(ds)

    assert [s.study_instance_uid for s in kos.studies] == [STUDY_UID, second_uid]
    assert [s.accession_number for s in kos.studies] == ["A24011500042", "B23100200007"]
    assert kos.studies[1].series[0].retrieve_ae_title == "PACS_HOPB"
    assert kos.modalities == ("CT", "MR")
    assert (kos.series_count, kos.instance_count) == (3, 9)


def test_a_referenced_study_without_request_has_no_accession_number() -> None:
    second_uid = f"{UID_ROOT}.1.20231002.7"
    ds = make_kos_dataset()
    other = make_kos_dataset(study_instance_uid=second_uid)
    ds.CurrentRequestedProcedureEvidenceSequence.extend(
        other.CurrentRequestedProcedureEvidenceSequence
    )

    kos = parse(ds)

    assert [s.accession_number for s in kos.studies] == ["A24011500042", None]


def test_two_evidence_items_for_one_study_are_merged() -> None:
    ds = make_kos_dataset()
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    split = Dataset()
    split.StudyInstanceUID = STUDY_UID
    split.ReferencedSeriesSequence = Sequence([evidence.ReferencedSeriesSequence.pop()])
    ds.CurrentRequestedProcedureEvidenceSequence.append(split)

    kos = parse(ds)

    assert len(kos.studies) == 1
    assert kos.series_count == 2


@pytest.mark.parametrize(
    ("study_date", "study_time", "expected_date", "expected_time"),
    [
        ("1990.01.01", "10:30:00", dt.date(1990, 1, 1), dt.time(10, 30)),
        ("20240115", "104207.123456", dt.date(2024, 1, 15), dt.time(10, 42, 7, 123456)),
        ("20240115", "104207.5", dt.date(2024, 1, 15), dt.time(10, 42, 7, 500000)),
        ("20240115", "1042", dt.date(2024, 1, 15), dt.time(10, 42)),
        ("20240115", "10", dt.date(2024, 1, 15), dt.time(10)),
        ("20240115", "235960", dt.date(2024, 1, 15), dt.time(23, 59, 59)),
        ("", "", None, None),
        ("20241345", "256100", None, None),
        ("unknown", "noon", None, None),
    ],
)
def test_old_style_odd_or_empty_dates_and_times_are_read_liberally(
    study_date: str, study_time: str, expected_date: dt.date | None, expected_time: dt.time | None
) -> None:
    ds = make_kos_dataset()
    set_raw(ds, "StudyDate", study_date)
    set_raw(ds, "StudyTime", study_time)
    set_raw(ds, "PatientBirthDate", study_date)

    kos = parse(ds)

    assert (kos.study_date, kos.study_time) == (expected_date, expected_time)
    assert kos.patient.birth_date == expected_date


def test_a_content_date_without_time_zone_gives_a_naive_datetime() -> None:
    ds = make_kos_dataset()
    del ds.TimezoneOffsetFromUTC
    set_raw(ds, "ContentTime", "11:05")

    assert parse(ds).content_datetime == dt.datetime(2024, 1, 15, 11, 5)


@pytest.mark.parametrize(
    ("keyword", "value", "attribute"),
    [
        ("RetrieveAETitle", "PACS_HOPA", "retrieve_ae_title"),
        ("RetrieveLocationUID", f"{UID_ROOT}.77", "retrieve_location_uid"),
        ("RetrieveURL", "https://pacs.hopital-a.example/wado", "retrieve_url"),
    ],
)
def test_each_kind_of_retrieve_location_is_enough_on_its_own(
    keyword: str, value: str, attribute: str
) -> None:
    ds = make_kos_dataset()
    for item in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence:
        del item.RetrieveAETitle
        setattr(item, keyword, value)

    series = parse(ds).primary_study.series[0]

    assert getattr(series, attribute) == value


def test_a_multi_valued_retrieve_ae_title_gives_the_first() -> None:
    ds = make_kos_dataset()
    first_series_item(ds).RetrieveAETitle = ["PACS_MAIN", "PACS_BACKUP"]

    assert parse(ds).primary_study.series[0].retrieve_ae_title == "PACS_MAIN"


def test_a_document_title_other_than_manifest_is_kept() -> None:
    ds = make_kos_dataset()
    title = ds.ConceptNameCodeSequence[0]
    title.CodeValue, title.CodeMeaning = "113000", "Of Interest"

    assert parse(ds).document_title == ("113000", "DCM", "Of Interest")


def test_modalities_join_modalities_in_study_and_referenced_sop_classes_but_never_ko() -> None:
    ds = make_kos_dataset()
    ds.ModalitiesInStudy = ["CT", "KO", "SR"]
    series = first_series_item(ds)
    series.ReferencedSOPSequence[0].ReferencedSOPClassUID = GSPS_STORAGE

    kos = parse(ds)

    assert kos.modalities == ("CT", "PR", "SR")


def test_a_series_without_modality_takes_the_one_of_its_sop_classes() -> None:
    ds = make_kos_dataset()
    series = first_series_item(ds)
    del series.Modality
    for reference in series.ReferencedSOPSequence:
        reference.ReferencedSOPClassUID = MR_IMAGE_STORAGE

    assert parse(ds).primary_study.series[0].modality == "MR"


def test_a_series_of_secondary_captures_without_modality_has_none() -> None:
    ds = make_kos_dataset()
    series = first_series_item(ds)
    del series.Modality
    for reference in series.ReferencedSOPSequence:
        reference.ReferencedSOPClassUID = SECONDARY_CAPTURE_STORAGE

    assert parse(ds).primary_study.series[0].modality is None


def test_body_parts_come_from_the_top_level_and_the_series_items() -> None:
    ds = make_kos_dataset()
    ds.BodyPartExamined = "ABDOMEN"
    del ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[1].BodyPartExamined

    kos = parse(ds)

    assert kos.body_parts == ("ABDOMEN", "CHEST")
    assert [series.body_part for series in kos.primary_study.series] == ["CHEST", None]


def test_a_middle_name_joins_the_given_names_and_the_birth_name_is_read() -> None:
    ds = make_kos_dataset()
    ds.PatientName = "DUPONT^Marie^Claire"
    ds.PatientBirthName = "MARTIN^Marie"

    patient = parse(ds).patient

    assert (patient.family_name, patient.given_names, patient.birth_name) == (
        "DUPONT",
        "Marie Claire",
        "MARTIN",
    )


def test_an_unknown_patient_sex_is_read_as_empty() -> None:
    ds = make_kos_dataset()
    set_raw(ds, "PatientSex", "U")

    assert parse(ds).patient.sex == ""


def test_a_dimse_dataset_without_file_meta_is_parsed() -> None:
    bare = dataset_to_bytes(make_kos_dataset(), implicit_vr=True, with_meta=False)
    ds = decode(io.BytesIO(bare), is_implicit_vr=True, is_little_endian=True)

    kos = parse_kos_dataset(ds, transfer_syntax_uid=pydicom.uid.ImplicitVRLittleEndian)

    assert kos.transfer_syntax_uid == pydicom.uid.ImplicitVRLittleEndian
    assert kos.instance_count == 6


def test_a_dimse_dataset_whose_file_meta_disagrees_is_refused() -> None:
    ds = make_kos_dataset()
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(f"{UID_ROOT}.666")

    with pytest.raises(KOSError) as caught:
        parse_kos_dataset(ds, transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)

    assert caught.value.code == "kos:meta-mismatch"


def test_parse_kos_dataset_refuses_a_bad_transfer_syntax_and_a_non_dataset() -> None:
    with pytest.raises(KOSError) as bad_syntax:
        parse_kos_dataset(make_kos_dataset(), transfer_syntax_uid="explicit")
    with pytest.raises(KOSError) as not_a_dataset:
        parse_kos_dataset(b"DICM", transfer_syntax_uid="1.2.840.10008.1.2")  # type: ignore[arg-type]

    assert bad_syntax.value.code == "kos:invalid-meta"
    assert not_a_dataset.value.code == "kos:not-dicom"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", bytes(200), b"\x00" * 128 + b"DICX" + bytes(100)],
    ids=["empty", "text", "zeros", "wrong-magic"],
)
def test_bytes_that_are_not_dicom_are_refused(data: bytes) -> None:
    assert refusal(data).code == "kos:not-dicom"


def test_a_bare_dataset_without_part10_header_is_refused_as_not_dicom() -> None:
    assert refusal(dataset_to_bytes(make_kos_dataset(), with_meta=False)).code == "kos:not-dicom"


def test_something_other_than_bytes_is_refused_as_not_dicom() -> None:
    assert refusal("DICM").code == "kos:not-dicom"  # type: ignore[arg-type]


@pytest.mark.parametrize("keep", [132, 150, 400, 1200, -1], ids=str)
def test_a_truncated_manifest_is_refused(keep: int) -> None:
    data = make_kos_bytes()

    error = refusal(data[:keep])

    assert error.code == "kos:truncated"


def test_a_truncated_value_is_named_in_the_refusal() -> None:
    data = make_kos_bytes()
    cut = data.index(b"A24011500042") + 4

    error = refusal(data[:cut])

    assert error.code == "kos:truncated"
    assert "AccessionNumber (0008,0050)" in error.message


def test_a_manifest_of_another_sop_class_is_refused() -> None:
    ds = make_kos_dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(CT_IMAGE_STORAGE)

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:wrong-sop-class"
    assert "SOPClassUID (0008,0016)" in error.message
    assert CT_IMAGE_STORAGE in error.message


@pytest.mark.parametrize(
    ("meta_keyword", "value"),
    [
        ("MediaStorageSOPInstanceUID", f"{UID_ROOT}.666"),
        ("MediaStorageSOPClassUID", CT_IMAGE_STORAGE),
    ],
)
def test_file_meta_that_disagrees_with_the_dataset_is_refused(
    meta_keyword: str, value: str
) -> None:
    ds = make_kos_dataset()
    setattr(ds.file_meta, meta_keyword, value)

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:meta-mismatch"
    assert meta_keyword in error.message
    assert value in error.message


def test_file_meta_without_the_instance_uid_is_refused() -> None:
    ds = make_kos_dataset()
    del ds.file_meta.MediaStorageSOPInstanceUID

    assert refusal(dataset_to_bytes(ds)).code == "kos:invalid-meta"


@pytest.mark.parametrize("empty", [True, False], ids=["empty", "absent"])
def test_a_manifest_without_evidence_is_refused(empty: bool) -> None:
    ds = make_kos_dataset()
    if empty:
        ds.CurrentRequestedProcedureEvidenceSequence = Sequence()
    else:
        del ds.CurrentRequestedProcedureEvidenceSequence

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:no-evidence"
    assert "(0040,A375)" in error.message


def test_a_study_without_series_is_refused() -> None:
    ds = make_kos_dataset()
    ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence = Sequence()

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:no-references"
    assert STUDY_UID in error.message


def test_a_series_without_instances_is_refused() -> None:
    ds = make_kos_dataset()
    del first_series_item(ds).ReferencedSOPSequence

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:no-references"
    assert "ReferencedSOPSequence (0008,1199)" in error.message


def test_a_manifest_without_content_items_is_refused() -> None:
    ds = make_kos_dataset()
    del ds.ContentSequence

    assert refusal(dataset_to_bytes(ds)).code == "kos:no-content"


def _set_study_uid(ds: Dataset, value: str) -> None:
    set_raw(ds.CurrentRequestedProcedureEvidenceSequence[0], "StudyInstanceUID", value)


def _set_series_uid(ds: Dataset, value: str) -> None:
    set_raw(first_series_item(ds), "SeriesInstanceUID", value)


def _set_instance_uid(ds: Dataset, value: str) -> None:
    set_raw(first_series_item(ds).ReferencedSOPSequence[2], "ReferencedSOPInstanceUID", value)


def _set_own_uid(ds: Dataset, value: str) -> None:
    set_raw(ds, "SOPInstanceUID", value)
    set_raw(ds.file_meta, "MediaStorageSOPInstanceUID", value)


def _set_content_uid(ds: Dataset, value: str) -> None:
    reference = ds.ContentSequence[0].ReferencedSOPSequence[0]
    set_raw(reference, "ReferencedSOPInstanceUID", value)


def _set_location_uid(ds: Dataset, value: str) -> None:
    set_raw(first_series_item(ds), "RetrieveLocationUID", value)


@pytest.mark.parametrize(
    ("setter", "keyword"),
    [
        (_set_study_uid, "StudyInstanceUID (0020,000D)"),
        (_set_series_uid, "SeriesInstanceUID (0020,000E)"),
        (_set_instance_uid, "ReferencedSOPInstanceUID (0008,1155)"),
        (_set_own_uid, "SOPInstanceUID (0008,0018)"),
        (_set_content_uid, "ReferencedSOPInstanceUID (0008,1155) in ContentSequence[0]"),
        (_set_location_uid, "RetrieveLocationUID (0040,E011)"),
    ],
    ids=["study", "series", "instance", "own", "content-item", "retrieve-location"],
)
@pytest.mark.parametrize("bad_uid", ["1.2.03.4", "1.2.x", "1." + "2" * 63], ids=str)
def test_an_invalid_uid_anywhere_is_refused_naming_it(
    setter: object, keyword: str, bad_uid: str
) -> None:
    ds = make_kos_dataset()
    setter(ds, bad_uid)  # type: ignore[operator]

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:invalid-uid"
    assert keyword in error.message
    assert bad_uid[:20] in error.message


def test_an_empty_referenced_instance_uid_is_refused() -> None:
    ds = make_kos_dataset()
    _set_instance_uid(ds, "")

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:invalid-uid"
    assert "ReferencedSOPSequence[2]" in error.message


@pytest.mark.parametrize("value", [None, "", "   "], ids=["absent", "empty", "blank"])
def test_a_manifest_without_patient_id_is_refused(value: str | None) -> None:
    ds = make_kos_dataset()
    if value is None:
        del ds.PatientID
    else:
        set_raw(ds, "PatientID", value)

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:no-patient-id"
    assert "PatientID (0010,0020)" in error.message


def test_several_patient_ids_are_refused() -> None:
    ds = make_kos_dataset()
    ds.PatientID = ["IPP1", "IPP2"]

    assert refusal(dataset_to_bytes(ds)).code == "kos:invalid-value"


def test_a_series_with_no_retrieve_location_is_refused() -> None:
    ds = make_kos_dataset()
    del first_series_item(ds).RetrieveAETitle

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:no-retrieve-location"
    assert f"{STUDY_UID}.1" in error.message
    assert "RetrieveAETitle (0008,0054)" in error.message


def test_a_retrieve_url_that_is_not_http_is_refused() -> None:
    ds = make_kos_dataset()
    first_series_item(ds).RetrieveURL = "file:///etc/passwd"

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:invalid-value"
    assert "RetrieveURL (0008,1190)" in error.message


def test_an_instance_referenced_twice_is_refused() -> None:
    ds = make_kos_dataset()
    references = first_series_item(ds).ReferencedSOPSequence
    references[1].ReferencedSOPInstanceUID = references[0].ReferencedSOPInstanceUID

    error = refusal(dataset_to_bytes(ds))

    assert error.code == "kos:duplicate-reference"
    assert f"{STUDY_UID}.1.1" in error.message


def test_a_series_referenced_twice_is_refused() -> None:
    ds = make_kos_dataset()
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    series[1].SeriesInstanceUID = series[0].SeriesInstanceUID

    assert refusal(dataset_to_bytes(ds)).code == "kos:duplicate-reference"


def test_an_evidence_sequence_holding_text_is_refused() -> None:
    ds = make_kos_dataset()
    set_raw(ds, EVIDENCE, "not a sequence", vr="LO")

    assert refusal(dataset_to_bytes(ds)).code == "kos:invalid-value"


def test_a_kos_error_keeps_its_code_and_message_through_pickling() -> None:
    error = KOSError(KOSErrorCode.NO_EVIDENCE, "nothing referenced")

    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object

    assert (copy.code, copy.message, str(copy)) == (
        "kos:no-evidence",
        "nothing referenced",
        "kos:no-evidence: nothing referenced",
    )
    assert isinstance(copy, ValueError)


# --------------------------------------------------------------------------- patient IDs


def kos_with_patient(**overrides: object) -> ParsedKOS:
    study = replace_patient(make_study_description(), **overrides)
    return parse_kos(build_kos(study, now=NOW))


@pytest.mark.parametrize(
    ("issuer", "issuer_oid"),
    [
        (None, None),
        (HOPITAL_A_ISSUER, None),
        (HOPITAL_A_OID, None),
        (None, HOPITAL_A_OID),
        (HOPITAL_A_ISSUER, HOPITAL_A_OID),
        ("CH A (ancien nom)", HOPITAL_A_OID),
    ],
    ids=["no-issuer", "issuer-text", "oid-as-text", "oid", "text-and-oid", "oid-wins"],
)
def test_a_patient_id_of_the_institution_domain_resolves_to_an_ipp(
    issuer: str | None, issuer_oid: str | None
) -> None:
    kos = kos_with_patient(issuer=issuer, issuer_oid=issuer_oid)

    assert resolve(kos) == ResolvedPatientId(
        kind="IPP", issuer=HOPITAL_A_ISSUER, value="IPP000123", test=False, qualified=False
    )


def test_an_issuer_text_matching_an_institution_without_oid_on_record_is_accepted() -> None:
    kos = kos_with_patient(issuer_oid="1.2.250.1.71.4.2.7.555")

    assert resolve(kos, oid=None).kind == "IPP"


def test_a_foreign_issuer_is_refused_naming_what_was_sent_and_what_was_expected() -> None:
    kos = kos_with_patient(issuer="HOPITAL-B")

    with pytest.raises(KOSError) as caught:
        resolve(kos)

    assert caught.value.code == "kos:unknown-issuer"
    assert "'HOPITAL-B'" in caught.value.message
    assert f"'{HOPITAL_A_ISSUER}'" in caught.value.message
    assert "IssuerOfPatientID (0010,0021)" in caught.value.message


def test_an_oid_contradicting_the_institution_oid_is_refused_even_with_the_right_text() -> None:
    kos = kos_with_patient(issuer_oid="1.2.250.1.71.4.2.7.555")

    with pytest.raises(KOSError) as caught:
        resolve(kos)

    assert caught.value.code == "kos:unknown-issuer"
    assert "1.2.250.1.71.4.2.7.555" in caught.value.message


def test_an_ins_as_primary_id_resolves_to_the_national_domain_as_qualified() -> None:
    kos = kos_with_patient(patient_id=NIR, issuer=None, issuer_oid=INS_NIR_OID)

    assert resolve(kos) == ResolvedPatientId(
        kind="INS-NIR", issuer=INS_NIR_OID, value=NIR, test=False, qualified=True
    )
    assert national_ids(kos) == (resolve(kos),)


def test_an_ins_oid_given_as_issuer_text_is_recognised() -> None:
    kos = kos_with_patient(patient_id=NIA, issuer=INS_NIA_OID, issuer_oid=None)

    assert resolve(kos).kind == "INS-NIA"


def test_an_ins_oid_written_as_urn_is_recognised() -> None:
    ds = make_kos_dataset(patient=make_patient(patient_id=NIR, issuer_oid=INS_NIR_OID))
    ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID = f"urn:oid:{INS_NIR_OID}"

    assert resolve(parse(ds)).kind == "INS-NIR"


def test_an_ins_issuer_text_contradicting_the_ins_oid_is_refused() -> None:
    kos = kos_with_patient(patient_id=NIR, issuer=INS_NIA_OID, issuer_oid=INS_NIR_OID)

    with pytest.raises(KOSError) as caught:
        resolve(kos)

    assert caught.value.code == "kos:unknown-issuer"


@pytest.mark.parametrize(
    ("oid", "kind", "test"),
    [
        (INS_NIR_OID, "INS-NIR", False),
        (INS_NIA_OID, "INS-NIA", False),
        (INS_NIR_TEST_OID, "INS-NIR", True),
        (INS_NIA_TEST_OID, "INS-NIA", True),
    ],
)
def test_an_ins_in_other_patient_ids_is_found_with_its_kind_and_test_flag(
    oid: str, kind: str, test: bool
) -> None:
    kos = kos_with_patient(other_ids=(OtherPatientId(NIR, "ASIP-SANTE-INS", oid, None),))

    assert national_ids(kos) == (
        ResolvedPatientId(kind=kind, issuer=oid, value=NIR, test=test, qualified=True),
    )
    assert resolve(kos).kind == "IPP"


def test_other_ids_that_are_not_ins_are_kept_but_not_national() -> None:
    other = OtherPatientId("99887766", "CPAM", "1.2.250.1.213.1.4.2", "TEXT")
    kos = kos_with_patient(other_ids=(other,))

    assert kos.patient.other_ids == (other,)
    assert national_ids(kos) == ()


def test_the_same_ins_twice_is_reported_once() -> None:
    kos = kos_with_patient(
        patient_id=NIR_WITHOUT_KEY,
        issuer_oid=INS_NIR_OID,
        other_ids=(OtherPatientId(NIR, None, INS_NIR_OID, None),),
    )

    assert [resolved.value for resolved in national_ids(kos)] == [NIR]


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (NIR, NIR),
        (NIR_WITHOUT_KEY, NIR),
        ("1 84 12 76 451 089 46", NIR),
        (NIR_CORSICA_2A, NIR_CORSICA_2A),
        (NIR_CORSICA_2B.lower(), NIR_CORSICA_2B),
        (NIR_CORSICA_2A[:13], NIR_CORSICA_2A),
        (NIA, NIA),
    ],
)
def test_an_ins_matricule_is_normalised_to_fifteen_characters(raw: str, normalised: str) -> None:
    assert normalise_ins_matricule(raw) == normalised


@pytest.mark.parametrize(
    "matricule",
    [
        NIR[:13] + "47",  # wrong key
        NIR_CORSICA_2A[:13] + "60",  # the 2B key on a 2A matricule
        "18412764510",  # too short
        "1841276451089461",  # too long
        "18412AB451089",  # letters outside the department
        "184122C45108933",  # not a Corsican department
    ],
)
def test_a_malformed_ins_is_refused_without_echoing_it_whole(matricule: str) -> None:
    kos = kos_with_patient(other_ids=(OtherPatientId(matricule, None, INS_NIR_OID, None),))

    with pytest.raises(KOSError) as caught:
        national_ids(kos)

    assert caught.value.code == "kos:invalid-ins"
    assert matricule not in caught.value.message
    assert "OtherPatientIDsSequence[0]" in caught.value.message


def test_a_malformed_primary_ins_is_refused_when_resolving() -> None:
    kos = kos_with_patient(patient_id="12345", issuer=None, issuer_oid=INS_NIR_OID)

    with pytest.raises(KOSError) as caught:
        resolve(kos)

    assert caught.value.code == "kos:invalid-ins"


def test_other_patient_ids_round_trip_with_their_type() -> None:
    others = (
        OtherPatientId(NIR, None, INS_NIR_OID, "TEXT"),
        OtherPatientId("X-42", "LABO", None, None),
    )

    assert kos_with_patient(other_ids=others).patient.other_ids == others


def test_referenced_instances_keep_their_order() -> None:
    instances = tuple(ReferencedInstance(CT_IMAGE_STORAGE, f"{STUDY_UID}.1.{n}") for n in (5, 1, 3))
    series = dataclasses.replace(make_series(STUDY_UID, 1), instances=instances)
    study = make_study_description(series=(series,))

    assert parse_kos(build_kos(study, now=NOW)).primary_study.series[0].instances == instances


# --------------------------------------------------------------------------- fast paths
#
# parse_kos reads the usual encodings itself and leaves the rest to pydicom; build_kos writes
# plainly typed descriptions itself and leaves the rest to pydicom. Either way the outcome must
# be pydicom's: the same ParsedKOS or the same refusal, the same bytes.


def read_by_pydicom(data: bytes, monkeypatch: pytest.MonkeyPatch) -> ParsedKOS | tuple[str, str]:
    with monkeypatch.context() as patched:
        patched.setattr(kos_module, "_parse_fast", lambda data: None)
        return outcome(data)


def outcome(data: bytes) -> ParsedKOS | tuple[str, str]:
    try:
        return parse_kos(data)
    except KOSError as error:
        return (error.code, error.message)


def with_undefined_lengths(ds: Dataset) -> Dataset:
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
    return ds


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined-lengths"])
@pytest.mark.parametrize("preamble", [True, False], ids=["preamble", "no-preamble"])
def test_usual_encodings_are_read_without_pydicom_and_as_pydicom_reads_them(
    implicit_vr: bool, undefined: bool, preamble: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_kos_dataset(
        patient=make_patient(other_ids=(OtherPatientId(NIR, None, INS_NIR_OID, "TEXT"),)),
        retrieve_location_uid=f"{UID_ROOT}.77",
    )
    if undefined:
        with_undefined_lengths(ds)
    data = dataset_to_bytes(ds, implicit_vr=implicit_vr, preamble=preamble)
    expected = read_by_pydicom(data, monkeypatch)

    def no_pydicom(data: bytes) -> None:
        raise AssertionError("read by pydicom")

    monkeypatch.setattr(kos_module, "_read_part10", no_pydicom)

    assert parse_kos(data) == expected
    assert isinstance(expected, ParsedKOS)
    assert expected.instance_count == 6


def _latin1_charset(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "MÜLLER^Hélène^Anaïs"
    ds.InstitutionName = "Hôpital Saint-Éloi"


def _no_charset_latin1_bytes(ds: Dataset) -> None:
    del ds.SpecificCharacterSet
    set_raw(ds, "InstitutionName", b"H\xf4pital A")
    set_raw(ds, "StudyDescription", b"\xc9PAULE\\GAUCHE")


def _iso2022_japanese(ds: Dataset) -> None:
    set_raw(ds, "SpecificCharacterSet", ["", "ISO 2022 IR 87"])
    set_raw(ds, "StudyDescription", b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B")


def _python_codec_as_charset(ds: Dataset) -> None:
    set_raw(ds, "SpecificCharacterSet", "cp500")
    set_raw(ds, "InstitutionName", "HOPITAL".encode("cp500"))


def _charset_in_an_item(ds: Dataset) -> None:
    title = ds.ConceptNameCodeSequence[0]
    set_raw(title, "SpecificCharacterSet", "ISO_IR 100")
    set_raw(title, "CodeMeaning", b"Manifeste \xe9tendu")


def _undecodable_utf8(ds: Dataset) -> None:
    set_raw(ds, "StudyDescription", b"TDM \xe9paule \xff")


def _private_elements(ds: Dataset) -> None:
    for tag, vr, value in [
        (0x00290010, "LO", "ACME 1.0"),
        (0x00291001, "LO", "private text"),
        (0x00291002, "UI", "1.2.03"),  # private UIDs are not checked
        (0x00291003, "US", 7),
        (0x00291004, "SQ", Sequence([Dataset()])),
    ]:
        ds[tag] = pydicom.DataElement(tag, vr, value, validation_mode=pydicom.config.IGNORE)
    first_series_item(ds)[0x00110010] = pydicom.DataElement(0x00110010, "LO", "ACME 1.0")
    first_series_item(ds)[0x00111001] = pydicom.DataElement(0x00111001, "OB", b"x")


def _odd_but_readable_values(ds: Dataset) -> None:
    set_raw(ds, "SeriesNumber", " +999 ")
    set_raw(ds, "InstanceNumber", "1.5")
    set_raw(ds, "PatientWeight", "72.5", vr="DS")
    set_raw(ds, "ModalitiesInStudy", "CT\\PR\\")
    set_raw(ds, "StudyDescription", "  padded  \x00")
    set_raw(ds, "ReferringPhysicianName", "SMITH^John")
    first_series_item(ds).RetrieveAETitle = ["  PACS_MAIN ", "PACS_BACKUP"]


def _uids_padded_or_spaced(ds: Dataset) -> None:
    set_raw(first_series_item(ds), "SeriesInstanceUID", f"{STUDY_UID}.1 ")
    reference = first_series_item(ds).ReferencedSOPSequence[0]
    set_raw(reference, "ReferencedSOPInstanceUID", f" {STUDY_UID}.1.1")
    set_raw(ds.ContentSequence[1].ReferencedSOPSequence[0], "ReferencedSOPClassUID", "")


def _group_lengths_and_empty_values(ds: Dataset) -> None:
    set_raw(ds, "PatientBirthDate", "")
    set_raw(ds, "PatientSex", "")
    set_raw(first_series_item(ds), "BodyPartExamined", "")
    ds[0x00100000] = pydicom.DataElement(0x00100000, "UL", 42)


def _unusual_content_items(ds: Dataset) -> None:
    item = ds.ContentSequence[0]
    item.ReferencedSOPSequence[0].ReferencedFrameNumber = "1"
    set_raw(ds.ContentSequence[1], "ValueType", "image")
    ds.ContentSequence[2].ReferencedSOPSequence.append(Dataset())


def _retyped_elements(ds: Dataset) -> None:
    set_raw(ds, "AccessionNumber", "A1\\A2", vr="CS")
    set_raw(first_series_item(ds), "Modality", "1.2.3", vr="UI")


def _several_refusals(ds: Dataset) -> None:
    _set_instance_uid(ds, "1.2.x")
    del first_series_item(ds).RetrieveAETitle
    del ds.PatientID


def _a_series_referenced_twice(ds: Dataset) -> None:
    series = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    series[1].SeriesInstanceUID = series[0].SeriesInstanceUID


def _an_instance_referenced_twice(ds: Dataset) -> None:
    references = first_series_item(ds).ReferencedSOPSequence
    references[2].ReferencedSOPInstanceUID = references[0].ReferencedSOPInstanceUID


def _sequences_nested_deep(ds: Dataset) -> None:
    item = ds.ContentSequence[0]
    for _ in range(40):
        inner = Dataset()
        inner.ContentSequence = Sequence([item])
        item = inner
    ds.ContentSequence = Sequence([item])


@pytest.mark.parametrize(
    "edit",
    [
        _latin1_charset,
        _no_charset_latin1_bytes,
        _iso2022_japanese,
        _python_codec_as_charset,
        _charset_in_an_item,
        _undecodable_utf8,
        _private_elements,
        _odd_but_readable_values,
        _uids_padded_or_spaced,
        _group_lengths_and_empty_values,
        _unusual_content_items,
        _retyped_elements,
        _several_refusals,
        _a_series_referenced_twice,
        _an_instance_referenced_twice,
        _sequences_nested_deep,
    ],
)
@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined-lengths"])
def test_the_fast_reader_and_pydicom_give_the_same_outcome(
    edit: object, implicit_vr: bool, undefined: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_kos_dataset()
    edit(ds)  # type: ignore[operator]
    if undefined:
        with_undefined_lengths(ds)
    data = dataset_to_bytes(ds, implicit_vr=implicit_vr)

    assert outcome(data) == read_by_pydicom(data, monkeypatch)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated_bytes() | mutated_datasets())
def test_hostile_manifests_have_the_same_outcome_read_fast_or_by_pydicom(data: bytes) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert outcome(data) == read_by_pydicom(data, monkeypatch)


@functools.cache
def encodings_to_mutate() -> tuple[bytes, ...]:
    """The manifest in explicit and implicit VR, with defined and undefined lengths."""
    found = []
    for undefined in (False, True):
        ds = make_kos_dataset(retrieve_url="https://pacs.hopital-a.example/wado")
        if undefined:
            with_undefined_lengths(ds)
        found += [dataset_to_bytes(ds), dataset_to_bytes(ds, implicit_vr=True)]
    return tuple(found)


@st.composite
def mutated_references(draw: st.DrawFn) -> bytes:
    """Small edits inside the evidence or the content items: lengths, padding, delimiters."""
    data = bytearray(draw(st.sampled_from(encodings_to_mutate())))
    rnd = draw(st.randoms(use_true_random=True))
    start = data.index(draw(st.sampled_from([b"\x40\x00\x75\xa3", b"\x40\x00\x30\xa7"])))
    for _ in range(draw(st.integers(1, 3))):
        position = rnd.randrange(start, len(data))
        operation = draw(st.sampled_from(["add", "set", "insert", "delete", "undefined", "repeat"]))
        if operation == "add":
            data[position] = (data[position] + draw(st.sampled_from([1, 255, 2]))) % 256
        elif operation == "set":
            data[position] = draw(st.sampled_from([0x00, 0x20, 0x2E, 0x30, 0x39, 0x5C, 0xFE, 0xFF]))
        elif operation == "insert":
            data[position:position] = draw(st.sampled_from([b"\x00", b" ", b"\x00\x00", b"0"]))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 4))]
        elif operation == "undefined":
            data[position : position + 4] = b"\xff\xff\xff\xff"
        else:
            length = draw(st.integers(2, 40))
            data[position:position] = data[position : position + length]
    return bytes(data)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=mutated_references())
def test_edited_reference_items_have_the_same_outcome_read_fast_or_by_pydicom(
    data: bytes,
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert outcome(data) == read_by_pydicom(data, monkeypatch)


def _written_by_pydicom(study: StudyDescription, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as patched:
        patched.setattr(kos_module, "_plainly_typed", lambda *args: False)
        return build_kos(study, now=NOW, **KOS_UIDS)


KOS_UIDS = {"sop_instance_uid": f"{UID_ROOT}.5.1", "series_instance_uid": f"{UID_ROOT}.5"}


@pytest.mark.parametrize(
    "change",
    [
        {},
        {
            "patient": make_patient(
                family_name="LÉVÊQUE",
                given_names="Zoé Anaïs",
                birth_name="Ŝtraße",
                issuer=None,
                issuer_oid=HOPITAL_A_OID,
                other_ids=(
                    OtherPatientId(NIR, None, INS_NIR_OID, "TEXT"),
                    OtherPatientId("X-42", "LABO", None, None),
                ),
            ),
            "institution_name": "Centre hospitalier de Saint-Étienne",
            "retrieve_location_uid": f"{UID_ROOT}.77",
            "retrieve_url": "https://pacs.hopital-a.example/dicom-web",
        },
        {
            "patient": make_patient(sex="", birth_date=None, given_names=""),
            "accession_number": None,
            "study_date": None,
            "study_time": dt.time(10, 42, 7, 120),
            "study_description": "odd",
            "institution_name": "",
            "series": (
                make_series(STUDY_UID, 1, modality="PR", sop_class_uid=GSPS_STORAGE),
                make_series(STUDY_UID, 2, body_part=None, sop_class_uid=SECONDARY_CAPTURE_STORAGE),
                make_series(STUDY_UID, 3, modality="ECG", sop_class_uid=ECG_STORAGE),
            ),
        },
        {"study_description": "TDM \ud800 lone surrogate"},
        {"accession_number": b"A24011500042"},  # bytes pass pydicom's validation of SH
    ],
    ids=["factory", "unicode-and-identifiers", "sparse-and-mixed", "surrogate", "bytes"],
)
def test_the_draft_writer_writes_the_bytes_pydicom_writes(
    change: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = make_study_description(**change)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.WARN)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom replaces the lone surrogate
        assert build_kos(study, now=NOW, **KOS_UIDS) == _written_by_pydicom(study, monkeypatch)


@pytest.mark.parametrize(
    "now",
    [NOW, NOW.replace(tzinfo=None), NOW.replace(tzinfo=dt.timezone(-dt.timedelta(hours=3.5)))],
    ids=["cet", "naive", "negative-offset"],
)
def test_the_draft_writer_and_pydicom_agree_for_any_time(
    now: dt.datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = make_study_description()
    with monkeypatch.context() as patched:
        patched.setattr(kos_module, "_plainly_typed", lambda *args: False)
        expected = build_kos(study, now=now)

    assert build_kos(study, now=now) == expected


def test_a_description_with_a_lone_surrogate_is_refused_as_a_bad_value() -> None:
    study = make_study_description(study_description="IRM \ud800 cérébrale")

    with pytest.raises(KOSError) as refused:
        build_kos(study, now=NOW)

    assert refused.value.code == "kos:invalid-value"


# --------------------------------------------------------------------------- a stored parse

SHA = "9" * 64  # the SHA-256 of the bytes a parse is stored for


@pytest.mark.parametrize(
    "now",
    [NOW, NOW.replace(tzinfo=None), NOW.replace(tzinfo=dt.timezone(-dt.timedelta(hours=3.5)))],
    ids=["cet", "naive", "negative-offset"],
)
def test_a_stored_parse_reads_back_as_the_same_parse_with_its_time_zone(now: dt.datetime) -> None:
    kos = parse_kos(build_kos(make_study_description(), now=now))

    loaded = load_parsed_kos(dump_parsed_kos(kos, sha256=SHA), sha256=SHA)

    assert loaded == kos
    assert loaded is not None
    assert loaded.content_datetime is not None
    assert loaded.content_datetime.utcoffset() == now.utcoffset()


def test_a_stored_parse_with_pydicoms_str_types_reads_back_as_plain_strings() -> None:
    kos = parse_kos(make_kos_bytes())
    with_uid = dataclasses.replace(kos, sop_instance_uid=pydicom.uid.UID(kos.sop_instance_uid))

    loaded = load_parsed_kos(dump_parsed_kos(with_uid, sha256=SHA), sha256=SHA)

    assert loaded == kos
    assert loaded is not None
    assert type(loaded.sop_instance_uid) is str


def test_a_parse_stored_for_other_bytes_under_another_format_or_damaged_is_not_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = dump_parsed_kos(parse_kos(make_kos_bytes()), sha256=SHA)
    assert load_parsed_kos(stored, sha256=SHA) is not None

    assert load_parsed_kos(stored, sha256="0" * 64) is None
    for damaged in (b"", b"{}", b"null", stored[: len(stored) // 2], stored.replace(b'"', b"'")):
        assert load_parsed_kos(damaged, sha256=SHA) is None
    # Another PARSED_KOS_FORMAT, or other fields in ParsedKOS (their schema's fingerprint).
    monkeypatch.setattr(kos_module, "_STORED_FORMAT", kos_module._STORED_FORMAT + "x")
    assert load_parsed_kos(stored, sha256=SHA) is None


def test_the_stored_format_follows_the_version_and_the_fields_of_a_parse() -> None:
    assert (
        f"{kos_module.PARSED_KOS_FORMAT}:{kos_module._schema_fingerprint(ParsedKOS)}"
    ) == kos_module._STORED_FORMAT
    with_a_field = dataclasses.make_dataclass(
        "ParsedKOS", [("added", str | None, None)], bases=(ParsedKOS,), frozen=True
    )
    assert kos_module._schema_fingerprint(with_a_field) != kos_module._schema_fingerprint(ParsedKOS)
