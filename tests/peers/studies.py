"""Synthetic imaging studies, written with pydicom, to load into real archives.

`make_study(...)` gives the Part 10 bytes of every instance of one study: small raw 16-bit
MONOCHROME2 images in explicit VR little endian, UTF-8 (ISO_IR 192), the SOP class of the
modality, the patient's local ID under its issuer and, when the patient has one, the INS in
OtherPatientIDsSequence under its official OID (as tests/dicom_factories.py does in
manifests). UIDs are derived from the study UID, so the same arguments give the same bytes.

`region_studies()` is the fixed region the `orthanc_region` fixture loads: studies at the CHU
de Bellecombe (AE CHUB_PACS) and at the CH de Port-Maël (AE PORTMAEL_PACS), with Marie
DUPONT at both under different local IDs.
"""

from __future__ import annotations

import datetime as dt
import io
import sys
from array import array
from dataclasses import dataclass
from functools import cache
from typing import Final, Literal, NamedTuple

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from broker.dicom.kos import INS_NIA_OID, INS_NIR_OID
from tests.dicom_factories import NIA, NIR

# Under pydicom's root, which pydicom lets its users allocate from (dicom_factories: .7100).
UID_PREFIX: Final = "1.2.826.0.1.3680043.8.498.72."

CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.1.1"  # For Presentation
US_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.6.1"
SECONDARY_CAPTURE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.7"

SOP_CLASS_BY_MODALITY: Final = {
    "CT": CT_IMAGE_STORAGE,
    "MR": MR_IMAGE_STORAGE,
    "CR": CR_IMAGE_STORAGE,
    "DX": DX_IMAGE_STORAGE,
    "US": US_IMAGE_STORAGE,
}

INS_OID_BY_KIND: Final = {"NIR": INS_NIR_OID, "NIA": INS_NIA_OID}

CHUB_AE: Final = "CHUB_PACS"
CHUB_ISSUER: Final = "CHU-BELLECOMBE"
CHUB_ISSUER_OID: Final = "1.2.250.1.999.350000014"  # as in tests/conftest.py
CHUB_NAME: Final = "CHU de Bellecombe"
PORTMAEL_AE: Final = "PORTMAEL_PACS"
PORTMAEL_ISSUER: Final = "CH-PORTMAEL"
PORTMAEL_NAME: Final = "CH de Port-Maël"

# A second synthetic NIR (a man born in July 1967), its key computed as 97 - n mod 97.
NIR_KERMARREC: Final = "167075612345645"


@dataclass(frozen=True)
class SyntheticPatient:
    """A person; `ins` is a 15-character matricule, `ins_kind` says which OID it goes under."""

    family: str
    given: str
    birth_date: dt.date
    sex: Literal["M", "F", "O", ""]
    ins: str | None = None
    ins_kind: Literal["NIR", "NIA"] = "NIR"

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}" if self.given else self.family

    @property
    def ins_oid(self) -> str | None:
        return INS_OID_BY_KIND[self.ins_kind] if self.ins else None


@dataclass(frozen=True)
class SyntheticStudy:
    """One study as loaded into an archive, with the bytes of its instances."""

    patient: SyntheticPatient
    patient_id: str
    issuer: str
    issuer_oid: str | None
    institution_name: str
    modality: str
    study_instance_uid: str
    study_date: dt.date
    study_time: dt.time | None
    accession_number: str
    description: str
    body_part: str | None
    series_uids: tuple[str, ...]
    instances_per_series: int
    instances: tuple[bytes, ...]

    @property
    def sop_class_uid(self) -> str:
        return sop_class_for(self.modality)

    @property
    def instance_count(self) -> int:
        return len(self.instances)

    def sop_instance_uids(self, series_number: int) -> tuple[str, ...]:
        """SOP Instance UIDs of series `series_number` (1-based), in instance order."""
        return tuple(
            sop_instance_uid(self.study_instance_uid, series_number, number)
            for number in range(1, self.instances_per_series + 1)
        )


