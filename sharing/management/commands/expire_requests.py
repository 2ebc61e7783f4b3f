"""``manage.py expire_requests``: end the tickets whose time is up.

Approved tickets past their end (a grant, a shift, an emergency window) and pending ones
nobody decided within ``RELAIS_REQUEST_PENDING_DAYS`` become expired, each audited; an
emergency window that ends records Emergency Override Stopped. Tokens never outlive their
ticket anyway (their expiry is capped by it): this makes the state and the audit say so.
Run it every minute (cron, a systemd timer), or with ``--every SECONDS`` as a service.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from broker.cli import cli_actor
from sharing.services import requests_expire


class Command(BaseCommand):
    help = "Expire the access requests whose grant, shift or emergency window has ended."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--every",
            type=float,
            default=0,
            help="keep running, sweeping every SECONDS (default: once)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        actor = cli_actor("expire_requests")
        while True:
            count = requests_expire(now=timezone.now(), actor=actor)
            self.stdout.write(f"{count} request(s) expired.")
            if options["every"] <= 0:
                return
            time.sleep(options["every"])
