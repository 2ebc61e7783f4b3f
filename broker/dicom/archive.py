"""Clients of a hospital archive (PACS): DICOMweb (QIDO-RS, WADO-RS) and DIMSE (C-ECHO, C-FIND,
C-GET, C-MOVE).

`archive_client(endpoint)` gives an `ArchiveClient` for an `ArchiveEndpoint` (plain values, no
Django): `DicomWebArchive` when the endpoint has a DICOMweb URL, `DimseArchive` otherwise, or the
transport asked for. Both answer the same questions the same way: `echo`, `find_studies` (one
`StudySummary` per study, sorted by date then UID), `describe_study` (a `kos.StudyDescription`
ready for `kos.build_kos`) and `retrieve` (each instance as DICOM Part 10 bytes, streamed as it
arrives: a generator, to `close()` when stopping early); `DimseArchive.move` asks the archive to
send a study to a third AE (C-MOVE). The module imports no Django: it takes plain values.

Errors
------
Nothing from httpx, pynetdicom or the socket layer escapes: every failure is one of the
`ArchiveError` subclasses, whose message names the archive, the transport and what failed, with
`.transport` ("dicomweb" | "dimse") and `.retryable` (worth trying again later):

=========================  ===========================================================
`ArchiveUnreachable`       connection refused, unknown host, TLS handshake failure
`ArchiveRefused`           association rejected (with the reason) or aborted by the archive,
                           no presentation context accepted, HTTP 401/403
`ArchiveTimeout`           connect, read, ACSE or DIMSE timeout (`endpoint.timeout`)
`ArchiveNotFound`          HTTP 404, or no match where one was required (describe, retrieve,
                           move of a study the archive does not hold)
`ArchiveProtocolError`     any other HTTP status, a DICOM failure status (given in hex), an
                           answer cut short or malformed
=========================  ===========================================================

Invalid arguments (a UID that is not a UID, a wildcard in a patient ID, a reversed date range, a
transport the endpoint does not have) raise `ValueError`: they are the caller's bug, not the
archive's.

DICOMweb
--------
One `httpx.Client` per archive (the WADO-RS retrieval aside, see `retrieve`): keep-alive,
`trust_env=False` (no proxy or netrc from the environment), `endpoint.timeout` for connect,
read, write and pool, and `Accept-Encoding: identity` (an Orthanc with HttpCompressionEnabled
gzips single instances for clients that accept it, 20 times slower; DICOM pixel data does not
compress that way anyway). GET requests are retried `endpoint.retries` times, with exponential
backoff (0.2 s, 0.4 s, 0.8 s..., capped at 5 s), on connect errors, timeouts, a connection
closed before the answer, and 502/503/504 (a Retry-After of at most 30 s is honoured; a longer
one ends the retries at once). A retrieval already streaming is not restarted behind the
consumer's back: a cut in the middle raises a retryable `ArchiveProtocolError`.

- `find_studies`: QIDO-RS `/studies` paged with `limit`/`offset` (`page_size` studies a page),
  the fields asked for with `includefield`. A study stored between two pages may be missed or
  listed twice (listed twice is merged). Query values are sent verbatim: Orthanc's plugin does not
  percent-decode them (`PatientID=CHU%30012345` matches nothing). A patient ID with characters
  that cannot go verbatim into a URL (space, `&`, `+`, non-ASCII...) is therefore not sent: the
  studies are filtered on the answers instead (slower, never wrong).
- `describe_study`: two round trips, whatever the study's size: one instance-level QIDO-RS
  `/studies/{uid}/instances` (series and instance attributes, paged like the above) and the
  WADO-RS metadata of ONE instance, the only place where Orthanc reveals Other Patient IDs
  Sequence (the INS), Patient's Birth Name and the issuer's OID.
- `retrieve`: WADO-RS with `Accept: multipart/related; type="application/dicom";
  transfer-syntax=*`. The `transfer-syntax=*` matters: without it Orthanc (DICOMweb plugin 1.7)
  transcodes every instance to Explicit VR Little Endian, slowly, and the bytes are no longer the
  archive's. This one request goes through `http.client`, not httpx: the body is read from the
  socket part by part (`broker.dicom.multipart`: boundary quoted or not, CRLF, preamble and
  epilogue, each part's Content-Length used when given and checked against the next delimiter),
  a part of known length in one read that fills its bytes object straight from the socket. That
  costs about 0.3 CPU s/GB against 1.2 through httpx and its per-64-KiB parsing
  (docs/performance.md). Memory is bounded by about one instance, never by the study. Orthanc
  ends such an answer by closing the connection (no Content-Length, no chunking): an answer that
  ends before the closing delimiter is reported as cut short. Retries and errors are the same
  as for the other requests.

DIMSE
-----
C-FIND and C-GET run on associations of the broker's own (`store_session.StoreSession`: the
caller's thread writes and reads the PDUs, pynetdicom builds and reads the association PDUs
and negotiates); a harvest's describing over DIMSE costs the broker less CPU than a plain
pynetdicom client's queries (docs/performance.md, "Harvest"). C-ECHO and C-MOVE use
pynetdicom, one association per operation and never one per image, each with
`network.NODELAY_HANDLERS` (pynetdicom leaves Nagle's algorithm on), DICOM TLS when
`endpoint.tls` is set, and `endpoint.timeout` as connection, ACSE, DIMSE and network timeout.
The broker proposes no maximum PDU length (0): the archive sends PDUs as large as its own limit
allows (C-GET from Orthanc with MaximumPduLength 65536: 80 MB/s when pynetdicom's default of
16 kB is proposed, 113 MB/s without limit). Queries carry Specific Character Set "ISO_IR 192" so
that non-ASCII values match. pynetdicom 3.0.4 leaves the socket of a failed connection open (a
ResourceWarning per unreachable archive): `network.RelaisAE` gives it a socket that closes, and
associations whose reactor cannot take a response meant for a request (pynetdicom's race).

- `find_studies`: one STUDY-level C-FIND (Study Root).
- `describe_study`: one association, two C-FINDs: STUDY level for the patient and study
  attributes, IMAGE level for the series and instances (plus a SERIES-level one only when the
  archive leaves the series attributes out of the IMAGE-level answers; Orthanc does not). Orthanc
  1.10 returns Other Patient IDs Sequence (the INS), Issuer of Patient ID Qualifiers Sequence and
  Patient's Birth Name as C-FIND return keys, reading them from one stored instance: they are
  asked for at STUDY level, where that costs one file read, and not at IMAGE level, where it would
  cost one per instance. Other archives may return nothing for them: over DIMSE the INS is known
  only when the archive returns it (no pixel data is fetched to learn it). Filtering on it is
  another matter: Orthanc ignores it as a matching key, in C-FIND and QIDO-RS alike.
- `retrieve`: C-GET, on two associations (the only operation with two). A first one runs an
  IMAGE-level C-FIND to learn the SOP classes to retrieve (and the series of a lone instance):
  presentation contexts are negotiated before anything is asked. The C-GET association proposes,
  for each
  class, the SCP role and one presentation context per transfer syntax (the usual uncompressed and
  lossless/lossy compressed ones, as many as pynetdicom's 128 contexts allow), so that the archive
  can send each instance as stored instead of transcoding it. The C-GET association runs on the
  caller's thread (`StoreSession.c_get`: no pynetdicom thread, and PDUs of up to 1 MiB): each
  instance is answered, made a Part 10 file without being decoded, and yielded as it arrives.
  While the caller holds an instance, the archive's next one waits in the socket buffers: a
  slow consumer slows the archive down instead of filling memory, and every wait has the
  archive's timeout. Closing the generator early aborts the association. Fewer instances than
  the C-FIND counted, or failed sub-operations, raise `ArchiveProtocolError` after the last one
  received.
- `move`: C-FIND then C-MOVE on one association, to a third AE title known to the archive;
  answers the sub-operation counts (`MoveResult`, warnings and failed sub-operations included).
  The C-FIND is there because Orthanc answers a move of a study it does not hold with 0xC000,
  as it does any other failure: without it "not found" could not be told apart.

What Orthanc 1.10.1 does when something is wrong (checked against the real server)
----------------------------------------------------------------------------------
- Not running (connection refused): `ArchiveUnreachable` in milliseconds, both transports. A
  port that accepts the connection and never answers: `ArchiveTimeout` after `endpoint.timeout`.
- A wrong called AE title: accepted, unless DicomCheckCalledAet is on (off by default); then the
  association is rejected (permanent, by the service user, "Called AE title not recognised"):
  `ArchiveRefused` with that reason.
- A calling AE title it does not know: with DicomAlwaysAllowEcho (on by default) the association
  is accepted, C-ECHO answered, and the association aborted at the first C-FIND (PEERS.md trap
  3): `ArchiveRefused`, "aborted the association during C-FIND". With DicomAlwaysAllowEcho off,
  rejected, "Calling AE title not recognised": `ArchiveRefused` with that reason.
- A study it does not hold: HTTP 404 from WADO-RS, an empty QIDO-RS answer, no C-FIND match:
  `ArchiveNotFound` from `describe_study`, `retrieve` and `move`.
- A C-MOVE destination it does not know: failure status 0xC000, not 0xA801 (move destination
  unknown): `ArchiveProtocolError`, "failed with status 0xC000".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.message
import email.utils
import http.client
import io
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, NoReturn, Protocol, Self, TypeAlias, TypeVar

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import PersonName
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import code_to_category

from broker.dicom.kos import (
    OtherPatientId,
    PatientInfo,
    ReferencedInstance,
    SeriesDescription,
    StudyDescription,
)
from broker.dicom.multipart import (
    MalformedMultipart,
    MultipartCutShort,
    MultipartParts,
    PendingPart,
)
from broker.dicom.network import NODELAY_HANDLERS, RelaisAE
from broker.dicom.part10 import META_GROUP_MAX_BYTES, file_meta
from broker.dicom.store_session import (
    StoreSession,
    StoreSessionAborted,
    StoreSessionClosed,
    StoreSessionError,
    StoreSessionProtocolError,
    StoreSessionRejected,
    StoreSessionTimeout,
    StoreSessionUnreachable,
)

Transport: TypeAlias = Literal["dicomweb", "dimse"]
DICOMWEB: Final = "dicomweb"
DIMSE: Final = "dimse"

_BACKOFF_BASE_SECONDS: Final = 0.2
_BACKOFF_MAX_SECONDS: Final = 5.0
_MAX_RETRY_AFTER_SECONDS: Final = 30.0
_DEFAULT_PAGE_SIZE: Final = 500
_MAX_ERROR_BODY_BYTES: Final = 300
# The largest PDU the broker takes from an archive sending a C-GET's instances: fewer, larger
# PDUs for the same bytes (the archive sends no larger ones than it is offered).
_C_GET_MAXIMUM_PDU: Final = 1024 * 1024
# What the broker takes in one PDU on its other associations run on its own thread (C-FIND).
_SESSION_MAXIMUM_PDU: Final = 65536
_MAX_CONTEXTS: Final = 128
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
_ECHO_STUDY_UID: Final = "2.25.0"  # a UID no study has: the echo carries no patient data
_UID_PATTERN: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")
# The sub-resources of an instance the gateway relays (PS3.18 WADO-RS).
_RESOURCE_PATTERN: Final = re.compile(r"frames/[0-9]{1,6}(?:,[0-9]{1,6}){0,99}|rendered|thumbnail")
_WILDCARDS: Final = frozenset("*?\\")
# Characters a query value may carry unescaped (RFC 3986 unreserved, plus the few DICOM needs).
_QUERY_SAFE: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~*^,:@/"
)
_REQUEST_HEADERS: Final = {"Accept-Encoding": "identity", "User-Agent": "Relais-broker"}
_DICOM_MULTIPART: Final = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# Transfer syntaxes proposed for C-GET, most common first: each gets its own presentation
# context so that the archive can send an instance as stored.
RETRIEVE_SYNTAXES: Final[tuple[UID, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGExtended12Bit,
    JPEGLossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

# DICOM JSON tags (PS3.18 F.2) read from QIDO-RS answers.
_TAG_SOP_CLASS: Final = "00080016"
_TAG_SOP_INSTANCE: Final = "00080018"
_TAG_STUDY_DATE: Final = "00080020"
_TAG_STUDY_TIME: Final = "00080030"
_TAG_ACCESSION: Final = "00080050"
_TAG_MODALITY: Final = "00080060"
_TAG_MODALITIES: Final = "00080061"
_TAG_STUDY_DESCRIPTION: Final = "00081030"
_TAG_PATIENT_ID: Final = "00100020"
_TAG_ISSUER: Final = "00100021"
_TAG_BODY_PART: Final = "00180015"
_TAG_STUDY_UID: Final = "0020000D"
_TAG_SERIES_UID: Final = "0020000E"
_TAG_SERIES_NUMBER: Final = "00200011"
_TAG_INSTANCE_NUMBER: Final = "00200013"
_TAG_NUMBER_OF_SERIES: Final = "00201206"
_TAG_NUMBER_OF_INSTANCES: Final = "00201208"

_STUDY_FIELDS: Final = (
    _TAG_STUDY_DATE,
    _TAG_STUDY_TIME,
    _TAG_ACCESSION,
    _TAG_MODALITIES,
    _TAG_STUDY_DESCRIPTION,
    _TAG_PATIENT_ID,
    _TAG_ISSUER,
    _TAG_NUMBER_OF_SERIES,
    _TAG_NUMBER_OF_INSTANCES,
)
_INSTANCE_FIELDS: Final = (
    _TAG_SOP_CLASS,
    _TAG_PATIENT_ID,
    _TAG_SERIES_UID,
    _TAG_MODALITY,
    _TAG_SERIES_NUMBER,
    _TAG_INSTANCE_NUMBER,
    _TAG_BODY_PART,
)
# What the WADO-RS metadata of one instance contributes: patient and study attributes only
# (the rest, pixel data's BulkDataURI included, is dropped before pydicom reads it).
_METADATA_TAGS: Final = frozenset(
    {
        "00080005",  # Specific Character Set
        _TAG_STUDY_DATE,
        _TAG_STUDY_TIME,
        _TAG_ACCESSION,
        _TAG_STUDY_DESCRIPTION,
        "00100010",  # Patient's Name
        _TAG_PATIENT_ID,
        _TAG_ISSUER,
        "00100024",  # Issuer of Patient ID Qualifiers Sequence
        "00100030",  # Patient's Birth Date
        "00100040",  # Patient's Sex
        "00101002",  # Other Patient IDs Sequence
        "00101005",  # Patient's Birth Name
        _TAG_STUDY_UID,
    }
)

# Return keys of the DIMSE queries (sent empty: "return this attribute").
_STUDY_KEYS: Final = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "PatientID",
    "IssuerOfPatientID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_PATIENT_KEYS: Final = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientBirthName",
)
_IMAGE_KEYS: Final = (
    "PatientID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "BodyPartExamined",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ArchiveEndpoint:
    """Where and how to reach one institution's archive."""

    name: str  # institution name, for messages
    ae_title: str = ""  # archive's AE title ("" = no DIMSE)
    host: str = ""
    port: int | None = None
    dicomweb_url: str = ""  # base URL of QIDO/WADO-RS ("" = no DICOMweb)
    calling_ae_title: str = "RELAIS"  # the broker's own AE title
    tls: ssl.SSLContext | None = None  # DICOM TLS for DIMSE
    https_ca: str = ""  # PEM file of CAs trusted for HTTPS besides the system's ("" = none)
    timeout: float = 30.0  # seconds; connect/read/DIMSE/ACSE timeouts
    retries: int = 3  # DICOMweb GETs: retries with exponential backoff on transient failures

    @property
    def has_dicomweb(self) -> bool:
        return bool(self.dicomweb_url)

    @property
    def has_dimse(self) -> bool:
        return bool(self.ae_title and self.host and self.port)

    @property
    def wado_base_url(self) -> str:
        return self.dicomweb_url.rstrip("/")


