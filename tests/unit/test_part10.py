"""Part 10 file meta, read and written without pydicom's dataset machinery."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from broker.dicom.part10 import file_meta, part10_file

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def encoded(implicit: bool) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = KOS
    ds.SOPInstanceUID = "1.2.3.45"  # odd length: padded
    ds.PatientName = "DUPONT^JEAN"
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_received_data_set_becomes_a_file_pydicom_reads(syntax: str) -> None:
    dataset = encoded(syntax == ImplicitVRLittleEndian)
    data = part10_file(
        dataset,
        sop_class_uid=KOS,
        sop_instance_uid="1.2.3.45",
        transfer_syntax_uid=syntax,
        implementation_class_uid="2.25.1",
        implementation_version_name="RELAIS_1",
        source_ae_title="CHU_PACS",
    )
    read = pydicom.dcmread(io.BytesIO(data))
    meta = read.file_meta
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.MediaStorageSOPClassUID == KOS
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert meta.TransferSyntaxUID == syntax
    assert meta.ImplementationClassUID == "2.25.1"
    assert meta.ImplementationVersionName == "RELAIS_1"
    assert meta.SourceApplicationEntityTitle == "CHU_PACS"
    assert meta.FileMetaInformationGroupLength == len(data) - 144 - len(dataset)
    assert read.PatientName == "DUPONT^JEAN"
    parsed = file_meta(data)
    assert parsed is not None
    assert data[parsed.dataset_offset :] == dataset
    assert (parsed.sop_class_uid, parsed.sop_instance_uid) == (KOS, "1.2.3.45")