def sop_class_for(modality: str) -> str:
    """The storage SOP class of the modality's images; Secondary Capture for the others."""
    return SOP_CLASS_BY_MODALITY.get(modality, SECONDARY_CAPTURE_STORAGE)


def study_instance_uid_for(seed: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["study", seed])


def series_instance_uid(study_uid: str, series_number: int) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[study_uid, "series", str(series_number)])


def sop_instance_uid(study_uid: str, series_number: int, instance_number: int) -> str:
    return generate_uid(
        prefix=UID_PREFIX,
        entropy_srcs=[study_uid, "instance", str(series_number), str(instance_number)],
    )


def make_study(
    *,
    patient: SyntheticPatient,
    patient_id: str,
    issuer: str,
    modality: str,
    study_date: dt.date,
    study_time: dt.time | None,
    accession_number: str,
    description: str,
    series_count: int,
    instances_per_series: int,
    study_instance_uid: str | None = None,
    seed: str | None = None,
    issuer_oid: str | None = None,
    institution_name: str = "",
    rows: int = 64,
    columns: int = 64,
    body_part: str | None = None,
) -> list[bytes]:
    """Part 10 bytes of every instance of the study, series after series.

    Without `study_instance_uid` the UID comes from `seed` (deterministic) or, without a seed
    either, is random. Series and SOP Instance UIDs always derive from the study UID.
    """
    if study_instance_uid is None:
        study_instance_uid = (
            study_instance_uid_for(seed) if seed is not None else generate_uid(prefix=UID_PREFIX)
        )
    study = _study_dataset(
        patient=patient,
        patient_id=patient_id,
        issuer=issuer,
        issuer_oid=issuer_oid,
        institution_name=institution_name,
        study_instance_uid=study_instance_uid,
        study_date=study_date,
        study_time=study_time,
        accession_number=accession_number,
        description=description,
    )
    instances = []
    for series_number in range(1, series_count + 1):
        for instance_number in range(1, instances_per_series + 1):
            ds = Dataset()
            ds.update(study)
            _add_series(ds, modality, series_number, description, body_part)
            _add_image(ds, modality, series_number, instance_number, rows, columns)
            instances.append(_part10(ds))
    return instances


def synthetic_study(
    *,
    patient: SyntheticPatient,
    patient_id: str,
    issuer: str,
    modality: str,
    study_date: dt.date,
    study_time: dt.time | None,
    accession_number: str,
    description: str,
    series_count: int,
    instances_per_series: int,
    seed: str,
    issuer_oid: str | None = None,
    institution_name: str = "",
    body_part: str | None = None,
) -> SyntheticStudy:
    """`make_study` with a seed, and the metadata kept beside the bytes."""
    study_uid = study_instance_uid_for(seed)
    instances = make_study(
        patient=patient,
        patient_id=patient_id,
        issuer=issuer,
        modality=modality,
        study_date=study_date,
        study_time=study_time,
        accession_number=accession_number,
        description=description,
        series_count=series_count,
        instances_per_series=instances_per_series,
        study_instance_uid=study_uid,
        issuer_oid=issuer_oid,
        institution_name=institution_name,
        body_part=body_part,
    )
    return SyntheticStudy(
        patient=patient,
        patient_id=patient_id,
        issuer=issuer,
        issuer_oid=issuer_oid,
        institution_name=institution_name,
        modality=modality,
        study_instance_uid=study_uid,
        study_date=study_date,
        study_time=study_time,
        accession_number=accession_number,
        description=description,
        body_part=body_part,
        series_uids=tuple(
            series_instance_uid(study_uid, number) for number in range(1, series_count + 1)
        ),
        instances_per_series=instances_per_series,
        instances=tuple(instances),
    )


# --------------------------------------------------------------------------- the region