class ArchiveError(Exception):
    """An archive could not answer; `message` says which, over what, and what failed."""

    default_retryable: bool = False

    def __init__(self, message: str, *, transport: str, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.transport = transport
        self.retryable = self.default_retryable if retryable is None else retryable


class ArchiveUnreachable(ArchiveError):
    """Connection refused, unknown host, TLS handshake failure."""

    default_retryable = True


class ArchiveRefused(ArchiveError):
    """Association rejected or aborted by the archive, HTTP 401/403."""


class ArchiveTimeout(ArchiveError):
    """No answer within the endpoint's timeout."""

    default_retryable = True


class ArchiveNotFound(ArchiveError):
    """HTTP 404, or no match where one was required."""


class ArchiveProtocolError(ArchiveError):
    """Another HTTP error status, a DICOM failure status, an answer cut short or malformed."""


@dataclass(frozen=True)
class StudySummary:
    """One study-level match."""

    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str | None
    study_date: dt.date | None
    study_time: dt.time | None
    accession_number: str | None
    study_description: str
    modalities: tuple[str, ...]
    number_of_series: int | None
    number_of_instances: int | None


@dataclass(frozen=True)
class MoveResult:
    """Sub-operation counts of a C-MOVE."""

    completed: int
    failed: int
    warning: int


class ArchiveClient(Protocol):
    transport: str

    def echo(self) -> None: ...

    def find_studies(
        self,
        *,
        since: dt.date | None = None,
        until: dt.date | None = None,
        patient_id: str | None = None,
    ) -> list[StudySummary]: ...

    def describe_study(
        self, study_instance_uid: str, *, expected_instances: int | None = None
    ) -> StudyDescription: ...

    def retrieve(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> Generator[bytes, None, None]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def archive_client(endpoint: ArchiveEndpoint, transport: Transport | None = None) -> ArchiveClient:
    """The client of `endpoint`: DICOMweb when it has a URL (or when asked), else DIMSE."""
    if transport is None:
        if endpoint.has_dicomweb:
            return DicomWebArchive(endpoint)
        if endpoint.has_dimse:
            return DimseArchive(endpoint)
        raise ValueError(
            f"archive of {endpoint.name!r} has neither a DICOMweb URL nor a DIMSE AE title, "
            "host and port"
        )
    if transport == DICOMWEB:
        return DicomWebArchive(endpoint)
    if transport == DIMSE:
        return DimseArchive(endpoint)
    raise ValueError(f"unknown archive transport {transport!r}: 'dicomweb' or 'dimse'")


# --------------------------------------------------------------------------- shared helpers


def _retrieve_uids(
    study: str, series: str | None, sop: str | None
) -> tuple[str, str | None, str | None]:
    """The UIDs of a retrieval, each checked (ValueError for a malformed one)."""
    return (
        _check_uid(study, "Study Instance UID"),
        _check_uid(series, "Series Instance UID") if series is not None else None,
        _check_uid(sop, "SOP Instance UID") if sop is not None else None,
    )


def _check_uid(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID_PATTERN.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a DICOM UID")
    return value


def _date_range(since: dt.date | None, until: dt.date | None) -> str | None:
    if since is None and until is None:
        return None
    if since is not None and until is not None and since > until:
        raise ValueError(f"the date range is reversed: since {since} is after until {until}")
    return f"{_da(since)}-{_da(until)}"


def _da(value: dt.date | None) -> str:
    return f"{value.year:04d}{value.month:02d}{value.day:02d}" if value is not None else ""


def _check_patient_id(patient_id: str | None) -> str | None:
    if patient_id is None:
        return None
    if not patient_id or _WILDCARDS & set(patient_id):
        raise ValueError(
            f"patient ID {patient_id!r} must be non-empty and without wildcards (* ? \\): "
            "pass None to match every patient"
        )
    return patient_id


_DATE_TEXT = re.compile(r"(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})")
_TIME_TEXT = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:[.,](\d{1,6})\d*)?)?)?")


def _parse_date(value: object) -> dt.date | None:
    match = _DATE_TEXT.fullmatch(str(value or "").strip())
    if not match:
        return None
    try:
        return dt.date(*(int(group) for group in match.groups()))
    except ValueError:
        return None


