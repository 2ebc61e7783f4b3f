"""What every DICOM association of the broker needs, whichever side opens it.

pynetdicom leaves Nagle's algorithm on, on the sockets it opens and on those it accepts: each
DIMSE exchange then waits ~40 ms for a delayed ACK. `NODELAY_HANDLERS` (bind them to every
`AE.associate` and `AE.start_server`) turn it off as soon as the connection opens, before
the A-ASSOCIATE exchange. `tls_server_context` / `tls_client_context` build the contexts for
DICOM over TLS (PS3.15 B.1, the BCP 195 profile): TLS 1.2 at least, peer certificates
checked against the configured CA.

`RelaisAE` is the AE of every association the broker requests (to an archive, to a C-MOVE
destination). Its associations close their socket when the connection fails, and their reactor
thread cannot take the response to a request (`PauseSafeAssociation`).
"""

from __future__ import annotations

import contextlib
import io
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom import association as pynetdicom_association
from pynetdicom import dul as pynetdicom_dul
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AddressInformation, AssociationSocket

from broker.dicom.part10 import FileMeta

# pynetdicom's own handlers log every PDU and DIMSE message it sends or receives (a summary
# built for each, at INFO level): a measurable share of a C-MOVE's CPU. It also logs every
# query's and every answer's identifier, element by element: patient names and IDs in the
# logs, and a sixth of a DIMSE harvest's CPU. The broker logs and audits what matters
# itself; pynetdicom's warnings and errors are still logged.
_config.LOG_HANDLER_LEVEL = "none"
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

# pynetdicom's threads poll: each association's DUL thread (`_run_loop_delay`, 1 ms by
# default) and its reactor (a hard-coded 1 ms). On a busy association every PDU and every
# request waits for them: an SCP answering C-STOREs one after another loses about a tenth of
# its rate to the reactor alone. Polling faster costs CPU and the GIL for nothing: sixteen
# idle association ends took 1.3 cores at 0.1 ms, 1.0 even at pynetdicom's 1 ms.
#
# So the associations of the broker (those bound to `NODELAY_HANDLERS`) do not poll; their
# threads sleep until there is work:
# - the DUL thread, until its socket has data or another thread queues something for it (a
#   PDU to send, an event, a request to stop): `_WakingDUL`;
# - the reactor of an association the broker accepts or requests (`RelaisAE`), until the
#   DUL thread hands it a DIMSE message, an A-RELEASE or an A-ABORT, a request begins (the
#   reactor parks for it), or the association is killed: `_WakingAssociation`.
# Either wakes at least every `WAKING_TURN` anyway, for pynetdicom's timers (ARTIM, the
# network timeout) and for what changes without a wake (a DUL thread that ends on an error).
# The reactor of an association that another AE (pynetdicom's own) requests keeps its 1 ms
# turn, `IDLE_LOOP_DELAY` once it has been idle for `BUSY_SECONDS`.
WAKING_TURN = 0.1
IDLE_LOOP_DELAY = 0.01
BUSY_SECONDS = 1.0


def _busy(dul: object) -> bool:
    """Whether the association received anything within `BUSY_SECONDS` (pynetdicom restarts
    its idle timer on every PDU received)."""
    started = getattr(getattr(dul, "_idle_timer", None), "_start_time", None)
    return started is None or time.time() - started < BUSY_SECONDS


class _ReactorClock:
    """`time`, as pynetdicom.association sees it: the reactor's 1 ms turn spent waiting for
    work on a `_WakingAssociation`, lengthened on another that has been idle."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == 0.001:  # the reactor's turn
            thread = threading.current_thread()
            if isinstance(thread, _WakingAssociation):
                thread.wait_for_work()
                return
            if not _busy(getattr(thread, "dul", None)):
                seconds = IDLE_LOOP_DELAY
        time.sleep(seconds)


class _DULClock:
    """`time`, as pynetdicom.dul sees it: a `_WakingDUL` thread waits for work instead of
    sleeping; any other thread sleeps."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, _WakingDUL):
            thread.wait_for_work(WAKING_TURN)
        else:
            time.sleep(seconds)


setattr(pynetdicom_association, "time", _ReactorClock())  # noqa: B010 - a module global
setattr(pynetdicom_dul, "time", _DULClock())  # noqa: B010 - a module global


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose `put` wakes the thread that reads it (`_wake`)."""

    _wake: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _waking(queue_: queue.Queue, wake: Callable[[], None]) -> None:  # type: ignore[type-arg]
    queue_._wake = wake  # type: ignore[attr-defined]
    queue_.__class__ = _WakingQueue


class _WakingCheckpoint(threading.Event):
    """An association's reactor checkpoint whose `clear` (a request beginning, which waits
    for the reactor to park) wakes the reactor (`_wake`)."""

    _wake: Callable[[], None]

    def clear(self) -> None:
        super().clear()
        self._wake()


class _WakePair:
    """The socket pair that wakes a `_WakingDUL` thread polling its reading end: other threads
    write a byte to it. Closed once, under the lock the writers take, so that no late writer
    writes to a descriptor number reused meanwhile."""

    def __init__(self) -> None:
        self.reading, self._writing = socket.socketpair()
        self.reading.setblocking(False)
        self._writing.setblocking(False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # full: the thread has bytes to wake it
                    self._writing.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):  # nothing more to read
            while self.reading.recv(4096):
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.reading.close()
            self._writing.close()


class _WakingDUL(DULServiceProvider):
    """A DUL thread that waits for its socket or for work instead of polling (see above).

    Another thread wakes it through a `_WakePair` after it queues a primitive or an event, or
    asks the thread to stop. The pair is closed as the thread ends: as its state machine stops
    it, as it finds itself told to stop when it would wait, once `stop_dul` or the
    association's `kill` has seen it end; at the latest when the provider is collected."""

    _wake_pair: _WakePair

    def _wake(self) -> None:
        if threading.current_thread() is not self:
            self._wake_pair.wake()

    def wait_for_work(self, timeout: float) -> None:
        if not self._kill_thread:
            self._wait(timeout)
        if self._kill_thread:  # the reactor ends as this returns
            self._wake_pair.close()

    def _wait(self, timeout: float) -> None:
        poll = select.poll()  # not select(): no limit on descriptor numbers
        poll.register(self._wake_pair.reading, select.POLLIN)
        sock = getattr(self.socket, "socket", None)
        if sock is not None:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes wait in the TLS layer, not on the socket
            if sock.fileno() >= 0:
                poll.register(sock, select.POLLIN)
        if poll.poll(timeout * 1000):
            self._wake_pair.drain()

    def kill_dul(self) -> None:
        super().kill_dul()
        if threading.current_thread() is self:  # its state machine: the reactor ends next turn
            self._wake_pair.close()
        else:
            self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        stopped = super().stop_dul()  # True once the thread has ended
        if stopped:
            self._wake_pair.close()
        return stopped


def _make_waking(dul: DULServiceProvider) -> None:
    try:
        pair = _WakePair()
    except OSError:  # out of descriptors: this one polls, as pynetdicom's do
        return
    weakref.finalize(dul, pair.close)
    dul._wake_pair = pair  # type: ignore[attr-defined]
    dul.__class__ = _WakingDUL
    waking = cast(_WakingDUL, dul)
    _waking(dul.to_provider_queue, waking._wake)
    _waking(dul.event_queue, waking._wake)


