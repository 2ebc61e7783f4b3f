"""Manifests for tests: a realistic study, its KOS, and the means to hand-craft variants.

`make_study_description()` is a CT chest study of Marie DUPONT at hospital A: two series of
three instances, retrievable from the AE title PACS_HOPA. `make_kos_bytes()` builds its
manifest with `build_kos`; `make_kos_dataset()` gives the same manifest as a pydicom dataset
to edit, and `dataset_to_bytes()` writes an edited dataset back, explicit or implicit VR, with
or without file meta.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import warnings
import zlib
from typing import Any

import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from broker.dicom.kos import (
    KOS_SOP_CLASS_UID,
    PatientInfo,
    ReferencedInstance,
    SeriesDescription,
    StudyDescription,
    build_kos,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"

# Test UIDs live under pydicom's root, which pydicom lets its users allocate from.
UID_ROOT = "1.2.826.0.1.3680043.8.498.7100"
STUDY_UID = f"{UID_ROOT}.1.20240115.42"
HOPITAL_A_ISSUER = "HOPITAL-A"
HOPITAL_A_OID = "1.2.250.1.71.4.2.7.999001"
HOPITAL_A_AE = "PACS_HOPA"
NOW = dt.datetime(2024, 1, 15, 11, 5, 30, 250000, tzinfo=dt.timezone(dt.timedelta(hours=1)))

# Synthetic matricules with their correct keys (key = 97 - n mod 97).
NIR = "184127645108946"
NIR_WITHOUT_KEY = "1841276451089"
NIR_CORSICA_2A = "184122A45108933"
NIR_CORSICA_2B = "184122B45108960"
NIA = "799129912345606"


def make_patient(**overrides: Any) -> PatientInfo:
    fields: dict[str, Any] = {
        "patient_id": "IPP000123",
        "issuer": HOPITAL_A_ISSUER,
        "issuer_oid": None,
        "family_name": "DUPONT",
        "given_names": "Marie",
        "birth_name": "",
        "birth_date": dt.date(1958, 3, 14),
        "sex": "F",
        "other_ids": (),
    }
    fields.update(overrides)
    return PatientInfo(**fields)


def make_series(
    study_uid: str,
    number: int,
    *,
    modality: str = "CT",
    body_part: str | None = "CHEST",
    instance_count: int = 3,
    sop_class_uid: str = CT_IMAGE_STORAGE,
) -> SeriesDescription:
    series_uid = f"{study_uid}.{number}"
    return SeriesDescription(
        series_instance_uid=series_uid,
        modality=modality,
        body_part=body_part,
        instances=tuple(
            ReferencedInstance(sop_class_uid, f"{series_uid}.{index}")
            for index in range(1, instance_count + 1)
        ),
    )


def make_study_description(**overrides: Any) -> StudyDescription:
    """A CT chest study; series and instance UIDs follow `study_instance_uid` if overridden."""
    study_uid = overrides.pop("study_instance_uid", STUDY_UID)
    fields: dict[str, Any] = {
        "patient": make_patient(),
        "study_instance_uid": study_uid,
        "accession_number": "A24011500042",
        "study_date": dt.date(2024, 1, 15),
        "study_time": dt.time(10, 42, 7),
        "study_description": "TDM THORAX",
        "series": (make_series(study_uid, 1), make_series(study_uid, 2)),
        "retrieve_ae_title": HOPITAL_A_AE,
        "institution_name": "Hôpital A",
    }
    fields.update(overrides)
    return StudyDescription(**fields)


def make_kos_bytes(
    *,
    now: dt.datetime = NOW,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    uid_root: str | None = None,
    **overrides: Any,
) -> bytes:
    return build_kos(
        make_study_description(**overrides),
        now=now,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        uid_root=uid_root,
    )


def make_kos_dataset(**overrides: Any) -> Dataset:
    """The manifest of `make_kos_bytes(**overrides)`, decoded, with its file meta."""
    return pydicom.dcmread(io.BytesIO(make_kos_bytes(**overrides)))


def dataset_to_bytes(
    ds: Dataset,
    *,
    implicit_vr: bool = False,
    big_endian: bool = False,
    deflated: bool = False,
    with_meta: bool = True,
    preamble: bool = True,
) -> bytes:
    """Encode an (edited) dataset, odd values and all.

    With meta: a Part 10 file whose file meta is the dataset's own, kept as it is (a test may
    make it disagree with the dataset or drop an element), with the transfer syntax asked for.
    Without: the bare dataset, as a DIMSE C-STORE carries it. pydicom's complaints about the
    values are silenced: writing odd values is the point.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        body = DicomBytesIO()
        body.is_little_endian = not big_endian
        body.is_implicit_VR = implicit_vr
        bare = Dataset()
        bare.update(ds)
        write_dataset(body, bare)
        if not with_meta:
            return body.getvalue()

        if deflated:
            transfer_syntax = DeflatedExplicitVRLittleEndian
        elif big_endian:
            transfer_syntax = ExplicitVRBigEndian
        elif implicit_vr:
            transfer_syntax = ImplicitVRLittleEndian
        else:
            transfer_syntax = ExplicitVRLittleEndian
        meta = FileMetaDataset()
        existing = getattr(ds, "file_meta", None)
        if existing is not None:
            meta.update(existing)
        else:
            meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", KOS_SOP_CLASS_UID)
            meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", f"{UID_ROOT}.9")
        meta.TransferSyntaxUID = transfer_syntax
        complete = all(
            keyword in meta for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
        )
        header = DicomBytesIO()
        header.is_little_endian = True
        header.is_implicit_VR = False
        write_file_meta_info(header, meta, enforce_standard=complete)

    dataset_bytes = body.getvalue()
    if deflated:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        dataset_bytes = compressor.compress(dataset_bytes) + compressor.flush()
    prefix = bytes(128) + b"DICM" if preamble else b"DICM"
    return prefix + header.getvalue() + dataset_bytes


def set_raw(ds: Dataset, keyword: str, value: Any, *, vr: str | None = None) -> None:
    """Set an element without pydicom's value validation (to write what odd archives write)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    ds[tag] = DataElement(
        tag, vr or dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE
    )


def replace_patient(study: StudyDescription, **overrides: Any) -> StudyDescription:
    return dataclasses.replace(study, patient=dataclasses.replace(study.patient, **overrides))
