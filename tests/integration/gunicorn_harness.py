"""The broker's WSGI application served, in this process, by gunicorn's own HTTP/1.1 request
parser and response writer, on a loopback port: each connection in a thread, each request
handled as gunicorn's gthread worker handles it (`ThreadWorker.handle_request`: the iterator's
pieces written by ``Response.write``, then ``Response.close``). In this process, so that the
test's database is the server's; with gunicorn's code, so that what the gateway writes on the
socket itself (`sharing.zero_copy`) is framed as gunicorn frames the rest."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from gunicorn.config import Config
from gunicorn.http import get_parser, wsgi
from gunicorn.http.errors import NoMoreData


class GunicornHarness:
    def __init__(self, application: Callable[..., Any]) -> None:
        self.application = application
        self.config = Config()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(
            target=self._accept, name="gunicorn-harness", daemon=True
        )
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.listener.accept()
            except OSError:  # closed
                return
            self._connections.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, address), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, address: Any) -> None:
        from django.db import connection

        try:
            for request in get_parser(self.config, sock, address):
                response, environ = wsgi.create(
                    request, sock, address, self.listener.getsockname(), self.config
                )
                environ["wsgi.multithread"] = True
                body = self.application(environ, response.start_response)
                try:
                    for piece in body:
                        response.write(piece)
                    response.close()
                finally:
                    if hasattr(body, "close"):
                        body.close()
                if response.should_close():
                    return
        except (OSError, StopIteration, NoMoreData):
            return  # the client went away, or the connection was shut
        except BaseException as exc:  # kept for the test to see
            self.errors.append(exc)
        finally:
            sock.close()
            connection.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept (closing alone would not)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self._connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        self._accepting.join(timeout=10)


@contextlib.contextmanager
def gunicorn_serving(application: Callable[..., Any]) -> Iterator[GunicornHarness]:
    harness = GunicornHarness(application)
    try:
        yield harness
    finally:
        harness.stop()
