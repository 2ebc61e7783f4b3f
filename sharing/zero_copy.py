"""Sending a retrieval's instances to the HTTP client without copying them through Python: the
bytes go from the archive's socket to the client's inside the kernel (splice(2), through a
pipe).

Why: a gateway that relays in user space pays two socket copies, and gunicorn a third to
frame each chunk. With splice the broker's own CPU per GB falls by a fifth to a third
(docs/performance.md, "Retrieval gateway"). On loopback the receiving process pays part of it
back (it copies from the many page fragments the spliced data arrives in); across a network
the receiving host reads from its own network buffers.

How, under gunicorn: gunicorn hands the WSGI application its client socket
(``environ["gunicorn.socket"]``) and, for an HTTP/1.1 GET answered without Content-Length,
frames the body in chunks, writing on that socket, synchronously, each piece the
application's iterator yields. Once the iterator has yielded a first piece (the status line
and headers are then sent), it may itself write further chunks on the socket, framed the same
way, between two yields: gunicorn's own ``Response.sendfile`` does the same for files. The
next piece gunicorn writes, and its closing chunk, follow on the wire.

`chunk_writer` gives a writer only when every condition holds: gunicorn with the broker's
configuration (broker/gunicorn_conf.py: the ``http`` protocol, a gthread or sync worker),
plain TCP, HTTP/1.1, GET, Linux's splice, the ``RELAIS_GATEWAY_SPLICE`` setting. Otherwise
the gateway yields its bytes as any WSGI application.

What is trusted: the archive's Content-Length of each part frames the instance, since its
bytes are not looked at. The chunk is ended only when the archive's boundary follows, and any
failure once a chunk is begun shuts the client's connection: a wrong length, or an answer cut,
is a broken transfer, never a short or padded instance that looks whole. Over an archive
answer that is encrypted (HTTPS) or framed (chunked, a Content-Length for the whole body),
the rest of each instance is read through Python, and the chunk is written the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import select
import socket
import ssl
import struct
from collections.abc import Mapping
from typing import Final

from django.conf import settings

from broker.dicom.multipart import MalformedMultipart, PendingPart

# How long the client may leave the gateway unable to write before it is taken as gone.
CLIENT_SEND_TIMEOUT_SECONDS: Final = 60.0
PIPE_BYTES: Final = 1024 * 1024
_SPLICE: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_MORE: Final = getattr(os, "SPLICE_F_MORE", 0)
# What reading the archive's answer through Python may raise (a closed file: ValueError).
_SOURCE_ERRORS: Final = (OSError, http.client.HTTPException, MalformedMultipart, ValueError)


class SourceFailed(Exception):
    """The archive's side failed while the rest of an instance was moved."""


class ClientGone(Exception):
    """The HTTP client's side failed (closed, reset, or stopped reading)."""


_server_frames_chunks = False


def server_frames_chunks(confirmed: bool) -> None:
    """Said by the server's configuration, once per worker process (broker/gunicorn_conf.py):
    whether it frames bodies as HTTP/1.1 chunks written on a blocking socket. Until it says
    so, `chunk_writer` gives no writer."""
    global _server_frames_chunks  # one fact about the process, said at start
    _server_frames_chunks = confirmed


def bound_client_sends(environ: Mapping[str, object]) -> None:
    """Under gunicorn, a send to a client that has stopped reading (but not closed) would block
    the worker's thread for as long as the client stays connected: the gthread worker has no
    request timeout. The client's socket gets a send timeout of the kernel's (SO_SNDTIMEO):
    a send that moves nothing for `CLIENT_SEND_TIMEOUT_SECONDS` fails, and gunicorn closes
    the connection; a slow client that keeps reading is never cut (a timeout of Python's
    would bound each whole `sendall`, an instance of hundreds of MB). It leaves the socket's
    blocking mode alone (gunicorn's, and the splice writer's, which has its own timeout)."""
    sock = environ.get("gunicorn.socket")
    if _server_frames_chunks and isinstance(sock, socket.socket):
        seconds = CLIENT_SEND_TIMEOUT_SECONDS
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def chunk_writer(environ: Mapping[str, object]) -> ChunkedSocketWriter | None:
    """A writer of chunks on the client's socket, when this request is served so that one is
    safe (module docstring); None otherwise."""
    sock = environ.get("gunicorn.socket")
    if (
        not _server_frames_chunks
        or not getattr(settings, "RELAIS_GATEWAY_SPLICE", False)
        or not hasattr(os, "splice")
        or not isinstance(sock, socket.socket)
        or isinstance(sock, ssl.SSLSocket)
        or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
        or sock.type != socket.SOCK_STREAM
        or not str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn/")
        or environ.get("SERVER_PROTOCOL") != "HTTP/1.1"
        or environ.get("REQUEST_METHOD") != "GET"
    ):
        return None
    return ChunkedSocketWriter(sock)


