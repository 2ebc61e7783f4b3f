"""A DICOM association run on the calling thread: the C-MOVE relay's C-STORE sub-operations,
and the C-GET that fetches a study from a DIMSE-only archive.

pynetdicom runs every association on two threads of its own (the DUL reading the socket and
decoding PDUs, the reactor) and hands each response over through queues: about a millisecond
of Python and several thread switches per C-STORE, which made the broker's C-MOVE four times
slower than the archive's own. A C-MOVE's sub-operations need none of that: one thread sends
an instance, waits for its response, and sends the next (no asynchronous operations window is
negotiated, so nothing else can arrive).

`StoreSession` is that association. pynetdicom still builds and reads the A-ASSOCIATE PDUs and
negotiates the presentation contexts (`negotiate_as_requestor`); this module only moves PDUs:

- an instance stored as Part 10 bytes (`EncodedInstance`) is sent as it is stored, in P-DATA
  PDUs no larger than the destination takes, written from the fetched bytes without a copy;
  when the destination accepts none of the instance's transfer syntax, an uncompressed
  instance is decoded and re-encoded in one it accepts, and a compressed one fails;
- the C-STORE-RSP command set is decoded by pydicom;
- every wait has a timeout (the AE's ACSE timeout for the association, its DIMSE timeout for
  each response, its network timeout for each write), after which the association is aborted.

`c_get` is the same idea the other way round (`DimseArchive.retrieve`): the C-GET-RQ is sent,
then each C-STORE-RQ the archive sends back on the association (its storage contexts proposed
with the SCP role) is read from PDUs of up to 1 MiB, answered with success, and handed over
as a Part 10 file written around the received data set, on the caller's thread; pynetdicom's
DUL thread decoded each one and made it cross two queues, three times the CPU per GB.

It answers to what pynetdicom's C-MOVE service uses of an association (`is_established`,
`send_c_store`, `release`, and `dul.socket.close()` after a failed association), so that the
service's status accounting, cancellation and final responses stay pynetdicom's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import select
import socket
import ssl
import struct
import warnings
from collections.abc import Generator, Sequence
from typing import Any, NoReturn

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
)
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor
from pynetdicom.status import STATUS_FAILURE, STORAGE_SERVICE_CLASS_STATUS

from broker.dicom.kos import RELAIS_IMPLEMENTATION_CLASS_UID, RELAIS_IMPLEMENTATION_VERSION_NAME
from broker.dicom.multipart import DEFAULT_MAX_PART_BYTES
from broker.dicom.network import EncodedInstance, ae_value, command_set, uid_value, us_value
from broker.dicom.part10 import part10_header

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# What the broker takes in one PDU; a C-STORE-RSP is a couple of hundred bytes.
MAXIMUM_RECEIVED_PDU = 16382
# A peer's PDU longer than this is not a C-STORE SCP's answer: the association is aborted.
_LARGEST_PDU_READ = 1 << 20
# A command set is a few hundred bytes; a data set received is at most an instance, held whole
# (as a WADO-RS part is: broker.dicom.multipart).
_LARGEST_COMMAND_SET = 64 * 1024
LARGEST_INSTANCE = DEFAULT_MAX_PART_BYTES
# A received fragment's cost beyond its bytes: its memoryview and its slot in the list.
_FRAGMENT_OVERHEAD = 200
# What one read asks of the socket.
_RECEIVE_CHUNK = 65536
# At most this many buffers in one vectored write (Linux's IOV_MAX is 1024).
_BUFFERS_PER_WRITE = 512

_Socket = socket.socket  # (the class's `socket` property hides the module in its body)
_A_ASSOCIATE_AC, _A_ASSOCIATE_RJ, _P_DATA_TF = 0x02, 0x03, 0x04
_A_RELEASE_RQ, _A_RELEASE_RP, _A_ABORT = 0x05, 0x06, 0x07
_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001
_C_GET_RQ, _C_GET_RSP = 0x0010, 0x8010
_C_FIND_RQ, _C_FIND_RSP = 0x0020, 0x8020
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# What can be decoded and sent again uncompressed when the destination takes it no other way.
_CONVERTIBLE = (*_UNCOMPRESSED, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)


class StoreSessionError(Exception):
    """The association failed: rejected, aborted, timed out or broken."""


class StoreSessionTimeout(StoreSessionError):
    """The peer did not answer, or took nothing, in time."""


class StoreSessionClosed(StoreSessionError):
    """The connection ended under the association: closed, reset, released by the peer, or a
    TLS failure."""


class StoreSessionAborted(StoreSessionError):
    """The peer sent an A-ABORT."""


class StoreSessionRejected(StoreSessionError):
    """The peer rejected the association (A-ASSOCIATE-RJ), or accepted none of its contexts."""


class StoreSessionUnreachable(StoreSessionError):
    """No connection could be made."""


class StoreSessionProtocolError(StoreSessionError):
    """The peer broke the upper layer protocol: the association is aborted by the provider
    (A-ABORT source 2, PS3.8 9.3.8) with this reason (1 unrecognised PDU, 2 unexpected PDU,
    6 invalid PDU parameter value)."""

    def __init__(self, message: str, reason: int = 0x02) -> None:
        super().__init__(message)
        self.reason = reason


class StoreSession:
    """One association to a Storage SCP, used by a single thread (see the module docstring).

    `open` connects and negotiates; `send_c_store` sends one instance and returns the status
    data set of the response (it raises when the instance cannot be sent, and aborts the
    association when it is no longer usable); `release` ends it.
    """

    def __init__(self, sock: socket.socket | None) -> None:
        self._socket = sock
        self.is_established = False
        self.rejection = ""  # why the association was not established
        self.failure: StoreSessionError | None = None  # the same, as the error it was
        self.peer_maximum_pdu = 0  # 0: no limit
        self.accepted: dict[tuple[str, str], int] = {}  # (SOP class, syntax) -> context ID
        self.context_syntax: dict[int, str] = {}  # context ID -> its transfer syntax
        self.context_class: dict[int, str] = {}  # context ID -> its abstract syntax
        self.maximum_received_pdu = MAXIMUM_RECEIVED_PDU
        self._received = bytearray()  # read from the socket, not yet a whole PDU
        self._pending_pdvs: list[tuple[int, int, memoryview]] = []  # not yet taken
        self.stored = 0  # C-STORE sub-operations answered with success or a warning
        self.failures = 0  # the others: a failure status, or the instance could not be sent
        self.acse_timeout: float | None = 30
        self.dimse_timeout: float | None = 30
        self.network_timeout: float | None = 60

    # ------------------------------------------------------------------ association

    @classmethod
    def open(
        cls,
        address: str,
        port: int,
        *,
        calling_ae_title: str,
        called_ae_title: str,
        contexts: Sequence[PresentationContext],
        acse_timeout: float | None = 30,
        dimse_timeout: float | None = 30,
        network_timeout: float | None = 60,
        connection_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        maximum_received_pdu: int = MAXIMUM_RECEIVED_PDU,
        extended_negotiation: Sequence[Any] = (),
    ) -> StoreSession:
        """Connect and request the association. A session that could not be established is
        returned with `is_established` false and `rejection` saying why (pynetdicom's
        `AE.associate` does the same)."""
        session = cls(None)
        session.maximum_received_pdu = maximum_received_pdu
        session.acse_timeout = acse_timeout
        session.dimse_timeout = dimse_timeout
        session.network_timeout = network_timeout
        try:
            sock = socket.create_connection(
                (address, port), timeout=connection_timeout or acse_timeout
            )
        except TimeoutError as exc:
            session.rejection = f"cannot connect to {address}:{port}: {exc or 'timed out'}"
            session.failure = StoreSessionTimeout(session.rejection)
            return session
        except OSError as exc:
            session.rejection = f"cannot connect to {address}:{port}: {exc}"
            session.failure = StoreSessionUnreachable(session.rejection)
            return session
        session._socket = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                session._socket = sock = tls.wrap_socket(
                    sock, server_hostname=server_hostname or address
                )
            session._associate(
                calling_ae_title, called_ae_title, list(contexts), list(extended_negotiation)
            )
        except Exception as exc:  # whatever the peer sent: not associated
            session.rejection = session.rejection or str(exc) or type(exc).__name__
            session.failure = (
                exc
                if isinstance(exc, StoreSessionError)
                else StoreSessionClosed(session.rejection)
                if isinstance(exc, OSError)  # a TLS handshake, a reset
                else StoreSessionProtocolError(session.rejection, reason=0x06)
            )
            if isinstance(exc, StoreSessionProtocolError):
                session._abort_quietly(exc.reason)
            elif not isinstance(exc, OSError | StoreSessionError):  # an answer pynetdicom
                session._abort_quietly(0x06)  # could not decode: an invalid parameter
            session.close()
        return session

    def _associate(
        self,
        calling: str,
        called: str,
        contexts: list[PresentationContext],
        extended_negotiation: list[Any] | None = None,
    ) -> None:
        requested = []
        for number, context in enumerate(contexts):
            proposed = PresentationContext()
            proposed.context_id = 2 * number + 1
            proposed.abstract_syntax = context.abstract_syntax
            proposed.transfer_syntax = list(context.transfer_syntax)
            requested.append(proposed)
        if not 0 < len(requested) <= 128:
            raise StoreSessionError(f"{len(requested)} presentation contexts: 1 to 128 allowed")
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        primitive.calling_ae_title = calling
        primitive.called_ae_title = called
        primitive.presentation_context_definition_list = requested
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.maximum_received_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        primitive.user_information = [
            maximum,
            implementation,
            version,
            *(extended_negotiation or []),
        ]
        request = A_ASSOCIATE_RQ()
        request.from_primitive(primitive)
        self._write([request.encode()], self.network_timeout)

        kind, body = self._read_pdu(self.acse_timeout)
        if kind == _A_ASSOCIATE_RJ:
            rejection = A_ASSOCIATE_RJ()
            rejection.decode(bytes(body))
            answer = rejection.to_primitive()
            self.rejection = (
                f"rejected (result {answer.result}, source {answer.result_source}, "
                f"reason {answer.diagnostic})"
            )
            raise StoreSessionRejected(self.rejection)
        if kind == _A_ABORT:
            self.rejection = "aborted by the peer during negotiation"
            self.close()
            raise StoreSessionAborted(self.rejection)
        if kind != _A_ASSOCIATE_AC:
            raise StoreSessionProtocolError(
                f"unexpected PDU 0x{kind:02X} in answer to A-ASSOCIATE-RQ",
                reason=0x02 if 0x01 <= kind <= 0x07 else 0x01,
            )
        acceptance = A_ASSOCIATE_AC()
        acceptance.decode(bytes(body))
        answer = acceptance.to_primitive()
        for item in answer.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_maximum_pdu = int(item.maximum_length_received or 0)
        results = negotiate_as_requestor(
            requested, answer.presentation_context_definition_results_list
        )
        self.accepted = {
            (str(context.abstract_syntax), str(context.transfer_syntax[0])): int(
                context.context_id or 0
            )
            for context in results
            if context.result == 0x00 and context.transfer_syntax
        }
        self.context_syntax = {
            context_id: syntax for (_sop_class, syntax), context_id in self.accepted.items()
        }
        self.context_class = {
            context_id: sop_class for (sop_class, _syntax), context_id in self.accepted.items()
        }
        if not self.accepted:
            self.rejection = "the peer accepted none of the presentation contexts"
            self._abort_quietly(None)
            raise StoreSessionRejected(self.rejection)
        self.is_established = True

    def is_quiet(self) -> bool:
        """Whether the peer has sent nothing since the last exchange: an idle association the
        peer aborted, released or closed meanwhile has bytes (or the end of the stream) to
        read, which only a read would otherwise notice."""
        sock = self._socket
        if sock is None or not self.is_established or self._received or self._pending_pdvs:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def release(self) -> None:
        """A-RELEASE; the association is aborted when the peer does not answer in time."""
        if not self.is_established:
            self.close()
            return
        self.is_established = False
        try:
            self._write([struct.pack(">BBII", _A_RELEASE_RQ, 0, 4, 0)], self.network_timeout)
            while True:
                kind, _body = self._read_pdu(self.acse_timeout)
                if kind in (_A_RELEASE_RP, _A_ABORT):
                    break
                if kind == _A_RELEASE_RQ:
                    # A release collision (PS3.8 7.2.2, Sta9 -> Sta11): the requestor answers
                    # first, then waits for the acceptor's answer.
                    self._write(
                        [struct.pack(">BBII", _A_RELEASE_RP, 0, 4, 0)], self.network_timeout
                    )
        except (OSError, StoreSessionError) as exc:
            logger.info("A-RELEASE not answered (%s): association aborted", exc)
            self._abort_quietly(None)
        self.close()

    def abort(self, provider_reason: int | None = None) -> None:
        """A-ABORT by the service user, or by the provider with `provider_reason` (a protocol
        error), then the connection closed."""
        self.is_established = False
        self._abort_quietly(provider_reason)
        self.close()

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    @property
    def dul(self) -> StoreSession:
        """pynetdicom's C-MOVE service closes a failed association as
        ``assoc.dul.socket.close()``."""
        return self

    @property
    def socket(self) -> StoreSession:
        return self

    # ------------------------------------------------------------------ C-STORE

    def send_c_store(
        self,
        dataset: Dataset,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        """Store one instance; the status data set of the response (Status, and ErrorComment,
        OffendingElement, ErrorID when the peer gave them)."""
        try:
            status = self._store(dataset, msg_id, priority, originator_aet, originator_id)
        except BaseException:
            self.failures += 1
            raise
        if STORAGE_SERVICE_CLASS_STATUS.get(status.Status, (STATUS_FAILURE,))[0] == STATUS_FAILURE:
            self.failures += 1
        else:
            self.stored += 1
        return status

    def _store(
        self,
        dataset: Dataset,
        msg_id: int,
        priority: int,
        originator_aet: str | None,
        originator_id: int | None,
    ) -> Dataset:
        if not self.is_established:
            raise StoreSessionError("the association is not established")
        sop_class, sop_instance = str(dataset.SOPClassUID), str(dataset.SOPInstanceUID)
        context_id, payload = self._payload(dataset, sop_class)
        command = command_set(
            [
                (0x0002, uid_value(sop_class)),
                (0x0100, us_value(_C_STORE_RQ)),
                (0x0110, us_value(msg_id)),
                (0x0700, us_value(priority)),
                (0x0800, us_value(0x0000)),  # a data set follows
                (0x1000, uid_value(sop_instance)),
                *([(0x1030, ae_value(originator_aet))] if originator_aet else []),
                *([(0x1031, us_value(originator_id))] if originator_id is not None else []),
            ]
        )
        try:
            self._write(
                self._pdvs(context_id, command, is_command=True)
                + self._pdvs(context_id, payload, is_command=False),
                self.network_timeout,
            )
            received = self._read_command(self.dimse_timeout)
            fields = _command_fields(received)
            answers = fields.get(0x0100) == _C_STORE_RSP and fields.get(0x0120) == msg_id
            if not answers or 0x0900 not in fields:
                raise StoreSessionProtocolError(
                    f"unexpected answer to C-STORE {msg_id}: command 0x"
                    f"{fields.get(0x0100, 0):04X}, responding to {fields.get(0x0120)}",
                    reason=0x06,
                )
        except StoreSessionProtocolError as exc:
            self.abort(exc.reason)
            raise
        except BaseException:
            self.abort()  # a PDU may be half-written, or its answer half-read
            raise
        if fields[0x0900] == 0x0000:
            return _SUCCESS
        status = Dataset()
        status.Status = fields[0x0900]
        if status.Status != 0x0000:  # what the peer says of a failure or a warning
            response = decode(io.BytesIO(received), True, True, False)
            for keyword in ("ErrorComment", "OffendingElement", "ErrorID"):
                value = response.get(keyword)
                if value is not None:
                    setattr(status, keyword, value)
        return status

    def _payload(self, dataset: Dataset, sop_class: str) -> tuple[int, memoryview]:
        """The context and the data set bytes to send: as stored when the destination accepts
        the stored transfer syntax, else decoded and re-encoded in an uncompressed one it
        accepts (from an uncompressed or a deflated syntax only: ValueError otherwise)."""
        if isinstance(dataset, EncodedInstance):
            syntax = dataset.meta.transfer_syntax_uid
            context_id = self.accepted.get((sop_class, syntax))
            if context_id is not None:
                payload = memoryview(dataset.encoded)[dataset.meta.dataset_offset :]
                if not payload:
                    raise ValueError(f"{dataset.SOPInstanceUID}: an empty data set")
                return context_id, payload
            if syntax not in _CONVERTIBLE:
                raise ValueError(
                    f"the destination does not accept {sop_class} in transfer syntax {syntax}"
                )
            decoded: Dataset = dcmread(io.BytesIO(dataset.encoded), force=True)
        else:
            decoded = dataset
            meta = getattr(dataset, "file_meta", None)
            syntax = str(getattr(meta, "TransferSyntaxUID", "") or ExplicitVRLittleEndian)
            context_id = self.accepted.get((sop_class, syntax))
            if context_id is not None:
                return context_id, _encoded(decoded, syntax)
            if syntax not in _CONVERTIBLE:
                raise ValueError(
                    f"the destination does not accept {sop_class} in transfer syntax {syntax}"
                )
        for target in _UNCOMPRESSED:
            context_id = self.accepted.get((sop_class, target))
            if context_id is not None:
                return context_id, _encoded(decoded, target)
        raise ValueError(f"the destination accepted no context for {sop_class}")

    def _pdvs(
        self, context_id: int, data: bytes | memoryview, *, is_command: bool
    ) -> list[bytes | memoryview]:
        """P-DATA-TF PDUs of one PDV each (PS3.8 9.3.5, E.2): headers and the fragments of
        `data`, no PDU larger than the peer takes."""
        view = memoryview(data)
        size = (self.peer_maximum_pdu - 6) if self.peer_maximum_pdu > 6 else max(len(view), 1)
        buffers: list[bytes | memoryview] = []
        for start in range(0, max(len(view), 1), size):
            piece = view[start : start + size]
            control = (0x01 if is_command else 0x00) | (0x02 if start + size >= len(view) else 0)
            buffers.append(
                struct.pack(
                    ">BBIIBB", _P_DATA_TF, 0, len(piece) + 6, len(piece) + 2, context_id, control
                )
            )
            buffers.append(piece)
        return buffers

    def _read_command(self, timeout: float | None) -> bytes:
        """The next DIMSE command set, from as many P-DATA PDVs as it takes."""
        fragments: list[bytes] = []
        while True:
            kind, pdu = self._read_pdu(timeout)
            if kind == _A_ABORT:
                self.is_established = False
                raise StoreSessionAborted("the destination aborted the association")
            if kind == _A_RELEASE_RQ:
                self.is_established = False
                with contextlib.suppress(OSError, StoreSessionError):
                    self._write(
                        [struct.pack(">BBII", _A_RELEASE_RP, 0, 4, 0)], self.network_timeout
                    )
                self.close()
                raise StoreSessionClosed("the destination released the association")
            if kind != _P_DATA_TF:
                raise StoreSessionProtocolError(
                    f"unexpected PDU 0x{kind:02X} during C-STORE",
                    reason=0x02 if 0x01 <= kind <= 0x07 else 0x01,
                )
            offset = 6  # each item: length, context ID, control header, fragment
            while offset + 6 <= len(pdu):
                (length,) = struct.unpack_from(">I", pdu, offset)
                control = pdu[offset + 5]
                if length < 2 or offset + 4 + length > len(pdu):
                    raise StoreSessionProtocolError("malformed P-DATA-TF item", reason=0x06)
                if not control & 0x01:
                    raise StoreSessionProtocolError("a data set in answer to C-STORE")
                fragments.append(bytes(pdu[offset + 6 : offset + 4 + length]))
                offset += 4 + length
                if control & 0x02:
                    return b"".join(fragments)
            if offset != len(pdu):
                raise StoreSessionProtocolError("malformed P-DATA-TF PDU", reason=0x06)

    # ------------------------------------------------------------------ C-GET

    def c_get(
        self,
        identifier: Dataset,
        model: str,
        *,
        source_ae_title: str,
        msg_id: int = 1,
        priority: int = 2,
    ) -> Generator[bytes, None, Dataset]:
        """C-GET (PS3.4 C.4.3) on this association, whose storage contexts were proposed with
        the SCP role: each instance the peer sends back by C-STORE, as a Part 10 file (its data
        set as received, the meta group written here), answered with success once received;
        then, as the generator's value, the final C-GET-RSP status data set (Status and the
        sub-operation counts). Closing the generator early aborts the association."""
        finished = False
        try:
            self._request(_C_GET_RQ, model, identifier, msg_id, priority)
            while True:
                context, received, data = self._read_message(self.dimse_timeout)
                fields = _command_fields(received)
                kind = fields.get(0x0100)
                if kind == _C_STORE_RQ:
                    instance = self._stored(context, received, fields, data, source_ae_title)
                    data = None  # not held while the caller has the instance
                    yield instance
                    continue
                if kind != _C_GET_RSP or fields.get(0x0120) != msg_id or 0x0900 not in fields:
                    raise StoreSessionProtocolError(
                        f"unexpected message 0x{kind or 0:04X} during C-GET {msg_id}",
                        reason=0x06,
                    )
                if fields[0x0900] in (0xFF00, 0xFF01):  # pending: the counts so far
                    continue
                finished = True
                return _get_status(received, fields)
        except StoreSessionProtocolError as exc:
            self.abort(exc.reason)
            raise
        finally:
            if not finished:
                self.abort()  # closed early, or failed: the association is no longer usable

    def c_find(
        self, identifier: Dataset, model: str, *, msg_id: int = 1, priority: int = 2
    ) -> Generator[Dataset, None, Dataset]:
        """C-FIND (PS3.4 C.4.1) on this association: each match's identifier as the peer sends
        it (a pending response), decoded; then, as the generator's value, the final C-FIND-RSP
        status data set. Closing the generator early aborts the association."""
        finished = False
        try:
            syntax = self._request(_C_FIND_RQ, model, identifier, msg_id, priority)
            while True:
                context, received, data = self._read_message(self.dimse_timeout)
                fields = _command_fields(received)
                if (
                    fields.get(0x0100) != _C_FIND_RSP
                    or fields.get(0x0120) != msg_id
                    or 0x0900 not in fields
                ):
                    raise StoreSessionProtocolError(
                        f"unexpected message 0x{fields.get(0x0100, 0):04X} during C-FIND {msg_id}",
                        reason=0x06,
                    )
                if fields[0x0900] in (0xFF00, 0xFF01):  # pending: a match
                    if data:
                        yield _decoded(b"".join(data), self.context_syntax.get(context, syntax))
                    continue
                finished = True
                return _get_status(received, fields)
        except StoreSessionProtocolError as exc:
            self.abort(exc.reason)
            raise
        finally:
            if not finished:
                self.abort()

    def _request(
        self, command_field: int, model: str, identifier: Dataset, msg_id: int, priority: int
    ) -> str:
        """Send a C-FIND or C-GET request with its identifier, on the model's context; that
        context's transfer syntax."""
        if not self.is_established:
            raise StoreSessionError("the association is not established")
        context_id, syntax = self._context_of(model)
        command = command_set(
            [
                (0x0002, uid_value(model)),
                (0x0100, us_value(command_field)),
                (0x0110, us_value(msg_id)),
                (0x0700, us_value(priority)),
                (0x0800, us_value(0x0000)),  # an identifier follows
            ]
        )
        self._write(
            self._pdvs(context_id, command, is_command=True)
            + self._pdvs(context_id, _encoded(identifier, syntax), is_command=False),
            self.network_timeout,
        )
        return syntax

    def _stored(
        self,
        context_id: int,
        received: bytes,
        fields: dict[int, int],
        data: list[memoryview] | None,
        source_ae_title: str,
    ) -> bytes:
        """A C-STORE sub-operation of a C-GET: its instance as a Part 10 file, after its
        C-STORE-RSP (success) is sent."""
        syntax = self.context_syntax.get(context_id)
        uids = _command_uids(received)
        sop_class, sop_instance = uids.get(0x0002), uids.get(0x1000)
        if syntax is None or not data or sop_class is None or not sop_instance:
            raise StoreSessionProtocolError("a C-STORE-RQ without context, UIDs or data set")
        if 0x0110 not in fields:
            raise StoreSessionProtocolError("a C-STORE-RQ without a message ID", reason=0x06)
        if self.context_class.get(context_id) != sop_class.rstrip(b"\0 ").decode("latin-1"):
            raise StoreSessionProtocolError(
                "a C-STORE-RQ on a presentation context of another SOP class", reason=0x06
            )
        try:
            header = part10_header(
                sop_class_uid=sop_class.decode("ascii").rstrip("\0 "),
                sop_instance_uid=sop_instance.decode("ascii").rstrip("\0 "),
                transfer_syntax_uid=syntax,
                implementation_class_uid=RELAIS_IMPLEMENTATION_CLASS_UID,
                implementation_version_name=RELAIS_IMPLEMENTATION_VERSION_NAME,
                source_ae_title=source_ae_title,
            )
        except (UnicodeError, ValueError):  # a UID that is not ASCII: pydicom writes the meta
            instance = _part10_by_pydicom(
                b"".join(data), syntax, sop_class, sop_instance, source_ae_title
            )
        else:  # the fragments as received, copied once, after the meta group
            instance = b"".join((header, *data))
        response = command_set(
            [
                (0x0002, _even(sop_class)),
                (0x0100, us_value(_C_STORE_RSP)),
                (0x0120, us_value(fields[0x0110])),
                (0x0800, us_value(0x0101)),  # no data set
                (0x0900, us_value(0x0000)),
                (0x1000, _even(sop_instance)),
            ]
        )
        self._write(self._pdvs(context_id, response, is_command=True), self.network_timeout)
        return instance

    def _context_of(self, sop_class: str) -> tuple[int, str]:
        for (abstract, syntax), context_id in self.accepted.items():
            if abstract == sop_class:
                return context_id, syntax
        raise StoreSessionError(f"the peer accepted no context for {sop_class}")

    def _read_message(self, timeout: float | None) -> tuple[int, bytes, list[memoryview] | None]:
        """The peer's next DIMSE message: its presentation context, its command set and its
        data set's fragments as received (None when the command says there is none: joined by
        the caller, once), from as many P-DATA PDVs as it takes."""
        command: list[memoryview] = []
        data: list[memoryview] = []
        command_size = data_size = 0
        context_id = 0
        wants_data: bool | None = None  # known once the command set is whole
        while True:
            items = self._next_pdvs(timeout)
            for index, (context, control, fragment) in enumerate(items):
                if wants_data is None:
                    if not control & 0x01:
                        raise StoreSessionProtocolError("a data set before its command")
                    if command and context != context_id:
                        raise StoreSessionProtocolError("a command set across contexts")
                    context_id = context
                    command_size += len(fragment)
                    if command_size > _LARGEST_COMMAND_SET:
                        raise StoreSessionProtocolError("a command set that does not end")
                    command.append(fragment)
                    if control & 0x02:
                        whole = b"".join(command)
                        wants_data = _command_fields(whole).get(0x0800, 0x0101) != 0x0101
                        if not wants_data:
                            self._pending_pdvs = items[index + 1 :]
                            return context_id, whole, None
                    continue
                if control & 0x01 or context != context_id:
                    raise StoreSessionProtocolError("a command where a data set was due")
                # What is held counts each fragment's view too: a peer sending endless tiny
                # PDVs is stopped like one sending a data set too large.
                data_size += len(fragment) + _FRAGMENT_OVERHEAD
                if data_size > LARGEST_INSTANCE:
                    raise StoreSessionProtocolError(
                        f"a data set larger than {LARGEST_INSTANCE} bytes", reason=0x06
                    )
                if fragment:  # an empty data set stays empty (no fragment), as the checks expect
                    data.append(fragment)
                if control & 0x02:
                    self._pending_pdvs = items[index + 1 :]
                    return context_id, b"".join(command), data

    def _next_pdvs(self, timeout: float | None) -> list[tuple[int, int, memoryview]]:
        """The PDVs of the next P-DATA-TF PDU (or those left of the last one)."""
        if self._pending_pdvs:
            pending, self._pending_pdvs = self._pending_pdvs, []
            return pending
        kind, pdu = self._read_pdu(timeout)
        if kind == _A_ABORT:
            self.is_established = False
            self.close()
            raise StoreSessionAborted("the peer aborted the association")
        if kind == _A_RELEASE_RQ:
            self.is_established = False
            with contextlib.suppress(OSError, StoreSessionError):
                self._write([struct.pack(">BBII", _A_RELEASE_RP, 0, 4, 0)], self.network_timeout)
            self.close()
            raise StoreSessionClosed("the peer released the association")
        if kind != _P_DATA_TF:
            raise StoreSessionProtocolError(
                f"unexpected PDU 0x{kind:02X}", reason=0x02 if 0x01 <= kind <= 0x07 else 0x01
            )
        items: list[tuple[int, int, memoryview]] = []
        view = memoryview(pdu)
        offset = 6
        while offset + 6 <= len(pdu):
            (length,) = struct.unpack_from(">I", pdu, offset)
            if length < 2 or offset + 4 + length > len(pdu):
                raise StoreSessionProtocolError("malformed P-DATA-TF item", reason=0x06)
            # a view of the PDU's bytes: each fragment is copied once, when its message is joined
            items.append((pdu[offset + 4], pdu[offset + 5], view[offset + 6 : offset + 4 + length]))
            offset += 4 + length
        if offset != len(pdu) or not items:
            raise StoreSessionProtocolError("malformed P-DATA-TF PDU", reason=0x06)
        return items

    # ------------------------------------------------------------------ transport

    def _read_pdu(self, timeout: float | None) -> tuple[int, bytes | bytearray]:
        """The type and the bytes (header included) of the peer's next PDU.

        A PDU that the bytes already read do not hold whole is read into its own buffer; one
        they hold (responses, which often come several to a read) is cut from them. On a
        session that takes long PDUs (a C-GET's instance data: DCMTK sends 128 KiB ones) with
        nothing read ahead, the header is read alone: such a PDU then goes from the socket to
        its buffer in one copy."""
        self._connected().settimeout(timeout)
        if not self._received and self.maximum_received_pdu > _RECEIVE_CHUNK:
            header = bytearray(6)
            with memoryview(header) as view:
                got = 0
                while got < 6:
                    got += self._recv_into(view[got:])
            self._received += header
        else:
            self._fill(6)
        kind, _reserved, length = struct.unpack_from(">BBI", self._received)
        if length > max(_LARGEST_PDU_READ, self.maximum_received_pdu):
            raise StoreSessionProtocolError(
                f"a PDU of {length} bytes, more than the {self.maximum_received_pdu} offered",
                reason=0x06,
            )
        total = 6 + length
        if length <= _RECEIVE_CHUNK:  # a short one: read with what follows it, if it has come
            self._fill(total)
        have = len(self._received)
        if have >= total:
            with memoryview(self._received) as view:
                pdu = bytes(view[:total])
            del self._received[:total]
            return kind, pdu
        whole = bytearray(total)
        whole[:have] = self._received
        self._received.clear()
        with memoryview(whole) as view:
            while have < total:
                have += self._recv_into(view[have:])
        return kind, whole

    def _recv_into(self, view: memoryview) -> int:
        """Read what the socket has, at most ``len(view)`` bytes, into ``view``."""
        try:
            count: int = self._connected().recv_into(view)
        except OSError as exc:
            self._read_failed(exc)
        return count or self._closed_by_peer()

    def _fill(self, size: int) -> None:
        """Read until `size` bytes are waiting."""
        sock = self._connected()
        while len(self._received) < size:
            try:
                chunk: bytes = sock.recv(max(_RECEIVE_CHUNK, size - len(self._received)))
            except OSError as exc:
                self._read_failed(exc)
            self._received += chunk or self._closed_by_peer()

    def _read_failed(self, exc: OSError) -> NoReturn:
        """A read from the peer's socket that failed, as the session's error (no context
        manager around the reads: they are the C-GET's hot path)."""
        if isinstance(exc, TimeoutError):
            raise StoreSessionTimeout("the peer did not answer in time") from exc
        self.is_established = False  # reset, a TLS failure
        raise StoreSessionClosed(f"the connection failed: {exc}") from exc

    def _closed_by_peer(self) -> NoReturn:
        """A read of nothing: the peer closed the connection."""
        self.is_established = False
        raise StoreSessionClosed("the peer closed the connection")

    def _write(self, buffers: list[bytes | memoryview], timeout: float | None) -> None:
        """Write every buffer; a peer that takes nothing for `timeout` s fails the write."""
        sock = self._connected()
        sock.settimeout(timeout)
        try:
            if isinstance(sock, ssl.SSLSocket):  # no vectored write over TLS
                for buffer in buffers:
                    sock.sendall(buffer)
                return
            views: list[memoryview] = [memoryview(b) for b in buffers]
            views = [view for view in views if view.nbytes]
            while views:
                sent = sock.sendmsg(views[:_BUFFERS_PER_WRITE])
                while sent:
                    if sent >= views[0].nbytes:
                        sent -= views.pop(0).nbytes
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except TimeoutError as exc:
            raise StoreSessionTimeout(f"the peer took nothing for {timeout:g} s") from exc
        except OSError as exc:  # reset, broken pipe, a TLS failure
            self.is_established = False
            raise StoreSessionClosed(f"the connection failed: {exc}") from exc

    def _connected(self) -> _Socket:
        if self._socket is None:
            raise StoreSessionError("the association is closed")
        return self._socket

    def _abort_quietly(self, provider_reason: int | None) -> None:
        """A-ABORT (PS3.8 9.3.8): by the service user, or by the provider with a reason."""
        if self._socket is None:
            return
        abort = A_ABORT_RQ()
        abort.source = 0x00 if provider_reason is None else 0x02
        abort.reason_diagnostic = 0x00 if provider_reason is None else provider_reason
        with contextlib.suppress(OSError, StoreSessionError):
            self._write([abort.encode()], 1.0)


