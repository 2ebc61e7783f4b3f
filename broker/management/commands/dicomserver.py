"""``manage.py dicomserver``: the broker's DICOM SCP (C-ECHO, C-STORE of KOS manifests)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from broker.dicom.network import TLSFiles, tls_server_context
from broker.dicom.scp import BrokerSCP, SCPConfig
from broker.intake import IntakeRegistrar

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run the broker's DICOM server: C-ECHO, and C-STORE of KOS manifests from the archives "
        "of registered institutions (AE title and port from RELAIS_DICOM_AE_TITLE and "
        "RELAIS_DICOM_PORT)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--bind", default=None, help="address to listen on")
        parser.add_argument("--port", type=int, default=None)
        parser.add_argument("--ae-title", default=None)
        parser.add_argument(
            "--registrar",
            choices=["process", "thread", "none"],
            default="process",
            help="who registers the manifests received: a child process (default), a thread "
            "of this one, or nobody here (an intake_registrar runs elsewhere)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        logging.basicConfig(
            level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # pynetdicom logs every association at INFO: keep its warnings only.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        config = SCPConfig(
            ae_title=options["ae_title"] or settings.RELAIS_DICOM_AE_TITLE,
            bind=options["bind"] or settings.RELAIS_DICOM_BIND,
            port=options["port"] or settings.RELAIS_DICOM_PORT,
            timeout=settings.RELAIS_DICOM_TIMEOUT,
            max_associations=settings.RELAIS_DICOM_MAX_ASSOCIATIONS,
            tls=_tls_context(),
        )
        if not 1 <= config.port <= 65535:
            raise CommandError(f"--port {config.port}: a port is 1 to 65535")
        registrar = _Registrar() if options["registrar"] == "process" else None
        scp = BrokerSCP(
            config, registrar=IntakeRegistrar() if options["registrar"] == "thread" else None
        )
        try:
            server = scp.start(block=False)
        except OSError as exc:
            if registrar is not None:
                registrar.stop()
            raise CommandError(f"cannot listen on {config.bind}:{config.port}: {exc}") from exc
        assert server is not None
        self.stdout.write(
            f"Relais DICOM server {config.ae_title} on {config.bind}:{config.port}"
            f"{' (TLS)' if config.tls else ''}; Ctrl-C to stop",
        )
        self.stdout.flush()
        stopping = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.set())
        while not stopping.wait(1.0):
            if registrar is not None:
                registrar.watch()
        scp.shutdown()
        if registrar is not None:
            registrar.stop()
        self.stdout.write("Relais DICOM server stopped")


def _tls_context() -> Any:
    if settings.RELAIS_DICOM_TLS_CERT is None:
        return None
    try:
        return tls_server_context(
            TLSFiles(
                certificate=settings.RELAIS_DICOM_TLS_CERT,
                private_key=settings.RELAIS_DICOM_TLS_KEY,
                ca_certificates=settings.RELAIS_DICOM_TLS_CA,
            )
        )
    except (OSError, ValueError) as exc:
        raise CommandError(f"DICOM TLS: {exc}") from exc


class _Registrar:
    """The ``intake_registrar`` child process, restarted (with a growing delay) if it dies:
    registering is CPU-bound, and in this process it would hold the GIL while the
    associations wait to answer."""

    def __init__(self) -> None:
        self._delay = 1.0
        self._restart_at = 0.0
        self._process: subprocess.Popen[bytes] | None = self._start()

    @staticmethod
    def _start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 - our own manage.py
            [sys.executable, str(settings.BASE_DIR / "manage.py"), "intake_registrar"]
        )

    def watch(self) -> None:
        if self._process is None:
            if time.monotonic() >= self._restart_at:
                self._process = self._start()
            return
        code = self._process.poll()
        if code is None:
            self._delay = 1.0
            return
        logger.error("intake_registrar exited (%s): restarting it in %.0f s", code, self._delay)
        self._process = None
        self._restart_at = time.monotonic() + self._delay
        self._delay = min(60.0, self._delay * 2)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
