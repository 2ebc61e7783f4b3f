"""``manage.py intake_registrar``: register the manifests the DICOM server has queued."""

from __future__ import annotations

import logging
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from broker.intake import DEFAULT_BATCH, IntakeRegistrar


class Command(BaseCommand):
    help = (
        "Register, in batches, the manifests received over DIMSE and queued by dicomserver "
        "(which starts one of these itself). Stops on SIGTERM/SIGINT once its batch is done."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
        parser.add_argument("--poll-interval", type=float, default=0.05, metavar="SECONDS")

    def handle(self, *args: Any, **options: Any) -> None:
        logging.basicConfig(
            level=settings.LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        registrar = IntakeRegistrar(
            batch=max(1, options["batch"]), poll_interval=max(0.001, options["poll_interval"])
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: registrar.stop(timeout=0))
        registrar.run()