class _ReadOnlyDataset(Dataset):
    """A data set that cannot change once frozen: shared by every caller."""

    def _refuse(self) -> None:
        if "_frozen" in self.__dict__:
            raise AttributeError("a shared status data set: not to be modified")

    def __setattr__(self, name: str, value: object) -> None:
        self._refuse()
        super().__setattr__(name, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._refuse()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._refuse()
        super().__delitem__(key)

    def __delattr__(self, name: str) -> None:
        self._refuse()
        super().__delattr__(name)

    def freeze(self) -> _ReadOnlyDataset:
        self.__dict__["_frozen"] = True
        return self


def _success() -> Dataset:
    status = _ReadOnlyDataset()
    status.Status = 0x0000
    return status.freeze()


# The status of most sub-operations, built once: a pydicom data set costs about 20 µs to make,
# a sixth of the relay's own time per instance.
_SUCCESS = _success()


def _encoded(dataset: Dataset, syntax: str) -> memoryview:
    """`dataset` encoded in `syntax` (ValueError when pydicom cannot, or it is empty)."""
    encoded = encode(
        dataset,
        syntax == ImplicitVRLittleEndian,
        syntax != ExplicitVRBigEndian,
        syntax == DeflatedExplicitVRLittleEndian,
    )
    if not encoded:
        raise ValueError(f"{dataset.get('SOPInstanceUID', '')}: cannot be encoded in {syntax}")
    return memoryview(encoded)


def _command_fields(command_set: bytes) -> dict[int, int]:
    """The US elements of a command set (implicit VR little endian) by element number: a
    C-STORE-RSP's command field, message ID responded to and status, read without building a
    pydicom data set for each of a move's thousands of responses."""
    fields: dict[int, int] = {}
    offset = 0
    while offset + 8 <= len(command_set):
        group, element, length = struct.unpack_from("<HHI", command_set, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(command_set):
            raise StoreSessionProtocolError("malformed command set", reason=0x06)
        if length == 2:
            (fields[element],) = struct.unpack_from("<H", command_set, offset)
        offset += length
    return fields


def _decoded(data: bytes, syntax: str) -> Dataset:
    """A data set received (an identifier), decoded by pydicom as pynetdicom decodes it."""
    return decode(
        io.BytesIO(data),
        syntax == ImplicitVRLittleEndian,
        syntax != ExplicitVRBigEndian,
        syntax == DeflatedExplicitVRLittleEndian,
    )


def _command_uids(command_set: bytes) -> dict[int, bytes]:
    """The raw values (padding kept) of a command set's UI elements, by element number."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command_set):
        _group, element, length = struct.unpack_from("<HHI", command_set, offset)
        offset += 8
        if element in (0x0002, 0x1000):
            values[element] = command_set[offset : offset + length]
        offset += length
    return values


def _even(raw: bytes) -> bytes:
    return raw + b"\0" if len(raw) % 2 else raw


def _get_status(received: bytes, fields: dict[int, int]) -> Dataset:
    """A final C-GET-RSP as a status data set: Status, the sub-operation counts, and what the
    peer says of a failure."""
    status = Dataset()
    status.Status = fields[0x0900]
    for element, keyword in (
        (0x1020, "NumberOfRemainingSuboperations"),
        (0x1021, "NumberOfCompletedSuboperations"),
        (0x1022, "NumberOfFailedSuboperations"),
        (0x1023, "NumberOfWarningSuboperations"),
    ):
        if element in fields:
            setattr(status, keyword, fields[element])
    if status.Status != 0x0000:
        response = decode(io.BytesIO(received), True, True, False)
        for keyword in ("ErrorComment", "OffendingElement", "ErrorID"):
            value = response.get(keyword)
            if value is not None:
                setattr(status, keyword, value)
    return status


def _part10_by_pydicom(
    data: bytes, syntax: str, sop_class: bytes, sop_instance: bytes, source_ae_title: str
) -> bytes:
    """The Part 10 file pynetdicom would write (its meta group by pydicom), for the rare
    instance whose UIDs are not ASCII."""
    with warnings.catch_warnings():  # pydicom warns of the invalid UID it is asked to keep
        warnings.simplefilter("ignore", UserWarning)
        return _meta_by_pydicom(data, syntax, sop_class, sop_instance, source_ae_title)


def _meta_by_pydicom(
    data: bytes, syntax: str, sop_class: bytes, sop_instance: bytes, source_ae_title: str
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class.decode("latin-1").rstrip("\0 "))
    meta.MediaStorageSOPInstanceUID = UID(sop_instance.decode("latin-1").rstrip("\0 "))
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(RELAIS_IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = RELAIS_IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = source_ae_title
    buffer = DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return bytes(buffer.getvalue()) + data
