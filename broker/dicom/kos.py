"""Manifests: parse and build DICOM Key Object Selection (KOS) documents.

A hospital archive publishes each study as a manifest, a KOS document (SOP Class
1.2.840.10008.5.1.4.1.1.88.59, Modality KO, title (113030, DCM, "Manifest")) whose Current
Requested Procedure Evidence Sequence (0040,A375) lists the referenced studies, series and
instances, and where to retrieve them. This module turns such a document into plain frozen
dataclasses (`parse_kos`, `parse_kos_dataset`) and writes one from a study description
(`build_kos`). Pure pydicom: no Django, no I/O, no clock.

Strict where safety needs it, liberal where the standard and real archives allow
--------------------------------------------------------------------------------
Every refusal is a `KOSError` with a stable `code` (see `KOSErrorCode`) and a message that names
the attribute (keyword and tag), where it is, and the offending value. `parse_kos` raises nothing
else, whatever the bytes: pydicom's own errors (and warnings, which would be errors under a
"warnings as errors" policy) are caught here and translated.

Refused: data that is not DICOM Part 10 or is cut short (a value or header shorter than
declared; a cut that falls exactly between two elements is only caught when it removes
something required); a SOP class other than KOS; file meta that disagrees with the dataset;
no evidence; a study without series or a series without instances; no content items (TID
2010); any invalid UID (syntax and 64-character limit, in every non-private UI element); no
Patient ID, or several; a series with no retrieve location of its own (AE title, location UID
or URL); a Retrieve URL that is not http(s) (the gateway must not be pointed at file: or
other schemes); the same series or instance referenced twice; a deflated dataset that would
inflate beyond 64 MiB.

Accepted: explicit or implicit VR, little or big endian, deflated; Part 10 files without the
128-byte preamble; no Issuer of Patient ID; no Specific Character Set (the default repertoire
is decoded as ISO 8859-1, so Latin-1 bytes read as Latin-1); several studies in one manifest
(two evidence items for one study are merged); ACR-NEMA dates and times ("1990.01.01",
"10:30:00"), fractional seconds, empty or unreadable dates (read as unknown); a multi-valued
Retrieve AE Title (the first is used); a document title other than 113030.

Patient identifiers and the INS
-------------------------------
`resolve_patient_id` says which domain the primary Patient ID belongs to: the sending
institution's local domain (IPP) or the national INS domain (NIR or NIA, told apart by the
assigning authority OID, 1.2.250.1.213.1.4.8 / .9, test OIDs .10 / .11). `national_ids`
collects every INS in the manifest (primary ID and Other Patient IDs Sequence). An INS matricule
is checked (13 characters, 2A/2B allowed for Corsica, optional 2-digit key = 97 - n mod 97 with
2A -> 19 and 2B -> 18) and returned normalised to its 15 characters (the key is computed when
the sender left it out), so the same person gives the same value whichever hospital sent it.

Qualified INS: the rule applied and its sources. DICOM has no attribute that says whether an
identity is qualified: Type of Patient ID (0010,0022) only says TEXT, RFID or BARCODE, and
Identifier Type Code (0040,0035) in the Issuer of Patient ID Qualifiers Sequence carries an
HL7 table 0203 identifier type (what kind of identifier, not how reliable; PS3.3 table 10-18).
In France the identity status travels in HL7 v2 (PID-32, identity reliability code, HL7 table
0445 with French codes) and in FHIR (FR Core "identity-reliability" extension), not in DICOM.
We found no ANS / CI-SIS text defining a DICOM marker of qualification (the CI-SIS imaging
volets of the Ségur "Diffusion d'Imagerie Médicale" project were not available to us). So we
apply the French rule itself: an INS may reference and accompany shared health data only once
qualified, i.e. retrieved or checked through the INSi teleservice and attached to an identity
validated under the national identitovigilance rules (ANS, https://esante.gouv.fr/securite/
identite-nationale-de-sante; the Nouvelle-Aquitaine identitovigilance FAQ,
https://www.identito-na.fr/faq, restates that only the "identité qualifiée" status allows
referencing data with the INS matricule), and the assigning-authority OID is what INSi returns
to attest the matricule's origin (e-santé Bretagne, "La gestion de l'INS"). Hence: an INS
conveyed under its official OID is taken as qualified (`ResolvedPatientId.qualified`); a
matricule without the OID is never taken for an INS. A sender that labels an unqualified INS
with the OID breaks that rule, and nothing in the DICOM object lets the broker notice.

Building
--------
`build_kos` writes a conformant manifest (KOS IOD, TID 2010 content, explicit VR little endian,
"ISO_IR 192"), with Modality and Body Part Examined in each series item and Modalities in Study
at the top level so that `parse_kos(build_kos(x))` gives x back. It is deterministic: the
default UIDs are derived from the study description (`derive_kos_uids`), so the same
description and the same `now` give byte-identical output. `now` stamps the content and
creation date/time but does not enter the UIDs: pass a stable time (the study's last change at
the source, say) when a re-harvest must reproduce the same bytes.

Speed
-----
pydicom stays the reference for both directions, but its per-element cost (some 10 µs to decode
an element, as much to write one) made a manifest cost 0.25 ms per referenced instance to parse
and twice that to build. `parse_kos` therefore first tries `_FastReader`, which walks the bytes
of the usual encodings itself, performs the same checks and decodes only what it reads; on
anything it would not read exactly as pydicom does it steps aside and pydicom reads the file as
before (see the "fast reading" section below). `build_kos` validates each value as before but
fills `_Draft`s that a small writer encodes to the very bytes pydicom's dcmwrite gives;
descriptions with values that are not plain strings are written by pydicom itself.
`parse_kos_dataset` (a dataset pydicom already decoded) still reads through pydicom.
`dump_parsed_kos` / `load_parsed_kos` keep a parse beside the bytes it came from (the DIMSE
intake queue: the check's parse is registered, not parsed again): JSON written and read back
by msgspec into the very dataclasses, some 10 µs against 0.4 ms for a parse.

Note: pydicom warnings are silenced with `warnings.catch_warnings`, which swaps process-wide
state; it is restored on exit, but another thread warning at that very moment may lose its
warning (Python 3.11 has no per-context warning filters).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import io
import json
import re
import struct
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast

import msgspec
import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.hooks import hooks as pydicom_hooks
from pydicom.hooks import raw_element_value, raw_element_vr
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    RE_VALID_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_32, PersonName, validate_value
from pydicom.values import converters

from broker.dicom.sopclasses import content_value_type, modality_for_sop_class

KOS_SOP_CLASS_UID: Final = "1.2.840.10008.5.1.4.1.1.88.59"
INS_NIR_OID: Final = "1.2.250.1.213.1.4.8"
INS_NIA_OID: Final = "1.2.250.1.213.1.4.9"
INS_NIR_TEST_OID: Final = "1.2.250.1.213.1.4.10"
INS_NIA_TEST_OID: Final = "1.2.250.1.213.1.4.11"

MANIFEST_TITLE: Final = ("113030", "DCM", "Manifest")
"""(code value, scheme, meaning) of the XDS-I manifest document title (CID 7010)."""

RELAIS_IMPLEMENTATION_CLASS_UID: Final = (
    f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:relais:dicom:implementation').int}"
)
RELAIS_IMPLEMENTATION_VERSION_NAME: Final = "RELAIS_KOS_1"

_UID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:relais:dicom:kos")
_INS_KINDS: Final = {
    INS_NIR_OID: ("INS-NIR", False),
    INS_NIA_OID: ("INS-NIA", False),
    INS_NIR_TEST_OID: ("INS-NIR", True),
    INS_NIA_TEST_OID: ("INS-NIA", True),
}
_MAX_NESTING: Final = 32
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF
_EVIDENCE: Final = "CurrentRequestedProcedureEvidenceSequence"
_DEFLATED_TRANSFER_SYNTAX: Final = b"1.2.840.10008.1.2.1.99"
_MAX_INFLATED_BYTES: Final = 64 * 1024 * 1024
_MAX_UID_ROOT_LENGTH: Final = 40  # with its final dot; leaves at least 24 hash digits


class KOSErrorCode(enum.StrEnum):
    """Stable machine codes of `KOSError`; never renamed nor reused."""

    NOT_DICOM = "kos:not-dicom"
    TRUNCATED = "kos:truncated"
    INVALID_META = "kos:invalid-meta"
    WRONG_SOP_CLASS = "kos:wrong-sop-class"
    META_MISMATCH = "kos:meta-mismatch"
    NO_EVIDENCE = "kos:no-evidence"
    NO_CONTENT = "kos:no-content"
    NO_REFERENCES = "kos:no-references"
    INVALID_UID = "kos:invalid-uid"
    DUPLICATE_REFERENCE = "kos:duplicate-reference"
    NO_PATIENT_ID = "kos:no-patient-id"
    NO_RETRIEVE_LOCATION = "kos:no-retrieve-location"
    UNKNOWN_ISSUER = "kos:unknown-issuer"
    INVALID_INS = "kos:invalid-ins"
    INVALID_VALUE = "kos:invalid-value"


class KOSError(ValueError):
    """A manifest the broker refuses, or a study description it cannot write."""

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message

    def __reduce__(self) -> tuple[type[KOSError], tuple[str, str]]:
        return (type(self), (self.code, self.message))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class OtherPatientId:
    value: str
    issuer: str | None
    issuer_oid: str | None
    type_of_patient_id: str | None


@dataclass(frozen=True)
class PatientInfo:
    patient_id: str
    issuer: str | None
    issuer_oid: str | None
    family_name: str
    given_names: str
    birth_name: str
    birth_date: dt.date | None
    sex: str
    other_ids: tuple[OtherPatientId, ...] = ()


@dataclass(frozen=True)
class ReferencedInstance:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class ReferencedSeries:
    series_instance_uid: str
    modality: str | None
    retrieve_ae_title: str | None
    retrieve_location_uid: str | None
    retrieve_url: str | None
    instances: tuple[ReferencedInstance, ...]
    body_part: str | None = None


@dataclass(frozen=True)
class ReferencedStudy:
    study_instance_uid: str
    accession_number: str | None
    series: tuple[ReferencedSeries, ...]


@dataclass(frozen=True)
class ParsedKOS:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient: PatientInfo
    studies: tuple[ReferencedStudy, ...]
    study_date: dt.date | None
    study_time: dt.time | None
    content_datetime: dt.datetime | None
    study_description: str
    accession_number: str | None
    institution_name: str
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    document_title: tuple[str, str, str] | None
    transfer_syntax_uid: str
    specific_character_set: str | None

    @property
    def series_count(self) -> int:
        return sum(len(study.series) for study in self.studies)

    @property
    def instance_count(self) -> int:
        return sum(len(series.instances) for study in self.studies for series in study.series)

    @property
    def primary_study(self) -> ReferencedStudy:
        return self.studies[0]


@dataclass(frozen=True)
class ResolvedPatientId:
    kind: str  # "IPP" | "INS-NIR" | "INS-NIA"
    issuer: str  # the institution's issuer string for an IPP, the INS OID for an INS
    value: str  # an INS is normalised to its 15 characters
    test: bool  # issued under a test OID (.10 / .11)
    qualified: bool  # meaningful for an INS only; see the module docstring


@dataclass(frozen=True)
class SeriesDescription:
    series_instance_uid: str
    modality: str
    body_part: str | None
    instances: tuple[ReferencedInstance, ...]


@dataclass(frozen=True)
class StudyDescription:
    patient: PatientInfo
    study_instance_uid: str
    accession_number: str | None
    study_date: dt.date | None
    study_time: dt.time | None
    study_description: str
    series: tuple[SeriesDescription, ...]
    retrieve_ae_title: str | None = None
    retrieve_location_uid: str | None = None
    retrieve_url: str | None = None
    institution_name: str = ""


PARSED_KOS_FORMAT: Final = 1
"""Version of what `parse_kos` gives. Bump it when the same bytes would give another
`ParsedKOS` (a value read differently, a check added or tightened): a parse stored under
another version is not loaded, and the bytes are parsed again. A change of the classes'
fields needs no bump: the stored format carries a fingerprint of their schema."""


@dataclass(frozen=True)
class _StoredParse:
    format: str
    sha256: str  # of the bytes it is the parse of
    kos: ParsedKOS


def _plain_str(value: object) -> str:
    if isinstance(value, str):  # pydicom's UID and other str subclasses
        return str.__str__(value)
    raise NotImplementedError(f"{type(value).__name__} is not part of a ParsedKOS")


_parse_encoder = msgspec.json.Encoder(enc_hook=_plain_str)
_parse_decoder = msgspec.json.Decoder(_StoredParse)


def _schema_fingerprint(cls: type) -> str:
    return hashlib.sha256(msgspec.json.encode(msgspec.json.schema(cls))).hexdigest()[:16]


_STORED_FORMAT: Final = f"{PARSED_KOS_FORMAT}:{_schema_fingerprint(ParsedKOS)}"


def dump_parsed_kos(kos: ParsedKOS, *, sha256: str) -> bytes:
    """`kos`, the parse of the bytes whose SHA-256 (hex) is ``sha256``, as JSON: to keep it
    beside those bytes, for `load_parsed_kos`."""
    return _parse_encoder.encode(_StoredParse(_STORED_FORMAT, sha256, kos))


def load_parsed_kos(data: bytes, *, sha256: str) -> ParsedKOS | None:
    """The parse `dump_parsed_kos` stored for the bytes whose SHA-256 is ``sha256``; None
    when it was stored for other bytes, under another version or fields of `ParsedKOS`
    (`PARSED_KOS_FORMAT`), or does not read as one: the caller parses the bytes."""
    try:
        stored = _parse_decoder.decode(data)
    except msgspec.MsgspecError:
        return None
    if stored.format != _STORED_FORMAT or stored.sha256 != sha256:
        return None
    return stored.kos


# --------------------------------------------------------------------------- parsing


def parse_kos(data: bytes) -> ParsedKOS:
    """Parse a DICOM Part 10 manifest (preamble optional, "DICM" and file meta required).

    Returns a validated `ParsedKOS` or raises `KOSError`; never any other exception.
    """
    with _kos_errors_only():
        parsed = _parse_fast(data)
        if parsed is not None:
            return parsed
        dataset, transfer_syntax_uid = _read_part10(data)
        return _parse_dataset(dataset, transfer_syntax_uid, meta_required=True)


def parse_kos_dataset(ds: Dataset, *, transfer_syntax_uid: str) -> ParsedKOS:
    """Parse a manifest received as a dataset (DIMSE C-STORE), without file meta of its own.

    If `ds.file_meta` is present (pynetdicom builds it from the C-STORE request) its SOP class
    and instance UIDs must agree with the dataset. Raises `KOSError` only.
    """
    with _kos_errors_only():
        if not isinstance(ds, Dataset):
            raise KOSError(
                KOSErrorCode.NOT_DICOM, f"expected a pydicom Dataset, got {type(ds).__name__}"
            )
        tsuid = str(transfer_syntax_uid).strip()
        if not _is_valid_uid(tsuid):
            raise KOSError(
                KOSErrorCode.INVALID_META, f"transfer syntax UID {_show(tsuid)} is not a valid UID"
            )
        return _parse_dataset(ds, tsuid, meta_required=False)


@contextmanager
def _kos_errors_only() -> Iterator[None]:
    """Silence pydicom's warnings and turn whatever it raises into KOSError.

    pydicom reports odd-but-readable values (over-long strings, unknown character sets,
    undecodable bytes...) as UserWarnings: we judge the values ourselves. On hostile input it
    raises many exception types (ValueError, TypeError, KeyError, struct.error, zlib.error,
    NotImplementedError, RecursionError...): the caller only ever sees KOSError.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            yield
        except KOSError:
            raise
        except RecursionError as exc:
            raise KOSError(
                KOSErrorCode.INVALID_VALUE, "sequences are nested too deeply to be a manifest"
            ) from exc
        except Exception as exc:
            raise KOSError(
                KOSErrorCode.INVALID_VALUE, f"the manifest cannot be decoded: {_describe(exc)}"
            ) from exc


