#!/usr/bin/env python
"""Registration alone (`manifests_register`), batch after batch, as the registry fills.

    .venv/bin/python benchmarks/registration.py \
        --database-url postgres://postgres@127.0.0.1:5432/postgres [--batches 15 15 15 15 25]

A fresh database (PostgreSQL: ``relais_bench_registration`` on the server of ``--database-url``,
dropped and re-created; SQLite: a file in a temporary folder), one institution, and the
manifests of `dimse_intake.py` (one new patient each, 2 series x 10 instances), given with
their parse as the intake's registrar and the harvest give them. For each ``--batches`` entry,
``--per-phase`` manifests are registered in batches of that size, one after the other, in one
process; the registry grows from phase to phase.

Printed per phase: CPU ms a manifest of this process and of its PostgreSQL backend (from
/proc: the server must run on this machine; autovacuum's CPU is not counted), wall ms a
manifest, and the statements a batch (Django's; COPY is not among them). The statements that
took longer than ``--slow-ms`` are summed by shape (values taken out) at the end. Django's
query capture adds some Python CPU of its own to every statement.

What it is for: a batch's cost must not grow with the registry. It did (session 11): with
PostgreSQL's statistics older than the registry, which is so while a registry fills fast (at a
go-live), finding the studies' approved manifests scanned the source's every approved manifest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_database import fresh_database  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--batches", type=int, nargs="+", default=[15, 15, 15, 15, 25, 100])
    parser.add_argument("--per-phase", type=int, default=300, help="manifests a phase")
    parser.add_argument("--slow-ms", type=float, default=5.0)
    return parser.parse_args()


def backend_cpu_seconds() -> float:
    """CPU time of the PostgreSQL backend behind this process's connection (0 on SQLite)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return 0.0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _shape(sql: str) -> str:
    """A statement without its values, the column list of a SELECT left out: statements
    that differ only by their values, or share a long column list, are told apart rightly."""
    sql = re.sub(r"'(?:[^']|'')*'|\b\d+\b", "?", sql)
    sql = re.sub(r"\(\?(?:, \?)*\)", "(...)", sql)
    return re.sub(r"^SELECT .*? FROM ", "SELECT ... FROM ", sql)


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-registration-"))
    os.environ.update(
        DATABASE_URL=fresh_database(args.database_url, workdir, "relais_bench_registration"),
        RELAIS_DATA_DIR=str(workdir / "data"),
        DJANGO_SETTINGS_MODULE="broker.settings",
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from audit.types import Actor
    from benchmarks.dimse_intake import write_manifests
    from broker.dicom.kos import parse_kos
    from broker.models import Institution
    from broker.registration import manifests_register

    call_command("migrate", verbosity=0)
    call_command(
        "add_institution",
        *("--finess", "350000014", "--name", "Hôpital du banc", "--issuer", "BENCH-HOSPITAL"),
        *("--ae-title", "BENCH_PACS", "--host", "127.0.0.1", "--port", "4242"),
        stdout=io.StringIO(),
    )
    institution = Institution.objects.get(finess="350000014")
    total = args.per_phase * len(args.batches)
    documents = [path.read_bytes() for path in write_manifests(workdir / "kos", total)]
    parsed = [parse_kos(document) for document in documents]
    actor = Actor.system("benchmark")
    print(
        f"Registration alone, {connection.vendor}, {args.per_phase} manifests a phase "
        "(one new patient each, 2 series x 10 instances), given with their parse"
    )
    print(
        "| registry before | batch | CPU ms a manifest: Python + database | wall ms | statements a batch |"
    )
    print("|---:|---:|---:|---:|---:|")
    slow: Counter[str] = Counter()
    slow_count: Counter[str] = Counter()
    at = 0
    for size in args.batches:
        cpu, database, wall = time.process_time(), backend_cpu_seconds(), time.perf_counter()
        statements = batches = 0
        for start in range(at, at + args.per_phase, size):
            end = min(start + size, at + args.per_phase)
            with CaptureQueriesContext(connection) as queries:
                manifests_register(
                    documents=documents[start:end],
                    parsed=parsed[start:end],
                    institution=institution,
                    actor=actor,
                    now=dt.datetime.now(dt.UTC),
                )
            statements += len(queries.captured_queries)
            batches += 1
            for query in queries.captured_queries:
                if float(query["time"]) * 1000 > args.slow_ms:
                    shape = _shape(query["sql"])
                    slow[shape] += float(query["time"])
                    slow_count[shape] += 1
        cpu = (time.process_time() - cpu) * 1000 / args.per_phase
        database = (backend_cpu_seconds() - database) * 1000 / args.per_phase
        wall = (time.perf_counter() - wall) * 1000 / args.per_phase
        print(
            f"| {at} | {size} | {cpu:.2f} + {database:.2f} | {wall:.2f} "
            f"| {statements / batches:.1f} |",
            flush=True,
        )
        at += args.per_phase
    if slow:
        print(f"\nStatements over {args.slow_ms:g} ms, summed:")
        for shape, seconds in slow.most_common(5):
            print(f"- {seconds:.2f} s in {slow_count[shape]}: {shape[:400]}")


if __name__ == "__main__":
    main()
