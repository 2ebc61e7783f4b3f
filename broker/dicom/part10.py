"""A DICOM Part 10 file's meta information, read from its first bytes without decoding it.

The gateway checks every instance it relays against the manifest, and forwards instances by
C-STORE as they are stored; both need only the file meta group (PS3.10 7.1: explicit VR little
endian, after a 128-byte preamble and "DICM"), never the data set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

_LONG_VRS: Final = frozenset({b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL"})
META_GROUP_MAX_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int  # where the data set starts, right after the meta group


def file_meta(data: bytes) -> FileMeta | None:
    """The meta group of a Part 10 file; None when there is none, or it lacks one of (0002,0002)
    Media Storage SOP Class UID, (0002,0003) Media Storage SOP Instance UID or (0002,0010)
    Transfer Syntax UID."""
    if data[128:132] != b"DICM":
        return None
    values: dict[int, str] = {}
    offset, end = 132, min(len(data), 132 + META_GROUP_MAX_BYTES)
    while offset + 8 <= end:
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            break
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > end:
                return None
            (length,) = struct.unpack_from("<I", data, offset + 8)
            value_at = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            value_at = offset + 8
        if element in (0x0002, 0x0003, 0x0010):
            raw = data[value_at : value_at + length]
            values[element] = raw.rstrip(b"\x00 ").decode("ascii", "replace")
        offset = value_at + length
    else:
        if offset < len(data):  # the meta group runs past what is read: not a sane file
            return None
    if offset > len(data) or not all(values.get(e) for e in (0x0002, 0x0003, 0x0010)):
        return None
    return FileMeta(
        sop_class_uid=values[0x0002],
        sop_instance_uid=values[0x0003],
        transfer_syntax_uid=values[0x0010],
        dataset_offset=offset,
    )


def part10_file(
    dataset: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    source_ae_title: str = "",
) -> bytes:
    """A data set received as it is (a C-STORE's), made a Part 10 file: preamble, "DICM" and
    the meta group, written here without building a pydicom dataset (a C-STORE SCP does it
    for every object it receives)."""
    return (
        part10_header(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            implementation_class_uid=implementation_class_uid,
            implementation_version_name=implementation_version_name,
            source_ae_title=source_ae_title,
        )
        + dataset
    )


def part10_header(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    source_ae_title: str = "",
) -> bytes:
    """What `part10_file` puts before the data set: the preamble, "DICM" and the meta group
    (for a caller that joins it with the data set's fragments as received, in one copy)."""
    elements = [
        _meta_long(0x0001, b"OB", b"\x00\x01"),
        _meta_short(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_short(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_short(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _meta_short(0x0012, b"UI", _padded(implementation_class_uid, b"\x00")),
        _meta_short(0x0013, b"SH", _padded(implementation_version_name, b" ")),
    ]
    if source_ae_title:
        elements.append(_meta_short(0x0016, b"AE", _padded(source_ae_title, b" ")))
    group = b"".join(elements)
    length = _meta_short(0x0000, b"UL", struct.pack("<I", len(group)))
    return b"\x00" * 128 + b"DICM" + length + group


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _meta_short(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"(0002,{element:04X}) is too long")
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _meta_long(element: int, vr: bytes, value: bytes) -> bytes:
    header = struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00"
    return header + struct.pack("<I", len(value)) + value
