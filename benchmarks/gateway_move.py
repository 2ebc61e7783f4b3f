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
A move that fails (its final status, or fewer sub-operations than instances) is reported
with what the broker logged meanwhile, kept out of the figures and tried again (``--retries``,
default 2); the failures are listed at the end. After the runs, the audit trail is read back:
one Instances Transferred record per broker move, successful and with the study's instance
count for each move that succeeded.

``--profile`` records the broker process with py-spy (``--py-spy PATH``; ``record --rate 250
--format raw --threads``, one record per move) during ``--profile-runs`` broker moves (not
timed), twice: with ``--gil`` (only the thread holding the GIL: where the interpreter's time
goes) and without (every thread py-spy does not find idle: pynetdicom's reactors, which sleep
0.1 ms at a time, look busy there). It prints each thread's CPU per move (/proc/PID/task:
the association thread running the C-MOVE handler, the DUL thread of the sub-association to
storescp, the DUL thread of movescu's association, ...) with its share of the samples, the
samples by stage (archive fetch, dcmread, dataset encoding, DIMSE command sets, P-DATA
fragmentation, PDU encoding, socket, waits, ...), and the top functions, self and inclusive.
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
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_database import fresh_database  # noqa: E402
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
    parser.add_argument(
        "--retries", type=int, default=2, help="a failed move is reported, then tried again"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and DB")
    return parser.parse_args()


# --------------------------------------------------------------------------- database


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
    broker_log: str = ""  # what the broker logged during the move (warnings and errors)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == "Success" and not self.failed

    def why(self) -> str:
        """The broker's first warnings and its last words, in a line or two."""
        lines = [line for line in self.broker_log.splitlines() if line.strip()]
        noted = [line for line in lines if " WARNING " in line or " ERROR " in line]
        shown = [*noted[:3], *(lines[-1:] if lines and lines[-1] not in noted[:3] else [])]
        return " | ".join(line[:300] for line in shown) or "(the broker logged nothing)"


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


def tail_of(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


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

# Leaves that are a thread waiting rather than working (py-spy counts a thread that sleeps
# 0.1 ms at a time, as pynetdicom's reactors do, as active).
WAITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "reactor loops' own lines (mostly time.sleep polling: DUL 0.1 ms, association 1 ms)",
        ("run_reactor (pynetdicom/dul.py", "_run_reactor (pynetdicom/association.py"),
    ),
    (
        "waiting (Condition/Event wait, select)",
        ("Condition.wait (", "Event.wait (", ".select (selectors.py", "Queue.get (queue.py"),
    ),
)
# Then the stages of the broker's C-MOVE, in this order: the first whose marker is anywhere
# in the stack (the command set's encoding, inside the DIMSE message, before the dataset's).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "archive fetch (WADO-RS read and multipart parsing, or C-GET)",
        ("broker/dicom/archive.py", "broker/dicom/multipart.py", "http/client.py", "httpx/"),
    ),
    ("dcmread of each instance (sharing/dimse.py)", ("dcmread (pydicom/filereader.py",)),
    ("database (decision, audit)", ("django/db/", "psycopg/")),
    (
        "DIMSE messages: command sets built, encoded, decoded (pynetdicom dimse_messages)",
        (
            "primitive_to_message (pynetdicom",
            "message_to_primitive (pynetdicom",
            "_set_command_group_length (pynetdicom",
            "DIMSEMessage.__init__ (pynetdicom",
            "decode_msg (pynetdicom",
        ),
    ),
    (
        "dataset encoding for C-STORE (dsutils.encode -> pydicom write_dataset)",
        ("encode (pynetdicom/dsutils.py",),
    ),
    (
        "P-DATA fragmentation (encode_msg, PDV fragments)",
        ("encode_msg (pynetdicom/dimse_messages.py", "_generate_pdv_fragments (pynetdicom"),
    ),
    ("pynetdicom events (evt.trigger, Event objects, handlers)", ("trigger (pynetdicom/events",)),
    (
        "PDU encoding / decoding (pynetdicom pdu, pdu_items, primitives)",
        ("pynetdicom/pdu.py", "pynetdicom/pdu_items.py", "pynetdicom/pdu_primitives.py"),
    ),
    ("socket send / recv / select (pynetdicom transport)", ("pynetdicom/transport.py",)),
    ("state machine (pynetdicom fsm)", ("pynetdicom/fsm.py",)),
    ("queues and locks (queue, threading)", ("(queue.py", "(threading.py")),
    ("DUL reactor (pynetdicom dul)", ("pynetdicom/dul.py",)),
    ("DIMSE provider (pynetdicom dimse)", ("pynetdicom/dimse.py",)),
    (
        "C-MOVE handler, service class, association (the rest)",
        ("sharing/dimse.py", "broker/dicom/scp.py", "pynetdicom/"),
    ),
)


