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
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import AddressInformation, AssociationSocket

# pynetdicom's DUL thread sleeps this long whenever it finds nothing to do (1 ms by
# default), which adds up to a millisecond to every PDU in each direction; 0.1 ms costs
# an idle association about 2 % of a core.
DUL_LOOP_DELAY = 0.0001


def _set_nodelay(event: Any) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(event.assoc.dul, "_run_loop_delay"):
        event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY


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

    @property
    def _is_paused(self) -> bool:
        if not self._reactor_checkpoint.is_set():
            with self._dimse_gate:  # a read the reactor began before is over
                return True
        return bool(self.__dict__.get("_is_paused", False))

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:
        self.__dict__["_is_paused"] = value


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
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock
