#!/usr/bin/env python
"""What open DIMSE associations cost when little or nothing is sent, and a C-ECHO round trip.

    .venv/bin/python benchmarks/association_idle.py [--associations 8] [--echoes 500]

In one process: a pynetdicom Verification SCP bound to the broker's ``NODELAY_HANDLERS`` (its
accepted associations are the broker's: `broker.dicom.network`), and ``--associations``
associations to it requested as the broker requests them (``RelaisAE``): twice as many
association ends, each with its DUL thread and its reactor. One C-ECHO on each, then:

- the process's CPU (cores) over the second after the last message, then over 3 idle seconds;
- the mean C-ECHO round trip over ``--echoes`` requests on one association.

Compare with the previous commit (``git stash`` or a checkout) in the same session: before the
broker's associations waited for work, their threads polled every 0.1 ms while busy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--echoes", type=int, default=500)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from broker.dicom.network import NODELAY_HANDLERS, RelaisAE

    scp = AE(ae_title="ECHO")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=NODELAY_HANDLERS)
    requester = RelaisAE(ae_title="RELAIS")
    requester.add_requested_context(Verification)
    associations = [
        requester.associate("127.0.0.1", server.server_address[1], evt_handlers=NODELAY_HANDLERS)
        for _ in range(args.associations)
    ]
    try:
        if not all(assoc.is_established for assoc in associations):
            raise SystemExit("an association was not established")
        for assoc in associations:
            assoc.send_c_echo()
        print(f"{2 * args.associations} association ends in one process")
        for label, seconds in (("the second after the last message", 1.0), ("idle", 3.0)):
            cpu = time.process_time()
            time.sleep(seconds)
            print(f"CPU, {label}: {(time.process_time() - cpu) / seconds:.2f} cores")
        started = time.perf_counter()
        for _ in range(args.echoes):
            status = associations[0].send_c_echo()
            if not status or status.Status != 0x0000:
                raise SystemExit(f"C-ECHO failed: {status}")
        per_echo = (time.perf_counter() - started) / args.echoes
        print(f"C-ECHO round trip: {1000 * per_echo:.2f} ms ({args.echoes} on one association)")
    finally:
        for assoc in associations:
            assoc.release()
        server.shutdown()


if __name__ == "__main__":
    main()
