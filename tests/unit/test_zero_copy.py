"""`sharing.zero_copy`: when the gateway may write on the client's socket itself, and what it
writes there, over real loopback sockets."""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from broker.dicom.multipart import MultipartParts, PendingPart
from broker.gunicorn_conf import post_worker_init
from sharing import zero_copy
from sharing.zero_copy import ChunkedSocketWriter, ClientGone, SourceFailed, chunk_writer


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two ends of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    with near, far:
        yield near, far


def environ(sock: object, **changes: str) -> dict[str, object]:
    return {
        "gunicorn.socket": sock,
        "SERVER_SOFTWARE": "gunicorn/27.0.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": "GET",
        **changes,
    }


@pytest.fixture
def gunicorn_configured(monkeypatch) -> None:
    monkeypatch.setattr(zero_copy, "_server_frames_chunks", False)
    worker = type("ThreadWorker", (), {"cfg": SimpleNamespace(protocol="http")})()
    post_worker_init(worker)


def test_the_server_configuration_says_whether_it_frames_chunks(monkeypatch) -> None:
    monkeypatch.setattr(zero_copy, "_server_frames_chunks", False)
    for worker_class, protocol, frames in [
        ("ThreadWorker", "http", True),
        ("SyncWorker", "http", True),
        ("ThreadWorker", "uwsgi", False),  # uwsgi bodies are not chunked
        ("GeventWorker", "http", False),  # cooperative sockets
    ]:
        post_worker_init(type(worker_class, (), {"cfg": SimpleNamespace(protocol=protocol)})())
        assert zero_copy._server_frames_chunks is frames


def test_no_writer_without_the_server_configuration(pair, monkeypatch) -> None:
    monkeypatch.setattr(zero_copy, "_server_frames_chunks", False)
    assert chunk_writer(environ(pair[0])) is None


@pytest.mark.usefixtures("gunicorn_configured")
def test_a_writer_only_where_the_server_frames_as_expected(pair, settings) -> None:
    sock, _ = pair
    assert isinstance(chunk_writer(environ(sock)), ChunkedSocketWriter)
    assert chunk_writer(environ(sock, SERVER_PROTOCOL="HTTP/1.0")) is None  # not chunked
    assert chunk_writer(environ(sock, SERVER_PROTOCOL="HTTP/2")) is None
    assert chunk_writer(environ(sock, REQUEST_METHOD="HEAD")) is None  # no body
    assert chunk_writer(environ(sock, SERVER_SOFTWARE="WSGIServer/0.2")) is None
    assert chunk_writer(environ(None)) is None
    context = ssl.create_default_context()
    with (
        socket.socket() as plain,
        context.wrap_socket(
            plain, server_hostname="viewer.example", do_handshake_on_connect=False
        ) as tls,
    ):
        assert chunk_writer(environ(tls)) is None  # bytes to encrypt in user space
    settings.RELAIS_GATEWAY_SPLICE = False
    assert chunk_writer(environ(sock)) is None


def archive_answer(parts: list[bytes]) -> bytes:
    body = b""
    for part in parts:
        body += b"--b\r\nContent-Length: %d\r\n\r\n" % len(part) + part + b"\r\n"
    return body + b"--b--\r\n"


def read_chunks(sock: socket.socket, count: int) -> list[bytes]:
    """`count` chunks of a chunked body, checked for their framing."""
    stream = sock.makefile("rb")
    chunks = []
    for _ in range(count):
        size = int(stream.readline().rstrip(b"\r\n"), 16)
        chunks.append(stream.read(size))
        assert stream.read(2) == b"\r\n"
    return chunks


@pytest.mark.parametrize("through_python", [False, True])
def test_each_part_is_one_chunk_whatever_the_reader_holds(pair, through_python) -> None:
    """Part sizes around the reader's buffer and the head; the rest spliced, or read through
    Python when there is no descriptor to splice from (TLS, a framed answer)."""
    parts = [bytes([n]) * size for n, size in enumerate([1, 4095, 4097, 9000, 3_000_000])]
    answer = archive_answer(parts)
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as archive_side,
    ):
        source, _ = listener.accept()
        feeding = threading.Thread(target=lambda: (source.sendall(answer), source.close()))
        feeding.start()
        reader_stream = archive_side.makefile("rb")
        client, viewer = pair
        received: list[list[bytes]] = []
        reading = threading.Thread(target=lambda: received.append(read_chunks(viewer, 5)))
        reading.start()
        writer = ChunkedSocketWriter(client)
        try:
            for part in MultipartParts(reader_stream, b"b").pending(4096):
                fd = None if through_python else archive_side.fileno()
                writer.part(b"<prefix>", part, source=fd, timeout=5)
        finally:
            writer.close()
        reading.join(timeout=30)
        feeding.join(timeout=30)
    assert received == [[b"<prefix>" + part for part in parts]]
    if through_python:
        assert writer.spliced == 0
    else:  # all but the heads and what the reader had read ahead
        assert writer.spliced > 2_900_000


