"""The broker's gunicorn configuration (broker/gunicorn_conf.py), under a real gunicorn: a
response that streams for longer than the worker timeout is served whole, and the same worker
answers another request meanwhile. gunicorn's sync worker fails both: it is killed as
unresponsive mid-stream, and it serves one request at a time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration import slow_stream_app

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")


@pytest.fixture
def served() -> Iterator[str]:
    """One worker configured as `make run` configures them, with a 2 s worker timeout: shorter
    than the slow stream (4 s). It binds a port of its own choosing, and says which."""
    with subprocess.Popen(
        [
            str(GUNICORN),
            "-c",
            "python:broker.gunicorn_conf",
            "tests.integration.slow_stream_app:application",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--timeout",
            "2",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stderr is not None
            base = ""
            deadline = time.monotonic() + 30
            while not base:
                line = server.stderr.readline()
                if not line or time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not start ({line!r})")
                found = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", line)
                base = found.group(1) if found else ""
            # Drained from now on, so that gunicorn never blocks on a full pipe.
            drain = threading.Thread(target=server.stderr.read, daemon=True)
            drain.start()
            yield base
        finally:
            server.terminate()
            server.wait(timeout=30)
            if server.stderr is not None and "drain" in locals():
                drain.join(timeout=10)  # gunicorn is gone: the pipe ends, before it is closed


def test_a_stream_longer_than_the_worker_timeout_is_served_whole(served):
    expected = slow_stream_app.PIECE * slow_stream_app.PIECES
    assert slow_stream_app.PIECES * slow_stream_app.PAUSE_SECONDS > 2 * 1.5  # the timeout, and more

    with httpx.Client(timeout=30) as client, client.stream("GET", f"{served}/slow") as response:
        # Meanwhile the same (only) worker answers another request, before the stream ends.
        started = time.monotonic()
        assert httpx.get(f"{served}/quick", timeout=10).content == b"quick"
        assert time.monotonic() - started < 3
        body = b"".join(response.iter_bytes())

    assert response.status_code == 200
    assert body == expected
