"""Storage SOP classes: the modality a referenced instance implies, and how a KOS points at it.

A manifest's Referenced SOP Sequence names each instance's SOP Class UID but not its modality.
When a series item carries no Modality (0008,0060) of its own, the modality is derived from the
SOP classes of its instances with this table. Classes whose instances may come from any modality
(Secondary Capture, Raw Data, Parametric Map...) are deliberately absent: they imply nothing.

UIDs and names are those of DICOM PS3.6 Annex A (checked against pydicom's UID dictionary);
modality codes are the Defined Terms of PS3.3 C.7.3.1.1.1.

Pure module: no Django, no I/O.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final, Literal

_BASE: Final = "1.2.840.10008.5.1.4.1.1."

ContentValueType = Literal["IMAGE", "WAVEFORM", "COMPOSITE"]

# (SOP Class UID suffix after 1.2.840.10008.5.1.4.1.1., modality)
_STORAGE_MODALITIES: Final[tuple[tuple[str, str], ...]] = (
    ("1", "CR"),  # Computed Radiography Image
    ("1.1", "DX"),  # Digital X-Ray Image - For Presentation
    ("1.1.1", "DX"),  # Digital X-Ray Image - For Processing
    ("1.2", "MG"),  # Digital Mammography X-Ray Image - For Presentation
    ("1.2.1", "MG"),  # Digital Mammography X-Ray Image - For Processing
    ("1.3", "IO"),  # Digital Intra-Oral X-Ray Image - For Presentation
    ("1.3.1", "IO"),  # Digital Intra-Oral X-Ray Image - For Processing
    ("2", "CT"),  # CT Image
    ("2.1", "CT"),  # Enhanced CT Image
    ("2.2", "CT"),  # Legacy Converted Enhanced CT Image
    ("3.1", "US"),  # Ultrasound Multi-frame Image
    ("4", "MR"),  # MR Image
    ("4.1", "MR"),  # Enhanced MR Image
    ("4.2", "MR"),  # MR Spectroscopy
    ("4.3", "MR"),  # Enhanced MR Color Image
    ("4.4", "MR"),  # Legacy Converted Enhanced MR Image
    ("6.1", "US"),  # Ultrasound Image
    ("6.2", "US"),  # Enhanced US Volume
    ("9.1.1", "ECG"),  # 12-lead ECG Waveform
    ("9.1.2", "ECG"),  # General ECG Waveform
    ("9.1.3", "ECG"),  # Ambulatory ECG Waveform
    ("9.1.4", "ECG"),  # General 32-bit ECG Waveform
    ("9.2.1", "HD"),  # Hemodynamic Waveform
    ("9.3.1", "EPS"),  # Cardiac Electrophysiology Waveform
    ("9.4.1", "AU"),  # Basic Voice Audio Waveform
    ("9.4.2", "AU"),  # General Audio Waveform
    ("11.1", "PR"),  # Grayscale Softcopy Presentation State
    ("11.2", "PR"),  # Color Softcopy Presentation State
    ("11.3", "PR"),  # Pseudo-Color Softcopy Presentation State
    ("11.4", "PR"),  # Blending Softcopy Presentation State
    ("11.5", "PR"),  # XA/XRF Grayscale Softcopy Presentation State
    ("11.8", "PR"),  # Advanced Blending Presentation State
    ("11.12", "PR"),  # Variable Modality LUT Softcopy Presentation State
    ("12.1", "XA"),  # X-Ray Angiographic Image
    ("12.1.1", "XA"),  # Enhanced XA Image
    ("12.2", "RF"),  # X-Ray Radiofluoroscopic Image
    ("12.2.1", "RF"),  # Enhanced XRF Image
    ("13.1.1", "XA"),  # X-Ray 3D Angiographic Image
    ("13.1.2", "DX"),  # X-Ray 3D Craniofacial Image
    ("13.1.3", "MG"),  # Breast Tomosynthesis Image
    ("13.1.4", "MG"),  # Breast Projection X-Ray Image - For Presentation
    ("13.1.5", "MG"),  # Breast Projection X-Ray Image - For Processing
    ("14.1", "IVOCT"),  # Intravascular OCT Image - For Presentation
    ("14.2", "IVOCT"),  # Intravascular OCT Image - For Processing
    ("20", "NM"),  # Nuclear Medicine Image
    ("66.1", "REG"),  # Spatial Registration
    ("66.2", "FID"),  # Spatial Fiducials
    ("66.3", "REG"),  # Deformable Spatial Registration
    ("66.4", "SEG"),  # Segmentation
    ("66.5", "SEG"),  # Surface Segmentation
    ("77.1.1", "ES"),  # VL Endoscopic Image
    ("77.1.1.1", "ES"),  # Video Endoscopic Image
    ("77.1.2", "GM"),  # VL Microscopic Image
    ("77.1.2.1", "GM"),  # Video Microscopic Image
    ("77.1.3", "SM"),  # VL Slide-Coordinates Microscopic Image
    ("77.1.4", "XC"),  # VL Photographic Image
    ("77.1.4.1", "XC"),  # Video Photographic Image
    ("77.1.5.1", "OP"),  # Ophthalmic Photography 8 Bit Image
    ("77.1.5.2", "OP"),  # Ophthalmic Photography 16 Bit Image
    ("77.1.5.4", "OPT"),  # Ophthalmic Tomography Image
    ("77.1.5.5", "OP"),  # Wide Field Ophthalmic Photography Stereographic Projection Image
    ("77.1.5.6", "OP"),  # Wide Field Ophthalmic Photography 3D Coordinates Image
    ("77.1.5.7", "OPT"),  # Ophthalmic OCT En Face Image
    ("77.1.5.8", "OPT"),  # Ophthalmic OCT B-scan Volume Analysis
    ("77.1.6", "SM"),  # VL Whole Slide Microscopy Image
    ("77.1.7", "XC"),  # Dermoscopic Photography Image
    ("88.11", "SR"),  # Basic Text SR
    ("88.22", "SR"),  # Enhanced SR
    ("88.33", "SR"),  # Comprehensive SR
    ("88.34", "SR"),  # Comprehensive 3D SR
    ("88.35", "SR"),  # Extensible SR
    ("88.40", "SR"),  # Procedure Log
    ("88.50", "SR"),  # Mammography CAD SR
    ("88.59", "KO"),  # Key Object Selection Document
    ("88.65", "SR"),  # Chest CAD SR
    ("88.67", "SR"),  # X-Ray Radiation Dose SR
    ("88.68", "SR"),  # Radiopharmaceutical Radiation Dose SR
    ("88.69", "SR"),  # Colon CAD SR
    ("88.70", "SR"),  # Implantation Plan SR
    ("88.71", "SR"),  # Acquisition Context SR
    ("88.72", "SR"),  # Simplified Adult Echo SR
    ("88.73", "SR"),  # Patient Radiation Dose SR
    ("88.76", "SR"),  # Enhanced X-Ray Radiation Dose SR
    ("104.1", "DOC"),  # Encapsulated PDF
    ("104.2", "DOC"),  # Encapsulated CDA
    ("104.3", "M3D"),  # Encapsulated STL
    ("104.4", "M3D"),  # Encapsulated OBJ
    ("104.5", "M3D"),  # Encapsulated MTL
    ("128", "PT"),  # Positron Emission Tomography Image
    ("128.1", "PT"),  # Legacy Converted Enhanced PET Image
    ("130", "PT"),  # Enhanced PET Image
    ("481.1", "RTIMAGE"),  # RT Image
    ("481.2", "RTDOSE"),  # RT Dose
    ("481.3", "RTSTRUCT"),  # RT Structure Set
    ("481.4", "RTRECORD"),  # RT Beams Treatment Record
    ("481.5", "RTPLAN"),  # RT Plan
    ("481.6", "RTRECORD"),  # RT Brachy Treatment Record
    ("481.7", "RTRECORD"),  # RT Treatment Summary Record
    ("481.8", "RTPLAN"),  # RT Ion Plan
    ("481.9", "RTRECORD"),  # RT Ion Beams Treatment Record
)

SOP_CLASS_MODALITIES: Final = MappingProxyType(
    {_BASE + suffix: modality for suffix, modality in _STORAGE_MODALITIES}
)
"""SOP Class UID -> the modality its instances carry."""

_WAVEFORM_MODALITIES: Final = frozenset({"ECG", "HD", "EPS", "AU"})
_NON_IMAGE_MODALITIES: Final = frozenset(
    {"SR", "KO", "PR", "DOC", "M3D", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTRECORD"}
)
# Image storage classes that imply no modality (the instance's own Modality says it).
_IMAGES_OF_ANY_MODALITY: Final = frozenset(
    _BASE + suffix for suffix in ("7", "7.1", "7.2", "7.3", "7.4", "30")
)
# Classes of an imaging modality whose instances carry no pixel data.
_NON_IMAGE_CLASSES: Final = frozenset(
    _BASE + suffix
    for suffix in ("4.2", "66.5")  # MR Spectroscopy, Surface Segmentation
)


def modality_for_sop_class(sop_class_uid: str) -> str | None:
    """The modality implied by a storage SOP class, or None when it implies none."""
    return SOP_CLASS_MODALITIES.get(sop_class_uid)


def content_value_type(sop_class_uid: str) -> ContentValueType:
    """The TID 2010 content item Value Type used to reference an instance of this SOP class.

    IMAGE for image storage classes, WAVEFORM for waveforms, COMPOSITE for everything else
    (COMPOSITE is also the safe choice for a class this table does not know).
    """
    if sop_class_uid in _IMAGES_OF_ANY_MODALITY:
        return "IMAGE"
    modality = SOP_CLASS_MODALITIES.get(sop_class_uid)
    if modality is None or modality in _NON_IMAGE_MODALITIES or sop_class_uid in _NON_IMAGE_CLASSES:
        return "COMPOSITE"
    if modality in _WAVEFORM_MODALITIES:
        return "WAVEFORM"
    return "IMAGE"