class _ShortReadDetector(io.BytesIO):
    """A byte stream that remembers when a small read (a tag or length field) came up short.

    pydicom stops quietly when fewer than 8 bytes are left for an element header; for us that
    is a truncated file.
    """

    short_read_at: int | None = None

    def read(self, size: int | None = -1, /) -> bytes:
        start = self.tell()
        chunk = super().read(size)
        short = size is not None and 0 < size <= 12 and 0 < len(chunk) < size
        if short and self.short_read_at is None:
            self.short_read_at = start
        return chunk


def _read_part10(data: bytes) -> tuple[Dataset, str]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise KOSError(KOSErrorCode.NOT_DICOM, f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) >= 132 and raw[128:132] == b"DICM":
        stream = raw
    elif raw[:4] == b"DICM":
        stream = bytes(128) + raw  # a Part 10 file whose preamble was stripped
    else:
        raise KOSError(
            KOSErrorCode.NOT_DICOM,
            f"no 'DICM' prefix at byte 128 (nor at byte 0) in {len(raw)} bytes: "
            "not a DICOM Part 10 file",
        )
    if len(stream) <= 132:
        raise KOSError(KOSErrorCode.TRUNCATED, "nothing follows the 'DICM' prefix")
    _refuse_deflate_bomb(stream)
    fp = _ShortReadDetector(stream)
    try:
        ds = pydicom.dcmread(fp, force=False)
    except InvalidDicomError as exc:
        raise KOSError(KOSErrorCode.NOT_DICOM, f"not a DICOM file: {_describe(exc)}") from exc
    except (EOFError, OSError) as exc:
        raise KOSError(KOSErrorCode.TRUNCATED, f"the file ends early: {_describe(exc)}") from exc
    except Exception as exc:
        if "unpack requires a buffer" in str(exc):  # struct.error on a short header
            raise KOSError(
                KOSErrorCode.TRUNCATED, f"the file ends early: {_describe(exc)}"
            ) from exc
        raise KOSError(
            KOSErrorCode.NOT_DICOM, f"the file cannot be read as DICOM: {_describe(exc)}"
        ) from exc
    meta = ds.file_meta
    _load_all(meta, " in the file meta", 0)
    group_length = meta.get("FileMetaInformationGroupLength")
    if stream[132:136] == b"\x02\x00\x00\x00" and isinstance(group_length, int):
        meta_end = 144 + group_length
        if len(stream) <= meta_end:
            raise KOSError(
                KOSErrorCode.TRUNCATED,
                f"the file meta information declares {group_length} bytes and the file ends "
                f"at byte {len(stream)}, before any dataset",
            )
    tsuid = _text(meta, "TransferSyntaxUID", " in the file meta")
    if not tsuid:
        raise KOSError(
            KOSErrorCode.INVALID_META,
            f"{_name('TransferSyntaxUID')} is absent from the file meta information",
        )
    if not _is_valid_uid(tsuid):
        raise KOSError(
            KOSErrorCode.INVALID_META,
            f"{_name('TransferSyntaxUID')} in the file meta is not a valid UID: {_show(tsuid)}",
        )
    _load_all(ds, "", 0)  # a value cut short names itself before the generic message below
    if fp.short_read_at is not None:
        raise KOSError(
            KOSErrorCode.TRUNCATED,
            f"the file ends inside an element header at byte {fp.short_read_at}",
        )
    return ds, tsuid


def _refuse_deflate_bomb(stream: bytes) -> None:
    """Refuse a deflated dataset that would inflate beyond reason (pydicom inflates it whole)."""
    if _DEFLATED_TRANSFER_SYNTAX not in stream[132:1024] or stream[132:136] != b"\x02\x00\x00\x00":
        return
    dataset_start = 144 + int.from_bytes(stream[140:144], "little")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(stream[dataset_start:], _MAX_INFLATED_BYTES)
    except zlib.error:
        return  # not deflate data after all: pydicom's reading will say what is wrong
    if inflater.unconsumed_tail:
        raise KOSError(
            KOSErrorCode.INVALID_VALUE,
            f"the deflated dataset inflates to more than {_MAX_INFLATED_BYTES} bytes",
        )


# --------------------------------------------------------------------------- fast reading
#
# pydicom decodes lazily, element by element, through several layers of Python (a Dataset
# per sequence item, converters, validators, DataElement objects): some 10 µs per element,
# 0.25 ms per referenced instance once everything is decoded to be checked. `_FastReader`
# walks the bytes of the usual encodings itself (explicit or implicit VR little endian,
# defined or undefined lengths), checks what `_read_part10` and `_load_all` check (complete
# values and headers, no trailing bytes, decodable elements, valid UIDs, nesting depth) and
# decodes only the values the parser reads. It is exact or it steps aside: whatever it would
# not read exactly as pydicom does (another transfer syntax; a file cut short or oddly
# framed; tags out of order or repeated; an unknown, UN or ambiguous VR; an element whose VR
# is not the dictionary's where the parser reads it; private elements in implicit VR; an
# invalid UID; a value pydicom fails to convert; a pydicom configuration other than the
# default...) raises `_Fallback`, and pydicom reads the manifest again as before: it remains
# the reference, and its reading gives every structural refusal its message. Values that are
# not plain (person names, numbers, text that is not ASCII...) are converted by pydicom
# itself, element by element, as `Dataset.__getitem__` would convert them.


class _Fallback(Exception):
    """The fast reader met something it does not read exactly as pydicom does."""


class _Items(list["_Node"]):
    """The items of a sequence read by the fast reader (what a Sequence is to a Dataset)."""

    __slots__ = ()


_LAZY: Final = object()  # marks a plain value, decoded from its bytes only when read


class _Node:
    """A dataset or a sequence item read by the fast reader.

    `elements` maps each tag to (VR, value start, value end, value) where the value is `_LAZY`
    (decoded on demand by `_decode`), the `_Items` of a sequence, or what pydicom converted.
    `pair` holds the (SOP class, SOP instance) UIDs of an item made of these two valid UIDs
    only, the shape of every referenced instance.
    """

    __slots__ = ("data", "elements", "encoding", "first_encoding", "pair")

    def __init__(
        self,
        data: bytes,
        encoding: str | list[str],
        first_encoding: str,
        elements: dict[int, tuple[str, int, int, Any]] | None = None,
        pair: tuple[str, str] | None = None,
    ) -> None:
        self.data = data
        self.encoding = encoding
        self.first_encoding = first_encoding  # `_first_encoding(encoding)`
        self.elements = {} if elements is None else elements
        self.pair = pair

    def __len__(self) -> int:
        return len(self.elements)

    def value(self, tag: int, vr: str) -> Any:
        """What `ds[tag].value` gives in pydicom, for an element of the dictionary VR `vr`."""
        entry = self.elements.get(tag)
        if entry is None:
            return None
        element_vr, start, end, value = entry
        if element_vr != vr:
            raise _Fallback  # another VR than the dictionary's: left to pydicom
        if value is _LAZY:
            return _decode(vr, self.data[start:end], self.first_encoding)
        return value