def test_a_client_that_stops_reading_is_gone_after_the_timeout(pair) -> None:
    client, _viewer = pair  # never read
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    answer = io.BufferedReader(io.BytesIO(archive_answer([b"x" * 20_000_000])))  # type: ignore[arg-type]
    part = next(MultipartParts(answer, b"b").pending(10))
    writer = ChunkedSocketWriter(client, send_timeout=0.3)
    with pytest.raises(ClientGone, match="read nothing"):
        writer.part(b"", part, source=None, timeout=5)
    with pytest.raises(BrokenPipeError):  # shut: a chunk was begun
        client.sendall(b"more" * 100_000)


@pytest.mark.parametrize(
    ("ending", "error"), [("stalls", "sent nothing for 0.2 s"), ("closes", "ended inside")]
)
def test_an_archive_that_stalls_or_ends_inside_an_instance_fails_the_source(
    pair, ending, error
) -> None:
    client, viewer = pair
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as archive_side,
    ):
        source, _ = listener.accept()
        source.sendall(b"--b\r\nContent-Length: 100000\r\n\r\n" + b"y" * 10_000)
        if ending == "closes":
            source.close()
        stream = archive_side.makefile("rb")
        part: PendingPart = next(MultipartParts(stream, b"b").pending(4096))
        writer = ChunkedSocketWriter(client)
        with pytest.raises(SourceFailed, match=error):
            writer.part(b"", part, source=archive_side.fileno(), timeout=0.2)
        writer.close()
        source.close()
    viewer.settimeout(5)
    received = b""
    while chunk := viewer.recv(65536):
        received += chunk
    assert received.startswith(b"186A0\r\n")  # the chunk begun, then the connection shut
    assert len(received) < 100_000


# ---------------------------------------------------------------- the client's send timeout


def _bounded(sock: socket.socket, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    monkeypatch.setattr(zero_copy, "_server_frames_chunks", True)
    monkeypatch.setattr(zero_copy, "CLIENT_SEND_TIMEOUT_SECONDS", seconds)
    zero_copy.bound_client_sends({"gunicorn.socket": sock})


def test_a_send_that_moves_nothing_fails_and_the_socket_stays_blocking(pair, monkeypatch):
    near, _far = pair  # the far end never reads
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    _bounded(near, monkeypatch, 0.3)
    assert near.gettimeout() is None  # gunicorn's blocking socket, as it was
    with pytest.raises(BlockingIOError):  # EAGAIN, once SO_SNDTIMEO has passed
        near.sendall(b"x" * (8 << 20))


def test_a_slow_reader_is_not_cut_however_long_the_whole_send(pair, monkeypatch):
    """The timeout is for a send that moves nothing for that long (SO_SNDTIMEO), not for a
    whole `sendall`: gunicorn sends an instance of hundreds of MB in one."""
    near, far = pair
    _bounded(near, monkeypatch, 0.3)
    payload = b"y" * (32 << 20)  # more than the loopback buffers hold
    received = bytearray()

    def read_slowly() -> None:  # about 20 MB/s
        while len(received) < len(payload):
            received.extend(far.recv(1 << 20))
            threading.Event().wait(0.05)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    started = time.monotonic()
    near.sendall(payload)  # longer in all than the 0.3 s timeout
    elapsed = time.monotonic() - started
    reader.join(timeout=30)
    assert elapsed > 0.3
    assert len(received) == len(payload)


def test_the_send_timeout_only_under_the_broker_s_gunicorn(pair, monkeypatch):
    near, _far = pair
    monkeypatch.setattr(zero_copy, "_server_frames_chunks", False)
    zero_copy.bound_client_sends({"gunicorn.socket": near})
    assert near.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16) == bytes(16)
