"""gunicorn's configuration for the broker: ``gunicorn -c python:broker.gunicorn_conf
broker.wsgi`` (what ``make run`` does); command-line options apply over it.

Its hook tells `sharing.zero_copy` that this server frames response bodies as HTTP/1.1 chunks
on a blocking socket, the way the gateway's socket writer expects: the ``http`` protocol (not
``uwsgi``, whose bodies are not chunked) and a gthread or sync worker (not gevent's or
eventlet's cooperative sockets). Without this configuration, the gateway never writes on the
socket itself.
"""

from __future__ import annotations

from typing import Any

_WORKERS_WITH_BLOCKING_SOCKETS = {"ThreadWorker", "SyncWorker"}


def post_worker_init(worker: Any) -> None:
    from sharing.zero_copy import server_frames_chunks

    server_frames_chunks(
        getattr(worker.cfg, "protocol", "http") == "http"
        and type(worker).__name__ in _WORKERS_WITH_BLOCKING_SOCKETS
    )
