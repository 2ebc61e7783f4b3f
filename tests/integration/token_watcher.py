"""Another process that checks a token, for the cross-process revocation test
(tests/integration/test_sharing.py).

    RELAIS_WATCHED_TOKEN=... python tests/integration/token_watcher.py STUDY_UID

The database and data directory are whatever the environment names. It checks the token
every 10 ms with ``sharing.revocation.token_check`` (its own copy of the revocation list),
prints "ready" after the first check passes, then "revoked <epoch seconds>" the first
time the token is refused as revoked, and exits (or "timeout" after 20 s).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(study: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.settings")
    import django

    django.setup()
    from django.utils import timezone

    from sharing.revocation import TokenRevoked, token_check

    token = os.environ["RELAIS_WATCHED_TOKEN"]
    token_check(token, studies=[study], now=timezone.now())
    print("ready", flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            token_check(token, studies=[study], now=timezone.now())
        except TokenRevoked:
            print(f"revoked {time.time():.6f}", flush=True)
            return
        time.sleep(0.01)
    print("timeout", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