MARIE_DUPONT: Final = SyntheticPatient(
    family="DUPONT", given="Marie", birth_date=dt.date(1958, 3, 14), sex="F", ins=NIR
)
HELENE_FRANCOIS: Final = SyntheticPatient(
    family="FRANÇOIS",
    given="Hélène",
    birth_date=dt.date(1972, 11, 2),
    sex="F",
    ins=NIA,
    ins_kind="NIA",
)
PAUL_MARTIN: Final = SyntheticPatient(
    family="MARTIN", given="Paul", birth_date=dt.date(1949, 6, 30), sex="M"
)
JEAN_PIERRE_LE_GALL: Final = SyntheticPatient(
    family="LE GALL", given="Jean-Pierre", birth_date=dt.date(1981, 1, 23), sex="M"
)
YANNICK_KERMARREC: Final = SyntheticPatient(
    family="KERMARREC", given="Yannick", birth_date=dt.date(1967, 7, 9), sex="M", ins=NIR_KERMARREC
)

# Marie DUPONT's local IDs: the same person, one IPP per hospital.
DUPONT_CHUB_IPP: Final = "CHU0012345"
DUPONT_PORTMAEL_IPP: Final = "PM-778812"


@dataclass(frozen=True)
class _Hospital:
    aet: str
    issuer: str
    issuer_oid: str | None
    name: str


_CHUB: Final = _Hospital(CHUB_AE, CHUB_ISSUER, CHUB_ISSUER_OID, CHUB_NAME)
_PORTMAEL: Final = _Hospital(PORTMAEL_AE, PORTMAEL_ISSUER, None, PORTMAEL_NAME)


class _Planned(NamedTuple):
    hospital: _Hospital
    patient: SyntheticPatient
    patient_id: str
    modality: str
    when: dt.datetime
    accession_number: str
    description: str
    series_count: int
    instances_per_series: int
    body_part: str


_REGION: Final = tuple(_Planned(*row) for row in (
    (_CHUB, MARIE_DUPONT, DUPONT_CHUB_IPP, "CT", dt.datetime(2024, 2, 12, 9, 14, 3),
     "CHUB24000112", "TDM THORAX", 3, 6, "CHEST"),
    (_CHUB, MARIE_DUPONT, DUPONT_CHUB_IPP, "MR", dt.datetime(2025, 6, 3, 16, 40, 0),
     "CHUB25003307", "IRM GENOU DROIT", 3, 5, "KNEE"),
    (_CHUB, HELENE_FRANCOIS, "CHU0048210", "CR", dt.datetime(2024, 9, 20, 11, 2, 51),
     "CHUB24009921", "RADIO THORAX", 2, 1, "CHEST"),
    (_CHUB, HELENE_FRANCOIS, "CHU0048210", "US", dt.datetime(2026, 1, 15, 8, 30, 12),
     "CHUB26000458", "ECHOGRAPHIE ABDOMINALE", 2, 4, "ABDOMEN"),
    (_CHUB, PAUL_MARTIN, "CHU0007731", "CT", dt.datetime(2025, 11, 8, 22, 5, 40),
     "CHUB25011873", "TDM CEREBRALE", 2, 8, "HEAD"),
    (_CHUB, PAUL_MARTIN, "CHU0007731", "CR", dt.datetime(2026, 3, 2, 14, 45, 9),
     "CHUB26002210", "RADIO BASSIN", 2, 2, "PELVIS"),
    (_PORTMAEL, MARIE_DUPONT, DUPONT_PORTMAEL_IPP, "CT", dt.datetime(2024, 5, 27, 10, 20, 0),
     "PM2405-0871", "SCANNER ABDOMINO-PELVIEN", 3, 6, "ABDOMEN"),
    (_PORTMAEL, MARIE_DUPONT, DUPONT_PORTMAEL_IPP, "US", dt.datetime(2026, 2, 10, 9, 5, 33),
     "PM2602-0112", "ECHOGRAPHIE CARDIAQUE", 2, 3, "HEART"),
    (_PORTMAEL, JEAN_PIERRE_LE_GALL, "PM-102938", "MR", dt.datetime(2025, 3, 18, 18, 12, 4),
     "PM2503-0440", "IRM RACHIS LOMBAIRE", 3, 5, "LSPINE"),
    (_PORTMAEL, YANNICK_KERMARREC, "PM-556071", "CR", dt.datetime(2024, 12, 1, 3, 50, 27),
     "PM2412-1903", "RADIO POIGNET GAUCHE", 2, 2, "WRIST"),
))  # fmt: skip