class _Unread(_Node):
    """A content item checked but not decoded: the parser does not read content items.

    Should it come to read one, the manifest goes to pydicom rather than read a wrong value.
    """

    __slots__ = ()

    def __len__(self) -> int:
        raise _Fallback

    def value(self, tag: int, vr: str) -> Any:
        raise _Fallback


_UNREAD: Final = _Unread(b"", default_encoding, default_encoding)

_Container: TypeAlias = "Dataset | _Node"


def _first_encoding(encoding: str | list[str]) -> str:
    """The codec pydicom decodes text with when it holds no escape sequence (ISO 2022)."""
    if not encoding:
        return default_encoding
    return encoding if isinstance(encoding, str) else encoding[0]


_EXPLICIT_HEADER: Final = struct.Struct("<HH2sH").unpack_from
_ITEM_HEADER: Final = struct.Struct("<HHL").unpack_from  # also an implicit VR element header
_UINT32: Final = struct.Struct("<L").unpack_from
_VR_OF_BYTES: Final = {str(vr).encode(): str(vr) for vr in converters if len(vr) == 2}
_LONG_LENGTH_VRS: Final = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_STRING_VRS: Final = frozenset({"AS", "CS", "DA", "DT", "TM"})  # pydicom's convert_string
_SPLIT_TEXT_VRS: Final = frozenset({"LO", "SH", "UC"})  # convert_text
_SINGLE_TEXT_VRS: Final = frozenset({"LT", "ST", "UT"})  # convert_single_string
_OPAQUE_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "AE", "UR"}) | _STRING_VRS
_CANONICAL_UID: Final = re.compile(rb"((?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*|)[\0 ]*")
_CANONICAL_IS: Final = re.compile(rb" *[+-]?[0-9]{1,9}[\0 ]*")
_IMPLICIT_VRS: dict[int, str | None] = {}
_UINT16: Final = struct.Struct("<H").unpack_from
_ITEM_DELIMITER: Final = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


class _Shapes:
    """Patterns of the two items a manifest repeats for each instance (see `_FastReader`).

    `reference`: an item of Referenced SOP Class UID and Referenced SOP Instance UID (groups:
    class UID, its padding, instance UID, its padding). `content`: a TID 2010 content item,
    Referenced SOP Sequence of one such item, Relationship Type and Value Type (groups 1-4 as
    above, 5: the item's delimitation item, 6: the sequence's, 7: Relationship Type, 8: Value
    Type and what may follow it). A match only proposes a cut: the declared lengths decide.
    """

    def __init__(self, implicit: bool) -> None:
        def header(tag: bytes, vr: bytes) -> bytes:
            return re.escape(tag) + (b"...." if implicit else vr + b"..")

        # Possessive repeats (each is followed by bytes it cannot take): no backtracking.
        uid = rb"((?:0|[1-9][0-9]*+)(?:\.(?:0|[1-9][0-9]*+))*+)([\0 ]*+)"
        item = rb"\xfe\xff\x00\xe0...."
        pair = header(b"\x08\x00\x50\x11", b"UI") + uid + header(b"\x08\x00\x55\x11", b"UI") + uid
        sequence = re.escape(b"\x08\x00\x99\x11") + (b"...." if implicit else b"SQ\x00\x00....")
        code = rb"([A-Z0-9 _]*+)"
        self.reference = re.compile(item + pair, re.DOTALL)
        self.content = re.compile(
            item
            + sequence
            + item
            + pair
            + rb"(\xfe\xff\x0d\xe0\x00\x00\x00\x00)?(\xfe\xff\xdd\xe0\x00\x00\x00\x00)?"
            + header(b"\x40\x00\x10\xa0", b"CS")
            + code
            + header(b"\x40\x00\x40\xa0", b"CS")
            + code,
            re.DOTALL,
        )


_EXPLICIT_SHAPES: Final = _Shapes(implicit=False)
_IMPLICIT_SHAPES: Final = _Shapes(implicit=True)
_REFERENCED_SOP_CLASS_UID: Final = 0x00081150
_REFERENCED_SOP_INSTANCE_UID: Final = 0x00081155


def _parse_fast(data: object) -> ParsedKOS | None:
    """The manifest as the fast reader reads it, or None to have pydicom read it."""
    if not isinstance(data, bytes | bytearray | memoryview) or not _pydicom_as_assumed():
        return None
    raw = bytes(data)
    if len(raw) >= 132 and raw[128:132] == b"DICM":
        stream = raw
    elif raw[:4] == b"DICM":
        stream = bytes(128) + raw
    else:
        return None
    if len(stream) <= 132 or _DEFLATED_TRANSFER_SYNTAX in stream[132:1024]:
        return None
    try:
        ds, meta, transfer_syntax_uid = _FastReader(stream).part10()
        return _interpret(ds, meta, transfer_syntax_uid, [], meta_required=True)
    except KOSError:
        raise  # a refusal of what was read exactly: the one pydicom's reading gives
    except Exception:  # _Fallback, or pydicom failing to convert a value
        return None


def _pydicom_as_assumed() -> bool:
    """pydicom's reading options are those whose behaviour the fast reader reproduces."""
    return (
        pydicom_config.settings.reading_validation_mode != pydicom_config.RAISE
        and not pydicom_config.datetime_conversion
        and not pydicom_config.use_none_as_empty_text_VR_value
        and pydicom_config.data_element_callback is None
        and pydicom_hooks.raw_element_vr is raw_element_vr
        and pydicom_hooks.raw_element_value is raw_element_value
        and not pydicom_hooks.raw_element_kwargs
    )


def _decode(vr: str, raw: bytes, first_encoding: str) -> Any:
    """The value pydicom's converter gives a plain element of this VR (see `_FastReader`)."""
    if not raw:
        return empty_value_for_VR(vr)
    if vr == "UI":  # a canonical UID, possibly padded
        return raw.rstrip(b"\0 ").decode("ascii")
    if vr in _STRING_VRS:
        return _one_or_many(raw.decode("latin-1").rstrip(" \0").split("\\"))
    if vr == "AE":
        return _one_or_many([part.strip() for part in raw.decode("latin-1").split("\\")])
    if vr == "UR":
        return raw.decode("latin-1").rstrip()
    if vr in _SPLIT_TEXT_VRS:  # text that decodes without escape sequences
        parts = raw.decode(first_encoding).split("\\")
        return _one_or_many([part.rstrip("\0 ") for part in parts])
    if vr in _SINGLE_TEXT_VRS:
        return raw.decode(first_encoding).rstrip("\0 ")
    if vr == "UL":  # 4 bytes
        return int.from_bytes(raw, "little")
    raise _Fallback


def _one_or_many(values: list[str]) -> str | MultiValue[str]:
    return values[0] if len(values) == 1 else MultiValue(str, values)


def _implicit_vr(tag: int) -> str | None:
    """The dictionary VR of a public tag read in implicit VR (None if unknown)."""
    if tag in _IMPLICIT_VRS:
        vr = _IMPLICIT_VRS[tag]
    else:
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = None
        if len(_IMPLICIT_VRS) < 4096:
            _IMPLICIT_VRS[tag] = vr
    if vr is not None and len(vr) != 2:
        raise _Fallback  # "US or SS"...: pydicom resolves it from other elements
    return vr