def _parse_time(value: object) -> dt.time | None:
    match = _TIME_TEXT.fullmatch(str(value or "").strip())
    if not match:
        return None
    hours, minutes, seconds, fraction = match.groups()
    try:
        return dt.time(
            int(hours),
            int(minutes or 0),
            int(seconds or 0),
            int((fraction or "0").ljust(6, "0")),
        )
    except ValueError:
        return None


def _parse_int(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            return int(float(str(value)))
        except ValueError:
            return None


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return _text(value[0]) if value else ""
    return str(value).strip()


def _modalities(values: Iterable[object]) -> tuple[str, ...]:
    return tuple(sorted({text for value in values if (text := str(value).strip())}))


def _sort_studies(studies: Iterable[StudySummary]) -> list[StudySummary]:
    unique = {(study.study_instance_uid, study.patient_id): study for study in studies}
    return sorted(
        unique.values(),
        key=lambda s: (
            s.study_date is not None,
            s.study_date or dt.date.min,
            s.study_instance_uid,
            s.patient_id,
        ),
    )


@dataclass
class _InstanceRow:
    """One instance of a study as a query answered it."""

    patient_id: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    body_part: str | None
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None


def _series_from_rows(rows: Iterable[_InstanceRow]) -> tuple[SeriesDescription, ...]:
    """Series by Series Number then UID, instances by Instance Number then UID (numbers missing
    last); an instance listed twice counts once."""
    by_series: dict[str, list[_InstanceRow]] = {}
    for row in rows:
        by_series.setdefault(row.series_instance_uid, []).append(row)

    def number_key(number: int | None, uid: str) -> tuple[bool, int, str]:
        return (number is None, number or 0, uid)

    ordered = sorted(
        by_series.items(),
        key=lambda item: number_key(
            next((r.series_number for r in item[1] if r.series_number is not None), None),
            item[0],
        ),
    )
    result = []
    for series_uid, members in ordered:
        unique = {row.sop_instance_uid: row for row in members}
        instances = sorted(
            unique.values(), key=lambda r: number_key(r.instance_number, r.sop_instance_uid)
        )
        result.append(
            SeriesDescription(
                series_instance_uid=series_uid,
                modality=next((r.modality for r in members if r.modality), ""),
                body_part=next((r.body_part for r in members if r.body_part), None),
                instances=tuple(
                    ReferencedInstance(
                        sop_class_uid=r.sop_class_uid, sop_instance_uid=r.sop_instance_uid
                    )
                    for r in instances
                ),
            )
        )
    return tuple(result)


def _patient_from_dataset(ds: Dataset) -> PatientInfo | None:
    """The patient attributes of a dataset (None without a Patient ID); the middle name joins
    the given names, as `kos` reads them."""
    patient_id = _text(ds.get("PatientID"))
    if not patient_id:
        return None
    family, given = _person_name(ds.get("PatientName"))
    other_ids = []
    for item in ds.get("OtherPatientIDsSequence") or ():
        value = _text(item.get("PatientID"))
        if value:
            other_ids.append(
                OtherPatientId(
                    value=value,
                    issuer=_text(item.get("IssuerOfPatientID")) or None,
                    issuer_oid=_issuer_oid(item),
                    type_of_patient_id=_text(item.get("TypeOfPatientID")) or None,
                )
            )
    sex = _text(ds.get("PatientSex")).upper()
    return PatientInfo(
        patient_id=patient_id,
        issuer=_text(ds.get("IssuerOfPatientID")) or None,
        issuer_oid=_issuer_oid(ds),
        family_name=family,
        given_names=given,
        birth_name=_person_name(ds.get("PatientBirthName"))[0],
        birth_date=_parse_date(ds.get("PatientBirthDate")),
        sex=sex if sex in {"M", "F", "O"} else "",
        other_ids=tuple(other_ids),
    )


def _person_name(value: object) -> tuple[str, str]:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if value else None
    if value is None or value == "":
        return "", ""
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    given = " ".join(part for part in (name.given_name.strip(), name.middle_name.strip()) if part)
    return name.family_name.strip(), given


def _issuer_oid(ds: Dataset) -> str | None:
    items = ds.get("IssuerOfPatientIDQualifiersSequence") or ()
    if not items:
        return None
    value = _text(items[0].get("UniversalEntityID"))
    if value.lower().startswith("urn:oid:"):
        value = value[len("urn:oid:") :].strip()
    return value or None


def _study_attributes(ds: Dataset) -> tuple[str | None, dt.date | None, dt.time | None, str]:
    """(accession number, study date, study time, study description)."""
    return (
        _text(ds.get("AccessionNumber")) or None,
        _parse_date(ds.get("StudyDate")),
        _parse_time(ds.get("StudyTime")),
        _text(ds.get("StudyDescription")),
    )


# --------------------------------------------------------------------------- DICOMweb


# The first bytes of each instance read by `DicomWebArchive.retrieve_pending`: enough for the
# meta group of nearly every file; a longer meta group is read on to its end.
PENDING_HEAD_BYTES: Final = 4096


_Part = TypeVar("_Part", bytes, PendingPart)


def _whole_meta_group(part: PendingPart) -> None:
    """Read on into the body when the head ends inside the Part 10 meta group."""
    if file_meta(part.head) is None and part.unread:
        part.extend_head(132 + META_GROUP_MAX_BYTES)


class PendingRetrieval:
    """A WADO-RS answer being read (`DicomWebArchive.retrieve_pending`): iterate for the
    instances, each a `PendingPart`, and take each one's rest before the next; close when done.

    `fileno` is the socket the rest of each part can be moved from without Python (None when
    the answer is encrypted or framed), `timeout` how long a read from it may wait."""

    def __init__(
        self,
        archive: DicomWebArchive,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        reader: MultipartParts,
        what: str,
        *,
        fileno: int | None,
        timeout: float | None,
    ) -> None:
        self._archive = archive
        self._connection = connection
        self._response = response
        self._reader = reader
        self.what = what
        self.fileno = fileno
        self.timeout = timeout

    def __iter__(self) -> Iterator[PendingPart]:
        parts = self._reader.pending(PENDING_HEAD_BYTES)
        return self._archive._mapped_parts(parts, self._reader, self.what, _whole_meta_group)

    def close(self) -> None:
        self._response.close()
        self._connection.close()


class DicomWebArchive:
    """QIDO-RS and WADO-RS client of one archive (see the module docstring)."""

    transport: str = DICOMWEB

    def __init__(self, endpoint: ArchiveEndpoint, *, page_size: int = _DEFAULT_PAGE_SIZE) -> None:
        if not endpoint.has_dicomweb:
            raise ValueError(f"archive of {endpoint.name!r} has no DICOMweb URL")
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.endpoint = endpoint
        self.page_size = page_size
        # The fewest matches the archive was seen to answer for a page that was not the
        # last: it caps `limit` there (None until seen).
        self._page_cap: int | None = None
        self._base = endpoint.wado_base_url
        self._client = httpx.Client(
            timeout=httpx.Timeout(endpoint.timeout),
            verify=_https_context(endpoint.https_ca),
            trust_env=False,
            follow_redirects=False,
            headers=_REQUEST_HEADERS,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # ---------------------------------------------------------------- operations

    def echo(self) -> None:
        """A QIDO-RS query that matches nothing: proves the service answers."""
        self._get_json("/studies", [("StudyInstanceUID", _ECHO_STUDY_UID)], "QIDO-RS echo")

    def find_studies(
        self,
        *,
        since: dt.date | None = None,
        until: dt.date | None = None,
        patient_id: str | None = None,
    ) -> list[StudySummary]:
        params: list[tuple[str, str]] = []
        date_range = _date_range(since, until)
        if date_range is not None:
            params.append(("StudyDate", date_range))
        patient = _check_patient_id(patient_id)
        if patient is not None and _query_safe(patient):
            params.append(("PatientID", patient))
        params += [("includefield", tag) for tag in _STUDY_FIELDS]
        studies = [
            self._study_summary(item)
            for item in self._get_pages("/studies", params, "QIDO-RS study query")
        ]
        if patient is not None:  # see _query_string: some IDs are filtered here, not there
            studies = [study for study in studies if study.patient_id == patient]
        return _sort_studies(studies)

    def describe_study(
        self, study_instance_uid: str, *, expected_instances: int | None = None
    ) -> StudyDescription:
        """``expected_instances``: the study's instance count from its listing, when known; a
        short first page of exactly that many is then taken as the whole study, without
        asking for the next, empty, page (one request of three)."""
        study_uid = _check_uid(study_instance_uid, "Study Instance UID")
        path = f"/studies/{study_uid}/instances"
        params = [("includefield", tag) for tag in _INSTANCE_FIELDS]
        rows = [
            self._instance_row(item)
            for item in self._get_pages(
                path, params, "QIDO-RS instance query", expected=expected_instances
            )
        ]
        if not rows:
            self._fail(ArchiveNotFound, f"study {study_uid} not found (no instance)")
        patient_ids = sorted({row.patient_id for row in rows})
        if len(patient_ids) > 1:
            self._fail(
                ArchiveProtocolError,
                f"study {study_uid} is filed under several patients ({', '.join(patient_ids)})",
            )
        series = _series_from_rows(rows)
        first_series = series[0]
        first = first_series.instances[0]
        metadata = self._get_json(
            f"/studies/{study_uid}/series/{first_series.series_instance_uid}"
            f"/instances/{first.sop_instance_uid}/metadata",
            [],
            "WADO-RS metadata",
        )
        ds = self._metadata_dataset(metadata, study_uid)
        patient = _patient_from_dataset(ds)
        if patient is None:
            self._fail(ArchiveProtocolError, f"the metadata of study {study_uid} has no PatientID")
        accession, study_date, study_time, description = _study_attributes(ds)
        return StudyDescription(
            patient=patient,
            study_instance_uid=study_uid,
            accession_number=accession,
            study_date=study_date,
            study_time=study_time,
            study_description=description,
            series=series,
            retrieve_ae_title=self.endpoint.ae_title if self.endpoint.has_dimse else None,
            retrieve_url=f"{self._base}/studies/{study_uid}",
            institution_name=self.endpoint.name,
        )

    def retrieve(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> Generator[bytes, None, None]:
        """WADO-RS: each instance as Part 10 bytes, as stored, streamed as it arrives."""
        return self._retrieve(
            *_retrieve_uids(study_instance_uid, series_instance_uid, sop_instance_uid)
        )

    def _retrieve(
        self, study_uid: str, series_uid: str | None, sop_uid: str | None
    ) -> Generator[bytes, None, None]:
        connection, response, boundary, what = self._open_retrieval(study_uid, series_uid, sop_uid)
        try:
            reader = MultipartParts(response, boundary)
            yield from self._mapped_parts(iter(reader), reader, what)
        finally:
            response.close()
            connection.close()

    def _open_retrieval(
        self, study_uid: str, series_uid: str | None, sop_uid: str | None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, bytes, str]:
        """The WADO-RS request answered: connection, response, multipart boundary, and what
        it is (for messages). Raises `ArchiveError`, with nothing left open."""
        if sop_uid is not None and series_uid is None:
            series_uid = self._series_of_instance(study_uid, sop_uid)
        path = f"/studies/{study_uid}"
        if series_uid is not None:
            path += f"/series/{series_uid}"
            if sop_uid is not None:
                path += f"/instances/{sop_uid}"
        what = f"WADO-RS retrieval of {path}"
        connection, response = self._open_stream(path, _DICOM_MULTIPART, what)
        try:
            boundary = self._boundary(response.getheader("Content-Type"), what)
        except ArchiveError:
            response.close()
            connection.close()
            raise
        return connection, response, boundary, what

    def _mapped_parts(
        self,
        parts: Iterator[_Part],
        reader: MultipartParts,
        what: str,
        each: Callable[[_Part], None] | None = None,
    ) -> Generator[_Part, None, None]:
        """The parts as `parts` gives them (`each` done on each), a failure reading them
        raised as the `ArchiveError` it is."""
        while True:
            try:
                part = next(parts)
                if each is not None:
                    each(part)
            except StopIteration:
                return
            except MultipartCutShort:
                self._fail(
                    ArchiveProtocolError,
                    f"{what}: the answer was cut short {reader.where}",
                    retryable=True,
                )
            except MalformedMultipart as exc:
                self._fail(ArchiveProtocolError, f"{what}: {exc}")
            except (OSError, http.client.HTTPException) as exc:
                raise self._socket_error(exc, what, stage="midstream") from exc
            yield part

    def retrieve_pending(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> PendingRetrieval:
        """WADO-RS, for a caller that moves the instances' bytes itself: each instance as a
        `PendingPart` whose head holds at least its Part 10 meta group (when it has one), the
        rest still on the socket (`PendingRetrieval.fileno`, when it can be read past
        Python). The answer is requested before this returns (errors raise here)."""
        connection, response, boundary, what = self._open_retrieval(
            *_retrieve_uids(study_instance_uid, series_instance_uid, sop_instance_uid)
        )
        # The body is the socket's bytes as they come only when nothing frames them (no
        # chunks, no length to count down: Orthanc answers so) and nothing encrypts them.
        raw = (
            not isinstance(connection, http.client.HTTPSConnection)
            and not response.chunked
            and response.length is None
        )
        return PendingRetrieval(
            self,
            connection,
            response,
            MultipartParts(response, boundary),
            what,
            fileno=response.fileno() if raw else None,
            timeout=self.endpoint.timeout,
        )

    def metadata(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[dict[str, Any]]:
        """WADO-RS metadata of a study, a series or an instance: one DICOM JSON object per
        instance (bulk data by reference)."""
        study_uid, series_uid, sop_uid = _retrieve_uids(
            study_instance_uid, series_instance_uid, sop_instance_uid
        )
        path = f"/studies/{study_uid}"
        if series_uid is not None:
            path += f"/series/{series_uid}"
        if sop_uid is not None:
            path += f"/instances/{sop_uid}"
        answer = self._get_json(f"{path}/metadata", [], "WADO-RS metadata")
        if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
            self._fail(ArchiveProtocolError, f"WADO-RS metadata of {path}: not a list of objects")
        return answer

    def instance_resource(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        resource: str,
        accept: str,
    ) -> tuple[str, Generator[bytes, None, None]]:
        """An instance's ``frames/<list>``, ``rendered`` or ``thumbnail``, as the archive
        answers it: its content type and its body, streamed."""
        study_uid, series_uid, sop_uid = _retrieve_uids(
            study_instance_uid, series_instance_uid, sop_instance_uid
        )
        if not _RESOURCE_PATTERN.fullmatch(resource):
            raise ValueError(f"not an instance resource: {resource!r}")
        path = f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/{resource}"
        what = f"WADO-RS {resource.split('/')[0]}"
        response = self._send(path, [], accept, what, stream=True)
        return response.headers.get("Content-Type", "application/octet-stream"), self._relay(
            response, f"{what} of {path}"
        )

    def _relay(self, response: httpx.Response, what: str) -> Generator[bytes, None, None]:
        try:
            yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what, midstream=True) from exc
        finally:
            response.close()

    # ---------------------------------------------------------------- HTTP

    def _series_of_instance(self, study_uid: str, sop_uid: str) -> str:
        answer = self._get_json(
            f"/studies/{study_uid}/instances",
            [("SOPInstanceUID", sop_uid), ("includefield", _TAG_SERIES_UID)],
            "QIDO-RS instance query",
        )
        if not isinstance(answer, list) or not answer:
            self._fail(ArchiveNotFound, f"instance {sop_uid} of study {study_uid} not found")
        series_uid = _json_text(answer[0], _TAG_SERIES_UID) if isinstance(answer[0], dict) else ""
        if not _UID_PATTERN.fullmatch(series_uid):
            self._fail(
                ArchiveProtocolError,
                f"QIDO-RS instance query: no valid SeriesInstanceUID for instance {sop_uid}",
            )
        return series_uid

    def _get_pages(
        self, path: str, params: list[tuple[str, str]], what: str, *, expected: int | None = None
    ) -> Iterator[dict[str, Any]]:
        offset = 0
        first_of_previous: dict[str, Any] | None = None
        previous_length: int | None = None
        while True:
            page = self._get_json(
                path,
                [*params, ("limit", str(self.page_size)), ("offset", str(offset))],
                what,
            )
            if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
                self._fail(ArchiveProtocolError, f"{what} of {path}: the answer is not a list")
            if not page:
                return
            if offset and page[0] == first_of_previous:
                # an archive that ignores `offset` would hand the same page forever
                self._fail(ArchiveProtocolError, f"{what} of {path}: paging is not honoured")
            if previous_length is not None and previous_length < self.page_size:
                self._page_cap = min(self._page_cap or previous_length, previous_length)
            first_of_previous, previous_length = page[0], len(page)
            yield from page
            # A short page is not the end: an archive may cap `limit` below what was asked
            # (a harvest that stopped there would take the rest for gone). Only an empty one
            # is; or a short first page holding exactly the count the caller expects, when
            # the archive was never seen to cap pages at that length or below. (An archive
            # capping at exactly a stale count, before any cap was seen, would still fool it.)
            offset += len(page)
            cap = self._page_cap
            if (
                offset == expected
                and offset == len(page) < self.page_size
                and (cap is None or len(page) < cap)
            ):
                return

    def _get_json(self, path: str, params: list[tuple[str, str]], what: str) -> Any:
        response = self._send(path, params, "application/dicom+json", what, stream=False)
        if not response.content.strip():
            return []  # some archives answer 204 or an empty body for "no match"
        try:
            return response.json()
        except ValueError as exc:
            self._fail(ArchiveProtocolError, f"{what} of {path}: the answer is not JSON ({exc})")

    def _send(
        self, path: str, params: list[tuple[str, str]], accept: str, what: str, *, stream: bool
    ) -> httpx.Response:
        """GET with retries; the response is read unless `stream`."""
        query = _query_string(params)
        url = httpx.URL(f"{self._base}{path}", query=query.encode("ascii") if query else None)
        attempt = 0
        while True:
            delay: float | None = None
            try:
                request = self._client.build_request("GET", url, headers={"Accept": accept})
                response = self._client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                error = self._transport_error(exc, f"{what} of {path}", midstream=False)
            else:
                if response.is_success:
                    return response
                detail = _error_detail(response, stream)
                error, delay = self._status_error(
                    response.status_code,
                    response.reason_phrase,
                    response.headers.get("Retry-After"),
                    detail,
                    f"{what} of {path}",
                )
            self._pause_before_retry(error, attempt, delay)
            attempt += 1

    def _open_stream(
        self, path: str, accept: str, what: str
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GET with retries, over `http.client`: a body to read from the socket as it comes
        (`broker.dicom.multipart`), without an HTTP library's handling of every 64 KiB. The
        caller closes both the response and the connection."""
        target = urllib.parse.urlsplit(f"{self._base}{path}")
        # the port always given: http.client would split an IPv6 address at its last colon
        host = target.hostname or ""
        port = target.port or (443 if target.scheme == "https" else 80)
        request_path = target.path + (f"?{target.query}" if target.query else "")
        headers = {"Accept": accept, **_REQUEST_HEADERS}
        attempt = 0
        while True:
            delay: float | None = None
            connection: http.client.HTTPConnection
            if target.scheme == "https":
                connection = http.client.HTTPSConnection(
                    host,
                    port,
                    timeout=self.endpoint.timeout,
                    context=_https_context(self.endpoint.https_ca),
                )
            else:
                connection = http.client.HTTPConnection(host, port, timeout=self.endpoint.timeout)
            try:
                connection.connect()
            except OSError as exc:
                connection.close()
                error = self._socket_error(exc, what, stage="connect")
            else:  # http.client sets TCP_NODELAY
                try:
                    connection.request("GET", request_path, headers=headers)
                    response = connection.getresponse()
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    # (ValueError: a path http.client cannot send, e.g. non-ASCII)
                    connection.close()
                    error = self._socket_error(exc, what, stage="answer")
                else:
                    encoding = (response.getheader("Content-Encoding") or "identity").lower()
                    if 200 <= response.status < 300 and encoding != "identity":
                        response.close()
                        connection.close()
                        self._fail(
                            ArchiveProtocolError,
                            f"{what}: answered with Content-Encoding {encoding!r} although "
                            "asked for identity",
                        )
                    if 200 <= response.status < 300:
                        return connection, response
                    error, delay = self._status_error(
                        response.status,
                        response.reason,
                        response.getheader("Retry-After"),
                        _raw_error_detail(response),
                        what,
                    )
                    connection.close()
            self._pause_before_retry(error, attempt, delay)
            attempt += 1

    def _pause_before_retry(self, error: ArchiveError, attempt: int, delay: float | None) -> None:
        """Raise `error` unless it is worth another attempt; then wait (backoff or
        Retry-After)."""
        if (
            not error.retryable
            or attempt >= self.endpoint.retries
            or (delay is not None and delay > _MAX_RETRY_AFTER_SECONDS)
        ):
            raise error
        if delay is None:
            delay = min(_BACKOFF_MAX_SECONDS, _BACKOFF_BASE_SECONDS * 2**attempt)
            delay *= 1 + random.random() / 4  # noqa: S311 - jitter, not cryptography
        time.sleep(delay)

    def _status_error(
        self, status: int, reason: str, retry_after_header: str | None, detail: str, what: str
    ) -> tuple[ArchiveError, float | None]:
        message = f"{what}: HTTP {status} {reason}{detail}"
        if status == 404:
            return self._error(ArchiveNotFound, message), None
        if status in {401, 403}:
            return self._error(ArchiveRefused, message), None
        if status not in _RETRY_STATUSES:
            return self._error(ArchiveProtocolError, message), None
        retry_after = _retry_after(retry_after_header)
        if retry_after is not None and retry_after > _MAX_RETRY_AFTER_SECONDS:
            message += f" (Retry-After {retry_after:.0f} s: too long to wait here)"
        return self._error(ArchiveProtocolError, message, retryable=True), retry_after

    def _socket_error(self, exc: Exception, what: str, *, stage: str) -> ArchiveError:
        """An error of `http.client` or of the socket under it, at the `stage` "connect",
        "answer" (before the body) or "midstream"."""
        reason = str(exc) or type(exc).__name__
        timeout = self.endpoint.timeout
        if isinstance(exc, TimeoutError):
            if stage == "connect":
                return self._error(ArchiveTimeout, f"{what}: no connection within {timeout:g} s")
            return self._error(ArchiveTimeout, f"{what}: no answer within {timeout:g} s (read)")
        if stage == "connect":
            return self._error(ArchiveUnreachable, f"{what}: cannot connect ({reason})")
        # (RemoteDisconnected, no status line at all, is a ConnectionResetError)
        if isinstance(exc, ConnectionError | ssl.SSLError | http.client.IncompleteRead):
            when = "in the middle of the answer" if stage == "midstream" else "before answering"
            return self._error(
                ArchiveProtocolError,
                f"{what}: the archive closed the connection {when} ({reason})",
                retryable=True,
            )
        return self._error(ArchiveProtocolError, f"{what}: {type(exc).__name__}: {reason}")

    def _transport_error(self, exc: httpx.HTTPError, what: str, *, midstream: bool) -> ArchiveError:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectTimeout):
            return self._error(
                ArchiveTimeout, f"{what}: no connection within {self.endpoint.timeout:g} s"
            )
        if isinstance(exc, httpx.TimeoutException):
            return self._error(
                ArchiveTimeout,
                f"{what}: no answer within {self.endpoint.timeout:g} s ({type(exc).__name__})",
            )
        if isinstance(exc, httpx.ConnectError):
            return self._error(ArchiveUnreachable, f"{what}: cannot connect ({reason})")
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
            when = "in the middle of the answer" if midstream else "before answering"
            return self._error(
                ArchiveProtocolError,
                f"{what}: the archive closed the connection {when} ({reason})",
                retryable=True,
            )
        return self._error(ArchiveProtocolError, f"{what}: {type(exc).__name__}: {reason}")

    def _boundary(self, content_type: str | None, what: str) -> bytes:
        content_type = content_type or ""
        message = email.message.Message()
        message["Content-Type"] = content_type
        boundary = message.get_param("boundary")
        if message.get_content_type() != "multipart/related" or not isinstance(boundary, str):
            self._fail(
                ArchiveProtocolError,
                f"{what}: expected a multipart/related answer with a boundary, got "
                f"{content_type!r}",
            )
        if not boundary or len(boundary) > 200:
            self._fail(ArchiveProtocolError, f"{what}: invalid multipart boundary {boundary!r}")
        return boundary.encode("latin-1", "replace")

    # ---------------------------------------------------------------- answers

    def _study_summary(self, item: dict[str, Any]) -> StudySummary:
        uid = _json_text(item, _TAG_STUDY_UID)
        if not uid:
            self._fail(ArchiveProtocolError, "QIDO-RS study query: a match has no StudyInstanceUID")
        return StudySummary(
            study_instance_uid=uid,
            patient_id=_json_text(item, _TAG_PATIENT_ID),
            issuer_of_patient_id=_json_text(item, _TAG_ISSUER) or None,
            study_date=_parse_date(_json_text(item, _TAG_STUDY_DATE)),
            study_time=_parse_time(_json_text(item, _TAG_STUDY_TIME)),
            accession_number=_json_text(item, _TAG_ACCESSION) or None,
            study_description=_json_text(item, _TAG_STUDY_DESCRIPTION),
            modalities=_modalities(_json_values(item, _TAG_MODALITIES)),
            number_of_series=_parse_int(_json_first(item, _TAG_NUMBER_OF_SERIES)),
            number_of_instances=_parse_int(_json_first(item, _TAG_NUMBER_OF_INSTANCES)),
        )

    def _instance_row(self, item: dict[str, Any]) -> _InstanceRow:
        series_uid = _json_text(item, _TAG_SERIES_UID)
        sop_uid = _json_text(item, _TAG_SOP_INSTANCE)
        sop_class = _json_text(item, _TAG_SOP_CLASS)
        if not sop_class or not all(_UID_PATTERN.fullmatch(uid) for uid in (series_uid, sop_uid)):
            self._fail(
                ArchiveProtocolError,
                "QIDO-RS instance query: a match lacks a valid SeriesInstanceUID, "
                "SOPInstanceUID or SOPClassUID",
            )
        body_part = _json_text(item, _TAG_BODY_PART)
        return _InstanceRow(
            patient_id=_json_text(item, _TAG_PATIENT_ID),
            series_instance_uid=series_uid,
            modality=_json_text(item, _TAG_MODALITY),
            series_number=_parse_int(_json_first(item, _TAG_SERIES_NUMBER)),
            body_part=body_part or None,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            instance_number=_parse_int(_json_first(item, _TAG_INSTANCE_NUMBER)),
        )

    def _metadata_dataset(self, metadata: Any, study_uid: str) -> Dataset:
        if not isinstance(metadata, list) or not metadata or not isinstance(metadata[0], dict):
            self._fail(
                ArchiveProtocolError, f"WADO-RS metadata of study {study_uid}: not a dataset list"
            )
        wanted = {tag: value for tag, value in metadata[0].items() if tag.upper() in _METADATA_TAGS}
        try:
            return Dataset.from_json(wanted)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            self._fail(
                ArchiveProtocolError,
                f"WADO-RS metadata of study {study_uid}: unreadable DICOM JSON ({exc})",
            )

    # ---------------------------------------------------------------- errors

    def _error(
        self, kind: type[ArchiveError], message: str, *, retryable: bool | None = None
    ) -> ArchiveError:
        return kind(
            f"{self.endpoint.name} (DICOMweb {self._base}): {message}",
            transport=DICOMWEB,
            retryable=retryable,
        )

    def _fail(
        self, kind: type[ArchiveError], message: str, *, retryable: bool | None = None
    ) -> NoReturn:
        raise self._error(kind, message, retryable=retryable)


_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_BULK_THRESHOLD = 1024


def _json_without_bulk(ds: Dataset) -> dict[str, Any]:
    """DICOM JSON of a dataset with its binary values of 1 KiB or more left out (no value)."""
    try:
        result: dict[str, Any] = ds.to_json_dict(
            bulk_data_threshold=_BULK_THRESHOLD, bulk_data_element_handler=_no_bulk_uri
        )
    except (TypeError, ValueError) as exc:  # a dataset pydicom cannot express as JSON
        raise ArchiveProtocolError(
            f"instance not expressible as DICOM JSON: {exc}", transport=DIMSE
        ) from exc
    for tag, attribute in list(result.items()):
        if attribute.get("vr") in _BULK_VRS and "BulkDataURI" in attribute:
            result[tag] = {"vr": attribute["vr"]}
    return result


def _no_bulk_uri(element: Any) -> str:
    return ""


_https_context_lock = threading.Lock()
_https_context_cache: dict[str, ssl.SSLContext] = {}


def _https_context(extra_ca: str = "") -> ssl.SSLContext:
    """One TLS context per set of trusted CAs for every DICOMweb client of the process:
    building one loads the CA bundle, 40-60 ms of CPU here, which a client per request (the
    gateway's) paid each time (docs/performance.md). An SSLContext is safe to share between
    threads. ``extra_ca``: a PEM file of CAs trusted besides the system's (a region's PKI)."""
    with _https_context_lock:
        context = _https_context_cache.get(extra_ca)
        if context is None:
            context = ssl.create_default_context()
            if extra_ca:
                context.load_verify_locations(cafile=extra_ca)
            _https_context_cache[extra_ca] = context
        return context


def _json_values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value")
    return values if isinstance(values, list) else []


def _json_first(item: dict[str, Any], tag: str) -> Any:
    values = _json_values(item, tag)
    return values[0] if values else None


def _json_text(item: dict[str, Any], tag: str) -> str:
    value = _json_first(item, tag)
    if isinstance(value, dict):  # PN
        value = value.get("Alphabetic", "")
    return "" if value is None else str(value).strip()


def _error_detail(response: httpx.Response, stream: bool) -> str:
    """The start of an error answer's body, for the message; the response is closed."""
    body = b""
    try:
        if not stream:
            body = response.content
        else:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) >= _MAX_ERROR_BODY_BYTES:
                    break
    except httpx.HTTPError:
        pass
    finally:
        response.close()
    text = " ".join(body[:_MAX_ERROR_BODY_BYTES].decode("utf-8", "replace").split())
    return f": {text}" if text else ""


def _raw_error_detail(response: http.client.HTTPResponse) -> str:
    """The start of an error answer's body (`http.client`), for the message."""
    try:
        body = response.read(_MAX_ERROR_BODY_BYTES)
    except (OSError, http.client.HTTPException):
        body = b""
    text = " ".join(body.decode("utf-8", "replace").split())
    return f": {text}" if text else ""


def _query_safe(value: str) -> bool:
    return all(char in _QUERY_SAFE for char in value)


def _query_string(params: Sequence[tuple[str, str]]) -> str:
    """The query string, values as they are: Orthanc's DICOMweb plugin 1.7 does not
    percent-decode query values (`PatientID=CHU%30012345` matches nothing, and httpx's own
    encoding turns `*` and `^` into escapes), so values are sent verbatim. Those that could
    not be (`find_studies` with a patient ID holding spaces, `&`, `+`, non-ASCII...) are left
    out of the query and filtered on the answers instead."""
    for name, value in params:
        if not _query_safe(value):
            raise ValueError(f"query value {value!r} of {name} cannot be sent verbatim")
    return "&".join(f"{name}={value}" for name, value in params)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --------------------------------------------------------------------------- DIMSE


_GET_MODEL: Final = UID(StudyRootQueryRetrieveInformationModelGet)
_FIND_MODEL: Final = UID(StudyRootQueryRetrieveInformationModelFind)
_MOVE_MODEL: Final = UID(StudyRootQueryRetrieveInformationModelMove)
# State machine events (PS3.8 table 9-10): the peer's A-ABORT, the connection closed, an
# invalid PDU; and ours: A-RELEASE or A-ABORT requested, after which a closed connection is ours.
_PEER_EVENTS: Final = frozenset({"Evt16", "Evt17", "Evt19"})
_LOCAL_END_EVENTS: Final = frozenset({"Evt11", "Evt15"})
_DUL_ENDING_SECONDS: Final = 2.0  # a DUL thread told to stop ends within its next turn


class _Watch:
    """What happened on one association's connection, seen from pynetdicom's threads."""

    def __init__(self) -> None:
        self.connected = False
        self.ending = False  # the broker asked for a release or an abort
        self._peer_event: str | None = None  # first of _PEER_EVENTS before that
        self._dul: threading.Thread | None = None

    @property
    def peer_event(self) -> str | None:
        """The peer's event that ended the association, if one did. pynetdicom's state machine
        hands the association its abort (or the end of its request) before it reports the
        event that caused it: read once the association's DUL thread has ended (it ends
        with the association: this is read when a request or the association failed)."""
        dul, self._dul = self._dul, None
        if dul is not None and dul is not threading.current_thread():
            dul.join(_DUL_ENDING_SECONDS)
        return self._peer_event

    def on_open(self, event: Any) -> None:
        self.connected = True
        self._dul = event.assoc.dul

    def on_transition(self, event: Any) -> None:
        if self._peer_event is not None or self.ending:
            return
        if event.fsm_event in _LOCAL_END_EVENTS:
            self.ending = True
        elif event.fsm_event in _PEER_EVENTS:
            self._peer_event = event.fsm_event

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            *NODELAY_HANDLERS,
            (evt.EVT_CONN_OPEN, self.on_open),
            (evt.EVT_FSM_TRANSITION, self.on_transition),
        ]


@dataclass
class _Done:
    """The end of a C-GET, as the worker thread saw it."""

    status: Dataset | None = None
    error: BaseException | None = None
    peer_event: str | None = None
    elapsed: float = 0.0


class DimseArchive:
    """C-ECHO, C-FIND, C-GET and C-MOVE client of one archive (see the module docstring).

    Its C-FIND association stays open between queries until `close()`: a client belongs
    to one thread at a time (a harvest gives each of its workers its own).
    """

    transport: str = DIMSE

    def __init__(self, endpoint: ArchiveEndpoint) -> None:
        if not endpoint.has_dimse:
            raise ValueError(f"archive of {endpoint.name!r} has no DIMSE AE title, host and port")
        self.endpoint = endpoint
        self._ae = RelaisAE(ae_title=endpoint.calling_ae_title)
        self._ae.connection_timeout = endpoint.timeout
        self._ae.acse_timeout = endpoint.timeout
        self._ae.dimse_timeout = endpoint.timeout
        self._ae.network_timeout = endpoint.timeout
        self._tls_args = (endpoint.tls, endpoint.host) if endpoint.tls is not None else None
        # The C-FIND association, kept open between queries (a harvest describes study
        # after study: one association for all, not a connection and a release each).
        self._finder: StoreSession | None = None  # the kept C-FIND association

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the C-FIND association kept open, if any (the others last one
        operation each)."""
        finder, self._finder = self._finder, None
        if finder is not None:
            finder.release()

    # ---------------------------------------------------------------- operations

    def echo(self) -> None:
        with self._association([build_context(Verification)], "C-ECHO") as (assoc, watch):
            started = time.monotonic()
            status = assoc.send_c_echo()
            self._check_final(status, "C-ECHO", watch, started)

    def find_studies(
        self,
        *,
        since: dt.date | None = None,
        until: dt.date | None = None,
        patient_id: str | None = None,
    ) -> list[StudySummary]:
        query = _query("STUDY", StudyInstanceUID="", **dict.fromkeys(_STUDY_KEYS, ""))
        date_range = _date_range(since, until)
        if date_range is not None:
            query.StudyDate = date_range
        if (patient := _check_patient_id(patient_id)) is not None:
            query.PatientID = patient
        with self._find_association() as (assoc, watch):
            matches = self._find(assoc, watch, query)
        return _sort_studies(self._study_summary(match) for match in matches)

    def describe_study(
        self, study_instance_uid: str, *, expected_instances: int | None = None
    ) -> StudyDescription:
        study_uid = _check_uid(study_instance_uid, "Study Instance UID")
        study_query = _query(
            "STUDY",
            StudyInstanceUID=study_uid,
            AccessionNumber="",
            StudyDate="",
            StudyTime="",
            StudyDescription="",
            **dict.fromkeys(_PATIENT_KEYS, ""),
        )
        study_query.IssuerOfPatientIDQualifiersSequence = []
        study_query.OtherPatientIDsSequence = []
        image_query = _query("IMAGE", StudyInstanceUID=study_uid, **dict.fromkeys(_IMAGE_KEYS, ""))
        with self._find_association() as (assoc, watch):
            studies = self._find(assoc, watch, study_query)
            if not studies:
                self._fail(ArchiveNotFound, f"study {study_uid} not found (no C-FIND match)")
            patient_ids = sorted({_text(match.get("PatientID")) for match in studies})
            if len(patient_ids) > 1:
                self._fail(
                    ArchiveProtocolError,
                    f"study {study_uid} is filed under several patients ({', '.join(patient_ids)})",
                )
            rows = [self._instance_row(match) for match in self._find(assoc, watch, image_query)]
            if not rows:
                self._fail(ArchiveNotFound, f"study {study_uid} has no instance")
            if any(not row.modality for row in rows):
                rows = self._complete_series(assoc, watch, study_uid, rows)
        patient = _patient_from_dataset(studies[0])
        if patient is None:
            self._fail(
                ArchiveProtocolError, f"the C-FIND match of study {study_uid} has no PatientID"
            )
        accession, study_date, study_time, description = _study_attributes(studies[0])
        return StudyDescription(
            patient=patient,
            study_instance_uid=study_uid,
            accession_number=accession,
            study_date=study_date,
            study_time=study_time,
            study_description=description,
            series=_series_from_rows(rows),
            retrieve_ae_title=self.endpoint.ae_title,
            retrieve_url=(
                f"{self.endpoint.wado_base_url}/studies/{study_uid}"
                if self.endpoint.has_dicomweb
                else None
            ),
            institution_name=self.endpoint.name,
        )

    def retrieve(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> Generator[bytes, None, None]:
        """C-GET: each instance as Part 10 bytes, streamed as it arrives."""
        return self._retrieve(
            *_retrieve_uids(study_instance_uid, series_instance_uid, sop_instance_uid)
        )

    def metadata(
        self,
        study_instance_uid: str,
        series_instance_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[dict[str, Any]]:
        """What WADO-RS metadata would say, from the instances fetched by C-GET (DIMSE has
        no metadata-only retrieval; an instance's alone, not its series'): DICOM JSON without
        the bulk data (pixels, large binary values), which a viewer fetches apart."""
        return [
            _json_without_bulk(dcmread(io.BytesIO(data), force=True))
            for data in self.retrieve(study_instance_uid, series_instance_uid, sop_instance_uid)
        ]

    def move(
        self,
        study_instance_uid: str,
        destination_ae_title: str,
        series_instance_uid: str | None = None,
    ) -> MoveResult:
        """C-MOVE a study (or one of its series) to an AE title the archive knows."""
        study_uid = _check_uid(study_instance_uid, "Study Instance UID")
        destination = destination_ae_title.strip()
        if not destination or len(destination) > 16 or "\\" in destination:
            raise ValueError(f"invalid destination AE title {destination_ae_title!r}")
        query = _query("STUDY", StudyInstanceUID=study_uid)
        if series_instance_uid is not None:
            query.QueryRetrieveLevel = "SERIES"
            query.SeriesInstanceUID = _check_uid(series_instance_uid, "Series Instance UID")
        what = f"C-MOVE of study {study_uid}"
        if series_instance_uid is not None:
            what += f" series {series_instance_uid}"
        what += f" to {destination}"
        contexts = [build_context(_FIND_MODEL), build_context(_MOVE_MODEL)]
        with self._association(contexts, "C-MOVE") as (assoc, watch):
            # Orthanc answers a move of an unknown study with 0xC000, like any other failure:
            # a C-FIND first tells "not found" apart (one more exchange, same association).
            if not self._find(assoc, watch, query):
                self._fail(ArchiveNotFound, f"{what}: nothing matched (C-FIND)")
            started = time.monotonic()
            final: Dataset | None = None
            try:
                for status, _identifier in assoc.send_c_move(query, destination, _MOVE_MODEL):
                    final = status
            except (ValueError, RuntimeError) as exc:
                self._fail(ArchiveProtocolError, f"{what}: {exc}")
            final = self._check_final(final, what, watch, started, allow_warning=True)
        return MoveResult(
            completed=int(final.get("NumberOfCompletedSuboperations") or 0),
            failed=int(final.get("NumberOfFailedSuboperations") or 0),
            warning=int(final.get("NumberOfWarningSuboperations") or 0),
        )

    # ---------------------------------------------------------------- C-GET

    def _retrieve(
        self, study_uid: str, series_uid: str | None, sop_uid: str | None
    ) -> Generator[bytes, None, None]:
        query = _query("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid or "")
        query.SOPInstanceUID = sop_uid or ""
        query.SOPClassUID = ""
        # An association of its own, not the kept one: a retrieval may run on another thread
        # than the one that closes the client (sharing.dimse.MoveTransfer's read-ahead).
        session = self._open_session([build_context(_FIND_MODEL)], "C-FIND")
        try:
            matches = self._find(session, _Watch(), query)
        except BaseException:
            session.abort()
            raise
        session.release()
        what = f"C-GET of study {study_uid}"
        if series_uid:
            what += f" series {series_uid}"
        if sop_uid:
            what += f" instance {sop_uid}"
        if not matches:
            self._fail(ArchiveNotFound, f"{what}: nothing matched (C-FIND)")
        sop_classes = sorted({cls for match in matches if (cls := _text(match.get("SOPClassUID")))})
        if not sop_classes:
            self._fail(ArchiveProtocolError, f"{what}: the C-FIND matches have no SOPClassUID")
        get = _query("STUDY", StudyInstanceUID=study_uid)
        if series_uid or sop_uid:
            get.QueryRetrieveLevel = "SERIES"
            get.SeriesInstanceUID = series_uid or _text(matches[0].get("SeriesInstanceUID"))
        if sop_uid:
            get.QueryRetrieveLevel = "IMAGE"
            get.SOPInstanceUID = sop_uid
        yield from self._c_get(get, sop_classes, expected=len(matches), what=what)

    def _c_get(
        self, identifier: Dataset, sop_classes: Sequence[str], *, expected: int, what: str
    ) -> Generator[bytes, None, None]:
        """The C-GET on an association of its own, run on the caller's thread
        (`StoreSession.c_get`): each instance is answered, then handed over, as it arrives;
        closing the generator early aborts the association."""
        contexts, roles = self._storage_contexts(sop_classes, what)
        started = time.monotonic()
        session = self._open_session(
            [build_context(_GET_MODEL), *contexts],
            what,
            roles=roles,
            maximum_pdu=_C_GET_MAXIMUM_PDU,
        )
        received = 0
        done = _Done()
        try:
            instances = session.c_get(
                identifier, _GET_MODEL, source_ae_title=self.endpoint.ae_title
            )
            while True:
                try:
                    instance = next(instances)
                except StopIteration as end:
                    done.status = end.value
                    break
                received += 1
                yield instance
        except (StoreSessionError, ValueError, OSError) as exc:
            # (ValueError: an identifier pydicom cannot encode, a status it cannot read)
            done.elapsed = time.monotonic() - started
            self._get_interrupted(exc, what, done.elapsed)
        finally:
            if done.status is not None:
                session.release()
            else:
                session.abort()
        self._c_get_outcome(done, what, received, expected)

    def _get_not_associated(self, session: StoreSession, what: str, elapsed: float) -> NoReturn:
        """The association for a C-GET failed: the error `_associate` gives for the same."""
        where = f"{what}: association with {self.endpoint.ae_title}"
        failure = session.failure
        if isinstance(failure, StoreSessionUnreachable | StoreSessionTimeout) and (
            session.rejection.startswith("cannot connect")
        ):
            self._unreachable(what, elapsed)
        if isinstance(failure, StoreSessionRejected):
            self._fail(ArchiveRefused, f"{where} {session.rejection}")
        if isinstance(failure, StoreSessionAborted):
            self._fail(ArchiveRefused, f"{where} aborted by the archive during negotiation")
        if isinstance(failure, StoreSessionClosed | StoreSessionProtocolError):
            # closed, or answered with what is not DICOM: a TLS port reached without TLS (or
            # the reverse), another service on the port
            self._fail(
                ArchiveUnreachable,
                f"{where}: the archive closed the connection during negotiation "
                f"(a TLS archive reached without TLS, or the reverse?): {session.rejection}",
                retryable=True,
            )
        if isinstance(failure, StoreSessionTimeout):
            self._fail(
                ArchiveTimeout,
                f"{where}: no answer to the association request within {self.endpoint.timeout:g} s",
            )
        self._fail(ArchiveProtocolError, f"{where}: {session.rejection}")

    def _get_interrupted(self, exc: Exception, what: str, elapsed: float) -> NoReturn:
        """The C-GET failed on its way: the error `_no_response` gives for the same."""
        if isinstance(exc, StoreSessionTimeout):
            self._fail(
                ArchiveTimeout,
                f"no answer to {what} within {self.endpoint.timeout:g} s (waited {elapsed:.1f} s)",
            )
        if isinstance(exc, StoreSessionAborted):
            self._fail(
                ArchiveRefused,
                f"the archive aborted the association during {what} (Orthanc does so when it "
                f"does not know the calling AE title {self.endpoint.calling_ae_title})",
            )
        if isinstance(exc, StoreSessionClosed):
            self._fail(
                ArchiveProtocolError,
                f"the archive closed the connection during {what} ({exc})",
                retryable=True,
            )
        self._fail(ArchiveProtocolError, f"{what}: {type(exc).__name__}: {exc}")

    def _c_get_outcome(self, done: _Done, what: str, received: int, expected: int) -> None:
        if done.error is not None:
            self._fail(ArchiveProtocolError, f"{what}: {type(done.error).__name__}: {done.error}")
        status = done.status
        if status is None or "Status" not in status:
            self._no_response(what, done.peer_event, done.elapsed)
        code = int(status.Status)
        failed = int(status.get("NumberOfFailedSuboperations") or 0)
        category = code_to_category(code)
        if category not in {"Success", "Warning"} or failed:
            counts = f"{received} received, {failed} failed"
            self._fail(
                ArchiveProtocolError,
                f"{what} failed with status 0x{code:04X} ({_status_meaning(code)}): {counts}",
            )
        if received < expected:
            self._fail(
                ArchiveProtocolError,
                f"{what}: {received} instance(s) received, {expected} expected",
                retryable=True,
            )

    def _storage_contexts(
        self, sop_classes: Sequence[str], what: str
    ) -> tuple[list[PresentationContext], list[Any]]:
        """A context per (SOP class, transfer syntax), as many syntaxes as 127 contexts allow."""
        budget = _MAX_CONTEXTS - 1  # one is the C-GET context
        if len(sop_classes) > budget:
            self._fail(
                ArchiveProtocolError,
                f"{what}: {len(sop_classes)} SOP classes, more than one association can carry",
            )
        per_class = max(1, min(len(RETRIEVE_SYNTAXES), budget // len(sop_classes)))
        contexts = []
        for sop_class in sop_classes:
            if per_class == 1:
                contexts.append(build_context(sop_class, list(RETRIEVE_SYNTAXES[:2])))
            else:
                contexts += [build_context(sop_class, ts) for ts in RETRIEVE_SYNTAXES[:per_class]]
        roles = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
        return contexts, roles

    # ---------------------------------------------------------------- associations

    @contextlib.contextmanager
    def _association(
        self, contexts: list[PresentationContext], what: str
    ) -> Iterator[tuple[Association, _Watch]]:
        assoc, watch = self._associate(contexts, what)
        try:
            yield assoc, watch
        except ArchiveError as exc:
            # the archive answered (a failure status, no match...): the association is sound
            if isinstance(exc, ArchiveTimeout) or not assoc.is_established:
                _abort(assoc)
            else:
                assoc.release()
            raise
        except BaseException:
            _abort(assoc)
            raise
        else:
            if assoc.is_established:
                assoc.release()
        finally:
            _join(assoc)

    @contextlib.contextmanager
    def _find_association(self) -> Iterator[tuple[StoreSession, _Watch]]:
        """The kept C-FIND association (opened if need be; a `StoreSession`: no pynetdicom
        thread); dropped on any trouble."""
        if self._finder is not None and not self._finder.is_quiet():
            # ended by the archive while idle (Orthanc aborts an association idle for
            # DicomScpTimeout, 30 s): a new one, rather than a query that fails on it
            self._finder.abort()
            self._finder = None
        if self._finder is None:
            self._finder = self._open_session([build_context(_FIND_MODEL)], "C-FIND")
        session = self._finder
        try:
            yield session, _Watch()
        except ArchiveError as exc:
            # the archive answered (a failure status, no match...): the association is sound
            if isinstance(exc, ArchiveTimeout) or not session.is_established:
                self._finder = None
                session.abort()
            raise
        except BaseException:
            self._finder = None
            session.abort()
            raise

    def _open_session(
        self,
        contexts: list[PresentationContext],
        what: str,
        *,
        roles: Sequence[Any] = (),
        maximum_pdu: int = _SESSION_MAXIMUM_PDU,
    ) -> StoreSession:
        """An association run on the caller's thread (`StoreSession`); the `ArchiveError` of
        the same failure as `_associate`'s when it cannot be established."""
        started = time.monotonic()
        tls, server_hostname = self._tls_args or (None, None)
        timeout = self.endpoint.timeout
        session = StoreSession.open(
            self.endpoint.host,
            int(self.endpoint.port or 0),
            calling_ae_title=self.endpoint.calling_ae_title,
            called_ae_title=self.endpoint.ae_title,
            contexts=contexts,
            acse_timeout=timeout,
            dimse_timeout=timeout,
            network_timeout=timeout,
            tls=tls,
            server_hostname=server_hostname,
            maximum_received_pdu=maximum_pdu,
            extended_negotiation=roles,
        )
        if not session.is_established:
            self._get_not_associated(session, what, time.monotonic() - started)
        return session

    def _associate(
        self,
        contexts: list[PresentationContext],
        what: str,
        *,
        ext_neg: list[Any] | None = None,
        handlers: list[tuple[Any, Any]] | None = None,
    ) -> tuple[Association, _Watch]:
        watch = _Watch()
        started = time.monotonic()
        try:
            assoc = self._ae.associate(
                self.endpoint.host,
                int(self.endpoint.port or 0),
                contexts=contexts,
                ae_title=self.endpoint.ae_title,
                max_pdu=0,
                ext_neg=ext_neg,
                tls_args=self._tls_args,
                evt_handlers=[*watch.handlers(), *(handlers or [])],
            )
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            self._fail(ArchiveProtocolError, f"{what}: cannot request an association ({exc})")
        if assoc.is_established:
            return assoc, watch
        elapsed = time.monotonic() - started
        where = f"{what}: association with {self.endpoint.ae_title}"
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            reason = (
                f"{primitive.result_str}, by the {primitive.source_str}: {primitive.reason_str}"
                if primitive is not None
                else "no reason given"
            )
            self._fail(ArchiveRefused, f"{where} rejected ({reason})")
        if not watch.connected:
            self._unreachable(what, elapsed)
        if watch.peer_event == "Evt16":
            self._fail(ArchiveRefused, f"{where} aborted by the archive during negotiation")
        if watch.peer_event in {"Evt17", "Evt19"}:
            self._fail(
                ArchiveUnreachable,
                f"{where}: the archive closed the connection during negotiation "
                f"(a TLS archive reached without TLS, or the reverse?)",
            )
        if assoc.acceptor.primitive is None:
            self._fail(
                ArchiveTimeout,
                f"{where}: no answer to the association request within {self.endpoint.timeout:g} s",
            )
        raise self._error(
            ArchiveRefused,
            f"{where}: no presentation context accepted (the archive does not offer {what})",
        )

    def _unreachable(self, what: str, elapsed: float) -> NoReturn:
        host, port = self.endpoint.host, self.endpoint.port
        where = f"{what}: cannot connect to {host}:{port}"
        if elapsed >= self.endpoint.timeout * 0.9:
            self._fail(ArchiveTimeout, f"{where}: no connection within {self.endpoint.timeout:g} s")
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            self._fail(ArchiveUnreachable, f"{where}: unknown host {host!r}")
        reason = (
            "connection refused or TLS handshake failed" if self._tls_args else "connection refused"
        )
        self._fail(ArchiveUnreachable, f"{where} ({reason})")

    # ---------------------------------------------------------------- C-FIND

    def _find(
        self, assoc: Association | StoreSession, watch: _Watch, query: Dataset
    ) -> list[Dataset]:
        what = f"C-FIND at {query.QueryRetrieveLevel} level"
        started = time.monotonic()
        matches: list[Dataset] = []
        final: Dataset | None = None
        if isinstance(assoc, StoreSession):
            try:
                finds = assoc.c_find(query, _FIND_MODEL)
                while True:
                    try:
                        matches.append(next(finds))
                    except StopIteration as end:
                        final = end.value
                        break
            except (StoreSessionError, ValueError, OSError) as exc:
                self._get_interrupted(exc, what, time.monotonic() - started)
            self._check_final(final, what, watch, started)
            return matches
        try:
            for status, identifier in assoc.send_c_find(query, _FIND_MODEL):
                if status and code_to_category(int(status.Status)) == "Pending":
                    if identifier is not None:
                        matches.append(identifier)
                    continue
                final = status
        except (ValueError, RuntimeError, AttributeError) as exc:
            self._fail(ArchiveProtocolError, f"{what}: {exc}")
        self._check_final(final, what, watch, started)
        return matches

    def _check_final(
        self,
        status: Dataset | None,
        what: str,
        watch: _Watch,
        started: float,
        *,
        allow_warning: bool = False,
    ) -> Dataset:
        """The final status, if it is a success (or a warning, when allowed)."""
        if status is None or "Status" not in status:
            self._no_response(what, watch.peer_event, time.monotonic() - started)
        code = int(status.Status)
        category = code_to_category(code)
        if category == "Success" or (allow_warning and category == "Warning"):
            return status
        counts = ", ".join(
            f"{label} {status.get(keyword)}"
            for label, keyword in (
                ("completed", "NumberOfCompletedSuboperations"),
                ("failed", "NumberOfFailedSuboperations"),
                ("warning", "NumberOfWarningSuboperations"),
            )
            if status.get(keyword) is not None
        )
        raise self._error(
            ArchiveProtocolError,
            f"{what} failed with status 0x{code:04X} ({_status_meaning(code)})"
            + (f" ({counts})" if counts else ""),
        )

    def _no_response(self, what: str, peer_event: str | None, elapsed: float) -> NoReturn:
        if peer_event == "Evt16":
            self._fail(
                ArchiveRefused,
                f"the archive aborted the association during {what} (Orthanc does so when it "
                f"does not know the calling AE title {self.endpoint.calling_ae_title})",
            )
        if peer_event == "Evt17":
            self._fail(
                ArchiveProtocolError,
                f"the archive closed the connection during {what}",
                retryable=True,
            )
        if peer_event == "Evt19":
            self._fail(ArchiveProtocolError, f"the archive sent an invalid PDU during {what}")
        self._fail(
            ArchiveTimeout,
            f"no answer to {what} within {self.endpoint.timeout:g} s (waited {elapsed:.1f} s)",
        )

    def _complete_series(
        self,
        assoc: Association | StoreSession,
        watch: _Watch,
        study_uid: str,
        rows: list[_InstanceRow],
    ) -> list[_InstanceRow]:
        """Series attributes from a SERIES-level C-FIND, for archives that leave them out of
        IMAGE-level answers."""
        query = _query(
            "SERIES",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID="",
            Modality="",
            SeriesNumber="",
            BodyPartExamined="",
        )
        series = {
            _text(match.get("SeriesInstanceUID")): match
            for match in self._find(assoc, watch, query)
        }
        for row in rows:
            match = series.get(row.series_instance_uid)
            if match is not None:
                row.modality = row.modality or _text(match.get("Modality"))
                row.body_part = row.body_part or _text(match.get("BodyPartExamined")) or None
                if row.series_number is None:
                    row.series_number = _parse_int(match.get("SeriesNumber"))
        return rows

    def _study_summary(self, match: Dataset) -> StudySummary:
        uid = _text(match.get("StudyInstanceUID"))
        if not uid:
            self._fail(
                ArchiveProtocolError, "C-FIND at STUDY level: a match has no StudyInstanceUID"
            )
        modalities = match.get("ModalitiesInStudy")
        return StudySummary(
            study_instance_uid=uid,
            patient_id=_text(match.get("PatientID")),
            issuer_of_patient_id=_text(match.get("IssuerOfPatientID")) or None,
            study_date=_parse_date(match.get("StudyDate")),
            study_time=_parse_time(match.get("StudyTime")),
            accession_number=_text(match.get("AccessionNumber")) or None,
            study_description=_text(match.get("StudyDescription")),
            modalities=_modalities(
                modalities if isinstance(modalities, MultiValue | list) else [modalities or ""]
            ),
            number_of_series=_parse_int(match.get("NumberOfStudyRelatedSeries")),
            number_of_instances=_parse_int(match.get("NumberOfStudyRelatedInstances")),
        )

    def _instance_row(self, match: Dataset) -> _InstanceRow:
        series_uid = _text(match.get("SeriesInstanceUID"))
        sop_uid = _text(match.get("SOPInstanceUID"))
        sop_class = _text(match.get("SOPClassUID"))
        if not series_uid or not sop_uid or not sop_class:
            self._fail(
                ArchiveProtocolError,
                "C-FIND at IMAGE level: a match lacks its SeriesInstanceUID, SOPInstanceUID "
                "or SOPClassUID",
            )
        return _InstanceRow(
            patient_id=_text(match.get("PatientID")),
            series_instance_uid=series_uid,
            modality=_text(match.get("Modality")),
            series_number=_parse_int(match.get("SeriesNumber")),
            body_part=_text(match.get("BodyPartExamined")) or None,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            instance_number=_parse_int(match.get("InstanceNumber")),
        )

    # ---------------------------------------------------------------- errors

    def _error(
        self, kind: type[ArchiveError], message: str, *, retryable: bool | None = None
    ) -> ArchiveError:
        endpoint = self.endpoint
        where = f"{endpoint.ae_title}@{endpoint.host}:{endpoint.port}"
        if endpoint.tls is not None:
            where += " TLS"
        return kind(
            f"{endpoint.name} (DIMSE {where}): {message}", transport=DIMSE, retryable=retryable
        )

    def _fail(
        self, kind: type[ArchiveError], message: str, *, retryable: bool | None = None
    ) -> NoReturn:
        raise self._error(kind, message, retryable=retryable)


def _query(level: str, **keys: object) -> Dataset:
    query = Dataset()
    query.SpecificCharacterSet = "ISO_IR 192"
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


def _join(assoc: Association) -> None:
    """Wait (briefly) for an association's reactor thread to end."""
    if assoc.ident is not None:
        assoc.join(timeout=1)


def _abort(assoc: Association) -> None:
    """Abort an association from the caller's thread and wake a thread waiting on it."""
    with contextlib.suppress(Exception):
        if assoc.is_established:
            assoc.abort()
    with contextlib.suppress(Exception):
        assoc.dimse.msg_queue.put((None, None))  # unblocks a pending get_msg at once


_STATUS_MEANINGS: Final[dict[int, str]] = {
    0x0106: "invalid attribute value",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0117: "invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0211: "unrecognised operation",
    0xA700: "out of resources",
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xAA00: "none of the frames requested were found",
    0xB000: "sub-operations complete, one or more failures or warnings",
    0xFE00: "cancelled",
}


def _status_meaning(code: int) -> str:
    if code in _STATUS_MEANINGS:
        return _STATUS_MEANINGS[code]
    if 0xC000 <= code <= 0xCFFF:
        return "unable to process"
    return code_to_category(code).lower()