@cache
def region_studies() -> dict[str, list[SyntheticStudy]]:
    """The studies of each archive of the test region, by AE title (10 studies, 106 images).

    Built once per process; treat the result as read-only.
    """
    studies: dict[str, list[SyntheticStudy]] = {CHUB_AE: [], PORTMAEL_AE: []}
    for planned in _REGION:
        hospital = planned.hospital
        studies[hospital.aet].append(
            synthetic_study(
                patient=planned.patient,
                patient_id=planned.patient_id,
                issuer=hospital.issuer,
                issuer_oid=hospital.issuer_oid,
                institution_name=hospital.name,
                modality=planned.modality,
                study_date=planned.when.date(),
                study_time=planned.when.time(),
                accession_number=planned.accession_number,
                description=planned.description,
                series_count=planned.series_count,
                instances_per_series=planned.instances_per_series,
                body_part=planned.body_part,
                seed=f"{hospital.aet}:{planned.accession_number}",
            )
        )
    return studies


# --------------------------------------------------------------------------- datasets


def _study_dataset(
    *,
    patient: SyntheticPatient,
    patient_id: str,
    issuer: str,
    issuer_oid: str | None,
    institution_name: str,
    study_instance_uid: str,
    study_date: dt.date,
    study_time: dt.time | None,
    accession_number: str,
    description: str,
) -> Dataset:
    """What every instance of the study shares: SOP common, patient, study, equipment."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient.dicom_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = issuer
    if issuer_oid is not None:
        ds.IssuerOfPatientIDQualifiersSequence = Sequence([_qualifiers(issuer_oid)])
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    if patient.ins is not None and patient.ins_oid is not None:
        ins = Dataset()
        ins.PatientID = patient.ins
        ins.IssuerOfPatientIDQualifiersSequence = Sequence([_qualifiers(patient.ins_oid)])
        ins.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([ins])
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = study_time.strftime("%H%M%S") if study_time is not None else ""
    ds.AccessionNumber = accession_number
    ds.StudyDescription = description
    ds.StudyID = accession_number[-16:]
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "Relais tests"
    ds.InstitutionName = institution_name
    return ds


def _qualifiers(oid: str) -> Dataset:
    item = Dataset()
    item.UniversalEntityID = oid
    item.UniversalEntityIDType = "ISO"
    return item


def _add_series(
    ds: Dataset, modality: str, series_number: int, description: str, body_part: str | None
) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid(ds.StudyInstanceUID, series_number)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{description} S{series_number}"
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if modality in {"CT", "MR"}:
        ds.FrameOfReferenceUID = generate_uid(
            prefix=UID_PREFIX, entropy_srcs=[ds.StudyInstanceUID, "frame", str(series_number)]
        )
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
    if modality == "US":
        ds.Laterality = ""


def _add_image(
    ds: Dataset, modality: str, series_number: int, instance_number: int, rows: int, columns: int
) -> None:
    sop_class = sop_class_for(modality)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid(ds.StudyInstanceUID, series_number, instance_number)
    ds.InstanceNumber = instance_number
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "AXIAL"]
        if modality in {"CT", "MR"}
        else [
            "ORIGINAL",
            "PRIMARY",
        ]
    )
    if sop_class == SECONDARY_CAPTURE_STORAGE:
        ds.ConversionType = "WSD"
    if modality in {"CT", "MR"}:
        ds.ImagePositionPatient = [0.0, 0.0, float(instance_number) * 5.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 5.0
        ds.SliceLocation = float(instance_number) * 5.0
        ds.PixelSpacing = [0.8, 0.8]
    if modality == "CT":
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    if modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 20.0
        ds.RepetitionTime = 500.0
        ds.EchoTrainLength = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(rows, columns, seed=series_number * 1000 + instance_number)


def _pixels(rows: int, columns: int, *, seed: int) -> bytes:
    """A 12-bit diagonal gradient, shifted by `seed`, as little-endian uint16."""
    values = array(
        "H", ((row + column + seed) * 16 % 4096 for row in range(rows) for column in range(columns))
    )
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _part10(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