class _FastReader:
    """Reads a Part 10 stream (preamble included) into `_Node`s, or raises `_Fallback`."""

    __slots__ = ("data", "implicit", "short", "short_offset", "size")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.set_implicit(False)

    def set_implicit(self, implicit: bool) -> None:
        self.implicit = implicit
        # where the length of an element of a 2-byte-length VR is, from its header
        self.short, self.short_offset = (_UINT32, 4) if implicit else (_UINT16, 6)

    def part10(self) -> tuple[_Node, _Node, str]:
        """(dataset, file meta information, transfer syntax UID)."""
        data, size = self.data, self.size
        meta = _Node(data, default_encoding, default_encoding)
        pos, previous = 132, -1
        while True:
            if pos + 8 > size:
                raise _Fallback
            group, number, vr_bytes, length = _EXPLICIT_HEADER(data, pos)
            if group != 2:
                break
            tag = 0x00020000 | number
            vr = _VR_OF_BYTES.get(vr_bytes)
            if tag <= previous or vr is None or vr == "SQ":
                raise _Fallback
            previous = tag
            start = pos + 8
            if vr in _LONG_LENGTH_VRS:
                if pos + 12 > size:
                    raise _Fallback
                (length,) = _UINT32(data, start)
                start += 4
            pos = start + length
            if pos > size:
                raise _Fallback
            meta.elements[tag] = self.element(meta, tag, vr, start, pos)
        if not meta.elements:
            raise _Fallback
        group_length = _value(meta, "FileMetaInformationGroupLength")
        if (
            data[132:136] == b"\x02\x00\x00\x00"
            and isinstance(group_length, int)
            and size <= 144 + group_length
        ):
            raise _Fallback  # refused as truncated
        transfer_syntax_uid = _text(meta, "TransferSyntaxUID", " in the file meta")
        if transfer_syntax_uid == ImplicitVRLittleEndian:
            # pydicom switches to explicit VR when the first element looks explicit
            if 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B:
                raise _Fallback
            self.set_implicit(True)
        elif transfer_syntax_uid != ExplicitVRLittleEndian:
            raise _Fallback
        ds, _ = self.dataset(pos, size, 0, default_encoding, default_encoding)
        return ds, meta, transfer_syntax_uid

    def dataset(
        self, pos: int, end: int, depth: int, encoding: str | list[str], first_encoding: str
    ) -> tuple[_Node, int]:
        """The elements from `pos` to `end`, or to an item delimitation item if `end` is -1."""
        data, implicit = self.data, self.implicit
        limit = self.size if end < 0 else end
        node = _Node(data, encoding, first_encoding)
        elements = node.elements
        previous = 0x0007FFFF  # ascending tags from group 0008 (no command or meta groups)
        vr: str | None
        while pos != end:
            if pos + 8 > limit:
                raise _Fallback
            if implicit:
                group, number, length = _ITEM_HEADER(data, pos)
            else:
                group, number, vr_bytes, length = _EXPLICIT_HEADER(data, pos)
            tag = group << 16 | number
            if tag <= previous or group >= 0xFFFE:
                if tag == 0xFFFEE00D and end < 0 and data[pos + 4 : pos + 8] == b"\0\0\0\0":
                    return node, pos + 8
                raise _Fallback
            previous = tag
            start = pos + 8
            if implicit:
                if group & 1:
                    raise _Fallback  # its VR comes from the private dictionary
                vr = _implicit_vr(tag)
            else:
                vr = _VR_OF_BYTES.get(vr_bytes)
                if vr is None:
                    raise _Fallback
                if vr in _LONG_LENGTH_VRS:
                    if pos + 12 > limit:
                        raise _Fallback
                    (length,) = _UINT32(data, start)
                    start += 4
            if vr == "SQ":
                if group & 1 and number < 0x100:
                    raise _Fallback  # a sequence where a private creator would be
                if length == 0xFFFFFFFF:
                    items, pos = self.items(start, -1, depth + 1, node)
                else:
                    pos = start + length
                    if pos > limit:
                        raise _Fallback
                    items, _ = self.items(start, pos, depth + 1, node)
                elements[tag] = ("SQ", start, pos, items)
                continue
            pos = start + length
            if pos > limit:  # also an undefined length, which only a sequence may have here
                raise _Fallback
            if tag < 0x00080005 and vr != "UL":
                raise _Fallback  # decoded before the dataset's character set is known
            elements[tag] = self.element(node, tag, vr, start, pos)
            if tag == 0x00080005:
                if vr != "CS":
                    raise _Fallback
                node.encoding = convert_encodings(node.value(tag, "CS"))
                node.first_encoding = _first_encoding(node.encoding)
        return node, pos

    def items(self, pos: int, end: int, depth: int, parent: _Node) -> tuple[_Items, int]:
        """The items of a sequence value, to `end` or to its delimitation item if `end` is -1."""
        if depth > _MAX_NESTING:
            raise _Fallback
        data = self.data
        encoding, first_encoding = parent.encoding, parent.first_encoding
        limit = self.size if end < 0 else end
        items = _Items()
        # Most items are references to instances: tried first, in their usual shapes.
        shapes = _IMPLICIT_SHAPES if self.implicit else _EXPLICIT_SHAPES
        while pos != end:
            if pos + 8 > limit:
                raise _Fallback
            if data.startswith(b"\x08\x00\x50\x11", pos + 8):  # Referenced SOP Class UID
                match = shapes.reference.match(data, pos, limit)
                if match is not None:
                    read = self.reference_item(match, encoding, first_encoding)
                    if read is not None:
                        item, pos = read
                        items.append(item)
                        continue
            elif data.startswith(b"\x08\x00\x99\x11", pos + 8) and depth < _MAX_NESTING:
                # a content item (its reference item is one level further down)
                match = shapes.content.match(data, pos, limit)
                if match is not None:
                    content_end = self.content_item(match)
                    if content_end is not None:
                        pos = content_end
                        items.append(_UNREAD)
                        continue
            group, number, length = _ITEM_HEADER(data, pos)
            pos += 8
            if group != 0xFFFE:
                raise _Fallback
            if number == 0xE000:
                if length == 0xFFFFFFFF:
                    item, pos = self.dataset(pos, -1, depth, encoding, first_encoding)
                else:
                    item_end = pos + length
                    if item_end > limit:
                        raise _Fallback
                    item, pos = self.dataset(pos, item_end, depth, encoding, first_encoding)
                if len(item.elements) == 2:
                    item.pair = _uid_pair(item)
                items.append(item)
            elif number == 0xE0DD and end < 0 and length == 0:
                return items, pos
            else:
                raise _Fallback
        return items, pos

    def reference_item(
        self, match: re.Match[bytes], encoding: str | list[str], first_encoding: str
    ) -> tuple[_Node, int] | None:
        """The item `_Shapes.reference` matched, if its declared lengths cut it as the match.

        It is then exactly what `dataset` would read: two UI elements in order, with canonical
        UIDs of at most 64 characters. None lets `dataset` read it.
        """
        data, short, offset = self.data, self.short, self.short_offset
        (pos, _), (_, class_uid_end), (_, class_end), (instance_start, uid_end), (_, pad_end) = (
            match.regs
        )
        class_start = pos + 16
        if class_start + short(data, pos + offset + 8)[0] != class_end:
            return None
        instance_end = instance_start + short(data, class_end + offset)[0]
        # the padding matched may run into the next element: the declared length decides
        if not uid_end <= instance_end <= pad_end:
            return None
        if class_uid_end - class_start > 64 or uid_end - instance_start > 64:
            return None
        (item_length,) = _UINT32(data, pos + 4)
        if item_length == 0xFFFFFFFF:
            if not data.startswith(_ITEM_DELIMITER, instance_end, match.endpos):
                return None
            end = instance_end + 8
        elif pos + 8 + item_length != instance_end:
            return None
        else:
            end = instance_end
        elements = {
            _REFERENCED_SOP_CLASS_UID: ("UI", class_start, class_end, _LAZY),
            _REFERENCED_SOP_INSTANCE_UID: ("UI", instance_start, instance_end, _LAZY),
        }
        pair = (
            data[class_start:class_uid_end].decode("ascii"),
            data[instance_start:uid_end].decode("ascii"),
        )
        return _Node(data, encoding, first_encoding, elements, pair), end

    def content_item(self, match: re.Match[bytes]) -> int | None:
        """The end of the TID 2010 content item `_Shapes.content` matched, if its lengths agree.

        Referenced SOP Sequence of one reference item (checked as above), Relationship Type and
        Value Type (CS of [A-Z0-9 _]). The parser does not read content items: `_UNREAD` stands
        for each.
        """
        data, short, offset = self.data, self.short, self.short_offset
        (
            (pos, _),
            (class_start, class_uid_end),
            (_, class_end),
            (instance_start, uid_end),
            (_, instance_end),
            (item_delimiter, _),
            (sequence_delimiter, _),
            (relationship_start, relationship_end),
            (value_type_start, value_type_run_end),
        ) = match.regs
        reference = class_start - 16
        if class_start + short(data, reference + offset + 8)[0] != class_end:
            return None
        if instance_start + short(data, class_end + offset)[0] != instance_end:
            return None
        if class_uid_end - class_start > 64 or uid_end - instance_start > 64:
            return None
        end = instance_end
        (reference_length,) = _UINT32(data, reference + 4)
        if reference_length == 0xFFFFFFFF:
            if item_delimiter != end:
                return None
            end += 8
        elif item_delimiter != -1 or reference + 8 + reference_length != end:
            return None
        (sequence_length,) = _UINT32(data, reference - 4)
        if sequence_length == 0xFFFFFFFF:
            if sequence_delimiter != end:
                return None
            end += 8
        elif sequence_delimiter != -1 or reference + sequence_length != end:
            return None
        if relationship_start != end + 8:
            return None
        if relationship_start + short(data, end + offset)[0] != relationship_end:
            return None
        value_type_end: int = value_type_start + short(data, relationship_end + offset)[0]
        if value_type_end > value_type_run_end:
            return None
        (item_length,) = _UINT32(data, pos + 4)
        if item_length == 0xFFFFFFFF:
            if not data.startswith(_ITEM_DELIMITER, value_type_end, match.endpos):
                return None
            return value_type_end + 8
        if pos + 8 + item_length != value_type_end:
            return None
        return value_type_end

    def element(
        self, node: _Node, tag: int, vr: str | None, start: int, end: int
    ) -> tuple[str, int, int, Any]:
        """A non-sequence element: plain (`_LAZY`) or converted by pydicom."""
        if vr is None or tag & 0x10000:  # unknown (implicit VR) or private
            return self.converted(node, tag, vr, start, end)
        if vr == "UI":
            match = _CANONICAL_UID.fullmatch(self.data, start, end)
            if match is not None and match.end(1) - start <= 64:
                return (vr, start, end, _LAZY)
            entry = self.converted(node, tag, vr, start, end)
            value = entry[3]
            for single in value if isinstance(value, MultiValue | list) else [value]:
                text = str(single).strip() if single is not None else ""
                if text and not _is_valid_uid(text):
                    raise _Fallback  # refused: pydicom's reading names it
            return entry
        if vr in _OPAQUE_VRS:
            return (vr, start, end, _LAZY)
        if vr in _SPLIT_TEXT_VRS or vr in _SINGLE_TEXT_VRS:
            # pydicom decodes text without escape sequences with the first encoding; should
            # that fail, it warns and decodes otherwise: that is left to it.
            data = self.data
            if data.find(b"\x1b", start, end) < 0:
                try:
                    data[start:end].decode(node.first_encoding)
                except (UnicodeError, LookupError):
                    pass
                else:
                    return (vr, start, end, _LAZY)
        elif vr == "IS":
            if start == end or _CANONICAL_IS.fullmatch(self.data, start, end):
                return (vr, start, end, _LAZY)  # an int pydicom reads without fail
        elif vr == "UL":
            if end - start == 4:
                return (vr, start, end, _LAZY)
        elif vr == "PN" and start == end:
            return (vr, start, end, _LAZY)
        return self.converted(node, tag, vr, start, end)

    def converted(
        self, node: _Node, tag: int, vr: str | None, start: int, end: int
    ) -> tuple[str, int, int, Any]:
        """The element converted by pydicom, as `Dataset.__getitem__` converts it."""
        if vr == "UN":
            raise _Fallback  # pydicom may replace it with the dictionary VR, or a sequence
        raw_vr = None if self.implicit else vr
        length = end - start
        empty = cast(bytes | None, empty_value_for_VR(raw_vr, raw=True))
        raw = RawDataElement(
            BaseTag(tag),
            raw_vr,
            length,
            self.data[start:end] if length else empty,
            start,
            self.implicit,
            True,
        )
        element = convert_raw_data_element(raw, encoding=node.encoding, ds=None)
        if element.VR == "SQ" or element.VR in AMBIGUOUS_VR:
            raise _Fallback
        return (element.VR, start, end, element.value)


def _uid_pair(item: _Node) -> tuple[str, str] | None:
    """(SOP class, SOP instance) of an item of exactly these two valid, plain UIDs."""
    sop_class = item.elements.get(_REFERENCED_SOP_CLASS_UID)
    sop_instance = item.elements.get(_REFERENCED_SOP_INSTANCE_UID)
    if sop_class is None or sop_instance is None:
        return None
    if sop_class[0] != "UI" or sop_class[3] is not _LAZY:
        return None
    if sop_instance[0] != "UI" or sop_instance[3] is not _LAZY:
        return None
    data = item.data
    class_uid = data[sop_class[1] : sop_class[2]].rstrip(b"\0 ").decode("ascii")
    instance_uid = data[sop_instance[1] : sop_instance[2]].rstrip(b"\0 ").decode("ascii")
    return (class_uid, instance_uid) if class_uid and instance_uid else None


def _parse_dataset(ds: Dataset, transfer_syntax_uid: str, *, meta_required: bool) -> ParsedKOS:
    bad_uids: list[str] = []
    _load_all(ds, "", 0, bad_uids)
    meta = getattr(ds, "file_meta", None)
    return _interpret(ds, meta, transfer_syntax_uid, bad_uids, meta_required=meta_required)


