"""A WSGI application that streams its body slowly, for tests/integration/test_gunicorn_conf.py:
``PIECES`` pieces, ``PAUSE_SECONDS`` apart, as a study streamed to a slow viewer would take."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

PIECES = 8
PAUSE_SECONDS = 0.5
PIECE = b"x" * 1024


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    if environ.get("PATH_INFO") == "/quick":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"quick"])
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return _pieces()


def _pieces() -> Iterator[bytes]:
    for _ in range(PIECES):
        time.sleep(PAUSE_SECONDS)
        yield PIECE