class ChunkedSocketWriter:
    """Writes chunks of a chunked HTTP/1.1 body on the client's socket. Close it when done."""

    def __init__(
        self, sock: socket.socket, *, send_timeout: float = CLIENT_SEND_TIMEOUT_SECONDS
    ) -> None:
        self._sock = sock
        self._send_timeout = send_timeout
        self._pipe: tuple[int, int, int] | None = None
        self.spliced = 0  # bytes that went from socket to socket without Python

    def part(
        self, prefix: bytes, part: PendingPart, *, source: int | None, timeout: float | None
    ) -> None:
        """One chunk: `prefix` (the multipart delimiter and headers), then the whole body of
        `part`: its head, what the reader holds already, and the rest straight from `source`
        (the archive's socket) or, without one, read through Python. The chunk is ended only
        once the archive's boundary is seen right after the body (its Content-Length was
        true). Raises `SourceFailed` or `ClientGone`, and on any failure once the chunk is
        begun, the client's connection is shut down."""
        try:
            buffered = part.take_buffered()
        except _SOURCE_ERRORS as exc:
            raise SourceFailed(f"reading the archive's answer: {exc}") from exc
        if source is not None:
            self._pipe_fds()  # before the first byte: nothing to undo if it fails
        client = self._sock.fileno()
        client_was_blocking = os.get_blocking(client)
        begun = False
        try:
            os.set_blocking(client, False)
            begun = True
            size = b"%X\r\n" % (len(prefix) + part.length)
            self._send(size + prefix + part.head + buffered, socket.MSG_MORE)
            if source is not None:
                self._splice_rest(source, client, part, timeout)
            else:
                self._relay(part)
            try:
                ended = part.boundary_follows()
            except _SOURCE_ERRORS as exc:
                raise SourceFailed(f"reading the archive's answer: {exc}") from exc
            if not ended:
                raise SourceFailed(
                    "the archive's answer does not go on with its boundary after an instance "
                    "(a wrong Content-Length, or the answer cut)"
                )
            self._send(b"\r\n", 0)
        except BaseException:
            if begun:
                self.abort()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.set_blocking(client, client_was_blocking)

    def abort(self) -> None:
        """Shut the client's connection: a chunk begun cannot be ended well."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
            self._pipe = None

    # ---------------------------------------------------------------- moving bytes

    def _relay(self, part: PendingPart) -> None:
        while True:
            try:
                piece = part.read_rest(PIPE_BYTES)
            except _SOURCE_ERRORS as exc:
                raise SourceFailed(f"reading the archive's answer: {exc}") from exc
            if not piece:
                return
            self._send(piece, socket.MSG_MORE)

    def _splice_rest(
        self, source: int, client: int, part: PendingPart, timeout: float | None
    ) -> None:
        source_was_blocking = os.get_blocking(source)
        os.set_blocking(source, False)
        try:
            self._splice(source, client, part, timeout)
        finally:
            with contextlib.suppress(OSError):
                os.set_blocking(source, source_was_blocking)

    def _splice(self, source: int, client: int, part: PendingPart, timeout: float | None) -> None:
        pipe_read, pipe_write, capacity = self._pipe_fds()
        in_pipe = 0
        while part.unread or in_pipe:
            moved = False
            if part.unread and in_pipe < capacity:
                try:
                    count = os.splice(
                        source, pipe_write, min(part.unread, capacity - in_pipe), flags=_SPLICE
                    )
                except BlockingIOError:  # nothing to read yet, or the pipe is full
                    pass
                except OSError as exc:
                    raise SourceFailed(f"reading the archive's answer: {exc}") from exc
                else:
                    if count == 0:
                        raise SourceFailed("the archive's answer ended inside an instance")
                    part.consumed(count)
                    in_pipe += count
                    moved = True
            if in_pipe:
                try:
                    count = os.splice(pipe_read, client, in_pipe, flags=_SPLICE | _MORE)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise ClientGone(f"sending to the client: {exc}") from exc
                else:
                    self.spliced += count
                    in_pipe -= count
                    moved = True
            if moved:
                continue
            # Neither side moved. With bytes in the pipe, the client is the one to wait for
            # (the pipe may also be full: its slots hold pieces of pages); without, the archive.
            if in_pipe:
                if not _ready(client, select.POLLOUT, self._send_timeout):
                    raise ClientGone(f"the client read nothing for {self._send_timeout:g} s")
            elif not _ready(source, select.POLLIN, timeout):
                raise SourceFailed(f"the archive sent nothing for {timeout:g} s")

    def _send(self, data: bytes, flags: int) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view, flags)
            except BlockingIOError:
                if not _ready(self._sock.fileno(), select.POLLOUT, self._send_timeout):
                    raise ClientGone(
                        f"the client read nothing for {self._send_timeout:g} s"
                    ) from None
                continue
            except OSError as exc:
                raise ClientGone(f"sending to the client: {exc}") from exc
            view = view[sent:]

    def _pipe_fds(self) -> tuple[int, int, int]:
        if self._pipe is None:
            pipe_read, pipe_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            with contextlib.suppress(OSError):  # a smaller pipe only means more calls
                fcntl.fcntl(pipe_write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            capacity = fcntl.fcntl(pipe_write, fcntl.F_GETPIPE_SZ)
            self._pipe = (pipe_read, pipe_write, capacity)
        return self._pipe


def _ready(fd: int, event: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(None if timeout is None else int(timeout * 1000)))