class _WakingAssociation(Association):
    """An association whose reactor thread sleeps until it has work (see above): its DUL
    thread queues a message for it, a request begins (the reactor parks for it), or the
    association is killed. For the associations the broker accepts, and those it requests
    (`PauseSafeAssociation`)."""

    _relais_work: threading.Event | None = None  # from the connection's opening

    def _install_work(self) -> None:
        work = threading.Event()
        _waking(self.dul.to_user_queue, work.set)
        _waking(self.dimse.msg_queue, work.set)
        checkpoint = self._reactor_checkpoint
        if type(checkpoint) is threading.Event:
            cast(_WakingCheckpoint, checkpoint)._wake = work.set
            checkpoint.__class__ = _WakingCheckpoint
        self._relais_work = work

    def wait_for_work(self) -> None:
        work = self._relais_work
        if work is None:  # never connected
            time.sleep(IDLE_LOOP_DELAY)
            return
        if self.dimse.msg_queue.qsize():  # the reactor takes one message a turn
            return
        work.wait(WAKING_TURN)
        # What set it is on a queue, or the checkpoint, that the reactor reads next; what sets
        # it from here on wakes the next wait.
        work.clear()

    def kill(self) -> None:
        super().kill()
        if self._relais_work is not None:
            self._relais_work.set()
        dul = self.dul
        if isinstance(dul, _WakingDUL) and not dul.is_alive():  # however it ended
            dul._wake_pair.close()


def _set_nodelay(event: Any) -> None:
    assoc = event.assoc
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if type(assoc.dul.socket) is AssociationSocket:  # an accepted connection's
        assoc.dul.socket.__class__ = _ClosingSocket
    if type(assoc.dul) is DULServiceProvider:
        _make_waking(assoc.dul)
    if assoc.is_acceptor and type(assoc) is Association:
        assoc.__class__ = _WakingAssociation
    if isinstance(assoc, _WakingAssociation) and assoc._relais_work is None:
        assoc._install_work()


NODELAY_HANDLERS: list[tuple[Any, Any]] = [(evt.EVT_CONN_OPEN, _set_nodelay)]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one side of DICOM over TLS."""

    certificate: Path
    private_key: Path
    ca_certificates: Path


def tls_server_context(
    files: TLSFiles, *, require_client_certificate: bool = True
) -> ssl.SSLContext:
    """The broker's SCP side: its own certificate, and the peers' checked against the CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.certificate), str(files.private_key))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return context


