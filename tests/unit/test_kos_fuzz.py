"""Property tests of manifests: hostile bytes never escape as anything but KOSError, and what
is accepted is still a valid manifest; a built manifest always reads back as its study."""

from __future__ import annotations

import datetime as dt
import functools
import io
import re
import traceback
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from broker.dicom import kos as kos_module
from broker.dicom.kos import (
    KOSError,
    KOSErrorCode,
    OtherPatientId,
    ParsedKOS,
    PatientInfo,
    ReferencedInstance,
    SeriesDescription,
    StudyDescription,
    build_kos,
    dump_parsed_kos,
    load_parsed_kos,
    parse_kos,
)
from broker.dicom.sopclasses import modality_for_sop_class
from tests.dicom_factories import (
    CT_IMAGE_STORAGE,
    GSPS_STORAGE,
    MR_IMAGE_STORAGE,
    NIR,
    SECONDARY_CAPTURE_STORAGE,
    UID_ROOT,
    dataset_to_bytes,
    make_kos_bytes,
    make_kos_dataset,
    make_patient,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
KOS_SOURCE = Path(kos_module.__file__).resolve()
KNOWN_CODES = {code.value for code in KOSErrorCode}


@functools.cache
def valid_encodings() -> tuple[bytes, ...]:
    """One manifest, with an INS in Other Patient IDs, in every encoding the broker reads."""
    ds = make_kos_dataset(
        patient=make_patient(other_ids=(OtherPatientId(NIR, None, kos_module.INS_NIR_OID, None),))
    )
    return (
        dataset_to_bytes(ds),
        dataset_to_bytes(ds, implicit_vr=True),
        dataset_to_bytes(ds, big_endian=True),
        dataset_to_bytes(ds, deflated=True),
        dataset_to_bytes(ds, preamble=False),
    )


def assert_parses_or_refuses(data: bytes) -> None:
    """parse_kos returns a valid ParsedKOS or raises KOSError, and never hides our own bug."""
    try:
        kos = parse_kos(data)
    except KOSError as error:
        refusal = error
    else:
        assert_is_a_valid_manifest(kos)
        # What the intake queue keeps beside the bytes reads back as the very same parse.
        assert load_parsed_kos(dump_parsed_kos(kos, sha256="x"), sha256="x") == kos
        return
    assert refusal.code in KNOWN_CODES
    assert refusal.message
    assert_not_raised_by_kos_module_itself(refusal)


def assert_not_raised_by_kos_module_itself(error: KOSError) -> None:
    # The parser turns decoding errors into KOSError("kos:invalid-value"); an error whose
    # innermost frame is in kos.py itself would be a bug of ours hidden by that translation.
    cause = error.__cause__
    if cause is None or isinstance(cause, KOSError):
        return
    innermost = traceback.extract_tb(cause.__traceback__)[-1]
    assert Path(innermost.filename).resolve() != KOS_SOURCE, (
        f"{type(cause).__name__} raised by kos.py itself at line {innermost.lineno}: {cause}"
    )


def assert_is_a_valid_manifest(kos: ParsedKOS) -> None:
    def valid(uid: str) -> bool:
        return len(uid) <= 64 and re.fullmatch(pydicom.uid.RE_VALID_UID, uid) is not None

    assert isinstance(kos, ParsedKOS)
    assert kos.patient.patient_id
    assert kos.studies
    assert all(valid(uid) for uid in (kos.sop_instance_uid, kos.study_instance_uid))
    seen: set[str] = set()
    for study in kos.studies:
        assert study.series
        for series in study.series:
            assert series.instances
            assert series.retrieve_ae_title or series.retrieve_location_uid or series.retrieve_url
            for instance in series.instances:
                assert valid(instance.sop_instance_uid)
                assert instance.sop_instance_uid not in seen
                seen.add(instance.sop_instance_uid)
    assert list(kos.modalities) == sorted(set(kos.modalities))
    assert "KO" not in kos.modalities


# --------------------------------------------------------------------------- hostile bytes

INTERESTING = [
    b"\xff\xff\xff\xff",  # undefined length
    b"\xfe\xff\x00\xe0",  # item
    b"\xfe\xff\x0d\xe0",  # item delimitation
    b"\xfe\xff\xdd\xe0",  # sequence delimitation
    b"SQ",
    b"UN",
    b"OB\x00\x00",
    b"\x00\x00",
    b"\\",
    b"\x00",
]


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(valid_encodings())))
    # Positions come from a (reproducible) Random: hypothesis's integers lean towards small
    # values, which would keep hitting the preamble. Most edits land past the "DICM" prefix.
    rnd = draw(st.randoms(use_true_random=True))
    start = 132 if data[128:132] == b"DICM" else 4
    for _ in range(draw(st.integers(1, 5))):
        low = 0 if rnd.random() < 0.03 else min(start, len(data))
        position = rnd.randrange(low, len(data)) if len(data) > low else len(data)
        operation = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        if operation == "flip" and position < len(data):
            data[position] ^= 1 << rnd.randrange(8)
        elif operation == "overwrite":
            chunk = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=8))
            data[position : position + len(chunk)] = chunk
        elif operation == "insert":
            data[position:position] = draw(st.sampled_from(INTERESTING) | st.binary(max_size=16))
        elif operation == "delete":
            del data[position : position + rnd.randrange(1, 17)]
        else:
            del data[position:]
    return bytes(data)


