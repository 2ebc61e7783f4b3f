"""``manage.py audit_verify [--from-sequence N]``: check the audit hash chain.

Exit status 0 when the chain is intact ("intact: N events, last sequence S, head hash H"
on stdout), 1 with the first broken sequence and what is wrong there otherwise. Either
way the check itself is recorded in the trail (Audit Log Used).
"""

from __future__ import annotations

import getpass
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from audit.services import Actor, audit_verify


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no LOGNAME (containers)
        return ""


class Command(BaseCommand):
    help = "Recompute the audit hash chain and report the first break, if any."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--from-sequence",
            type=int,
            default=1,
            metavar="N",
            help="Check from event N on (linking it to event N-1); default 1, the whole chain.",
        )
        parser.add_argument(
            "--chunk-size", type=int, default=2000, help="Events read per query (default 2000)."
        )

    def handle(self, *args: Any, from_sequence: int, chunk_size: int, **options: Any) -> None:
        if from_sequence < 1:
            raise CommandError("--from-sequence starts at 1", returncode=2)
        if chunk_size < 1:
            raise CommandError("--chunk-size must be positive", returncode=2)
        actor = Actor(
            kind="system", user_id=None, username=f"manage.py audit_verify {_os_user()}".strip()
        )
        result = audit_verify(
            actor=actor, now=timezone.now(), from_sequence=from_sequence, chunk_size=chunk_size
        )
        if not result.intact:
            raise CommandError(result.summary(), returncode=1)
        self.stdout.write(result.summary())
