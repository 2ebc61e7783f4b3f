#!/usr/bin/env python
"""The gateway's DIMSE side: a PACS's C-MOVE of a whole CT study through the broker, next to
the same C-MOVE asked of the archive (Orthanc) directly. Issue 6's measure: broker MB/s ÷
direct MB/s ≥ 0.8, measured in the same run, taking turns.

    .venv/bin/python benchmarks/gateway_move.py \
        --database-url postgres://postgres@127.0.0.1:5432/postgres \
        [--size-mb 100|500] [--runs 5] [--store-files] [--max-pdu N] \
        [--source-transport dicomweb|dimse] [--profile --py-spy PATH] [--json FILE]

A fresh database (PostgreSQL: ``relais_bench_gateway_move`` on the server of
``--database-url``, dropped and re-created, dropped again at the end; SQLite: a file in a
temporary folder); one real Orthanc (the CHU's archive, its own ports and storage) holding one
synthetic CT study (``benchmarks/gateway.py``'s: 512 x 512 16-bit random pixels, explicit VR
little endian, 0.5 MiB an instance: 200 instances for 100 MiB), harvested over DICOMweb; the
region as in ``tests/integration/test_gateway_dimse.py``: the CHU (source archive: the
Orthanc), Port-Maël (its PACS: AE ``PM_PACS`` at the address and port of a DCMTK
``storescp``), a Port-Maël referring doctor's treatment ticket on the study approved by a CHU
radiologist, the patient's consent to sharing with Port-Maël. The broker's DICOM server runs
as its own process, ``manage.py dicomserver`` (as ``make run`` starts it; ``--registrar
none``: no manifest intake here, so no registrar process), on the same data directory and
database.

``storescp`` (``-aet PM_PACS``) is the destination of both paths. By default it is started
with ``--ignore``: every instance is received in full and answered, nothing is written, so
that the disk is not what is measured; ``--store-files`` makes it write each instance
(``-od``, a folder of the temporary directory, emptied after each run, files counted).
``--max-pdu`` sets storescp's maximum receive PDU (DCMTK's default: 16,384 bytes), which is
the size of the P-DATA PDUs both senders cut the instances into.

The same DCMTK ``movescu`` (``-S``, STUDY level, calling AE ``PM_PACS``, the PACS's
registered AE, move destination ``PM_PACS``; TCP_NODELAY=1 in the environment of Orthanc,
storescp and movescu) asks, taking turns:

- **direct**: Orthanc (``DicomModalities`` lists PM_PACS at storescp's port) to move the
  study to PM_PACS;
- **broker**: the broker's SCP (called AE ``RELAIS``) to move the study to PM_PACS: the
  broker admits the association (calling AE and address), decides (ticket, consent), audits,
  fetches the study from the CHU's archive (its registered transport: WADO-RS, or C-GET with
  ``--source-transport dimse``) and sends it by C-STORE sub-operations (pynetdicom).

Measured per run: movescu's wall time (process start to exit), MB/s (the study's stored
bytes, 10^6, over that time), the final response's status and completed / failed / warning
sub-operations (movescu's debug output), the files written (``--store-files``); CPU seconds
per GB of Orthanc, of the broker process, of storescp, of movescu (utime + stime from
/proc/PID/stat, and this process's reaped children), of the rest of the machine (other
processes) and of interrupts (much of loopback TCP); the broker's RSS peak (VmRSS every
50 ms, and VmHWM reset before each run). Before the timed runs, once per path (also the
warm-up), the study is moved to a storescp that writes the files: the SOP Instance UIDs
received must be the study's, and each instance's Pixel Data the uploaded one (SHA-256).
After the runs, the audit trail is read back: one successful Instances Transferred record per
broker move, with the study's instance count.

``--profile`` records the broker process with py-spy (``--py-spy PATH``; ``record --rate 250
--format raw``) during ``--profile-runs`` broker moves (not timed) and prints where the
samples fall: by thread (the association's, the DUL reader/writer threads), by stage (archive
fetch, dcmread, dataset encoding, P-DATA fragmentation, PDU encoding and socket send, ...),
and the top functions, self and inclusive.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gateway import (  # noqa: E402 - after the path above
    ISSUER,
    MB,
    RssSampler,
    Study,
    cpu_seconds,
    ct_instances,
    load,
    machine_seconds,
    median,
    reset_hwm,
    spread,
    status_kb,
)

DATABASE = "relais_bench_gateway_move"
ARCHIVE_AE = "CHU_PACS"  # the Orthanc: the CHU's archive
PACS_AE = "PM_PACS"  # Port-Maël's PACS: storescp
BROKER_AE = "RELAIS"
PATHS = ("direct", "broker")
TOOLS = ("movescu", "storescp", "echoscu")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=100, help="MiB (e.g. 100 or 500)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per path, alternated")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument(
        "--store-files",
        action="store_true",
        help="storescp writes what it receives (-od) during the timed runs; default --ignore",
    )
    parser.add_argument(
        "--max-pdu", type=int, default=None, help="storescp's max receive PDU (default DCMTK's)"
    )
    parser.add_argument(
        "--source-transport",
        choices=["dicomweb", "dimse"],
        default="dicomweb",
        help="how the broker fetches from the CHU's archive: WADO-RS (default) or C-GET",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-runs", type=int, default=2)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per move")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and DB")
    return parser.parse_args()


# --------------------------------------------------------------------------- database


def prepare_database(database_url: str, workdir: Path) -> str:
    """A fresh database (its own name: the gateway benchmark may be running beside)."""
    if not database_url:
        return f"sqlite:///{workdir / 'bench.sqlite3'}"
    import psycopg

    base = database_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    return f"{base}/{DATABASE}"


def drop_database(database_url: str) -> None:
    if not database_url:
        return  # the SQLite file goes with the temporary folder
    import psycopg

    base = database_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


# --------------------------------------------------------------------------- processes


def dcmtk_env() -> dict[str, str]:
    """PEERS.md trap 1: DCMTK leaves Nagle on unless TCP_NODELAY=1."""
    return {**os.environ, "TCP_NODELAY": "1"}


def start_storescp(port: int, folder: Path | None, max_pdu: int | None, log: Path) -> Any:
    """Port-Maël's PACS: storescp writing into ``folder``, or receiving only (--ignore)."""
    command = ["storescp", "-aet", PACS_AE]
    command += ["-od", str(folder)] if folder is not None else ["--ignore"]
    if max_pdu:
        command += ["--max-pdu", str(max_pdu)]
    command.append(str(port))
    process = subprocess.Popen(
        command,
        env=dcmtk_env(),
        stdin=subprocess.DEVNULL,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_for_echo(port, PACS_AE, process)
    return process


def start_broker(env: dict[str, str], port: int, log: Path) -> Any:
    """``manage.py dicomserver`` in its own process, as ``make run`` starts it."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "manage.py"),
            "dicomserver",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--ae-title",
            BROKER_AE,
            "--registrar",
            "none",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    # Called by the PACS's registered AE: the admission (and so the database) answers too.
    wait_for_echo(port, BROKER_AE, process)
    return process


def wait_for_echo(port: int, called: str, process: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{called} on port {port} exited with status {process.returncode}")
        result = subprocess.run(
            ["echoscu", "-aet", PACS_AE, "-aec", called, "127.0.0.1", str(port)],
            capture_output=True,
            env=dcmtk_env(),
            check=False,
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"{called}: nothing answers C-ECHO on port {port}")


def stop(process: Any, timeout: float = 30) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- the move


@dataclass
class Move:
    seconds: float
    returncode: int
    status: str  # the final response's, as movescu words it
    completed: int | None
    failed: int | None
    warning: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "Success" and not self.failed


_SUBOPS = re.compile(r"(Completed|Failed|Warning) Suboperations\s*:\s*(\d+)")


def movescu(port: int, called: str, study_uid: str, timeout: float) -> Move:
    """One C-MOVE of the study to PM_PACS, asked by PM_PACS; wall time of the process.

    ``-d``: movescu prints the sub-operation counts of the responses only in debug; its own
    association carries only the move responses, so the log stays small."""
    command = [
        "movescu", "-d", "-S", "-aet", PACS_AE, "-aec", called, "-aem", PACS_AE,
        "127.0.0.1", str(port),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
    ]  # fmt: skip
    env = dcmtk_env()
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    final = output.rpartition("Received Final Move Response")[2]
    counts = {kind: int(n) for kind, n in _SUBOPS.findall(final)}
    status = ""
    if found := re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})(?:: (\w+))?", final):
        status = found.group(2) or f"0x{found.group(1)}"
    elif found := re.search(r"Received Final Move Response \((\w+)", output):
        status = found.group(1)
    return Move(
        seconds=seconds,
        returncode=done.returncode,
        status=status,
        completed=counts.get("Completed"),
        failed=counts.get("Failed"),
        warning=counts.get("Warning"),
        output=output,
    )


def pixel_hashes(instances: Iterator[bytes], into: dict[str, str]) -> Iterator[bytes]:
    """Pass the instances on, noting each one's SOP Instance UID and Pixel Data SHA-256."""
    import pydicom

    for data in instances:
        ds = pydicom.dcmread(io.BytesIO(data))
        into[str(ds.SOPInstanceUID)] = hashlib.sha256(ds.PixelData).hexdigest()
        yield data


def received(folder: Path) -> dict[str, str]:
    """SOP Instance UID -> Pixel Data SHA-256 of every file storescp wrote."""
    import pydicom

    found: dict[str, str] = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        uid = str(ds.SOPInstanceUID)
        if uid in found:
            raise SystemExit(f"{uid} received twice")
        found[uid] = hashlib.sha256(ds.PixelData).hexdigest()
    return found


def empty(folder: Path) -> int:
    """Remove the files of ``folder``; how many there were."""
    count = 0
    for path in folder.iterdir():
        path.unlink()
        count += 1
    return count


# --------------------------------------------------------------------------- the profile

# Stages of the broker's C-MOVE, matched from the leaf up: the first frame that names one.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dcmread (instance decoded for pynetdicom)", ("dcmread (pydicom/filereader.py",)),
    (
        "dataset encoding (pynetdicom dsutils.encode -> pydicom write)",
        ("encode (pynetdicom/dsutils.py", "dcmwrite (pydicom/filewriter.py"),
    ),
    (
        "P-DATA fragmentation (encode_msg, PDVs)",
        ("encode_msg (pynetdicom/dimse_messages.py", "_generate_pdv_fragments ("),
    ),
    ("PDU encoding (pynetdicom pdu/pdu_items)", ("pynetdicom/pdu.py", "pynetdicom/pdu_items.py")),
    (
        "socket send/recv (pynetdicom transport)",
        ("send (pynetdicom/transport.py", "recv (pynetdicom/transport.py", "ready (pynetdicom"),
    ),
    (
        "archive fetch (WADO-RS read, multipart parsing / C-GET)",
        ("broker/dicom/archive.py", "broker/dicom/multipart.py", "http/client.py", "httpx/"),
    ),
    ("SOP UID check (media_storage_sop_instance_uid)", ("media_storage_sop_instance_uid (",)),
    ("database (decision, audit)", ("django/", "psycopg/")),
    ("DUL reactor loop / queues (pynetdicom dul)", ("pynetdicom/dul.py",)),
    ("DIMSE provider / queues", ("pynetdicom/dimse.py", "queue.py", "threading.py")),
    ("C-MOVE service class", ("pynetdicom/service_class.py",)),
    ("association", ("pynetdicom/association.py",)),
)


