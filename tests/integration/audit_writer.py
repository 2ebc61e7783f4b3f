"""One OS process of the audit trail's multi-process tests (tests/integration/test_audit.py).

    python tests/integration/audit_writer.py migrate
    python tests/integration/audit_writer.py write NAME COUNT [GO_FILE]

The database is whatever the environment names (DJANGO_SETTINGS_MODULE, DATABASE_URL).
``write`` prints "ready", waits for GO_FILE to exist (so that every writer starts at
once), then commits COUNT events, one per transaction, with a rolled-back transaction
every third event that must consume no sequence.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class _RolledBack(Exception):
    pass


def _wait_for(go_file: Path) -> None:
    deadline = time.monotonic() + 60
    while not go_file.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{go_file} never appeared")
        time.sleep(0.01)


def write(name: str, count: int, go_file: Path | None) -> None:
    from django.db import transaction
    from django.utils import timezone

    from audit.events import EventCode
    from audit.services import Actor, audit_record

    actor = Actor.system(name)
    print("ready", flush=True)  # the parent waits for this line
    if go_file is not None:
        _wait_for(go_file)
    for n in range(count):
        time.sleep(0.005)  # let the other writers in between (SQLite's busy wait backs off)
        with transaction.atomic():
            audit_record(
                code=EventCode.MANIFEST_QUERY,
                actor=actor,
                now=timezone.now(),
                details={"writer": name, "n": n},
            )
        if n % 3 == 0:
            try:
                with transaction.atomic():
                    audit_record(
                        code=EventCode.MANIFEST_QUERY,
                        actor=actor,
                        now=timezone.now(),
                        details={"writer": name, "rolled_back": n},
                    )
                    raise _RolledBack
            except _RolledBack:
                pass


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.settings")
    import django

    django.setup()
    match argv:
        case ["migrate"]:
            from django.core.management import call_command

            call_command("migrate", "audit", verbosity=0)
        case ["write", name, count]:
            write(name, int(count), None)
        case ["write", name, count, go_file]:
            write(name, int(count), Path(go_file))
        case _:
            raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
