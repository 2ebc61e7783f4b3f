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
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom import association as pynetdicom_association
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
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

# pynetdicom's DUL thread sleeps this long whenever it finds nothing to do (1 ms by
# default), which adds up to a millisecond to every PDU in each direction; 0.1 ms costs
# an idle association about 2 % of a core.
DUL_LOOP_DELAY = 0.0001


# pynetdicom's threads poll: each association's DUL thread (`_run_loop_delay`, 1 ms by
# default) and its reactor (a hard-coded 1 ms). On a busy association every PDU and every
# request waits for them: an SCP answering C-STOREs one after another loses about a tenth of
# its rate to the reactor alone. On an idle one, polling every 0.1 ms costs CPU and the GIL
# for nothing: sixteen idle association ends took 1.3 cores, 1.0 even at pynetdicom's 1 ms.
# So both poll every 0.1 ms while the association has received something within the last
# second, and every 10 ms once it has not (the first message after a pause waits up to that).
# The reactors of busy associations the broker requests keep 1 ms: their requests do not wait
# on the reactor (`PauseSafeAssociation`). pynetdicom's other sleeps are left as they are.
REACTOR_LOOP_DELAY = DUL_LOOP_DELAY
IDLE_LOOP_DELAY = 0.01
BUSY_SECONDS = 1.0


def _busy(dul: object) -> bool:
    """Whether the association received anything within `BUSY_SECONDS` (pynetdicom restarts
    its idle timer on every PDU received)."""
    started = getattr(getattr(dul, "_idle_timer", None), "_start_time", None)
    return started is None or time.time() - started < BUSY_SECONDS


class _ReactorClock:
    """`time`, as pynetdicom.association sees it: the reactor's 1 ms turn shortened for a
    busy accepted association, lengthened for an idle one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == 0.001:  # the reactor's turn
            thread = threading.current_thread()
            if not _busy(getattr(thread, "dul", None)):
                seconds = IDLE_LOOP_DELAY
            elif getattr(thread, "mode", "") == "acceptor":
                seconds = REACTOR_LOOP_DELAY
        time.sleep(seconds)


setattr(pynetdicom_association, "time", _ReactorClock())  # noqa: B010 - a module global


class _AdaptiveDUL(DULServiceProvider):
    """A DUL thread that polls fast while its association is busy (see above)."""

    @property
    def _run_loop_delay(self) -> float:
        return DUL_LOOP_DELAY if _busy(self) else IDLE_LOOP_DELAY

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        pass  # pynetdicom sets its default in __init__


def _set_nodelay(event: Any) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if type(event.assoc.dul) is DULServiceProvider:
        event.assoc.dul.__class__ = _AdaptiveDUL


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


class PauseSafeAssociation(Association):
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
    """pynetdicom 3.0.4 never closes the socket of a connection that failed (its
    `_shutdown_socket` calls `shutdown`, which raises on an unconnected socket, and skips
    `close`): a ResourceWarning for every unreachable peer. Close it regardless."""

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


class StoreResponseDIMSE(DIMSEServiceProvider):
    """A DIMSE provider that encodes a plain C-STORE-RSP itself, one P-DATA PDU, byte for byte
    what pynetdicom sends (`store_response_command`): pydicom's encoding of the command set
    was a fifth of the SCP's time per manifest received, and as much of a C-GET's per
    instance. Anything else, and any response a handler watches (``EVT_DIMSE_SENT``), is
    pynetdicom's."""

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