def _interpret(
    ds: _Container,
    meta: object,
    transfer_syntax_uid: str,
    bad_uids: list[str],
    *,
    meta_required: bool,
) -> ParsedKOS:
    """The manifest in a decoded dataset: the checks and reading common to both readers."""
    sop_class_uid = _text(ds, "SOPClassUID", "")
    if sop_class_uid != KOS_SOP_CLASS_UID:
        found = "absent"
        if sop_class_uid:
            known = UID(sop_class_uid).name if _is_valid_uid(sop_class_uid) else "not a valid UID"
            found = f"{_show(sop_class_uid)} ({known})"
        raise KOSError(
            KOSErrorCode.WRONG_SOP_CLASS,
            f"{_name('SOPClassUID')} is {found}, expected {KOS_SOP_CLASS_UID} "
            "(Key Object Selection Document Storage)",
        )
    sop_instance_uid = _uid(ds, "SOPInstanceUID", "")
    _check_file_meta(meta, sop_class_uid, sop_instance_uid, required=meta_required)
    if bad_uids:
        raise KOSError(KOSErrorCode.INVALID_UID, bad_uids[0])

    study_instance_uid = _uid(ds, "StudyInstanceUID", "")
    series_instance_uid = _uid(ds, "SeriesInstanceUID", "")
    patient = _patient(ds)
    accession_number = _text(ds, "AccessionNumber", "") or None
    studies = _studies(ds, study_instance_uid, accession_number)
    if not _sequence(ds, "ContentSequence", ""):
        raise KOSError(
            KOSErrorCode.NO_CONTENT,
            f"{_name('ContentSequence')} is absent or empty: a Key Object Selection document "
            "lists its references as content items (TID 2010)",
        )

    modalities = set(_values(ds, "ModalitiesInStudy", ""))
    body_parts = set(_values(ds, "BodyPartExamined", ""))
    for study in studies:
        for series in study.series:
            if series.modality:
                modalities.add(series.modality)
            if series.body_part:
                body_parts.add(series.body_part)
            for instance in series.instances:
                derived = modality_for_sop_class(instance.sop_class_uid)
                if derived:
                    modalities.add(derived)
    modalities.discard("KO")

    content_date = _parse_date(_text(ds, "ContentDate", ""))
    content_time = _parse_time(_text(ds, "ContentTime", ""))
    content_datetime = None
    if content_date is not None:
        content_datetime = dt.datetime.combine(
            content_date,
            content_time or dt.time(0),
            tzinfo=_parse_tz_offset(_text(ds, "TimezoneOffsetFromUTC", "")),
        )
    charset = _text(ds, "SpecificCharacterSet", "")

    return ParsedKOS(
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        study_instance_uid=study_instance_uid,
        patient=patient,
        studies=studies,
        study_date=_parse_date(_text(ds, "StudyDate", "")),
        study_time=_parse_time(_text(ds, "StudyTime", "")),
        content_datetime=content_datetime,
        study_description=_text(ds, "StudyDescription", ""),
        accession_number=accession_number,
        institution_name=_text(ds, "InstitutionName", ""),
        modalities=tuple(sorted(modalities)),
        body_parts=tuple(sorted(body_parts)),
        document_title=_document_title(ds),
        transfer_syntax_uid=transfer_syntax_uid,
        specific_character_set=charset or None,
    )


def _load_all(ds: Dataset, where: str, depth: int, bad_uids: list[str] | None = None) -> None:
    """Decode every element now (pydicom is lazy), so that decoding errors surface here.

    Also checks that no value is shorter than its declared length (a truncated file) and, when
    `bad_uids` is given, collects a message for each invalid UID in a non-private UI element.
    """
    if depth > _MAX_NESTING:
        raise KOSError(
            KOSErrorCode.INVALID_VALUE,
            f"sequences are nested more than {_MAX_NESTING} levels deep{where}",
        )
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != _UNDEFINED_LENGTH
            and raw.value is not None
            and len(raw.value) < raw.length
        ):
            raise KOSError(
                KOSErrorCode.TRUNCATED,
                f"{_tag_name(tag)}{where} declares {raw.length} bytes but only "
                f"{len(raw.value)} remain",
            )
        try:
            elem = ds[tag]
        except Exception as exc:
            raise KOSError(
                KOSErrorCode.INVALID_VALUE,
                f"{_tag_name(tag)}{where} cannot be decoded: {_describe(exc)}",
            ) from exc
        if elem.VR == "SQ":
            items = elem.value if isinstance(elem.value, Sequence) else ()
            for index, item in enumerate(items):
                _load_all(
                    item, f"{_inside(where, elem.keyword or str(tag), index)}", depth + 1, bad_uids
                )
        elif elem.VR == "UI" and bad_uids is not None and not BaseTag(tag).is_private:
            values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
            for value in values:
                text = str(value).strip() if value is not None else ""
                if text and not _is_valid_uid(text):
                    bad_uids.append(f"{_tag_name(tag)}{where} is not a valid UID: {_show(text)}")


def _check_file_meta(
    meta: object, sop_class_uid: str, sop_instance_uid: str, *, required: bool
) -> None:
    if not isinstance(meta, Dataset | _Node) or len(meta) == 0:
        if required:
            raise KOSError(KOSErrorCode.INVALID_META, "the file meta information is absent")
        return
    if isinstance(meta, Dataset):
        _load_all(meta, " in the file meta", 0)
    pairs = (
        ("MediaStorageSOPClassUID", "SOPClassUID", sop_class_uid),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID", sop_instance_uid),
    )
    for meta_keyword, keyword, value in pairs:
        meta_value = _text(meta, meta_keyword, " in the file meta")
        if not meta_value:
            if required:
                raise KOSError(
                    KOSErrorCode.INVALID_META,
                    f"{_name(meta_keyword)} is absent from the file meta information",
                )
            continue
        if meta_value != value:
            raise KOSError(
                KOSErrorCode.META_MISMATCH,
                f"{_name(meta_keyword)} in the file meta is {_show(meta_value)} but "
                f"{_name(keyword)} in the dataset is {_show(value)}",
            )


def _patient(ds: _Container) -> PatientInfo:
    patient_id = _single_text(ds, "PatientID", "")
    if not patient_id:
        raise KOSError(KOSErrorCode.NO_PATIENT_ID, f"{_name('PatientID')} is absent or empty")
    family_name, given_names = _person_name(ds, "PatientName", "")
    birth_name = _person_name(ds, "PatientBirthName", "")[0]
    other_ids = []
    for index, item in enumerate(_sequence(ds, "OtherPatientIDsSequence", "")):
        where = _inside("", "OtherPatientIDsSequence", index)
        value = _single_text(item, "PatientID", where)
        if not value:
            continue
        other_ids.append(
            OtherPatientId(
                value=value,
                issuer=_single_text(item, "IssuerOfPatientID", where) or None,
                issuer_oid=_issuer_oid(item, where),
                type_of_patient_id=_text(item, "TypeOfPatientID", where) or None,
            )
        )
    sex = _text(ds, "PatientSex", "").upper()
    return PatientInfo(
        patient_id=patient_id,
        issuer=_single_text(ds, "IssuerOfPatientID", "") or None,
        issuer_oid=_issuer_oid(ds, ""),
        family_name=family_name,
        given_names=given_names,
        birth_name=birth_name,
        birth_date=_parse_date(_text(ds, "PatientBirthDate", "")),
        sex=sex if sex in {"M", "F", "O"} else "",
        other_ids=tuple(other_ids),
    )


def _issuer_oid(ds: _Container, where: str) -> str | None:
    """Universal Entity ID of the Issuer of Patient ID Qualifiers Sequence, without "urn:oid:"."""
    items = _sequence(ds, "IssuerOfPatientIDQualifiersSequence", where)
    if not items:
        return None
    value = _single_text(
        items[0], "UniversalEntityID", _inside(where, "IssuerOfPatientIDQualifiersSequence", 0)
    )
    if value.lower().startswith("urn:oid:"):
        value = value[len("urn:oid:") :].strip()
    return value or None


def _studies(
    ds: _Container, kos_study_uid: str, kos_accession: str | None
) -> tuple[ReferencedStudy, ...]:
    evidence = _sequence(ds, _EVIDENCE, "")
    if not evidence:
        raise KOSError(
            KOSErrorCode.NO_EVIDENCE,
            f"{_name(_EVIDENCE)} is absent or empty: the manifest references nothing",
        )
    accessions = _request_accessions(ds)
    series_by_study: dict[str, list[ReferencedSeries]] = {}
    seen_series: set[str] = set()
    seen_instances: set[str] = set()
    for study_index, study_item in enumerate(evidence):
        where = _inside("", _EVIDENCE, study_index)
        study_uid = _uid(study_item, "StudyInstanceUID", where)
        series_items = _sequence(study_item, "ReferencedSeriesSequence", where)
        if not series_items:
            raise KOSError(
                KOSErrorCode.NO_REFERENCES,
                f"{_name('ReferencedSeriesSequence')}{where} is absent or empty: "
                f"study {study_uid} references no series",
            )
        study_series = series_by_study.setdefault(study_uid, [])
        for series_index, series_item in enumerate(series_items):
            series = _series(
                series_item,
                _inside(where, "ReferencedSeriesSequence", series_index),
                seen_instances,
            )
            if series.series_instance_uid in seen_series:
                raise KOSError(
                    KOSErrorCode.DUPLICATE_REFERENCE,
                    f"{_name('SeriesInstanceUID')} {series.series_instance_uid} is referenced "
                    f"twice (again{where} > ReferencedSeriesSequence[{series_index}])",
                )
            seen_series.add(series.series_instance_uid)
            study_series.append(series)
    return tuple(
        ReferencedStudy(
            study_instance_uid=study_uid,
            accession_number=accessions.get(study_uid)
            or (kos_accession if study_uid == kos_study_uid else None),
            series=tuple(series),
        )
        for study_uid, series in series_by_study.items()
    )


def _series(item: _Container, where: str, seen_instances: set[str]) -> ReferencedSeries:
    series_uid = _uid(item, "SeriesInstanceUID", where)
    sop_items = _sequence(item, "ReferencedSOPSequence", where)
    if not sop_items:
        raise KOSError(
            KOSErrorCode.NO_REFERENCES,
            f"{_name('ReferencedSOPSequence')}{where} is absent or empty: "
            f"series {series_uid} references no instance",
        )
    instances = []
    for index, sop_item in enumerate(sop_items):
        # The fast reader has already read and checked the two UIDs of a plain item.
        pair = sop_item.pair if isinstance(sop_item, _Node) else None
        if pair is not None:
            instance = ReferencedInstance(*pair)
        else:
            sop_where = _inside(where, "ReferencedSOPSequence", index)
            instance = ReferencedInstance(
                sop_class_uid=_uid(sop_item, "ReferencedSOPClassUID", sop_where),
                sop_instance_uid=_uid(sop_item, "ReferencedSOPInstanceUID", sop_where),
            )
        if instance.sop_instance_uid in seen_instances:
            sop_where = _inside(where, "ReferencedSOPSequence", index)
            raise KOSError(
                KOSErrorCode.DUPLICATE_REFERENCE,
                f"{_name('ReferencedSOPInstanceUID')} {instance.sop_instance_uid} is "
                f"referenced twice (again{sop_where})",
            )
        seen_instances.add(instance.sop_instance_uid)
        instances.append(instance)

    ae_titles = _values(item, "RetrieveAETitle", where)
    retrieve_ae_title = ae_titles[0] if ae_titles else None
    retrieve_location_uid = _optional_uid(item, "RetrieveLocationUID", where)
    retrieve_url = _single_text(item, "RetrieveURL", where) or None
    if retrieve_url is not None and not _HTTP_URL.match(retrieve_url):
        raise KOSError(
            KOSErrorCode.INVALID_VALUE,
            f"{_name('RetrieveURL')}{where} is not an http(s) URL: {_show(retrieve_url)}",
        )
    if not (retrieve_ae_title or retrieve_location_uid or retrieve_url):
        raise KOSError(
            KOSErrorCode.NO_RETRIEVE_LOCATION,
            f"series {series_uid}{where} names no retrieve location: none of "
            f"{_name('RetrieveAETitle')}, {_name('RetrieveLocationUID')} or "
            f"{_name('RetrieveURL')} is given",
        )
    modality = _text(item, "Modality", where).upper() or _derived_modality(instances)
    return ReferencedSeries(
        series_instance_uid=series_uid,
        modality=modality,
        retrieve_ae_title=retrieve_ae_title,
        retrieve_location_uid=retrieve_location_uid,
        retrieve_url=retrieve_url,
        instances=tuple(instances),
        body_part=_text(item, "BodyPartExamined", where).upper() or None,
    )


