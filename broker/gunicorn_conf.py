"""gunicorn's configuration for the broker: ``gunicorn -c python:broker.gunicorn_conf
broker.wsgi`` (what ``make run`` does); command-line options apply over it.

**Threads, not the sync worker.** A retrieval streams a whole study (hundreds of MB, minutes to
a slow viewer). gunicorn's sync worker serves one request at a time and tells the arbiter it is
alive only between requests, so a stream longer than ``timeout`` got its worker killed
mid-transfer, and two streams blocked the portal and the API of that worker. The gthread worker
serves each request on a thread of its pool and keeps telling the arbiter it is alive, however
long a request lasts (tests/integration/test_gunicorn_conf.py).

Its hook tells `sharing.zero_copy` that this server frames response bodies as HTTP/1.1 chunks
on a blocking socket, the way the gateway's socket writer expects: the ``http`` protocol (not
``uwsgi``, whose bodies are not chunked) and a gthread or sync worker (not gevent's or
eventlet's cooperative sockets). Without this configuration, the gateway never writes on the
socket itself.
"""

from __future__ import annotations

from typing import Any

worker_class = "gthread"
# Requests served at once by each worker: streams, and the portal and API beside them.
threads = 8
# How long a worker may go without telling the arbiter it is alive (not a request's limit).
timeout = 60

_WORKERS_WITH_BLOCKING_SOCKETS = {"ThreadWorker", "SyncWorker"}


def post_worker_init(worker: Any) -> None:
    from sharing.zero_copy import server_frames_chunks

    server_frames_chunks(
        getattr(worker.cfg, "protocol", "http") == "http"
        and type(worker).__name__ in _WORKERS_WITH_BLOCKING_SOCKETS
    )
