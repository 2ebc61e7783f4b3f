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
_MAX_META_BYTES: Final = 64 * 1024


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
    offset, end = 132, min(len(data), 132 + _MAX_META_BYTES)
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