def _derived_modality(instances: list[ReferencedInstance]) -> str | None:
    counts = Counter(
        modality
        for instance in instances
        if (modality := modality_for_sop_class(instance.sop_class_uid)) is not None
    )
    if not counts:
        return None
    return min(counts.items(), key=lambda pair: (-pair[1], pair[0]))[0]


def _request_accessions(ds: _Container) -> dict[str, str]:
    """Study Instance UID -> Accession Number, from the Referenced Request Sequence."""
    accessions: dict[str, str] = {}
    for index, item in enumerate(_sequence(ds, "ReferencedRequestSequence", "")):
        where = _inside("", "ReferencedRequestSequence", index)
        study_uid = _optional_uid(item, "StudyInstanceUID", where)
        accession = _text(item, "AccessionNumber", where)
        if study_uid and accession:
            accessions.setdefault(study_uid, accession)
    return accessions


def _document_title(ds: _Container) -> tuple[str, str, str] | None:
    items = _sequence(ds, "ConceptNameCodeSequence", "")
    if not items:
        return None
    where = _inside("", "ConceptNameCodeSequence", 0)
    code = (
        _text(items[0], "CodeValue", where)
        or _text(items[0], "LongCodeValue", where)
        or _text(items[0], "URNCodeValue", where)
    )
    title = (
        code,
        _text(items[0], "CodingSchemeDesignator", where),
        _text(items[0], "CodeMeaning", where),
    )
    return title if any(title) else None


# --------------------------------------------------------------------------- value helpers


def _is_valid_uid(value: str) -> bool:
    # pydicom's UID() warns on an invalid value; this only answers.
    return len(value) <= 64 and RE_VALID_UID.fullmatch(value) is not None


def _name(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _tag_name(tag: int) -> str:
    keyword = keyword_for_tag(tag)
    position = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{keyword} {position}" if keyword else position


def _inside(where: str, sequence_keyword: str, index: int) -> str:
    step = f"{sequence_keyword}[{index}]"
    return f"{where} > {step}" if where else f" in {step}"


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_show(str(exc), 200)}"


def _keyword_info(keyword: str) -> tuple[int, str]:
    """(tag, dictionary VR) of a keyword the parser reads, cached."""
    info = _KEYWORD_INFO.get(keyword)
    if info is None:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(keyword)
        info = _KEYWORD_INFO[keyword] = (tag, dictionary_VR(tag))
    return info


_KEYWORD_INFO: dict[str, tuple[int, str]] = {}


def _value(ds: _Container, keyword: str) -> Any:
    tag, vr = _keyword_info(keyword)
    if isinstance(ds, _Node):
        return ds.value(tag, vr)
    if tag not in ds:
        return None
    return ds[tag].value


def _scalar_text(value: Any, keyword: str, where: str) -> str:
    if type(value) is str:
        return value.strip(" \x00")
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    if isinstance(value, str | int | float | PersonName):
        return str(value).strip(" \x00")
    raise KOSError(
        KOSErrorCode.INVALID_VALUE,
        f"{_name(keyword)}{where} holds a {type(value).__name__}, not a text value",
    )


def _text(ds: _Container, keyword: str, where: str) -> str:
    """The value as stripped text ('' when absent); several values are joined with '\\'."""
    value = _value(ds, keyword)
    if type(value) is not str and isinstance(value, MultiValue | list | tuple):
        return "\\".join(_scalar_text(v, keyword, where) for v in value).strip()
    return _scalar_text(value, keyword, where)


def _values(ds: _Container, keyword: str, where: str) -> list[str]:
    """The non-empty values, stripped (upper-cased for code strings)."""
    value = _value(ds, keyword)
    raw = value if isinstance(value, MultiValue | list | tuple) else [value]
    texts = [_scalar_text(v, keyword, where) for v in raw]
    if _keyword_info(keyword)[1] == "CS":
        texts = [t.upper() for t in texts]
    return [t for t in texts if t]


def _single_text(ds: _Container, keyword: str, where: str) -> str:
    """Like `_text` but several values are an error (an identifier must be one value)."""
    value = _value(ds, keyword)
    if type(value) is not str and isinstance(value, MultiValue | list | tuple):
        texts = [t for t in (_scalar_text(v, keyword, where) for v in value) if t]
        if len(texts) > 1:
            raise KOSError(
                KOSErrorCode.INVALID_VALUE,
                f"{_name(keyword)}{where} has {len(texts)} values where one is expected",
            )
        return texts[0] if texts else ""
    return _scalar_text(value, keyword, where)


def _uid(ds: _Container, keyword: str, where: str) -> str:
    """A required UID: absent, empty, several or invalid is KOSError("kos:invalid-uid")."""
    uid = _optional_uid(ds, keyword, where)
    if uid is None:
        raise KOSError(KOSErrorCode.INVALID_UID, f"{_name(keyword)}{where} is absent or empty")
    return uid


def _optional_uid(ds: _Container, keyword: str, where: str) -> str | None:
    value = _value(ds, keyword)
    if type(value) is not str and isinstance(value, MultiValue | list | tuple):
        if len(value) > 1:
            raise KOSError(
                KOSErrorCode.INVALID_UID,
                f"{_name(keyword)}{where} has {len(value)} values where one UID is expected",
            )
        value = value[0] if value else None
    text = _scalar_text(value, keyword, where)
    if not text:
        return None
    if not _is_valid_uid(text):
        raise KOSError(
            KOSErrorCode.INVALID_UID, f"{_name(keyword)}{where} is not a valid UID: {_show(text)}"
        )
    return text


def _sequence(ds: _Container, keyword: str, where: str) -> list[_Container]:
    value = _value(ds, keyword)
    if value is None:
        return []
    if isinstance(value, Sequence | _Items):
        return list(value)
    if isinstance(value, str | bytes) and not value:
        return []
    raise KOSError(
        KOSErrorCode.INVALID_VALUE,
        f"{_name(keyword)}{where} is not a sequence (it holds a {type(value).__name__})",
    )


def _person_name(ds: _Container, keyword: str, where: str) -> tuple[str, str]:
    """(family name, given names) of a PN value; the middle name joins the given names."""
    value = _value(ds, keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if value is None:
        return "", ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        value = PersonName(value)
    if not isinstance(value, PersonName):
        raise KOSError(
            KOSErrorCode.INVALID_VALUE,
            f"{_name(keyword)}{where} holds a {type(value).__name__}, not a person name",
        )
    family = value.family_name.strip()
    given = " ".join(part for part in (value.given_name.strip(), value.middle_name.strip()) if part)
    return family, given


_HTTP_URL = re.compile(r"(?i)https?://[^/\s]")
_DATE = re.compile(r"(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})")
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:[.,](\d{1,6})\d*)?)?)?")
_TZ_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


def _parse_date(text: str) -> dt.date | None:
    """DICOM DA ("20240131") or ACR-NEMA ("2024.01.31"); None when empty or unreadable."""
    match = _DATE.fullmatch(text.strip())
    if not match:
        return None
    try:
        return dt.date(*(int(group) for group in match.groups()))
    except ValueError:
        return None


def _parse_time(text: str) -> dt.time | None:
    """DICOM TM ("103000.25", "1030") or ACR-NEMA ("10:30:00"); None when empty or unreadable."""
    match = _TIME.fullmatch(text.strip())
    if not match:
        return None
    hours, minutes, seconds, fraction = match.groups()
    try:
        return dt.time(
            int(hours),
            int(minutes or 0),
            min(int(seconds or 0), 59),  # a leap second (60) is allowed by TM
            int((fraction or "").ljust(6, "0")),
        )
    except ValueError:
        return None


def _parse_tz_offset(text: str) -> dt.tzinfo | None:
    match = _TZ_OFFSET.fullmatch(text.strip())
    if not match:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) > 59:
        return None
    offset = dt.timedelta(hours=int(hours), minutes=int(minutes))
    return dt.timezone(-offset if sign == "-" else offset)


# --------------------------------------------------------------------------- patient IDs


def resolve_patient_id(
    kos: ParsedKOS, *, institution_issuer: str, institution_issuer_oid: str | None
) -> ResolvedPatientId:
    """The domain of the manifest's primary Patient ID, as sent by this institution.

    Accepted: no issuer at all (the institution's domain applies); Issuer of Patient ID equal
    to the institution's issuer string or OID; Universal Entity ID equal to the institution's
    OID; or the national INS domain, by its OID (as Universal Entity ID, or as Issuer of
    Patient ID text). Anything else raises KOSError("kos:unknown-issuer").
    """
    patient = kos.patient
    issuer = patient.issuer
    issuer_oid = patient.issuer_oid
    ins_oid = _ins_oid(issuer, issuer_oid)
    if ins_oid is not None:
        if issuer in _INS_KINDS and issuer != ins_oid:
            raise KOSError(
                KOSErrorCode.UNKNOWN_ISSUER,
                f"{_name('IssuerOfPatientID')} {_show(issuer)} contradicts "
                f"{_name('UniversalEntityID')} {_show(issuer_oid)}",
            )
        return _resolve_ins(patient.patient_id, ins_oid, "PatientID (0010,0020)")

    ipp = ResolvedPatientId(
        kind="IPP",
        issuer=institution_issuer,
        value=patient.patient_id,
        test=False,
        qualified=False,
    )
    if issuer_oid is not None:
        if institution_issuer_oid is not None:
            if issuer_oid == institution_issuer_oid:
                return ipp  # the OID is authoritative; the text may be spelt differently
        elif issuer == institution_issuer:
            return ipp  # no OID on record for the institution: its issuer text decides
    elif issuer is None or issuer in {institution_issuer, institution_issuer_oid}:
        return ipp
    expected = f"{_show(institution_issuer)}" + (
        f" (OID {institution_issuer_oid})" if institution_issuer_oid else ""
    )
    sent = _show(issuer) if issuer is not None else "no issuer text"
    if issuer_oid is not None:
        sent += f" with {_name('UniversalEntityID')} {_show(issuer_oid)}"
    raise KOSError(
        KOSErrorCode.UNKNOWN_ISSUER,
        f"{_name('IssuerOfPatientID')} is {sent}: neither this institution's domain, expected "
        f"{expected}, nor the national INS domain ({INS_NIR_OID}, {INS_NIA_OID})",
    )