def stage_of(frames: list[str]) -> str:
    for stage, markers in WAITS:
        if any(marker in frames[-1] for marker in markers):
            return stage
    for stage, markers in STAGES:
        if stage.startswith("queues"):  # only as the leaf
            if any(marker in frames[-1] for marker in markers):
                return stage
        elif any(marker in frame for frame in frames for marker in markers):
            return stage
    return "other"


class TaskCpu:
    """CPU seconds (utime + stime) each thread of ``pid`` spends while the block runs, read
    from /proc/PID/task every ``interval`` (a thread that ends loses at most that much)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[int, float]:
        tick = os.sysconf("SC_CLK_TCK")
        found = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            found[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        return found

    def __enter__(self) -> TaskCpu:
        self.base = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(self._read())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(self._read())

    @property
    def used(self) -> dict[int, float]:
        return {tid: cpu - self.base.get(tid, 0.0) for tid, cpu in self.last.items()}


ROLES = {
    "acceptor": "movescu's association thread (C-MOVE handler: fetch, dcmread, encode, "
    "fragment, C-STORE sub-operations)",
    "dul_acceptor": "DUL thread of movescu's association (move responses)",
    "dul_requestor": "DUL thread of the sub-association to storescp (P-DATA PDUs sent)",
    "requestor": "sub-association's requestor thread (association set-up)",
    "dul": "DUL thread (of which association: not told apart)",
    "server": "server accept loop",
    "main": "main thread (waits for a signal)",
    "other": "other",
}


MOVE_THREADS = ("acceptor", "dul_acceptor", "requestor", "dul_requestor")


def thread_roles(threads: dict[int, str]) -> dict[int, str]:
    """Each thread of one move's recording (tid -> Python name) by its role: pynetdicom
    names association threads ``AcceptorThread@…`` / ``RequestorThread@…``, and each
    starts a DUL thread (``Thread-N (run_reactor)``): the acceptor's first."""
    roles: dict[int, str] = {}
    duls = []
    for tid, name in threads.items():
        if name.startswith("AcceptorThread@"):
            roles[tid] = "acceptor"
        elif name.startswith("RequestorThread@"):
            roles[tid] = "requestor"
        elif name == "MainThread":
            roles[tid] = "main"
        elif found := re.fullmatch(r"Thread-(\d+) \(run_reactor\)", name):
            duls.append((int(found.group(1)), tid))
        elif "serve_forever" in name:
            roles[tid] = "server"
        else:
            roles[tid] = "other"
    if len(duls) == 2:
        (_, first), (_, second) = sorted(duls)
        roles[first], roles[second] = "dul_acceptor", "dul_requestor"
    # else: told apart by the order the threads started (`profile_broker`), or left "dul"
    return roles


