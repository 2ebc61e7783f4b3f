#!/usr/bin/env python
"""KOS intake over DIMSE: DCMTK's storescu sends N manifests to ``manage.py dicomserver``.

    .venv/bin/python benchmarks/dimse_intake.py [--manifests 1000] [--database-url URL]

A fresh database (PostgreSQL: ``relais_bench_dimse`` on the server of ``--database-url``,
dropped and re-created; SQLite: a file in a temporary folder), one institution, N distinct
manifests (one patient each, 2 series x 10 instances), then in the same run:

- the peer: the same files sent by the same storescu, in one association, to a real Orthanc
  (which stores them: its own intake rate for these objects);
- the broker: the same, to ``dicomserver`` (every manifest parsed, validated, its patient
  resolved, registered and audited, one transaction per C-STORE, before the response).

Prints manifests/s for both and the ratio; every manifest must be registered. Then the CPU
each side spent, ms a manifest (/proc): storescu; Orthanc; the broker's ``dicomserver`` and
its registrar process; the PostgreSQL server. On a machine of
2 cores these sum to the ceiling of the rate: 2,000 ms / (CPU ms a manifest).

``--registrar after`` measures each half alone, where the default runs them together as in
production: ``dicomserver`` checks and queues the manifests with no registrar running, then an
``intake_registrar`` registers the full queue (its rate and CPU counted from its first batch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_database import fresh_database  # noqa: E402

PYTHON = sys.executable


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifests", type=int, default=1000)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--registrar",
        choices=["process", "thread", "after"],
        default="process",
        help="after: each half alone, dicomserver queueing without a registrar, then "
        "intake_registrar registering the full queue",
    )
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_manifests(folder: Path, count: int) -> list[Path]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.settings")
    from broker.dicom.kos import (
        PatientInfo,
        ReferencedInstance,
        SeriesDescription,
        StudyDescription,
        build_kos,
    )

    folder.mkdir()
    root = "1.2.826.0.1.3680043.10.778"
    now = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
    paths = []
    for n in range(count):
        study = f"{root}.{n}"
        description = StudyDescription(
            patient=PatientInfo(
                patient_id=f"BENCH{n:06d}",
                issuer="BENCH-HOSPITAL",
                issuer_oid=None,
                family_name=f"PATIENT{n}",
                given_names="Bench",
                birth_name=f"PATIENT{n}",
                birth_date=dt.date(1950 + n % 50, 1 + n % 12, 1 + n % 28),
                sex="F" if n % 2 else "M",
            ),
            study_instance_uid=study,
            accession_number=f"A{n}",
            study_date=dt.date(2025, 1, 1) + dt.timedelta(days=n % 365),
            study_time=dt.time(9, 30),
            study_description="Scanner thoracique",
            series=tuple(
                SeriesDescription(
                    series_instance_uid=f"{study}.{s}",
                    modality="CT",
                    body_part="CHEST",
                    instances=tuple(
                        ReferencedInstance("1.2.840.10008.5.1.4.1.1.2", f"{study}.{s}.{i}")
                        for i in range(10)
                    ),
                )
                for s in range(2)
            ),
            retrieve_ae_title="BENCH_PACS",
        )
        path = folder / f"{n:06d}.dcm"
        path.write_bytes(build_kos(description, now=now, uid_root=root))
        paths.append(path)
    return paths


def storescu(port: int, called: str, files: list[Path]) -> tuple[float, float]:
    """Seconds storescu takes to send ``files`` in one association, and the CPU seconds
    storescu itself used (fails on any error)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "BENCH_PACS",
            "-aec",
            called,
            "127.0.0.1",
            str(port),
            "+sd",
            str(files[0].parent),
            "--scan-pattern",
            "*.dcm",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)
    if result.returncode != 0 or "Error" in result.stderr:
        raise SystemExit(f"storescu failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed, cpu


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The process ``pid`` and every process below it (/proc/PID/task/*/children)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found.extend(descendants(int(child)))
    return found


def postgres_cpu_seconds(database_url: str) -> float:
    """CPU time of the whole PostgreSQL server so far (it runs on this machine): the
    postmaster with the children it has reaped, plus the processes running now. Backends that
    end in between count too (an association's connection closes with it), and the WAL
    writer's flushes; other databases' work would, but nothing else runs meanwhile. 0 for
    SQLite."""
    if database_url.startswith("sqlite:///"):
        return 0.0
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return reaped + sum(cpu_seconds(pid) for pid in descendants(postmaster)[1:])


def wait_for_registered(
    database_url: str, expected: int, timeout: float = 600, poll: float = 0.01
) -> float:
    """Seconds until the registry holds ``expected`` manifests (polled every ``poll`` s)."""
    if database_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"))
    else:
        import psycopg

        conn = psycopg.connect(database_url, autocommit=True)
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < timeout:
            (count,) = conn.execute("SELECT count(*) FROM broker_manifest").fetchone()
            if count >= expected:
                return time.perf_counter() - start
            time.sleep(poll)
    finally:
        conn.close()
    raise SystemExit(f"only {count} of {expected} manifests registered after {timeout} s")


def drain_queue(manage: list[str], env: dict[str, str], expected: int) -> dict[str, float]:
    """``--registrar after``: an ``intake_registrar`` started on the full queue. Counted from
    its first registered batch (Django's start-up is not registration) to the last: seconds,
    manifests, its CPU and the database's meanwhile."""
    registrar = subprocess.Popen(
        [*manage, "intake_registrar"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_registered(env["DATABASE_URL"], 1, poll=0.001)
        first = registered_count(env["DATABASE_URL"])
        if first >= expected:
            raise SystemExit("--registrar after: send more manifests than one batch (50)")
        registrar_cpu = cpu_seconds(registrar.pid)
        database_cpu = postgres_cpu_seconds(env["DATABASE_URL"])
        seconds = wait_for_registered(env["DATABASE_URL"], expected)
        registrar_cpu = cpu_seconds(registrar.pid) - registrar_cpu
        database_cpu = postgres_cpu_seconds(env["DATABASE_URL"]) - database_cpu
    finally:
        registrar.terminate()
        registrar.wait(timeout=60)
    return {
        "seconds": seconds,
        "manifests": expected - first,
        "registrar_cpu": registrar_cpu,
        "database_cpu": database_cpu,
    }


def registered_count(database_url: str) -> int:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        (count,) = conn.execute("SELECT count(*) FROM broker_manifest").fetchone()
    return int(count)


def wait_for_echo(port: int, called: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["echoscu", "-aet", "BENCH_PACS", "-aec", called, "127.0.0.1", str(port)],
            capture_output=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            check=False,
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"nothing answers C-ECHO on port {port}")


def main() -> None:
    args = parse_args()
    for tool in ("storescu", "echoscu", "/usr/sbin/Orthanc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install dcmtk orthanc")
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-dimse-"))
    env = {
        **os.environ,
        "DATABASE_URL": fresh_database(args.database_url, workdir, "relais_bench_dimse"),
        "RELAIS_DATA_DIR": str(workdir / "data"),
        "LOG_LEVEL": "WARNING",
    }
    files = write_manifests(workdir / "kos", args.manifests)
    manage = [PYTHON, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput", "-v", "0"], env=env, check=True)
    subprocess.run(
        [
            *manage,
            "add_institution",
            "--finess",
            "350000014",
            "--name",
            "Hôpital du banc",
            "--issuer",
            "BENCH-HOSPITAL",
            "--ae-title",
            "BENCH_PACS",
            "--host",
            "127.0.0.1",
            "--port",
            "4242",
        ],
        env=env,
        check=True,
        capture_output=True,
    )

    from tests.peers.orthanc import start_orthanc

    orthanc = start_orthanc(
        workdir / "orthanc", aet="ORTHANC", modalities={"BENCH": ("BENCH_PACS", "127.0.0.1", 4242)}
    )
    try:
        orthanc_cpu = cpu_seconds(orthanc.process.pid)
        peer_seconds, peer_client_cpu = storescu(orthanc.dicom_port, "ORTHANC", files)
        orthanc_cpu = cpu_seconds(orthanc.process.pid) - orthanc_cpu
    finally:
        orthanc.stop()

    port = free_port()
    alone = args.registrar == "after"
    server = subprocess.Popen(
        [
            *manage,
            "dicomserver",
            "--port",
            str(port),
            "--registrar",
            "none" if alone else args.registrar,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_echo(port, "RELAIS")
        time.sleep(1)  # the registrar process started and connected
        processes = descendants(server.pid)
        broker_cpu = [cpu_seconds(pid) for pid in processes]
        database_cpu = postgres_cpu_seconds(env["DATABASE_URL"])
        start = time.perf_counter()
        intake_seconds, intake_client_cpu = storescu(port, "RELAIS", files)
        if alone:
            broker_cpu = [
                cpu_seconds(pid) - before for pid, before in zip(processes, broker_cpu, strict=True)
            ]
            database_cpu = postgres_cpu_seconds(env["DATABASE_URL"]) - database_cpu
            drain = drain_queue(manage, env, args.manifests)
            registered_seconds = intake_seconds + drain["seconds"]
        else:
            registered_seconds = (
                wait_for_registered(env["DATABASE_URL"], args.manifests)
                + (time.perf_counter() - start - intake_seconds)
                + intake_seconds
            )
            broker_cpu = [
                cpu_seconds(pid) - before for pid, before in zip(processes, broker_cpu, strict=True)
            ]
            database_cpu = postgres_cpu_seconds(env["DATABASE_URL"]) - database_cpu
    finally:
        server.terminate()
        server.wait(timeout=60)
    results = {
        "database": "PostgreSQL" if args.database_url else "SQLite",
        "manifests": args.manifests,
        "orthanc_per_s": args.manifests / peer_seconds,
        "broker_intake_per_s": args.manifests / intake_seconds,
        "broker_per_s": args.manifests / registered_seconds,
    }
    per_manifest = 1000 / args.manifests
    results["cpu_ms"] = {
        "orthanc": {
            "storescu": per_manifest * peer_client_cpu,
            "orthanc": per_manifest * orthanc_cpu,
        },
        "relais": {
            "storescu": per_manifest * intake_client_cpu,
            "dicomserver": per_manifest * broker_cpu[0],
            "registrar": per_manifest * sum(broker_cpu[1:]),
            "postgresql": per_manifest * database_cpu,
        },
    }
    results["ratio"] = results["broker_per_s"] / results["orthanc_per_s"]
    if alone:
        drained = 1000 / drain["manifests"]
        results["registrar_alone_per_s"] = drain["manifests"] / drain["seconds"]
        del results["cpu_ms"]["relais"]["registrar"]
        results["cpu_ms"]["relais, registering the full queue"] = {
            "registrar": drained * drain["registrar_cpu"],
            "postgresql": drained * drain["database_cpu"],
        }
    print(
        f"| KOS intake over C-STORE ({results['database']}, {args.manifests} manifests, storescu, one association) | manifests/s |"
    )
    print("|---|---|")
    print(f"| Orthanc (stores them) | {results['orthanc_per_s']:.0f} |")
    print(
        f"| Relais `dicomserver`, C-STORE answered (checked, queued) | {results['broker_intake_per_s']:.0f} |"
    )
    if alone:
        print(
            "| Relais `intake_registrar` alone, registering the full queue | "
            f"{results['registrar_alone_per_s']:.0f} |"
        )
    if not alone:  # one half after the other is not how the broker runs
        print(f"| Relais `dicomserver`, all registered | {results['broker_per_s']:.0f} |")
        print(f"| ratio Relais / Orthanc | {results['ratio']:.2f} |")
    for side, parts in results["cpu_ms"].items():
        cells = ", ".join(f"{name} {ms:.1f}" for name, ms in parts.items())
        print(f"CPU ms a manifest, {side}: {cells}; in all {sum(parts.values()):.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