def tls_client_context(files: TLSFiles | None, *, ca_certificates: Path) -> ssl.SSLContext:
    """The broker as an SCU: the archive's certificate checked against the CA, and the
    broker's own certificate presented when it has one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files is not None:
        context.load_cert_chain(str(files.certificate), str(files.private_key))
    return context


class PauseSafeAssociation(_WakingAssociation):
    """An association whose reactor thread cannot take the response to a request.

    pynetdicom 3.0 pauses an association's reactor thread before each request (C-ECHO,
    C-FIND, C-MOVE, C-STORE...) by clearing its checkpoint and waiting for ``_is_paused``, a
    flag the reactor sets when it parks and clears when it wakes. After the previous request
    sets the checkpoint again, the flag stays true until the woken reactor runs: the next
    request goes ahead, and the reactor takes its first response off the DIMSE queue
    ("Received unexpected C-FIND / C-STORE service message"). A query loses a match; a
    C-STORE waits for a response that never comes, and a C-MOVE fails after the
    destination's timeout (pynetdicom issue 875; seen in the archive client, and in the
    C-MOVE sub-operations about once in 30 moves of 200 instances).

    Here the reactor reads the DIMSE queue through a gate: while a request holds the
    association (the checkpoint cleared), it reads nothing. The request goes ahead as soon as
    a read the reactor may have begun before is over (the gate's lock), without waiting for
    the reactor to come round and park, which costs about a millisecond a request.
    """

    def _install_gate(self) -> None:
        self._dimse_gate = threading.Lock()
        provider = self.dimse
        take = provider.get_msg

        def get_msg(block: bool = False) -> Any:
            if threading.current_thread() is not self:
                return take(block)
            with self._dimse_gate:
                if not self._reactor_checkpoint.is_set():
                    return None, None
                return take(block)

        provider.get_msg = get_msg  # type: ignore[method-assign]

    def send_c_store(  # type: ignore[override]
        self,
        dataset: Dataset,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        """C-STORE; an `EncodedInstance` is decoded first (the C-MOVE relay sends it as
        stored, through `store_session.StoreSession`)."""
        if isinstance(dataset, EncodedInstance):
            dataset = dataset.decoded()
        return super().send_c_store(dataset, msg_id, priority, originator_aet, originator_id)

    @property
    def _is_paused(self) -> bool:
        if not self._reactor_checkpoint.is_set():
            with self._dimse_gate:  # a read the reactor began before is over
                return True
        return bool(self.__dict__.get("_is_paused", False))

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:
        self.__dict__["_is_paused"] = value


class EncodedInstance(Dataset):
    """An instance to send by C-STORE as it is stored (Part 10 bytes), not decoded.

    It is a `Dataset` whose only attributes are SOP Class and SOP Instance UID, read from its
    meta group, so that pynetdicom's C-MOVE service (which sends what a handler yields, and
    lists failed instances) takes it; `store_session.StoreSession.send_c_store` sends its data
    set bytes as they are.
    """

    encoded: bytes
    meta: FileMeta

    def __init__(self, data: bytes, meta: FileMeta) -> None:
        super().__init__()
        object.__setattr__(self, "encoded", data)
        object.__setattr__(self, "meta", meta)

    @property
    def SOPClassUID(self) -> str:
        return self.meta.sop_class_uid

    @property
    def SOPInstanceUID(self) -> str:
        return self.meta.sop_instance_uid

    def __bool__(self) -> bool:  # no element of its own, yet not empty (pynetdicom tests it)
        return True

    def decoded(self) -> Dataset:
        return dcmread(io.BytesIO(self.encoded), force=True)


class _ClosingSocket(AssociationSocket):
    """pynetdicom 3.0.4 never closes the socket of a connection that failed or that the peer
    closed first (its `_shutdown_socket` calls `shutdown`, which raises on an unconnected
    socket, and skips `close`): a ResourceWarning, and a descriptor held until the collector
    runs, for every unreachable peer and every peer that aborts. Close it regardless. The
    sockets of associations the broker requests (`RelaisAE`) and of those it accepts
    (`NODELAY_HANDLERS`) are these."""

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()


class RelaisAE(AE):
    """The AE of the associations the broker requests (see the module docstring)."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        # Called by `AE.associate` before the association's threads start.
        assoc.__class__ = PauseSafeAssociation
        cast(PauseSafeAssociation, assoc)._install_gate()
        if type(assoc.dimse) is DIMSEServiceProvider:  # a C-GET's C-STOREs answered fast
            assoc.dimse.__class__ = StoreResponseDIMSE
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (group 0000, implicit VR little endian, PS3.7 6.3.1) from its
    (element, encoded value) pairs in ascending order, with its group length: for the
    messages the broker sends by the thousand, which pydicom takes about 0.3 ms to encode."""
    body = b"".join(
        struct.pack("<HHI", 0x0000, element, len(value)) + value for element, value in elements
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def uid_value(uid: str) -> bytes:
    """A UI value, padded to an even length with a NUL."""
    data = uid.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def ae_value(title: str) -> bytes:
    """An AE value, padded to an even length with a space."""
    data = title.encode("ascii")
    return data + b" " if len(data) % 2 else data


def us_value(number: int) -> bytes:
    return struct.pack("<H", number)


def store_response_command(response: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2) carrying a status alone; None when
    it has more to say (an error comment, an offending element), is not a response, or echoes
    a UID that is not ASCII (invalid, but a peer may send one)."""
    if (
        response.MessageIDBeingRespondedTo is None
        or response.Status is None
        or response.ErrorComment is not None
        or response.OffendingElement is not None
        or not str(response.AffectedSOPClassUID or "").isascii()
        or not str(response.AffectedSOPInstanceUID or "").isascii()
    ):
        return None  # pynetdicom's encoding, whatever it makes of it
    elements = []
    if response.AffectedSOPClassUID:
        elements.append((0x0002, uid_value(str(response.AffectedSOPClassUID))))
    elements += [
        (0x0100, us_value(0x8001)),  # C-STORE-RSP
        (0x0120, us_value(int(response.MessageIDBeingRespondedTo))),
        (0x0800, us_value(0x0101)),  # no data set
        (0x0900, us_value(int(response.Status))),
    ]
    if response.AffectedSOPInstanceUID:
        elements.append((0x1000, uid_value(str(response.AffectedSOPInstanceUID))))
    return command_set(elements)