@FUZZ
@given(mutated_bytes())
def test_flipped_truncated_or_spliced_manifests_only_parse_or_raise_kos_error(data: bytes) -> None:
    assert_parses_or_refuses(data)


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([0, 1, 2]))
def test_garbage_after_a_valid_header_only_parses_or_raises_kos_error(
    tail: bytes, header_index: int
) -> None:
    valid = valid_encodings()[header_index]
    meta_end = 144 + int.from_bytes(valid[140:144], "little")

    assert_parses_or_refuses(valid[:meta_end] + tail)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_kos_error(data: bytes) -> None:
    assert_parses_or_refuses(data)
    assert_parses_or_refuses(b"DICM" + data)


# --------------------------------------------------------------------------- hostile datasets

VALUE_FOR_VR: dict[str, st.SearchStrategy[Any]] = {
    "CS": st.text(max_size=20),
    "LO": st.text(max_size=80),
    "SH": st.text(max_size=20),
    "PN": st.text(max_size=30),
    "UI": st.sampled_from(["", "1.2.03", "1..2", "x", "1." + "9" * 70, f"{UID_ROOT}.1"]),
    "AE": st.text(max_size=20),
    "UR": st.text(max_size=40),
    "DA": st.sampled_from(["", "20240230", "2024.01.01", "abc", "99999999"]),
    "TM": st.sampled_from(["", "25", "10:30", "1030.1234567", "xx"]),
    "IS": st.sampled_from(["", "1", "-5", "1.5", "9" * 20]),
    "DS": st.sampled_from(["", "1.5", "nan", "1e400", "x"]),
    "US": st.integers(0, 0xFFFF),
    "UL": st.integers(0, 0xFFFFFFFF),
    "SS": st.integers(-0x8000, 0x7FFF),
    "FD": st.floats(allow_nan=True),
    "OB": st.binary(max_size=40),
    "UN": st.binary(max_size=40),
    "LT": st.text(max_size=100),
}


def all_elements(ds: Dataset) -> list[tuple[Dataset, int]]:
    found: list[tuple[Dataset, int]] = []

    def walk(container: Dataset) -> None:
        for element in container:
            found.append((container, element.tag))
            if element.VR == "SQ" and isinstance(element.value, Sequence):
                for item in element.value:
                    walk(item)

    walk(ds)
    walk(ds.file_meta)
    return found


def sequences(ds: Dataset) -> list[DataElement]:
    return [container[tag] for container, tag in all_elements(ds) if container[tag].VR == "SQ"]


@functools.cache
def base_manifest() -> bytes:
    return valid_encodings()[0]