def national_ids(kos: ParsedKOS) -> tuple[ResolvedPatientId, ...]:
    """Every INS in the manifest: the primary ID if it is one, then Other Patient IDs.

    Recognised by the INS OIDs only; each matricule is checked (KOSError "kos:invalid-ins")
    and normalised to 15 characters. Duplicates are dropped, order is kept.
    """
    found: list[ResolvedPatientId] = []
    patient = kos.patient
    primary_oid = _ins_oid(patient.issuer, patient.issuer_oid)
    if primary_oid is not None:
        found.append(_resolve_ins(patient.patient_id, primary_oid, "PatientID (0010,0020)"))
    for index, other in enumerate(patient.other_ids):
        oid = _ins_oid(other.issuer, other.issuer_oid)
        if oid is not None:
            found.append(
                _resolve_ins(other.value, oid, f"OtherPatientIDsSequence[{index}] PatientID")
            )
    unique: dict[tuple[str, str, str], ResolvedPatientId] = {}
    for resolved in found:
        unique.setdefault((resolved.kind, resolved.issuer, resolved.value), resolved)
    return tuple(unique.values())


def normalise_ins_matricule(value: str) -> str:
    """The 15-character INS matricule (NIR or NIA): 13 characters and the 2-digit key.

    Spaces are dropped and 2a/2b upper-cased; a missing key is computed, a present one checked.
    Raises KOSError("kos:invalid-ins") without echoing the full matricule.
    """
    compact = re.sub(r"\s+", "", value).upper()
    match = re.fullmatch(r"([0-9]{5}(?:[0-9]{2}|2A|2B)[0-9]{6})([0-9]{2})?", compact)
    if not match:
        raise KOSError(
            KOSErrorCode.INVALID_INS,
            f"{_mask(compact)} is not an INS matricule: 13 characters (digits, with 2A or 2B "
            "for a Corsican department) and an optional 2-digit key are expected",
        )
    body, key = match.groups()
    department = body[5:7]
    numeric = int(body[:5] + {"2A": "19", "2B": "18"}.get(department, department) + body[7:])
    expected = 97 - numeric % 97
    if key is not None and int(key) != expected:
        raise KOSError(
            KOSErrorCode.INVALID_INS,
            f"INS matricule {_mask(compact)} has key {key}, "
            f"but its 13 characters give {expected:02d}",
        )
    return f"{body}{expected:02d}"


def _ins_oid(issuer: str | None, issuer_oid: str | None) -> str | None:
    if issuer_oid is not None:
        return issuer_oid if issuer_oid in _INS_KINDS else None
    return issuer if issuer in _INS_KINDS else None


def _resolve_ins(value: str, oid: str, label: str) -> ResolvedPatientId:
    kind, test = _INS_KINDS[oid]
    try:
        matricule = normalise_ins_matricule(value)
    except KOSError as exc:
        raise KOSError(exc.code, f"{label} under {kind} OID {oid}: {exc.message}") from None
    return ResolvedPatientId(kind=kind, issuer=oid, value=matricule, test=test, qualified=True)


def _mask(value: str) -> str:
    # A matricule is a national identifier: never echo it whole into logs or error pages.
    return f"'{value[:3]}…' ({len(value)} characters)" if len(value) > 3 else repr(value)


# --------------------------------------------------------------------------- building