@dataclass(frozen=True)
class StoreRequestCommand:
    """The command set of a C-STORE-RQ (PS3.7 9.3.1.1), decoded by `store_request_command`."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    move_originator_ae_title: str | None
    move_originator_message_id: int | None


# The elements of a C-STORE-RQ's command set, by element number (group 0000).
_STORE_RQ_ELEMENTS: Final = frozenset(
    {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}
)
_STORE_RQ_REQUIRED: Final = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_COMMAND_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


def store_request_command(command: bytes) -> StoreRequestCommand | None:
    """The C-STORE-RQ a command set encodes (implicit VR little endian, PS3.7 6.3.1), when it
    is a plain one with a data set: its elements, each once, in ascending order, of the length
    their VR gives, their group length true, its texts ASCII with one value each. None
    otherwise: pynetdicom decodes it then, whatever it makes of it (its decoding, by pydicom,
    took a tenth of `dicomserver`'s CPU for each manifest received)."""
    values: dict[int, bytes] = {}
    offset, end, previous = 0, len(command), -1
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(command, offset)
        offset += 8
        if group != 0x0000 or element <= previous or element not in _STORE_RQ_ELEMENTS:
            return None
        if offset + length > end:
            return None
        values[element] = command[offset : offset + length]
        offset += length
        previous = element
    if not values.keys() >= _STORE_RQ_REQUIRED:
        return None
    if values[0x0000] != struct.pack("<I", end - 12):  # the group length: all that follows it
        return None
    numbers: dict[int, int] = {}
    for element in (0x0100, 0x0110, 0x0700, 0x0800, 0x1031):
        value = values.get(element)
        if value is not None:
            if len(value) != 2:
                return None
            (numbers[element],) = _US.unpack(value)
    if numbers[0x0100] != 0x0001 or numbers[0x0800] == 0x0101:  # a C-STORE-RQ, with data
        return None
    texts: dict[int, str] = {}
    for element, padding in ((0x0002, "\0 "), (0x1000, "\0 "), (0x1030, None)):
        value = values.get(element)
        if value is None:
            continue
        if not value.isascii() or b"\\" in value:
            return None
        text = value.decode("ascii")
        text = text.rstrip(padding) if padding else text.strip()  # as pydicom reads UI, AE
        if not text:
            return None
        texts[element] = text
    return StoreRequestCommand(
        message_id=numbers[0x0110],
        sop_class_uid=texts[0x0002],
        sop_instance_uid=texts[0x1000],
        priority=numbers[0x0700],
        move_originator_ae_title=texts.get(0x1030),
        move_originator_message_id=numbers.get(0x1031),
    )


class _StoreRequestMessage(C_STORE_RQ):
    """A C-STORE-RQ whose command set the broker decoded (`store_request_command`); its data
    set is gathered as pynetdicom gathers it, and `message_to_primitive` makes the same
    C_STORE primitive, through the primitive's own checks. ``command_set``, which nothing of
    the broker's reads, is decoded by pydicom only if something asks for it (a handler bound
    to ``EVT_DIMSE_RECV`` while the message was arriving).

    One difference, on a broken stream: a command fragment after the command set, among the
    data set's fragments, aborts the association (PS3.8 E.2: a message's command fragments
    come before its data set's). pynetdicom would add it to the command set it has decoded
    already and go on, or decode the two as one command."""

    def __init__(self, context_id: int, command: StoreRequestCommand, encoded: bytes) -> None:
        # DIMSEMessage's attributes; the command set is `command` (and `encoded`, for pydicom)
        self.context_id: int | None = context_id
        self.encoded_command_set = io.BytesIO()
        self.data_set: io.BytesIO | None = io.BytesIO()
        self._data_set_path = None
        self._data_set_file = None
        self._command = command
        self._encoded = encoded
        self._command_set: Dataset | None = None
        self._command_fragments = 0
        self._invalid = ""

    @property
    def command_set(self) -> Dataset:
        if self._command_set is None:
            self._command_set = decode_dataset(io.BytesIO(self._encoded), True, True)
        return self._command_set

    @command_set.setter
    def command_set(self, value: Dataset) -> None:
        self._command_set = value

    def decode_msg(self, primitive: P_DATA, assoc: Association | None = None) -> bool:
        for _context_id, data in primitive.presentation_data_value_list:
            if data[0] & 1:  # a command fragment: only the first, decoded already
                self._command_fragments += 1
                if self._command_fragments > 1:
                    self._invalid = "a command fragment after the command set"
                    return True  # refused by message_to_primitive: the association aborts
                continue
            cast(io.BytesIO, self.data_set).write(data[1:])
            if data[0] & 2:  # the data set's last fragment
                return True
        return False

    def message_to_primitive(self) -> C_STORE:
        if self._invalid:
            raise ValueError(f"invalid C-STORE-RQ: {self._invalid}")
        command = self._command
        primitive = C_STORE()
        primitive.MessageID = command.message_id
        primitive.AffectedSOPClassUID = command.sop_class_uid
        primitive.AffectedSOPInstanceUID = command.sop_instance_uid
        primitive.Priority = command.priority
        if command.move_originator_ae_title is not None:
            primitive.MoveOriginatorApplicationEntityTitle = command.move_originator_ae_title
        if command.move_originator_message_id is not None:
            primitive.MoveOriginatorMessageID = command.move_originator_message_id
        primitive.DataSet = cast(io.BytesIO, self.data_set)
        primitive._context_id = self.context_id
        primitive._dataset_path = None
        primitive._dataset_file = None
        return primitive


class StoreResponseDIMSE(DIMSEServiceProvider):
    """A DIMSE provider that encodes a plain C-STORE-RSP itself, one P-DATA PDU, byte for byte
    what pynetdicom sends (`store_response_command`): pydicom's encoding of the command set
    was a fifth of the SCP's time per manifest received, and as much of a C-GET's per
    instance. Anything else, and any response a handler watches (``EVT_DIMSE_SENT``), is
    pynetdicom's.

    It decodes a plain C-STORE-RQ's command set itself too (`store_request_command`), when its
    first P-DATA holds the whole of it, no handler watches what is received
    (``EVT_DIMSE_RECV``) and data sets are gathered in memory (pynetdicom's default)."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = self._store_request(primitive)
        super().receive_primitive(primitive)

    def _store_request(self, primitive: P_DATA) -> _StoreRequestMessage | None:
        values = primitive.presentation_data_value_list
        if not values or _config.STORE_RECV_CHUNKED_DATASET:
            return None
        context_id, data = values[0]
        if len(data) < 2 or data[0] & 3 != 3:  # not a whole command set, or not a command
            return None
        if self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            return None
        encoded = data[1:]
        command = store_request_command(encoded)
        return None if command is None else _StoreRequestMessage(context_id, command, encoded)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and self._send_store_response(primitive, context_id):
            return
        super().send_msg(primitive, context_id)

    def _send_store_response(self, response: C_STORE, context_id: int) -> bool:
        if self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            return False
        command = store_response_command(response)
        maximum = self.maximum_pdu_size
        if command is None or (maximum and len(command) + 7 > maximum):
            return False  # pynetdicom encodes it (and fragments it if it must)
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)
        return True