def thread_kind(frames: list[str]) -> str:
    text = ";".join(frames)
    if "run_reactor (pynetdicom/dul.py" in text:
        return "DUL threads (PDU reading, encoding, sending)"
    if "pynetdicom/association.py" in text:
        return "association threads (handler, C-STORE sub-operations)"
    if "serve_forever (socketserver.py" in text:
        return "server accept loop"
    return "other (main thread, ...)"


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, markers in STAGES:
            if any(marker in frame for marker in markers):
                return stage
    return "other"


def profile_broker(py_spy: str, pid: int, run: Callable[[], None], out: Path) -> dict[str, Any]:
    """py-spy record of the broker process while ``run()`` runs; samples by thread kind,
    by stage, and by function (self: the leaf; inclusive: anywhere in the stack)."""
    recorder = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)  # attached
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    time.sleep(0.3)
    recorder.send_signal(signal.SIGINT)
    _, errors = recorder.communicate(timeout=60)
    if not out.exists():
        raise SystemExit(f"py-spy wrote nothing: {errors.decode(errors='replace')[-500:]}")
    kinds: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        kinds[thread_kind(frames)] += count
        stages[stage_of(frames)] += count
        own[frames[-1]] += count  # the leaf with its line
        for frame in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            inclusive[frame] += count
    if not total:
        raise SystemExit("py-spy recorded no sample of the broker")
    return {
        "samples": total,
        "seconds": wall,
        # 250 samples/s of each thread on CPU: samples / 250 / wall = cores busy in Python.
        "cores_busy": total / 250 / wall,
        "threads": [(k, n / total) for k, n in kinds.most_common()],
        "stages": [(k, n / total) for k, n in stages.most_common()],
        "self": [(frame, n / total) for frame, n in own.most_common(20)],
        "inclusive": [(frame, n / total) for frame, n in inclusive.most_common(30)],
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise SystemExit(f"DCMTK's {tool} is missing: apt-get install dcmtk")
    if args.profile and not args.py_spy:
        raise SystemExit("--profile needs py-spy (--py-spy PATH)")
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-move-"))
    env = {
        **os.environ,
        "DATABASE_URL": prepare_database(args.database_url, workdir),
        "RELAIS_DATA_DIR": str(workdir / "data"),
        "DJANGO_SETTINGS_MODULE": "broker.settings",
        "RELAIS_DICOM_AE_TITLE": BROKER_AE,
        "RELAIS_DICOM_TIMEOUT": "120",
        "LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connections
    from django.utils import timezone

    from audit.types import Actor
    from broker.archives import institution_archive
    from broker.harvest import harvest_run
    from broker.models import Manifest, ManifestStatus, Membership, Professional, Role
    from broker.services import institution_create
    from consent.services import directive_record
    from sharing import services
    from tests.peers.orthanc import free_port, start_orthanc

    call_command("migrate", verbosity=0)
    store_port, broker_port = free_port(), free_port()
    while broker_port == store_port:
        broker_port = free_port()
    # Orthanc moves to PM_PACS (storescp) and, with --source-transport dimse, lets the
    # broker C-GET (its AE at 127.0.0.1).
    archive = start_orthanc(
        workdir / "orthanc",
        aet=ARCHIVE_AE,
        modalities={
            "portmael": (PACS_AE, "127.0.0.1", store_port),
            "relais": (BROKER_AE, "127.0.0.1", broker_port),
        },
    )
    processes: dict[str, Any] = {}
    received_dir = workdir / "received"
    received_dir.mkdir()
    results: dict[str, Any] = {
        "database": "PostgreSQL" if args.database_url else "SQLite",
        "size_mb": args.size_mb,
        "runs": args.runs,
        "store_files": args.store_files,
        "storescp_max_pdu": args.max_pdu or 16384,
        "source_transport": args.source_transport,
    }
    try:
        study, instances = ct_instances(args.size_mb, dt.date(2025, 1, 1))
        expected: dict[str, str] = {}
        load(archive, study, pixel_hashes(instances, expected))
        stats = archive.statistics()
        print(
            f"Orthanc: {stats['CountInstances']} instances, {stats['TotalDiskSizeMB']} MB",
            file=sys.stderr,
        )

        # The region, as tests/integration/test_gateway_dimse.py sets it up.
        actor = Actor.system("benchmark")
        now = timezone.now()
        chu = institution_create(
            finess="350000014",
            name="CHU du banc",
            patient_id_issuer=ISSUER,
            ae_title=ARCHIVE_AE,
            dicom_host="127.0.0.1",
            dicom_port=archive.dicom_port,
            dicomweb_url=archive.dicomweb_url + "/",
            archive_transport=args.source_transport,
            actor=actor,
            now=now,
        )
        summary = harvest_run(
            institution=chu,
            client_factory=lambda: institution_archive(chu, "dicomweb"),
            transport="dicomweb",
            actor=actor,
        )
        manifest = Manifest.objects.get(
            study_instance_uid=study.uid, status=ManifestStatus.APPROVED
        )
        if manifest.instance_count != study.instances:
            raise SystemExit(f"harvest: {manifest.instance_count} instances, {summary}")
        portmael = institution_create(
            finess="560000019",
            name="CH de Port-Maël",
            patient_id_issuer="CH-PORTMAEL",
            ae_title=PACS_AE,
            dicom_host="127.0.0.1",
            dicom_port=store_port,
            actor=actor,
            now=now,
        )

        def user(username: str, institution: Any, role: str) -> Any:
            account = get_user_model().objects.create_user(username=username)
            professional = Professional.objects.create(user=account)
            Membership.objects.create(professional=professional, institution=institution, role=role)
            return account

        doctor = user("dr.martin", portmael, Role.REFERRING_DOCTOR)
        radiologist = user("dr.bernard", chu, Role.RADIOLOGIST)
        clerk = user("clerk.chu", chu, Role.ADMISSIONS_CLERK)
        patient = manifest.source_identifier.patient
        ticket = services.request_create(
            user=doctor,
            purpose="treatment",
            patient=patient,
            institution=portmael,
            studies=[study.uid],
            justification="banc d'essai du C-MOVE",
            actor=actor,
            now=timezone.now(),
        )
        if ticket.state == "pending":
            services.request_approve(
                user=radiologist, ticket=ticket, actor=actor, now=timezone.now()
            )
        directive_record(
            patient=patient,
            institution=chu,
            recorder=clerk,
            kind="consent",
            scope="institution",
            value=portmael.finess,
            note="consentement oral",
            actor=actor,
            now=timezone.now(),
        )
        connections.close_all()

        ports = {"direct": archive.dicom_port, "broker": broker_port}
        called = {"direct": ARCHIVE_AE, "broker": BROKER_AE}

        def move(name: str) -> Move:
            return movescu(ports[name], called[name], study.uid, args.timeout)

        def failed(name: str, got: Move) -> SystemExit:
            tail = "\n".join(got.output.splitlines()[-25:])
            return SystemExit(
                f"{name} C-MOVE failed: exit {got.returncode}, status {got.status!r}, "
                f"completed {got.completed}, failed {got.failed}\n{tail}"
            )

        # Once per path, to a storescp that writes: every instance, the uploaded pixels.
        processes["storescp"] = start_storescp(
            store_port, received_dir, args.max_pdu, workdir / "storescp.log"
        )
        processes["broker"] = start_broker(env, broker_port, workdir / "broker.log")
        broker_pid = processes["broker"].pid
        results["rss_boot_mb"] = status_kb(broker_pid, "VmRSS") / 1024
        verified: dict[str, dict[str, Any]] = {}
        moves = 0
        for name in PATHS:
            got = move(name)
            moves += name == "broker"
            if not got.ok:
                raise failed(name, got)
            found = received(received_dir)
            empty(received_dir)
            verified[name] = {
                "files": len(found),
                "uids_match": found.keys() == expected.keys(),
                "pixels_match": found == expected,
                "completed": got.completed,
            }
            print(f"  verification, {name}: {verified[name]}", file=sys.stderr)
            if found != expected:
                raise SystemExit(f"{name}: the instances received are not the study's")
        results["verified"] = verified
        time.sleep(0.5)
        results["rss_idle_mb"] = status_kb(broker_pid, "VmRSS") / 1024
        if not args.store_files:
            stop(processes.pop("storescp"))
            processes["storescp"] = start_storescp(
                store_port, None, args.max_pdu, workdir / "storescp.log"
            )
        hwm_resettable = reset_hwm(broker_pid)

        def snapshot() -> tuple[float, ...]:
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            return (
                cpu_seconds(archive.process.pid),
                cpu_seconds(broker_pid),
                cpu_seconds(processes["storescp"].pid),
                children.ru_utime + children.ru_stime,  # movescu, once reaped
                time.process_time(),
                *machine_seconds(),
            )

        def cpu_per_gb(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, float]:
            used = [b - a for a, b in zip(before, after, strict=True)]
            gigabytes = study.stored_bytes / 1e9
            measured = sum(used[:5])
            figures = dict(zip(("orthanc", "broker", "storescp", "movescu"), used[:4], strict=True))
            figures["others"] = max(0.0, used[5] - measured)  # the rest of the machine
            figures["irq"] = used[6]
            figures["steal"] = used[7]
            return {key: value / gigabytes for key, value in figures.items()}

        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
        for run in range(args.runs):
            order = PATHS if run % 2 == 0 else PATHS[::-1]
            for name in order:
                reset_hwm(broker_pid)
                before = snapshot()
                with RssSampler(broker_pid) as sampler:
                    got = move(name)
                after = snapshot()
                moves += name == "broker"
                if not got.ok:
                    raise failed(name, got)
                files = empty(received_dir) if args.store_files else None
                if got.completed is not None and got.completed != study.instances:
                    raise failed(name, got)
                if files is not None and files != study.instances:
                    raise SystemExit(f"{name}: {files} files of {study.instances}")
                hwm = status_kb(broker_pid, "VmHWM") if hwm_resettable else 0
                row = {
                    "seconds": got.seconds,
                    "mb_per_s": study.stored_bytes / MB / got.seconds,
                    "completed": got.completed,
                    "files": files,
                    "cpu_s_per_gb": cpu_per_gb(before, after),
                    "broker_rss_peak_mb": max(sampler.peak_kb, hwm) / 1024,
                }
                rows[name].append(row)
                print(
                    f"  run {run + 1} {name:6}: {row['mb_per_s']:6.0f} MB/s "
                    f"({got.seconds:.2f} s), completed {got.completed}, CPU s/GB "
                    + " / ".join(f"{k} {v:.2f}" for k, v in row["cpu_s_per_gb"].items())
                    + f", broker RSS peak {row['broker_rss_peak_mb']:.1f} MiB",
                    file=sys.stderr,
                )
        results["rows"] = rows
        results["ratio_runs"] = [
            b["mb_per_s"] / d["mb_per_s"]
            for d, b in zip(rows["direct"], rows["broker"], strict=True)
        ]
        results["rss_after_mb"] = status_kb(broker_pid, "VmRSS") / 1024

        if args.profile:

            def broker_moves() -> None:
                for _ in range(args.profile_runs):
                    got = move("broker")
                    if not got.ok:
                        raise failed("broker", got)
                    if args.store_files:
                        empty(received_dir)

            results["profile"] = profile_broker(
                args.py_spy, broker_pid, broker_moves, workdir / "pyspy.txt"
            )
            moves += args.profile_runs

        results["audit"] = audit_check(study, moves)
        results["instances"] = study.instances
        results["stored_mb"] = study.stored_bytes / MB
    finally:
        for name in ("broker", "storescp"):
            stop(processes.get(name))
        archive.stop()
        connections.close_all()
        if args.keep:
            print(f"kept {workdir} and the database", file=sys.stderr)
        else:
            drop_database(args.database_url)
            shutil.rmtree(workdir, ignore_errors=True)

    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def audit_check(study: Study, moves: int) -> dict[str, Any]:
    """One successful C-MOVE Instances Transferred record per broker move, every instance."""
    from django.db import connections

    from audit.events import EventCode
    from audit.models import AuditEvent

    ends = AuditEvent.objects.filter(code=EventCode.TRANSFER_END, details__dimse="C-MOVE")
    outcomes = Counter(ends.values_list("outcome", flat=True))
    counts = Counter(d.get("instances") for d in ends.values_list("details", flat=True))
    figures = {
        "moves": moves,
        "end_records": ends.count(),
        "outcomes": dict(outcomes),
        "every_instance": dict(counts) == {study.instances: moves},
    }
    connections.close_all()
    return figures


def report(results: dict[str, Any]) -> None:
    rows = results["rows"]
    keys = ("orthanc", "broker", "storescp", "movescu", "others", "irq")
    print(
        f"\nC-MOVE of a {results['size_mb']} MiB CT study ({results['instances']} instances, "
        f"{results['stored_mb']:.1f} MB) to DCMTK storescp "
        f"({'writing files' if results['store_files'] else '--ignore: received, not written'}, "
        f"max PDU {results['storescp_max_pdu']}), asked by movescu; broker source: "
        f"{results['source_transport']}; {results['database']}; medians (min-max) of "
        f"{results['runs']} runs each, alternated"
    )
    print()
    print(
        "| path | MB/s | seconds | sub-operations completed | CPU s/GB: Orthanc / broker / "
        "storescp / movescu | CPU s/GB: other processes / irq | broker RSS peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in PATHS:
        runs = rows[name]

        def cpu(which: tuple[str, ...], runs: list[dict[str, Any]] = runs) -> str:
            return " / ".join(f"{median([r['cpu_s_per_gb'][k] for r in runs]):.2f}" for k in which)

        completed = {r["completed"] for r in runs}
        print(
            f"| {name} | {spread([r['mb_per_s'] for r in runs])} "
            f"| {spread([r['seconds'] for r in runs], '{:.2f}')} "
            f"| {', '.join(str(c) for c in sorted(completed, key=str))} "
            f"| {cpu(keys[:4])} | {cpu(keys[4:])} "
            f"| {max(r['broker_rss_peak_mb'] for r in runs):.1f} |"
        )
    ratio = median(results["ratio_runs"])
    ratio_of_medians = median([r["mb_per_s"] for r in rows["broker"]]) / median(
        [r["mb_per_s"] for r in rows["direct"]]
    )
    results["ratio"] = ratio
    results["target_met"] = ratio >= 0.8
    print()
    print("| measure | target | measured | met |")
    print("|---|---|---|---|")
    print(
        f"| throughput broker ÷ direct (median of the runs' ratios) | ≥ 0.8 "
        f"| **{spread(results['ratio_runs'], '{:.2f}')}** (ratio of medians "
        f"{ratio_of_medians:.2f}) | {'yes' if ratio >= 0.8 else 'no'} |"
    )
    peak = max(r["broker_rss_peak_mb"] for r in rows["broker"])
    print(
        f"| broker RSS peak during a move (idle {results['rss_idle_mb']:.1f} MiB after the "
        f"warm-up, {results['rss_boot_mb']:.1f} at boot) | | {peak:.1f} MiB "
        f"(+{peak - results['rss_idle_mb']:.1f}) | |"
    )
    checks = results["verified"]
    print(
        "\nVerification (one move per path to a storescp writing files): "
        + "; ".join(
            f"{name}: {c['files']} files, SOP Instance UIDs "
            f"{'= the study' if c['uids_match'] else 'DIFFER'}, pixel data "
            f"{'identical' if c['pixels_match'] else 'DIFFERENT'}"
            for name, c in checks.items()
        )
    )
    audit = results["audit"]
    print(
        f"Audit: {audit['moves']} broker moves, {audit['end_records']} C-MOVE Instances "
        f"Transferred records, outcomes {audit['outcomes']}, every instance: "
        f"{audit['every_instance']}"
    )
    if "profile" in results:
        profile = results["profile"]
        print(
            f"\npy-spy, broker process, {profile['samples']} samples in {profile['seconds']:.1f} s "
            f"of broker moves (~{profile['cores_busy']:.2f} cores busy in Python on average)"
        )
        for title, key in (("by thread", "threads"), ("by stage", "stages")):
            print(f"{title}:")
            for name, share in profile[key]:
                print(f"  {100 * share:5.1f} %  {name}")
        print("self (leaf line):")
        for frame, share in profile["self"]:
            print(f"  {100 * share:5.1f} %  {frame}")
        print("inclusive:")
        for frame, share in profile["inclusive"]:
            print(f"  {100 * share:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