def derive_kos_uids(study: StudyDescription, *, uid_root: str | None = None) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) that `build_kos` uses by default.

    The SOP Instance UID is derived from the whole study description, so any change to the
    study gives a new manifest identity; the Series Instance UID from the study UID only, so
    successive manifests of one study share a KO series. With `uid_root` the UIDs are
    `<uid_root>.<digits of a SHA-512>` (pydicom.uid.generate_uid); without, UUID-derived
    2.25 UIDs (PS3.5 B.2).
    """
    canonical = json.dumps(_plain(study), sort_keys=True, default=str, ensure_ascii=False)
    return (
        _derived_uid(uid_root, "kos-sop-instance", canonical),
        _derived_uid(uid_root, "kos-series", study.study_instance_uid),
    )


def _plain(value: Any) -> Any:
    """What `dataclasses.asdict` gives for a description, as JSON encodes it (a tuple and a
    list are both an array), without its deep copies: a fifth of the time to build a manifest.
    fixtures/kos/ holds manifests whose UIDs depend on this staying the same."""
    fields = getattr(type(value), "__dataclass_fields__", None)
    if fields is not None:
        return {name: _plain(getattr(value, name)) for name in fields}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def _derived_uid(uid_root: str | None, purpose: str, source: str) -> str:
    if uid_root is None:
        name = "\x1f".join((purpose, source))
        return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"
    prefix = uid_root.strip()
    prefix = prefix if prefix.endswith(".") else f"{prefix}."
    if len(prefix) > _MAX_UID_ROOT_LENGTH:
        # generate_uid keeps only the digits that fit in 64 characters: a long root would
        # leave too few of them for tens of millions of manifests not to collide.
        raise KOSError(
            KOSErrorCode.INVALID_VALUE,
            f"uid_root {_show(uid_root)} is longer than {_MAX_UID_ROOT_LENGTH - 1} characters",
        )
    try:
        return str(generate_uid(prefix=prefix, entropy_srcs=[purpose, "\x1f", source]))
    except ValueError as exc:
        raise KOSError(
            KOSErrorCode.INVALID_VALUE,
            f"uid_root {_show(uid_root)} is not a usable UID root: {exc}",
        ) from exc


def build_kos(
    study: StudyDescription,
    *,
    now: dt.datetime,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    uid_root: str | None = None,
) -> bytes:
    """A KOS manifest (Part 10 bytes) for one study, titled (113030, DCM, "Manifest").

    Raises KOSError when the description cannot make a manifest the broker itself would accept
    (the result is parsed back before it is returned).
    """
    data, _parsed = build_kos_parsed(
        study,
        now=now,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        uid_root=uid_root,
    )
    return data


def build_kos_parsed(
    study: StudyDescription,
    *,
    now: dt.datetime,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    uid_root: str | None = None,
) -> tuple[bytes, ParsedKOS]:
    """`build_kos`, with what `parse_kos` reads back from the bytes: a caller that registers
    them need not parse them again."""
    try:
        if sop_instance_uid is None or series_instance_uid is None:
            # A lone surrogate in a description cannot be hashed: refused like any bad value.
            derived_sop, derived_series = derive_kos_uids(study, uid_root=uid_root)
            sop_instance_uid = sop_instance_uid or derived_sop
            series_instance_uid = series_instance_uid or derived_series
        if _plainly_typed(study, now, sop_instance_uid, series_instance_uid):
            # the bytes pydicom would write, without its per-element cost (see `_Draft`)
            draft, draft_meta = cast(
                tuple[_Draft, _Draft],
                _kos_dataset(study, now, sop_instance_uid, series_instance_uid, _Draft),
            )
            data = _encode_part10(draft, draft_meta)
        else:
            ds, meta = cast(
                tuple[Dataset, FileMetaDataset],
                _kos_dataset(study, now, sop_instance_uid, series_instance_uid, Dataset),
            )
            ds.file_meta = meta
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            data = buffer.getvalue()
    except KOSError:
        raise
    except (ValueError, TypeError, OverflowError, AttributeError) as exc:
        raise KOSError(
            KOSErrorCode.INVALID_VALUE, f"the manifest cannot be encoded: {_describe(exc)}"
        ) from exc
    return data, parse_kos(data)


class _Draft:
    """A dataset as `build_kos` assembles it: (VR, value) by tag, sequences as lists of drafts.

    `_encode_part10` writes it as pydicom's dcmwrite writes the same Dataset (explicit VR
    little endian, defined lengths, values padded to even length), for descriptions whose
    values are all plain `str` (`_plainly_typed`); pydicom writes anything else itself.
    """

    __slots__ = ("elements",)

    def __init__(self) -> None:
        self.elements: dict[int, tuple[str, Any]] = {}


_Target: TypeAlias = "Dataset | _Draft"
# Code strings validate_value accepted: those repeated for each instance are checked once.
# (Only CS: no patient data is kept.)
_VALID_CODES: set[str] = set()
_MAX_VALID_CODES: Final = 1024


def _put(ds: _Target, keyword: str, value: Any) -> None:
    """Set an element after checking the value against its VR (pydicom would only warn)."""
    tag, vr = _keyword_info(keyword)
    for single in value if isinstance(value, list) else [value]:
        if vr == "UI":
            if not (isinstance(single, str) and _is_valid_uid(single)):
                raise KOSError(
                    KOSErrorCode.INVALID_UID,
                    f"{_name(keyword)} is not a valid UID: {_show(single)}",
                )
            continue  # validate_value checks a UID as _is_valid_uid does (same pattern, 64)
        if vr == "CS" and type(single) is str and single in _VALID_CODES:
            continue
        try:
            validate_value(vr, single, pydicom_config.RAISE)
        except ValueError as exc:
            reason = str(exc).split(" Please see", 1)[0]
            raise KOSError(
                KOSErrorCode.INVALID_VALUE,
                f"{_name(keyword)} cannot hold {_show(single)}: {reason}",
            ) from exc
        if vr == "CS" and type(single) is str and len(_VALID_CODES) < _MAX_VALID_CODES:
            _VALID_CODES.add(single)
    if isinstance(ds, _Draft):
        ds.elements[tag] = (vr, value)
    else:
        setattr(ds, keyword, value)


def _put_sequence(ds: _Target, keyword: str, items: list[_Target]) -> None:
    if isinstance(ds, _Draft):
        ds.elements[_keyword_info(keyword)[0]] = ("SQ", items)
    else:
        setattr(ds, keyword, Sequence(cast(list[Dataset], items)))


def _plainly_typed(
    study: StudyDescription, now: dt.datetime, sop_instance_uid: str, series_instance_uid: str
) -> bool:
    """Whether every value `_kos_dataset` will set is a str (or None where optional).

    Other values (bytes, say, which pydicom's validation lets through for text) go to pydicom.
    """

    def plain(*values: object) -> bool:
        return all(isinstance(value, str) for value in values)

    def optional(*values: object) -> bool:
        return all(value is None or isinstance(value, str) for value in values)

    if not isinstance(study, StudyDescription):
        return False
    patient = study.patient
    if not (
        isinstance(patient, PatientInfo)
        and isinstance(now, dt.datetime)
        and isinstance(patient.other_ids, tuple | list)
        and isinstance(study.series, tuple | list)
        and plain(
            sop_instance_uid,
            series_instance_uid,
            patient.patient_id,
            patient.family_name,
            patient.given_names,
            patient.birth_name,
            patient.sex,
            study.study_instance_uid,
            study.study_description,
            study.institution_name,
        )
        and optional(
            patient.issuer,
            patient.issuer_oid,
            study.accession_number,
            study.retrieve_ae_title,
            study.retrieve_location_uid,
            study.retrieve_url,
        )
    ):
        return False
    for other in patient.other_ids:
        if not (
            isinstance(other, OtherPatientId)
            and plain(other.value)
            and optional(other.issuer, other.issuer_oid, other.type_of_patient_id)
        ):
            return False
    for series in study.series:
        if not (
            isinstance(series, SeriesDescription)
            and plain(series.series_instance_uid, series.modality)
            and optional(series.body_part)
            and isinstance(series.instances, tuple | list)
        ):
            return False
        for instance in series.instances:
            if not (
                type(instance) is ReferencedInstance
                and type(instance.sop_class_uid) is str
                and type(instance.sop_instance_uid) is str
            ):
                return False
    return True


_PADDED_WITH_NULL: Final = frozenset({"UI", "OB"})
_ENCODED_AS_LATIN1: Final = frozenset({"AE", "AS", "CS", "DA", "DT", "IS", "TM", "UI", "UR"})
_ENCODED_WITH_CHARSET: Final = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_SHORT_HEADER: Final = struct.Struct("<HH2sH").pack
_LONG_HEADER: Final = struct.Struct("<HH2s2xL").pack
_ITEM_START: Final = struct.Struct("<HHL").pack


def _encode_part10(ds: _Draft, meta: _Draft) -> bytes:
    """The Part 10 file pydicom's dcmwrite(enforce_file_format=True) writes for these drafts."""
    meta.elements.setdefault(0x00020001, ("OB", b"\x00\x01"))  # File Meta Information Version
    meta.elements.pop(0x00020000, None)
    meta_bytes = _encode_draft(meta, [default_encoding])
    group_length = _encode_element(0x00020000, "UL", len(meta_bytes).to_bytes(4, "little"))
    charset = ds.elements.get(0x00080005)
    encodings = convert_encodings(charset[1] if charset is not None else default_encoding)
    return b"".join((bytes(128), b"DICM", group_length, meta_bytes, _encode_draft(ds, encodings)))


def _encode_draft(draft: _Draft, encodings: list[str]) -> bytes:
    parts = []
    for tag, (vr, value) in sorted(draft.elements.items()):
        if vr == "SQ":
            items = []
            for item in value:
                body = _encode_draft(item, encodings)
                items.append(_ITEM_START(0xFFFE, 0xE000, len(body)))
                items.append(body)
            parts.append(_encode_element(tag, vr, b"".join(items)))
        else:
            parts.append(_encode_element(tag, vr, _encode_value(vr, value, encodings)))
    return b"".join(parts)


def _encode_element(tag: int, vr: str, value: bytes) -> bytes:
    if vr in _LONG_LENGTH_VRS:
        return _LONG_HEADER(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value
    return _SHORT_HEADER(tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _encode_value(vr: str, value: Any, encodings: list[str]) -> bytes:
    """A value as pydicom's writers encode it (write_string, write_UI, write_text, write_PN...)."""
    if vr in _ENCODED_AS_LATIN1:
        text = "\\".join(value) if isinstance(value, list) else value
        if len(text) % 2:
            text += "\0" if vr == "UI" else " "
        return bytes(text.encode(default_encoding))
    if vr in _ENCODED_WITH_CHARSET:
        encoded = value.encode("ascii") if value.isascii() else encode_string(value, encodings)
    elif vr == "PN":
        encoded = PersonName(value).encode(encodings) if value else b""
    elif vr == "OB" and isinstance(value, bytes):
        encoded = value
    else:
        raise TypeError(f"no encoder for VR {vr}")
    if len(encoded) % 2:
        encoded += b"\0" if vr in _PADDED_WITH_NULL else b" "
    return bytes(encoded)


def _da(value: dt.date | None) -> str:
    return f"{value.year:04d}{value.month:02d}{value.day:02d}" if value is not None else ""


def _tm(value: dt.time | None) -> str:
    if value is None:
        return ""
    text = f"{value.hour:02d}{value.minute:02d}{value.second:02d}"
    return f"{text}.{value.microsecond:06d}" if value.microsecond else text


def _person_name_value(family: str, given: str) -> str:
    for part in (family, given):
        if any(char in part for char in "^=\\"):
            raise KOSError(
                KOSErrorCode.INVALID_VALUE,
                f"a person name component cannot contain '^', '=' or '\\': {_show(part)}",
            )
    return f"{family}^{given}" if given else family


def _issuer_qualifiers(oid: str, new: type[_Target]) -> list[_Target]:
    item = new()
    _put(item, "UniversalEntityID", oid)
    _put(item, "UniversalEntityIDType", "ISO")
    return [item]


def _kos_dataset(
    study: StudyDescription,
    now: dt.datetime,
    sop_instance_uid: str,
    series_instance_uid: str,
    new: type[_Target],
) -> tuple[_Target, _Target]:
    """(dataset, file meta information) of the manifest, as pydicom Datasets or `_Draft`s."""
    patient = study.patient
    ds = new()
    # SOP Common
    _put(ds, "SpecificCharacterSet", "ISO_IR 192")
    _put(ds, "InstanceCreationDate", _da(now.date()))
    _put(ds, "InstanceCreationTime", _tm(now.time()))
    _put(ds, "SOPClassUID", KOS_SOP_CLASS_UID)
    _put(ds, "SOPInstanceUID", sop_instance_uid)
    offset = now.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        _put(ds, "TimezoneOffsetFromUTC", f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}")
    # Patient
    _put(ds, "PatientName", _person_name_value(patient.family_name, patient.given_names))
    _put(ds, "PatientID", patient.patient_id)
    if patient.issuer:
        _put(ds, "IssuerOfPatientID", patient.issuer)
    if patient.issuer_oid:
        _put_sequence(
            ds, "IssuerOfPatientIDQualifiersSequence", _issuer_qualifiers(patient.issuer_oid, new)
        )
    _put(ds, "PatientBirthDate", _da(patient.birth_date))
    if patient.sex not in {"M", "F", "O", ""}:
        raise KOSError(
            KOSErrorCode.INVALID_VALUE,
            f"{_name('PatientSex')} must be M, F, O or empty, not {_show(patient.sex)}",
        )
    _put(ds, "PatientSex", patient.sex)
    if patient.birth_name:
        _put(ds, "PatientBirthName", _person_name_value(patient.birth_name, ""))
    if patient.other_ids:
        items: list[_Target] = []
        for other in patient.other_ids:
            item = new()
            _put(item, "PatientID", other.value)
            if other.issuer:
                _put(item, "IssuerOfPatientID", other.issuer)
            if other.issuer_oid:
                qualifiers = _issuer_qualifiers(other.issuer_oid, new)
                _put_sequence(item, "IssuerOfPatientIDQualifiersSequence", qualifiers)
            if other.type_of_patient_id:
                _put(item, "TypeOfPatientID", other.type_of_patient_id)
            items.append(item)
        _put_sequence(ds, "OtherPatientIDsSequence", items)
    # General Study (the manifest belongs to the study it describes, as XDS-I manifests do)
    _put(ds, "StudyInstanceUID", study.study_instance_uid)
    _put(ds, "StudyDate", _da(study.study_date))
    _put(ds, "StudyTime", _tm(study.study_time))
    _put(ds, "ReferringPhysicianName", "")
    _put(ds, "StudyID", "")
    _put(ds, "AccessionNumber", study.accession_number or "")
    if study.study_description:
        _put(ds, "StudyDescription", study.study_description)
    modalities = sorted(
        {series.modality for series in study.series}
        | {
            modality
            for series in study.series
            for instance in series.instances
            if (modality := modality_for_sop_class(instance.sop_class_uid)) is not None
        }
        - {"KO", ""}
    )
    if modalities:
        _put(ds, "ModalitiesInStudy", modalities)
    # Key Object Document Series, General Equipment
    _put(ds, "Modality", "KO")
    _put(ds, "SeriesInstanceUID", series_instance_uid)
    _put(ds, "SeriesNumber", "999")
    _put_sequence(ds, "ReferencedPerformedProcedureStepSequence", [])
    _put(ds, "Manufacturer", "Relais")
    if study.institution_name:
        _put(ds, "InstitutionName", study.institution_name)
    # Key Object Document
    _put(ds, "InstanceNumber", "1")
    _put(ds, "ContentDate", _da(now.date()))
    _put(ds, "ContentTime", _tm(now.time()))
    if study.accession_number:
        _put_sequence(ds, "ReferencedRequestSequence", [_referenced_request(study, new)])
    _put_sequence(ds, "CurrentRequestedProcedureEvidenceSequence", [_evidence_item(study, new)])
    # SR Document Content, TID 2010 Key Object Selection
    _put(ds, "ValueType", "CONTAINER")
    title = new()
    _put(title, "CodeValue", MANIFEST_TITLE[0])
    _put(title, "CodingSchemeDesignator", MANIFEST_TITLE[1])
    _put(title, "CodeMeaning", MANIFEST_TITLE[2])
    _put_sequence(ds, "ConceptNameCodeSequence", [title])
    _put(ds, "ContinuityOfContent", "SEPARATE")
    template = new()
    _put(template, "MappingResource", "DCMR")
    _put(template, "TemplateIdentifier", "2010")
    _put_sequence(ds, "ContentTemplateSequence", [template])
    content: list[_Target] = []
    for series in study.series:
        for instance in series.instances:
            reference = new()
            _put(reference, "ReferencedSOPClassUID", instance.sop_class_uid)
            _put(reference, "ReferencedSOPInstanceUID", instance.sop_instance_uid)
            item = new()
            _put(item, "RelationshipType", "CONTAINS")
            _put(item, "ValueType", content_value_type(instance.sop_class_uid))
            _put_sequence(item, "ReferencedSOPSequence", [reference])
            content.append(item)
    _put_sequence(ds, "ContentSequence", content)

    meta = FileMetaDataset() if new is Dataset else new()
    _put(meta, "MediaStorageSOPClassUID", KOS_SOP_CLASS_UID)
    _put(meta, "MediaStorageSOPInstanceUID", sop_instance_uid)
    _put(meta, "TransferSyntaxUID", ExplicitVRLittleEndian)
    _put(meta, "ImplementationClassUID", RELAIS_IMPLEMENTATION_CLASS_UID)
    _put(meta, "ImplementationVersionName", RELAIS_IMPLEMENTATION_VERSION_NAME)
    return ds, meta


def _referenced_request(study: StudyDescription, new: type[_Target]) -> _Target:
    request = new()
    _put(request, "StudyInstanceUID", study.study_instance_uid)
    _put_sequence(request, "ReferencedStudySequence", [])
    _put(request, "AccessionNumber", study.accession_number or "")
    _put_sequence(request, "IssuerOfAccessionNumberSequence", [])
    _put(request, "PlacerOrderNumberImagingServiceRequest", "")
    _put(request, "FillerOrderNumberImagingServiceRequest", "")
    _put(request, "RequestedProcedureID", "")
    _put(request, "RequestedProcedureDescription", "")
    _put_sequence(request, "RequestedProcedureCodeSequence", [])
    return request


def _evidence_item(study: StudyDescription, new: type[_Target]) -> _Target:
    series_items: list[_Target] = []
    for series in study.series:
        item = new()
        _put(item, "SeriesInstanceUID", series.series_instance_uid)
        _put(item, "Modality", series.modality)
        if series.body_part:
            _put(item, "BodyPartExamined", series.body_part)
        if study.retrieve_ae_title:
            _put(item, "RetrieveAETitle", study.retrieve_ae_title)
        if study.retrieve_location_uid:
            _put(item, "RetrieveLocationUID", study.retrieve_location_uid)
        if study.retrieve_url:
            _put(item, "RetrieveURL", study.retrieve_url)
        references: list[_Target] = []
        for instance in series.instances:
            reference = new()
            _put(reference, "ReferencedSOPClassUID", instance.sop_class_uid)
            _put(reference, "ReferencedSOPInstanceUID", instance.sop_instance_uid)
            references.append(reference)
        _put_sequence(item, "ReferencedSOPSequence", references)
        series_items.append(item)
    study_item = new()
    _put(study_item, "StudyInstanceUID", study.study_instance_uid)
    _put_sequence(study_item, "ReferencedSeriesSequence", series_items)
    return study_item