def mutate(draw: st.DrawFn, ds: Dataset) -> None:
    container, tag = draw(st.sampled_from(all_elements(ds)))
    action = draw(st.sampled_from(["delete", "retype", "empty", "swap", "duplicate", "drop"]))
    element = container[tag]
    if action == "delete":
        del container[tag]
    elif action == "retype":
        vr = draw(st.sampled_from(sorted(VALUE_FOR_VR)))
        value = draw(VALUE_FOR_VR[vr])
        container[tag] = DataElement(tag, vr, value, validation_mode=pydicom.config.IGNORE)
    elif action == "empty":
        container[tag] = DataElement(tag, element.VR, None, validation_mode=pydicom.config.IGNORE)
    elif action == "swap":
        first = draw(st.sampled_from(sequences(ds)))
        second = draw(st.sampled_from(sequences(ds)))
        first.value, second.value = Sequence(list(second.value)), Sequence(list(first.value))
    elif action == "duplicate" and element.VR == "SQ" and element.value:
        element.value.append(element.value[draw(st.integers(0, len(element.value) - 1))])
    elif action == "drop" and element.VR == "SQ" and element.value:
        del element.value[draw(st.integers(0, len(element.value) - 1))]


@st.composite
def mutated_datasets(draw: st.DrawFn) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(base_manifest()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(draw(st.integers(1, 4))):
            try:
                mutate(draw, ds)
            except (ValueError, TypeError, UnicodeError, KeyError):
                continue  # pydicom refuses this edit (e.g. a value it cannot convert)
    try:
        return dataset_to_bytes(ds, implicit_vr=draw(st.booleans()))
    except Exception:
        reject()  # pydicom cannot even write this dataset


@FUZZ
@given(mutated_datasets())
def test_mutated_datasets_only_parse_or_raise_kos_error(data: bytes) -> None:
    assert_parses_or_refuses(data)


# --------------------------------------------------------------------------- round trip

NAME_ALPHABET = st.characters(
    codec="utf-8",
    categories=("Lu", "Ll", "Nd"),
    include_characters=" -'.",
    exclude_characters="^=\\",
)
words = st.text(NAME_ALPHABET, max_size=16).map(str.strip)
identifiers = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
    min_size=1,
    max_size=16,
)
oids = st.lists(st.integers(0, 99999), min_size=1, max_size=4).map(
    lambda parts: "1.2.250.1." + ".".join(map(str, parts))
)
uid_suffixes = st.integers(1, 10**9)
sop_classes = st.sampled_from(
    [CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, SECONDARY_CAPTURE_STORAGE, GSPS_STORAGE]
)
dates = st.dates(dt.date(1900, 1, 1), dt.date(2100, 12, 31))
times = st.times()
offsets = st.integers(-12 * 60, 14 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
nows = st.builds(
    lambda naive, tz: naive.replace(tzinfo=tz),
    st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31)),
    st.none() | offsets,
)