def profile_broker(
    py_spy: str, pid: int, move: Callable[[], None], runs: int, workdir: Path, *, gil: bool
) -> dict[str, Any]:
    """py-spy records of the broker process, one per move (so that a thread id the system
    reuses in the next move is not taken for the same thread), and each thread's CPU
    (/proc) during the move: samples by thread role, by stage, by function (self: the leaf
    line; inclusive: anywhere in the stack), CPU seconds per move by role.

    ``gil``: only the thread holding the GIL is sampled (``--gil``): where the
    interpreter's one core goes; else every thread py-spy does not find idle (a thread that
    sleeps 0.1 ms at a time, as pynetdicom's reactors do, looks active)."""
    roles: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    total = 0
    wall = process_cpu = 0.0
    for run in range(runs):
        out = workdir / f"pyspy-{'gil' if gil else 'all'}-{run}.txt"
        command = [
            py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
            "--threads", *(["--gil"] if gil else []), "-o", str(out),
        ]  # fmt: skip
        recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.5)  # attached
        started = time.perf_counter()
        with TaskCpu(pid) as tasks:
            move()
        wall += time.perf_counter() - started
        time.sleep(0.3)
        recorder.send_signal(signal.SIGINT)
        _, errors = recorder.communicate(timeout=60)
        if not out.exists():
            raise SystemExit(f"py-spy wrote nothing: {errors.decode(errors='replace')[-500:]}")
        stacks = []
        names: dict[int, str] = {}
        for line in out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            head = re.match(r"thread \((\d+)\): ([^;]*);", stack)
            if not head or not count_text.isdigit():
                continue
            tid = int(head.group(1))
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if names.get(tid) != "serve_forever":
                names[tid] = head.group(2)
            if any("serve_forever (socketserver.py" in f for f in frames):
                names[tid] = "serve_forever"
            stacks.append((tid, frames, int(count_text)))
        role_of = thread_roles(names)
        # A thread py-spy never sampled (with --gil: never held the GIL) has no name: the
        # threads a move starts are, in order, the acceptor, its DUL, the requestor, its DUL.
        started_threads = sorted(tid for tid in tasks.last if tid not in tasks.base)
        if len(started_threads) == len(MOVE_THREADS):
            for tid, role in zip(started_threads, MOVE_THREADS, strict=True):
                role_of.setdefault(tid, role)
        for tid, name in names.items():
            role_of.setdefault(tid, "dul" if "run_reactor" in name else "other")
        for tid, frames, count in stacks:
            total += count
            roles[role_of[tid]] += count
            stages[stage_of(frames)] += count
            own[frames[-1]] += count
            for frame in {re.sub(r":\d+\)$", ")", f) for f in frames}:
                inclusive[frame] += count
        for tid, seconds in tasks.used.items():
            cpu[role_of.get(tid, "other")] += seconds
            process_cpu += seconds
    if not total:
        raise SystemExit("py-spy recorded no sample of the broker")
    return {
        "gil": gil,
        "runs": runs,
        "samples": total,
        "seconds": wall,
        # 250 samples/s of each thread sampled: samples / 250 / wall = threads busy on
        # average (with --gil: the share of the time the GIL is held).
        "busy": total / 250 / wall,
        "cpu_s_per_move": process_cpu / runs,
        "roles": [
            (ROLES[role], cpu[role] / runs, roles[role] / total)
            for role in sorted(set(cpu) | set(roles), key=lambda r: -cpu[r])
        ],
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
        "DATABASE_URL": fresh_database(args.database_url, workdir, DATABASE),
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

        broker_log = workdir / "broker.log"
        failures: list[dict[str, Any]] = []

        def move(name: str) -> Move:
            offset = broker_log.stat().st_size if broker_log.exists() else 0
            got = movescu(ports[name], called[name], study.uid, args.timeout)
            if broker_log.exists():
                with broker_log.open("rb") as log:
                    log.seek(offset)
                    got.broker_log = log.read().decode(errors="replace")
            return got

        def complete(got: Move) -> bool:
            return got.ok and got.completed in (None, study.instances)

        def note_failure(name: str, got: Move, where: str) -> None:
            """A failed move is recorded and reported, then tried again (``--retries``)."""
            failures.append(
                {
                    "where": where,
                    "path": name,
                    "seconds": got.seconds,
                    "status": got.status,
                    "completed": got.completed,
                    "failed": got.failed,
                    "why": got.why(),
                }
            )
            print(
                f"  {where} {name}: MOVE FAILED after {got.seconds:.1f} s (status "
                f"{got.status!r}, completed {got.completed}, failed {got.failed}): {got.why()}",
                file=sys.stderr,
            )
            if args.store_files or where == "verification":
                empty(received_dir)

        def failed(name: str, got: Move) -> SystemExit:
            """The move's failure, with movescu's last words and the logs of the broker and
            of storescp (the temporary folder is removed)."""
            logs = [f"movescu:\n{tail_of(got.output, 12)}"]
            for log in ("broker.log", "storescp.log"):
                if (workdir / log).exists():
                    text = (workdir / log).read_text(errors="replace")
                    logs.append(f"{log}:\n{tail_of(text, 40)}")
            return SystemExit(
                f"{name} C-MOVE failed: exit {got.returncode}, status {got.status!r}, "
                f"completed {got.completed}, failed {got.failed}\n" + "\n".join(logs)
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
            for _ in range(args.retries + 1):
                got = move(name)
                moves += name == "broker"
                if complete(got):
                    break
                note_failure(name, got, "verification")
            else:
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
                for _ in range(args.retries + 1):
                    reset_hwm(broker_pid)
                    before = snapshot()
                    with RssSampler(broker_pid) as sampler:
                        got = move(name)
                    after = snapshot()
                    moves += name == "broker"
                    if complete(got):
                        break
                    note_failure(name, got, f"run {run + 1}")
                else:
                    raise failed(name, got)
                files = empty(received_dir) if args.store_files else None
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

            def broker_move() -> None:
                nonlocal moves
                for _ in range(args.retries + 1):
                    got = move("broker")
                    moves += 1
                    if complete(got):
                        break
                    note_failure("broker", got, "profile")
                else:
                    raise failed("broker", got)
                if args.store_files:
                    empty(received_dir)

            for key, gil in (("profile_gil", True), ("profile_all", False)):
                results[key] = profile_broker(
                    args.py_spy, broker_pid, broker_move, args.profile_runs, workdir, gil=gil
                )

        results["failures"] = failures
        broker_failures = sum(f["path"] == "broker" for f in failures)
        results["audit"] = audit_check(study, moves, broker_failures)
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


def audit_check(study: Study, moves: int, failed: int) -> dict[str, Any]:
    """One C-MOVE Instances Transferred record per broker move: successful, with every
    instance, for each move that succeeded; a failure for each one that failed."""
    from django.db import connections

    from audit.events import EventCode
    from audit.models import AuditEvent

    ends = AuditEvent.objects.filter(code=EventCode.TRANSFER_END, details__dimse="C-MOVE")
    outcomes = Counter(ends.values_list("outcome", flat=True))
    counts = Counter(
        d.get("instances") for d in ends.filter(outcome=0).values_list("details", flat=True)
    )
    figures = {
        "moves": moves,
        "failed_moves": failed,
        "end_records": ends.count(),
        "outcomes": dict(outcomes),
        "every_instance": dict(counts) == {study.instances: moves - failed}
        and outcomes.get(0, 0) == moves - failed,
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
        peak = f"{max(r['broker_rss_peak_mb'] for r in runs):.1f}" if name == "broker" else "-"
        print(
            f"| {name} | {spread([r['mb_per_s'] for r in runs])} "
            f"| {spread([r['seconds'] for r in runs], '{:.2f}')} "
            f"| {', '.join(str(c) for c in sorted(completed, key=str))} "
            f"| {cpu(keys[:4])} | {cpu(keys[4:])} | {peak} |"
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
        f"Audit: {audit['moves']} broker moves ({audit['failed_moves']} failed), "
        f"{audit['end_records']} C-MOVE Instances Transferred records, outcomes "
        f"{audit['outcomes']}, every successful move with every instance: "
        f"{audit['every_instance']}"
    )
    failures = results["failures"]
    print(
        f"Failed moves (tried again, not in the figures): {len(failures)}"
        + "".join(
            f"\n  {f['where']} {f['path']}: {f['seconds']:.1f} s, status {f['status']!r}, "
            f"completed {f['completed']}, failed {f['failed']}: {f['why']}"
            for f in failures
        )
    )
    for key in ("profile_gil", "profile_all"):
        if key not in results:
            continue
        profile = results[key]
        what = (
            f"only the thread holding the GIL (--gil): held {100 * profile['busy']:.0f} % "
            "of the time"
            if profile["gil"]
            else f"every thread not idle: {profile['busy']:.2f} threads on average"
        )
        print(
            f"\npy-spy, broker process, {profile['runs']} moves, {profile['samples']} samples "
            f"in {profile['seconds']:.1f} s, {what}"
        )
        print(
            f"by thread: CPU s per move (/proc; {profile['cpu_s_per_move']:.2f} s in all), "
            "share of the samples"
        )
        for role, seconds, share in profile["roles"]:
            print(f"  {seconds:5.2f} s  {100 * share:5.1f} %  {role}")
        print("by stage (a wait by its leaf, else the first of STAGES named in the stack):")
        for name, share in profile["stages"]:
            print(f"  {100 * share:5.1f} %  {name}")
        print("self (leaf line):")
        for frame, share in profile["self"]:
            print(f"  {100 * share:5.1f} %  {frame}")
        print("inclusive:")
        for frame, share in profile["inclusive"]:
            print(f"  {100 * share:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