@st.composite
def study_descriptions(draw: st.DrawFn) -> StudyDescription:
    study_uid = f"{UID_ROOT}.{draw(uid_suffixes)}"
    other_ids = draw(
        st.lists(
            st.builds(
                OtherPatientId,
                value=identifiers,
                issuer=st.none() | identifiers,
                issuer_oid=st.none() | oids,
                type_of_patient_id=st.sampled_from([None, "TEXT", "RFID", "BARCODE"]),
            ),
            max_size=2,
        )
    )
    patient = PatientInfo(
        patient_id=draw(identifiers),
        issuer=draw(st.none() | identifiers),
        issuer_oid=draw(st.none() | oids),
        family_name=draw(words),
        given_names=draw(words),
        birth_name=draw(words),
        birth_date=draw(st.none() | dates),
        sex=draw(st.sampled_from(["M", "F", "O", ""])),
        other_ids=tuple(other_ids),
    )
    series = []
    for number in range(1, draw(st.integers(1, 3)) + 1):
        series_uid = f"{study_uid}.{number}"
        classes = draw(st.lists(sop_classes, min_size=1, max_size=4))
        series.append(
            SeriesDescription(
                series_instance_uid=series_uid,
                modality=draw(st.sampled_from(["CT", "MR", "US", "PR", "OT", "SR"])),
                body_part=draw(st.sampled_from([None, "CHEST", "HEAD", "ABDOMEN"])),
                instances=tuple(
                    ReferencedInstance(sop_class, f"{series_uid}.{index}")
                    for index, sop_class in enumerate(classes, start=1)
                ),
            )
        )
    kinds = draw(st.sets(st.sampled_from(["ae", "uid", "url"]), min_size=1))
    retrieve = {
        "retrieve_ae_title": draw(st.sampled_from(["PACS_A", "ARCHIVE1"]))
        if "ae" in kinds
        else None,
        "retrieve_location_uid": f"{UID_ROOT}.77" if "uid" in kinds else None,
        "retrieve_url": "https://pacs.example/dicom-web" if "url" in kinds else None,
    }
    return StudyDescription(
        patient=patient,
        study_instance_uid=study_uid,
        accession_number=draw(st.none() | identifiers),
        study_date=draw(st.none() | dates),
        study_time=draw(st.none() | times),
        study_description=draw(words),
        series=tuple(series),
        institution_name=draw(words),
        **retrieve,
    )


@settings(max_examples=100, deadline=None)
@given(study_descriptions(), nows)
def test_any_study_round_trips_through_its_manifest(
    study: StudyDescription, now: dt.datetime
) -> None:
    data = build_kos(study, now=now)

    kos = parse_kos(data)

    assert kos.patient == study.patient
    assert kos.study_instance_uid == study.study_instance_uid
    assert (kos.study_date, kos.study_time) == (study.study_date, study.study_time)
    assert kos.study_description == study.study_description
    assert kos.institution_name == study.institution_name
    assert kos.accession_number == study.accession_number
    assert kos.content_datetime == now
    [referenced] = kos.studies
    assert referenced.accession_number == study.accession_number
    for parsed, described in zip(referenced.series, study.series, strict=True):
        assert parsed.series_instance_uid == described.series_instance_uid
        assert parsed.modality == described.modality
        assert parsed.body_part == described.body_part
        assert parsed.instances == described.instances
        assert parsed.retrieve_ae_title == study.retrieve_ae_title
        assert parsed.retrieve_location_uid == study.retrieve_location_uid
        assert parsed.retrieve_url == study.retrieve_url
    expected_modalities = {series.modality for series in study.series} | {
        modality
        for series in study.series
        for instance in series.instances
        if (modality := modality_for_sop_class(instance.sop_class_uid))
    }
    assert kos.modalities == tuple(sorted(expected_modalities - {"KO"}))
    assert build_kos(study, now=now) == data
    assert load_parsed_kos(dump_parsed_kos(kos, sha256="x"), sha256="x") == kos


def test_the_bug_detector_recognises_an_error_raised_by_kos_py_itself() -> None:
    error = KOSError("kos:invalid-value", "wrapped")
    error.__cause__ = _error_raised_inside_kos_py()

    with pytest.raises(AssertionError, match=r"raised by kos\.py itself"):
        assert_not_raised_by_kos_module_itself(error)


def _error_raised_inside_kos_py() -> BaseException:
    # An exception whose innermost frame is in kos.py, as a bug of ours would have.
    try:
        kos_module._parse_time(None)  # type: ignore[arg-type]
    except AttributeError as exc:
        return exc
    raise AssertionError("expected kos._parse_time(None) to fail")


def test_warnings_do_not_leak_out_of_parsing_odd_values() -> None:
    ds = make_kos_dataset()
    ds["StudyDescription"] = DataElement(
        0x00081030, "LO", "X" * 200, validation_mode=pydicom.config.IGNORE
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_kos(dataset_to_bytes(ds)).study_description == "X" * 200


def test_a_fresh_manifest_is_valid_for_the_properties_above() -> None:
    assert_is_a_valid_manifest(parse_kos(make_kos_bytes()))
