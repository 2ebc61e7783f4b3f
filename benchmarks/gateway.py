#!/usr/bin/env python
"""The retrieval gateway (``/dicomweb/``) against the archive it fronts: a whole CT study
fetched through the broker, next to the same study fetched from Orthanc's own WADO-RS.

    .venv/bin/python benchmarks/gateway.py \
        --database-url postgres://postgres@127.0.0.1:5432/postgres --soak 100 \
        --profile --py-spy /tmp/pyspy/bin/py-spy [--json FILE]
    # defaults: --sizes-mb 100 500 --runs 5 --concurrency 10 --concurrent-rounds 3
    #           --instances 100; --what-if shared-ssl-context serves a patched gateway

A fresh database (PostgreSQL: ``relais_bench_gateway`` on the server of ``--database-url``,
dropped and re-created; SQLite: a file in a temporary folder), one real Orthanc (its own
ports and storage) holding one synthetic CT study per size (512 x 512 16-bit images, random
pixels, explicit VR little endian: 0.5 MiB an instance, so 200 for 100 MiB and 1,000 for
500 MiB), harvested over DICOMweb; a CHU radiologist's treatment ticket on both studies and
its retrieval token (RELAIS_TOKEN_LIFETIME_SECONDS=3600); the broker served by gunicorn
(``broker.wsgi``, one gthread worker, ``--threads``, default concurrency + 2), with the same
data directory (signing keys) and database.

The same client (one new connection per fetch, built before the clock starts, the body read
as it arrives and only counted, its last bytes checked for the closing boundary) fetches, in
the same run, taking turns. ``--client lean`` (the default): ``http.client``, ``readinto`` a
1 MiB buffer (each call fills it; the first body byte is timed by a ``peek``), the cheapest
receiver in Python (0.3-0.45 CPU s/GB here, see "the receiving side alone" below);
``--client httpx``: httpx ``iter_raw`` (64 KiB reads), as a Python viewer would, three to four
times that. All of it shares the machine's 2 cores with Orthanc and the gateway, which a viewer on
its own workstation would not: every CPU second the client spends is taken from the two
servers being compared, the more so the more the path needs (the gateway, three processes).

- **direct**: ``GET {dicomweb_url}/studies/{uid}`` from Orthanc with the Accept the gateway's
  archive client sends (``multipart/related; type="application/dicom"; transfer-syntax=*``:
  no transcoding, the same work on Orthanc's side);
- **relay** (``--no-relay`` to skip): the cheapest relay in Python, served by the same
  gunicorn set-up (`relay_app`: Orthanc's answer passed on in reads of up to 1 MiB, nothing
  checked): what any Python gateway pays on this machine for an extra process and an extra
  pair of socket copies;
- **gateway**: ``GET /dicomweb/studies/{uid}`` with ``Authorization: Bearer`` and
  ``Accept: multipart/related; type="application/dicom"``.

Measured, medians of ``--runs``: throughput (MB/s, 10^6 bytes), time to the first body byte
(TTFB), CPU seconds per GB of Orthanc, of the server's worker, of the client, and of the rest
of the machine (other processes, interrupts, steal: another session's tests show there), and
the server worker's RSS (VmRSS sampled every 50 ms, and VmHWM reset before each transfer
through /proc/PID/clear_refs) against the gateway's idle RSS after a warm-up request. Then
``--concurrency`` streams at once (threads, the largest study unless ``--concurrent-mb``) per
path: aggregate MB/s and errors (an exception, a status other than 200, a body without its
closing boundary or of another length than the single fetch's). Every path's answer is
checked once per size: as many parts as the study has instances, the same bytes (SHA-256 per
SOP Instance UID) as from Orthanc. Then ``--instances`` requests of one instance each on one
keep-alive client (requests/s); ``--soak N`` transfers of the smallest study with the RSS
after each; the steps before the gateway's first byte timed in this process; the receiving
side alone (several readers of the largest study, CPU per GB); the audit trail read back (one
successful Instances Transferred record per transfer, with its instance count).

``--profile`` records the gateway worker with py-spy (``--py-spy PATH``; the wheel installs
with ``pip install --target DIR``) during two transfers of the largest study and during the
one-instance requests, and prints where the samples of request threads fall.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_database import fresh_database  # noqa: E402

ACCEPT_GATEWAY = 'multipart/related; type="application/dicom"'
# What the gateway's archive client asks (broker/dicom/archive.py): no transcoding.
ACCEPT_DIRECT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ROWS = COLUMNS = 512
INSTANCE_PIXEL_BYTES = ROWS * COLUMNS * 2
UID_PREFIX = "1.2.826.0.1.3680043.8.498.73."  # pydicom's root, beside tests/peers/studies.py
ISSUER = "BENCH-GATEWAY"
MB = 1_000_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 500], help="MiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--concurrent-mb", type=int, default=None, help="default: largest size")
    parser.add_argument("--concurrent-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="gunicorn threads")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--profile-gil", action="store_true", help="--profile: only samples holding the GIL"
    )
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "")
    parser.add_argument("--no-relay", action="store_true", help="skip the relay peer")
    parser.add_argument(
        "--client",
        choices=CLIENTS,
        default="lean",
        help="the receiving client of every path (see the module docstring)",
    )
    parser.add_argument(
        "--what-if",
        choices=["shared-ssl-context"],
        default=None,
        help="serve the gateway with one change patched in at start-up (an experiment)",
    )
    parser.add_argument(
        "--instances", type=int, default=100, help="single-instance requests per path"
    )
    parser.add_argument(
        "--soak", type=int, default=0, help="then N transfers of the smallest study, RSS after each"
    )
    parser.add_argument(
        "--server-env", nargs="*", default=[], help="KEY=VALUE for the servers (e.g. MALLOC_*)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser.parse_args()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the studies


@dataclass
class Study:
    size_mb: int
    uid: str
    instances: int
    series: list[str]
    stored_bytes: int = 0


def ct_instances(size_mb: int, when: dt.date) -> tuple[Study, Iterator[bytes]]:
    """A CT study of about ``size_mb`` MiB: 512 x 512 16-bit images of random pixels
    (nothing compresses), explicit VR little endian, in series of at most 250."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    count = max(1, round(size_mb * 2**20 / INSTANCE_PIXEL_BYTES))
    per_series = 250
    study_uid = generate_uid(prefix=UID_PREFIX, entropy_srcs=["gateway", str(size_mb)])
    series_uids = [
        generate_uid(prefix=UID_PREFIX, entropy_srcs=[study_uid, "series", str(s)])
        for s in range((count + per_series - 1) // per_series)
    ]
    study = Study(size_mb=size_mb, uid=study_uid, instances=count, series=series_uids)

    def generate() -> Iterator[bytes]:
        for n in range(count):
            series_number, number = divmod(n, per_series)
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.PatientName = "BANC^Gateway"
            ds.PatientID = "GW000001"
            ds.IssuerOfPatientID = ISSUER
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "F"
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = when.strftime("%Y%m%d")
            ds.StudyTime = "093000"
            ds.AccessionNumber = f"GW{size_mb}"
            ds.StudyDescription = f"TDM {size_mb} Mo"
            ds.StudyID = f"GW{size_mb}"
            ds.ReferringPhysicianName = ""
            ds.Manufacturer = "Relais benchmark"
            ds.Modality = "CT"
            ds.SeriesInstanceUID = series_uids[series_number]
            ds.SeriesNumber = series_number + 1
            ds.BodyPartExamined = "CHEST"
            ds.FrameOfReferenceUID = generate_uid(
                prefix=UID_PREFIX, entropy_srcs=[study_uid, "frame"]
            )
            ds.PositionReferenceIndicator = ""
            ds.PatientPosition = "HFS"
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ds.SOPInstanceUID = generate_uid(
                prefix=UID_PREFIX, entropy_srcs=[study_uid, "instance", str(n)]
            )
            ds.InstanceNumber = number + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient = [0.0, 0.0, float(number)]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.SliceThickness = 1.0
            ds.PixelSpacing = [0.7, 0.7]
            ds.KVP = 120
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = ROWS, COLUMNS
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 0
            ds.PixelData = os.urandom(INSTANCE_PIXEL_BYTES)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            study.stored_bytes += len(data)
            yield data

    return study, generate()


def load(archive: Any, study: Study, instances: Iterator[bytes]) -> None:
    started = time.perf_counter()

    def progress() -> Iterator[bytes]:
        for n, data in enumerate(instances, 1):
            yield data
            if n % 100 == 0 or n == study.instances:
                print(
                    f"  {study.size_mb} MiB study: {n}/{study.instances} instances uploaded "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )

    archive.upload_many(progress())


# --------------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_seconds() -> tuple[float, float, float]:
    """CPU seconds the whole machine has spent so far (/proc/stat): processes (user, nice,
    system), interrupts (irq, softirq: much of loopback TCP), and steal (the hypervisor)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[0:3]) / tick, (fields[5] + fields[6]) / tick, fields[7] / tick)


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into clear_refs); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """The highest VmRSS of ``pid`` seen every ``interval`` seconds while it runs."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.peak_kb = status_kb(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))


def start_server(
    app: str, env: dict[str, str], port: int, threads: int, log: Path
) -> subprocess.Popen:
    """gunicorn serving ``app``: one gthread worker, as the broker is benchmarked."""
    return subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "gunicorn"),
            "-c",
            "python:broker.gunicorn_conf",  # as `make run` does
            app,
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--timeout",
            "300",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def worker_pid(master: subprocess.Popen, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if master.poll() is not None:
            raise SystemExit(f"gunicorn exited with status {master.returncode}")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master.pid:  # its parent
                return int(entry.name)
        time.sleep(0.05)
    raise SystemExit("gunicorn started no worker")


# --------------------------------------------------------------------------- the client


@dataclass
class Fetch:
    status: int = 0
    bytes: int = 0
    ttfb: float = 0.0  # seconds to the first body byte
    headers: float = 0.0  # seconds to the response headers
    seconds: float = 0.0
    complete: bool = False  # ends with the closing boundary
    error: str = ""
    body: list[bytes] = field(default_factory=list, repr=False)
    boundary: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds else 0.0


CLIENTS = ("lean", "httpx")
# The receiving client of every path (--client): set once from the arguments.
CLIENT = "lean"


def fetch(url: str, accept: str, token: str | None = None, *, keep: bool = False) -> Fetch:
    """One GET on a new connection; the body read as it arrives and counted (kept if asked),
    by the client --client names (see the module docstring)."""
    headers = {"Accept": accept, "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    result = Fetch()
    tail = bytearray()

    def received(chunk: bytes | memoryview) -> None:
        if not result.ttfb:
            result.ttfb = time.perf_counter() - started
        result.bytes += len(chunk)
        tail[:] = (tail + chunk[-128:])[-128:]
        if keep:
            result.body.append(bytes(chunk))

    def answered(status: int, content_type: str) -> None:
        result.headers = time.perf_counter() - started
        result.status = status
        found = re.search(r'boundary="?([^";]+)"?', content_type)
        result.boundary = found.group(1) if found else ""

    if CLIENT == "httpx":
        import httpx

        # Built before the clock starts: an httpx.Client makes an SSL context (~20 ms).
        client = httpx.Client(trust_env=False, timeout=httpx.Timeout(300, connect=10))
    else:
        import http.client
        import urllib.parse

        target = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(target.hostname or "", target.port, timeout=300)
        path = target.path + (f"?{target.query}" if target.query else "")
        buffer = memoryview(bytearray(1 << 20))
    started = time.perf_counter()
    try:
        if CLIENT == "httpx":
            with client, client.stream("GET", url, headers=headers) as response:
                answered(response.status_code, response.headers.get("content-type", ""))
                for chunk in response.iter_raw():
                    if chunk:
                        received(chunk)
        else:
            try:
                connection.request("GET", path, headers=headers)
                answer = connection.getresponse()
                answered(answer.status, answer.getheader("Content-Type") or "")
                # readinto fills the whole buffer before it returns: the first byte is timed
                # by a peek, which returns as soon as the body has begun
                if answer.peek(1):
                    result.ttfb = time.perf_counter() - started
                while n := answer.readinto(buffer):
                    received(buffer[:n])
            finally:
                connection.close()
        result.seconds = time.perf_counter() - started
        closing = f"--{result.boundary}--".encode()
        result.complete = bool(result.boundary) and bytes(tail).rstrip(b"\r\n").endswith(closing)
        if result.status != 200:
            result.error = f"HTTP {result.status}: {b''.join(result.body)[:200]!r}"
        elif not result.complete:
            result.error = "no closing boundary: the body was cut short"
    except Exception as exc:
        result.seconds = time.perf_counter() - started
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def parts(result: Fetch) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of each part of a kept multipart body."""
    import pydicom

    body = b"".join(result.body)
    result.body.clear()
    found: dict[str, str] = {}
    segments = body.split(b"--" + result.boundary.encode())
    for segment in segments[1:-1]:
        _, _, data = segment.partition(b"\r\n\r\n")
        data = data[:-2]  # the CRLF before the next delimiter
        uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        if uid in found:
            raise SystemExit(f"instance {uid} sent twice")
        found[uid] = hashlib.sha256(data).hexdigest()
    return found


def concurrent(make: Callable[[], Fetch], streams: int) -> tuple[float, list[Fetch]]:
    """``streams`` fetches started together; (wall seconds, results)."""
    barrier = threading.Barrier(streams + 1)
    results: list[Fetch | None] = [None] * streams

    def run(n: int) -> None:
        barrier.wait()
        results[n] = make()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, [r for r in results if r is not None]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


# --------------------------------------------------------------------------- the profile


def profile_worker(
    py_spy: str, pid: int, run: Callable[[], None], out: Path, *, gil: bool = False
) -> dict[str, Any]:
    """py-spy record of ``pid`` while ``run()`` runs: the samples of threads handling a
    request, by leaf line (self) and by function anywhere in the stack (inclusive). With
    ``gil``, only the samples of the thread holding the GIL: where the Python CPU goes, not
    the waits."""
    recorder = subprocess.Popen(
        [
            py_spy,
            *("record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out)),
            *(["--gil"] if gil else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)  # attached
    run()
    time.sleep(0.3)
    recorder.send_signal(signal.SIGINT)
    recorder.wait(timeout=60)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not any("handle_request (gunicorn" in f for f in frames):
            continue  # an idle thread waiting for work (py-spy counts some of them)
        total += count
        own[stack.split(";")[-1]] += count  # the leaf with its line
        for frame in set(frames):
            inclusive[frame] += count
    return {
        "samples": total,
        "self": [(frame, n / total) for frame, n in own.most_common(15)],
        "inclusive": [(frame, n / total) for frame, n in inclusive.most_common(30)],
    }


# --------------------------------------------------------------------------- the relay peer


def relay_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """The cheapest Python relay in the same server: Orthanc's answer passed on as it comes
    (``http.client``, reads of up to 1 MiB), nothing checked, parsed, filtered or audited.

    Served by gunicorn like the broker (``benchmarks.gateway:relay_app``), it tells what any
    gateway written in Python pays on this machine for a second process and a second pair of
    socket copies; the rest is the broker's own."""
    import http.client

    host, _, port = os.environ["RELAY_ORTHANC"].rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.request(
        "GET",
        "/dicom-web" + environ["PATH_INFO"],
        headers={"Accept": ACCEPT_DIRECT, "Accept-Encoding": "identity"},
    )
    response = conn.getresponse()
    start_response(
        f"{response.status} {response.reason}",
        [("Content-Type", response.getheader("Content-Type", "application/octet-stream"))],
    )

    def body() -> Iterator[bytes]:
        try:
            while chunk := response.read1(1 << 20):
                yield chunk
        finally:
            conn.close()

    return body()


def shared_ssl_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """``--what-if shared-ssl-context``: the broker as it is, except that every httpx.Client
    of the process shares one SSL context made at start-up, instead of making its own (the
    archive client makes one per request, even for an ``http://`` archive)."""
    return _shared_ssl_application()(environ, start_response)


@functools.cache
def _shared_ssl_application() -> Callable[..., Any]:
    import ssl

    import httpx

    context = ssl.create_default_context()
    original = httpx.Client

    class SharedContextClient(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("verify", context)
            super().__init__(*args, **kwargs)

    httpx.Client = SharedContextClient  # type: ignore[misc]
    from broker.wsgi import application

    return application


# --------------------------------------------------------------------------- main

PATHS = ("direct", "relay", "gateway")


def main() -> None:
    global CLIENT
    args = parse_args()
    CLIENT = args.client
    threads = args.threads or args.concurrency + 2
    sizes = sorted(args.sizes_mb)
    concurrent_mb = args.concurrent_mb or sizes[-1]
    if concurrent_mb not in sizes:
        raise SystemExit("--concurrent-mb must be one of --sizes-mb")
    paths = [p for p in PATHS if p != "relay" or not args.no_relay]
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-gateway-"))
    env = {
        **os.environ,
        "DATABASE_URL": fresh_database(args.database_url, workdir, "relais_bench_gateway"),
        "RELAIS_DATA_DIR": str(workdir / "data"),
        "DJANGO_SETTINGS_MODULE": "broker.settings",
        "ALLOWED_HOSTS": "127.0.0.1",
        "RELAIS_TOKEN_LIFETIME_SECONDS": "3600",
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
    from sharing import services
    from tests.peers.orthanc import start_orthanc

    call_command("migrate", verbosity=0)
    archive = start_orthanc(workdir / "orthanc", aet="BENCH_PACS")
    servers: list[subprocess.Popen] = []
    results: dict[str, Any] = {
        "database": "PostgreSQL" if args.database_url else "SQLite",
        "runs": args.runs,
        "gunicorn": f"1 gthread worker, {threads} threads",
        "paths": paths,
        "server_env": args.server_env,
        "what_if": args.what_if,
        "client": args.client,
        "sizes": {},
    }
    try:
        studies: dict[int, Study] = {}
        for n, size in enumerate(sizes):
            study, instances = ct_instances(size, dt.date(2025, 1, 1) + dt.timedelta(days=n))
            load(archive, study, instances)
            studies[size] = study
        stats = archive.statistics()
        print(
            f"Orthanc: {stats['CountInstances']} instances, {stats['TotalDiskSizeMB']} MB",
            file=sys.stderr,
        )

        actor = Actor.system("benchmark")
        chu = institution_create(
            finess="350000014",
            name="CHU du banc",
            patient_id_issuer=ISSUER,
            ae_title=archive.aet,
            dicom_host="127.0.0.1",
            dicom_port=archive.dicom_port,
            dicomweb_url=archive.dicomweb_url + "/",
            actor=actor,
            now=timezone.now(),
        )
        summary = harvest_run(
            institution=chu,
            client_factory=lambda: institution_archive(chu, "dicomweb"),
            transport="dicomweb",
            actor=actor,
        )
        manifests = {
            size: Manifest.objects.get(study_instance_uid=study.uid, status=ManifestStatus.APPROVED)
            for size, study in studies.items()
        }
        for size, manifest in manifests.items():
            if manifest.instance_count != studies[size].instances:
                raise SystemExit(f"harvest: {manifest.instance_count} instances, {summary}")
        user = get_user_model().objects.create_user(username="dr.banc")
        professional = Professional.objects.create(user=user)
        Membership.objects.create(professional=professional, institution=chu, role=Role.RADIOLOGIST)
        ticket = services.request_create(
            user=user,
            purpose="treatment",
            patient=manifests[sizes[0]].source_identifier.patient,
            institution=chu,
            studies=[s.uid for s in studies.values()],
            justification="banc d'essai de la passerelle",
            actor=actor,
            now=timezone.now(),
        )
        token, _ = services.token_issue_for_ticket(
            user=user, ticket=ticket, actor=actor, now=timezone.now()
        )
        connections.close_all()

        bases: dict[str, str] = {"direct": archive.dicomweb_url}
        pids: dict[str, int] = {}
        gateway_app = "benchmarks.gateway:shared_ssl_app" if args.what_if else "broker.wsgi"
        for name, app in (("gateway", gateway_app), ("relay", "benchmarks.gateway:relay_app")):
            if name not in paths:
                continue
            port = free_port()
            server_env = {
                **env,
                "RELAY_ORTHANC": f"127.0.0.1:{archive.http_port}",
                **dict(item.split("=", 1) for item in args.server_env),
            }
            servers.append(start_server(app, server_env, port, threads, workdir / f"{name}.log"))
            pids[name] = worker_pid(servers[-1])
            bases[name] = f"http://127.0.0.1:{port}" + ("/dicomweb" if name == "gateway" else "")
        wait_until_answers(f"{bases['gateway']}/studies", token)
        pid = pids["gateway"]
        idle_boot_kb = status_kb(pid, "VmRSS")
        # Warm-up: one instance through the whole path (imports, connections, caches).
        small = studies[sizes[0]]
        first = manifests[sizes[0]].series.order_by("id").first()
        sop = first.instances.order_by("id").first().sop_instance_uid
        one = f"/studies/{small.uid}/series/{first.series_instance_uid}/instances/{sop}"
        for name in paths:
            warm = fetch(
                bases[name] + one,
                ACCEPT_GATEWAY if name == "gateway" else ACCEPT_DIRECT,
                token if name == "gateway" else None,
            )
            if warm.error:
                raise SystemExit(f"warm-up {name}: {warm.error}")
        time.sleep(0.5)
        idle_kb = status_kb(pid, "VmRSS")
        results["rss_idle_boot_mb"] = idle_boot_kb / 1024
        results["rss_idle_mb"] = idle_kb / 1024
        hwm_resettable = reset_hwm(pid)
        print(f"gateway worker {pid}: idle RSS {idle_kb / 1024:.1f} MiB", file=sys.stderr)

        sent: Counter[int] = Counter({1: 1})  # instances per gateway transfer (the warm-up)

        def get(name: str, study: Study, keep: bool = False) -> Fetch:
            url = f"{bases[name]}/studies/{study.uid}"
            if name == "gateway":
                sent[study.instances] += 1
                return fetch(url, ACCEPT_GATEWAY, token, keep=keep)
            return fetch(url, ACCEPT_DIRECT, keep=keep)

        def cpu_snapshot(name: str) -> tuple[float, ...]:
            return (
                cpu_seconds(archive.process.pid),
                cpu_seconds(pids[name]) if name in pids else 0.0,
                time.process_time(),
                *machine_seconds(),
            )

        def cpu_since(name: str, before: tuple[float, ...], gigabytes: float) -> dict[str, float]:
            used = [b - a for a, b in zip(before, cpu_snapshot(name), strict=True)]
            used[3] = max(0.0, used[3] - sum(used[:3]))  # the other processes of the machine
            keys = ("orthanc", "server", "client", "others", "irq", "steal")
            return {
                f"cpu_s_per_gb_{key}": value / gigabytes
                for key, value in zip(keys, used, strict=True)
            }

        def measured(name: str, run: Callable[[], Any]) -> tuple[Any, dict[str, float], float]:
            """run() with the CPU it cost and the RSS peak of the path's server (MiB)."""
            server = pids.get(name)
            cpu = cpu_snapshot(name)
            if server is None:
                return run(), cpu, 0.0
            reset_hwm(server)
            with RssSampler(server) as sampler:
                outcome = run()
            hwm = status_kb(server, "VmHWM") if hwm_resettable else 0
            return outcome, cpu, max(sampler.peak_kb, hwm) / 1024

        reference: dict[tuple[int, str], int] = {}
        for size in sizes:
            study = studies[size]
            # Complete and identical, once: every instance, the archive's bytes.
            found: dict[str, dict[str, str]] = {}
            for name in paths:
                got = get(name, study, keep=True)
                if got.error:
                    raise SystemExit(f"{size} MiB {name}: {got.error}")
                reference[(size, name)] = got.bytes
                found[name] = parts(got)
            identical = all(found[name] == found["direct"] for name in paths)
            print(
                f"{size} MiB: "
                + ", ".join(f"{name} {len(found[name])}" for name in paths)
                + f" of {study.instances} instances, identical: {identical}",
                file=sys.stderr,
            )
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for run in range(args.runs):
                for name in paths[run % len(paths) :] + paths[: run % len(paths)]:
                    got, cpu, peak = measured(name, lambda n=name, s=study: get(n, s))
                    if got.error or got.bytes != reference[(size, name)]:
                        raise SystemExit(f"{size} MiB {name}: {got.error or got.bytes}")
                    rows[name].append(
                        {
                            "mb_per_s": got.mb_per_s,
                            "ttfb_ms": 1000 * got.ttfb,
                            "seconds": got.seconds,
                            **cpu_since(name, cpu, got.bytes / 1e9),
                            "rss_peak_mb": peak,
                        }
                    )
                    print(
                        f"  {size} MiB {name:7} run {run + 1}: {got.mb_per_s:6.0f} MB/s, "
                        f"TTFB {1000 * got.ttfb:6.1f} ms, server RSS peak {peak:.1f} MiB",
                        file=sys.stderr,
                    )
            results["sizes"][size] = {
                "instances": study.instances,
                "stored_mb": study.stored_bytes / MB,
                "parts": {name: len(found[name]) for name in paths},
                "identical": identical,
                "runs": rows,
                "ratio_runs": {
                    name: [
                        r["mb_per_s"] / d["mb_per_s"]
                        for d, r in zip(rows["direct"], rows[name], strict=True)
                    ]
                    for name in paths
                    if name != "direct"
                },
                "added_ttfb_ms": {
                    name: [
                        r["ttfb_ms"] - d["ttfb_ms"]
                        for d, r in zip(rows["direct"], rows[name], strict=True)
                    ]
                    for name in paths
                    if name != "direct"
                },
            }
        results["rss_idle_after_mb"] = status_kb(pid, "VmRSS") / 1024

        # Concurrent streams.
        study = studies[concurrent_mb]
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        for round_ in range(args.concurrent_rounds):
            for name in paths[round_ % len(paths) :] + paths[: round_ % len(paths)]:
                (wall, got_all), cpu, peak = measured(
                    name, lambda n=name: concurrent(lambda: get(n, study), args.concurrency)
                )
                total = sum(g.bytes for g in got_all)
                errors = [
                    g.error or f"{g.bytes} bytes instead of {reference[(concurrent_mb, name)]}"
                    for g in got_all
                    if g.error or g.bytes != reference[(concurrent_mb, name)]
                ]
                rounds[name].append(
                    {
                        "aggregate_mb_per_s": total / MB / wall,
                        "seconds": wall,
                        "errors": len(errors),
                        "error_samples": errors[:3],
                        "ttfb_ms_median": 1000 * median([g.ttfb for g in got_all if g.ttfb]),
                        "ttfb_ms_max": 1000 * max((g.ttfb for g in got_all), default=0),
                        **cpu_since(name, cpu, max(total, 1) / 1e9),
                        "rss_peak_mb": peak,
                    }
                )
                print(
                    f"  {args.concurrency} x {concurrent_mb} MiB {name:7} round {round_ + 1}: "
                    f"{rounds[name][-1]['aggregate_mb_per_s']:.0f} MB/s, {len(errors)} errors "
                    f"{errors[:1]}, server RSS peak {peak:.1f} MiB",
                    file=sys.stderr,
                )
        results["concurrent"] = {"streams": args.concurrency, "size_mb": concurrent_mb, **rounds}
        time.sleep(0.5)
        results["rss_idle_end_mb"] = status_kb(pid, "VmRSS") / 1024

        # One instance per request, as a viewer may fetch them, on one keep-alive client.
        if args.instances:
            small = studies[sizes[0]]
            series = manifests[sizes[0]].series.order_by("id").first()
            uids = list(series.instances.order_by("id").values_list("sop_instance_uid", flat=True))[
                : args.instances
            ]
            one_by_one: dict[str, dict[str, float]] = {}
            for name in paths:
                results_one = one_instance_rate(
                    [
                        f"{bases[name]}/studies/{small.uid}/series/"
                        f"{series.series_instance_uid}/instances/{uid}"
                        for uid in uids
                    ],
                    ACCEPT_GATEWAY if name == "gateway" else ACCEPT_DIRECT,
                    token if name == "gateway" else None,
                )
                if name == "gateway":
                    sent[1] += len(uids)
                one_by_one[name] = results_one
                print(f"  one instance per request, {name}: {results_one}", file=sys.stderr)
            results["one_instance"] = one_by_one

        if args.soak:
            small = studies[sizes[0]]
            curve = []
            for n in range(args.soak):
                got = get("gateway", small)
                if got.error:
                    raise SystemExit(f"soak {n}: {got.error}")
                curve.append(status_kb(pid, "VmRSS") / 1024)
            results["soak"] = {"size_mb": small.size_mb, "rss_mb": curve}
            print(
                f"  soak: {args.soak} x {small.size_mb} MiB, RSS after each: "
                + " ".join(f"{v:.0f}" for v in curve[:: max(1, args.soak // 10)])
                + f" ... {curve[-1]:.1f}",
                file=sys.stderr,
            )

        results["ttfb_breakdown"] = ttfb_breakdown(token, manifests[sizes[-1]], args.runs)
        results["receive_costs"] = receive_costs(
            archive.dicomweb_url, studies[sizes[-1]].uid, chu, 3
        )

        if args.profile:
            if not args.py_spy:
                raise SystemExit("--profile needs py-spy (--py-spy PATH)")
            big = studies[sizes[-1]]

            def two() -> None:
                for _ in range(2):
                    got = get("gateway", big)
                    if got.error:
                        raise SystemExit(got.error)

            results["profile"] = profile_worker(
                args.py_spy, pid, two, workdir / "pyspy.txt", gil=args.profile_gil
            )
            if args.instances:
                instance_urls = [
                    f"{bases['gateway']}/studies/{small.uid}/series/"
                    f"{series.series_instance_uid}/instances/{uid}"
                    for uid in uids
                ]

                def singles() -> None:
                    one_instance_rate(instance_urls, ACCEPT_GATEWAY, token)
                    sent[1] += len(instance_urls)

                results["profile_one_instance"] = profile_worker(
                    args.py_spy, pid, singles, workdir / "pyspy-instances.txt", gil=args.profile_gil
                )
        # Let the last streams' end records be written, then read the audit trail back.
        time.sleep(1)
        results["audit"] = audit_check(sent)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
        archive.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)

    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def wait_until_answers(url: str, token: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, trust_env=False)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer") from None
            time.sleep(0.2)
            continue
        if answer.status_code != 200:
            raise SystemExit(f"{url}: {answer.status_code} {answer.text[:300]}")
        return


def receive_costs(archive_url: str, study_uid: str, institution: Any, runs: int) -> dict:
    """The gateway's receiving side alone, in this process, one thread: the study read from
    Orthanc by several readers, CPU seconds per GB (process time) and MB/s, medians."""
    import http.client
    import urllib.parse

    import httpx

    from broker.archives import institution_archive
    from sharing.gateway import media_storage_sop_instance_uid

    url = f"{archive_url}/studies/{study_uid}"
    headers = {"Accept": ACCEPT_DIRECT, "Accept-Encoding": "identity"}

    def boundary_of(content_type: str) -> bytes:
        found = re.search(r'boundary="?([^";]+)"?', content_type)
        assert found is not None
        return found.group(1).encode()

    # Clients are built before the clock starts (each httpx.Client makes an SSL context).
    def httpx_raw() -> Callable[[], int]:
        client = httpx.Client(trust_env=False, timeout=300)

        def read() -> int:
            total = 0
            with client, client.stream("GET", url, headers=headers) as response:
                for chunk in response.iter_bytes():
                    total += len(chunk)
            return total

        return read

    def archive_client() -> Callable[[], int]:
        client = institution_archive(institution)

        def read() -> int:
            total = 0
            try:
                for part in client.retrieve(study_uid):
                    media_storage_sop_instance_uid(part)
                    total += len(part)
            finally:
                client.close()
            return total

        return read

    def http_client(size: int) -> Callable[[], Callable[[], int]]:
        def prepare() -> Callable[[], int]:
            def read() -> int:
                parsed = urllib.parse.urlsplit(url)
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
                conn.request("GET", parsed.path, headers=headers)
                response = conn.getresponse()
                total = 0
                buffer = bytearray(size)
                while n := response.readinto(buffer):
                    total += n
                conn.close()
                return total

            return read

        return prepare

    readers: dict[str, Callable[[], Callable[[], int]]] = {
        "httpx iter_bytes (64 KiB reads), bytes dropped": httpx_raw,
        "the gateway's archive client (http.client + MultipartParts, SOP UID check)": (
            archive_client
        ),
        "http.client readinto, 64 KiB buffer": http_client(64 * 1024),
        "http.client readinto, 1 MiB buffer": http_client(1 << 20),
    }
    figures: dict[str, dict[str, float]] = {}
    for name, read in readers.items():
        cpu, speed = [], []
        for _ in range(runs):
            prepared = read()
            started, cpu_started = time.perf_counter(), time.process_time()
            total = prepared()
            wall, used = time.perf_counter() - started, time.process_time() - cpu_started
            cpu.append(used / (total / 1e9))
            speed.append(total / MB / wall)
        figures[name] = {"cpu_s_per_gb": median(cpu), "mb_per_s": median(speed)}
    return figures


def one_instance_rate(urls: list[str], accept: str, token: str | None) -> dict[str, float]:
    """Sequential GETs of one instance each on one keep-alive client: requests/s, p50 ms."""
    import httpx

    headers = {"Accept": accept, "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    times = []
    with httpx.Client(trust_env=False, timeout=60, headers=headers) as client:
        started = time.perf_counter()
        for url in urls:
            one = time.perf_counter()
            response = client.get(url)
            if response.status_code != 200:
                raise SystemExit(f"{url}: {response.status_code} {response.text[:200]}")
            times.append(time.perf_counter() - one)
        wall = time.perf_counter() - started
    times.sort()
    return {
        "requests_per_s": len(urls) / wall,
        "p50_ms": 1000 * times[len(times) // 2],
        "p95_ms": 1000 * times[int(len(times) * 0.95) - 1],
    }


def audit_check(sent: Counter[int]) -> dict[str, Any]:
    """Each gateway transfer's Instances Transferred record: one per transfer, successful,
    with the study's instance count."""
    from audit.events import EventCode
    from audit.models import AuditEvent

    ends = AuditEvent.objects.filter(code=EventCode.TRANSFER_END)
    outcomes = Counter(ends.values_list("outcome", flat=True))
    counted = Counter(
        d.get("instances") for d in ends.filter(outcome=0).values_list("details", flat=True)
    )
    return {
        "transfers": sum(sent.values()),
        "end_records": ends.count(),
        "outcomes": dict(outcomes),
        "instances_as_sent": dict(counted) == dict(sent),
        "sent": dict(sent),
        "recorded": dict(counted),
    }


def ttfb_breakdown(token: str, manifest: Any, runs: int) -> dict[str, dict[str, float]]:
    """What the gateway does before its first byte, step by step, in this process (the same
    code as `gateway_retrieve`, timed piece by piece): medians in ms, for the first request
    of a viewing (the lookups `sharing.recent` keeps, made) and for the requests after it."""
    from django.db import connection
    from django.utils import timezone

    from audit.events import EventCode, Outcome
    from broker.archives import institution_archive
    from sharing import gateway
    from sharing.recent import recent_clear

    steps: dict[str, dict[str, list[float]]] = {"first": {}, "later": {}}
    for n in range(runs + 1):
        if n == 1:
            for timed in steps.values():
                timed.clear()  # the first round warms this process up
        recent_clear()
        for which in ("first", "later"):
            clock = [time.perf_counter()]

            def lap(step: str, clock: list[float] = clock, which: str = which) -> None:
                now_ = time.perf_counter()
                steps[which].setdefault(step, []).append(1000 * (now_ - clock[0]))
                clock[0] = now_

            now = timezone.now()
            access = gateway.gateway_access(
                authorization=f"Bearer {token}", address="127.0.0.1", now=now
            )
            lap("token check, its holder and patient (gateway_access)")
            found = gateway.gateway_manifest(access, manifest.study_instance_uid)
            lap("manifest (gateway_manifest)")
            allowed = gateway.gateway_instances(found)
            lap("allowed instances (gateway_instances)")
            client = institution_archive(found.source_institution)
            lap("archive client (institution_archive: httpx.Client, SSL context)")
            gateway._audit_transfer(
                EventCode.TRANSFER_BEGIN, access, found, access.patient, now, Outcome.SUCCESS, None
            )
            lap("audit Begin Transferring (committed)")
            if which == "first":
                source = client.retrieve(found.study_instance_uid)
                gateway._next_allowed(source, allowed, gateway.Transfer())
                lap("first instance from Orthanc (WADO-RS request, parsed whole)")
                source.close()
            client.close()
    connection.close()
    return {
        which: {step: median(values) for step, values in timed.items()}
        for which, timed in steps.items()
    }


def cpu_cells(rows: list[dict[str, Any]]) -> str:
    def cell(keys: tuple[str, ...]) -> str:
        return " / ".join(f"{median([r[f'cpu_s_per_gb_{key}'] for r in rows]):.2f}" for key in keys)

    return f"{cell(('orthanc', 'server', 'client'))} | {cell(('others', 'irq', 'steal'))}"


def report_concurrent(conc: dict[str, Any], paths: list[str]) -> None:
    print()
    print(
        f"| {conc['streams']} concurrent streams of the {conc['size_mb']} MiB study "
        "| aggregate MB/s | errors | TTFB ms median / max "
        "| CPU s/GB: Orthanc / server / client | other processes / irq / steal "
        "| server RSS peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in paths:
        rounds = conc[name]
        cpu = cpu_cells(rounds)
        peak = f"{max(r['rss_peak_mb'] for r in rounds):.1f}" if name != "direct" else "-"
        print(
            f"| {name} | {spread([r['aggregate_mb_per_s'] for r in rounds])} "
            f"| {sum(r['errors'] for r in rounds)} of {conc['streams'] * len(rounds)} "
            f"| {median([r['ttfb_ms_median'] for r in rounds]):.0f} / "
            f"{max(r['ttfb_ms_max'] for r in rounds):.0f} | {cpu} | {peak} |"
        )
    direct = median([r["aggregate_mb_per_s"] for r in conc["direct"]])
    conc["ratio"] = {
        name: median([r["aggregate_mb_per_s"] for r in conc[name]]) / direct
        for name in paths
        if name != "direct"
    }
    print(
        "\nConcurrent aggregate / direct: "
        + ", ".join(f"{name} {ratio:.2f}" for name, ratio in conc["ratio"].items())
    )


def report(results: dict[str, Any]) -> None:
    idle = results["rss_idle_mb"]
    paths = results["paths"]
    print(
        f"\nGateway vs Orthanc WADO-RS, {results['database']}, gunicorn {results['gunicorn']}, "
        f"medians (min-max) of {results['runs']} runs each, alternated, "
        f"client {results.get('client', 'httpx')}"
        + (f"; WHAT-IF: {results['what_if']}" if results["what_if"] else "")
    )
    print()
    print(
        "| study | path | MB/s | TTFB ms | CPU s/GB: Orthanc / server / client "
        "| CPU s/GB: other processes / irq / steal "
        f"| server RSS peak MiB (gateway idle {idle:.1f}) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for size, figures in results["sizes"].items():
        for name in paths:
            rows = figures["runs"][name]
            cpu = cpu_cells(rows)
            peak = f"{max(r['rss_peak_mb'] for r in rows):.1f}" if name != "direct" else "-"
            print(
                f"| {size} MiB, {figures['instances']} instances | {name} "
                f"| {spread([r['mb_per_s'] for r in rows])} "
                f"| {spread([r['ttfb_ms'] for r in rows], '{:.1f}')} | {cpu} | {peak} |"
            )
    print()
    print(
        "| study | throughput / direct: gateway (relay) | added TTFB ms: gateway (relay) "
        "| gateway RSS peak above idle MiB | instances (each path / study), identical bytes |"
    )
    print("|---|---:|---:|---:|---|")
    for size, figures in results["sizes"].items():
        rows = figures["runs"]
        peak = max(r["rss_peak_mb"] for r in rows["gateway"])
        figures["rss_above_idle_mb"] = peak - idle
        ratio = spread(figures["ratio_runs"]["gateway"], "{:.2f}")
        added = spread(figures["added_ttfb_ms"]["gateway"], "{:.1f}")
        if "relay" in paths:
            ratio += f" ({median(figures['ratio_runs']['relay']):.2f})"
            added += f" ({median(figures['added_ttfb_ms']['relay']):.1f})"
        counts = " / ".join(str(figures["parts"][name]) for name in paths)
        print(
            f"| {size} MiB | {ratio} | {added} | {peak - idle:.1f} "
            f"| {counts} / {figures['instances']}, {'yes' if figures['identical'] else 'NO'} |"
        )
    conc = results["concurrent"]
    if all(conc[name] for name in paths):  # --concurrent-rounds 0: none
        report_concurrent(conc, paths)
    print(
        f"Gateway worker RSS: {results['rss_idle_boot_mb']:.1f} MiB at boot, "
        f"{idle:.1f} after warm-up, {results['rss_idle_after_mb']:.1f} after the single "
        f"transfers, {results['rss_idle_end_mb']:.1f} after the concurrent ones"
    )
    if "soak" in results:
        curve = results["soak"]["rss_mb"]
        print(
            f"Soak: {len(curve)} transfers of the {results['soak']['size_mb']} MiB study, "
            f"RSS after the first {curve[0]:.1f} MiB, after the last {curve[-1]:.1f} MiB"
        )
    audit = results["audit"]
    print(
        f"Audit: {audit['transfers']} gateway transfers, {audit['end_records']} Instances "
        f"Transferred records, outcomes {audit['outcomes']}, instance counts as sent: "
        f"{audit['instances_as_sent']}"
    )
    print(
        "\n| before the gateway's first byte (in-process, median ms) "
        "| first request of a viewing | the requests after it |"
    )
    print("|---|---:|---:|")
    breakdown = results["ttfb_breakdown"]
    for step, ms in breakdown["first"].items():
        later = breakdown["later"].get(step)
        print(f"| {step} | {ms:.1f} | {'-' if later is None else f'{later:.1f}'} |")
    if "one_instance" in results:
        print(
            "\n| one instance per request, sequential, keep-alive | requests/s | p50 ms | p95 ms |"
        )
        print("|---|---:|---:|---:|")
        for name, figures in results["one_instance"].items():
            print(
                f"| {name} | {figures['requests_per_s']:.0f} | {figures['p50_ms']:.1f} "
                f"| {figures['p95_ms']:.1f} |"
            )
    print(
        f"\n| receiving the {list(results['sizes'])[-1]} MiB study from Orthanc in the benchmark's "
        "process, one thread (median of 3) | CPU s/GB | MB/s |"
    )
    print("|---|---:|---:|")
    for name, figures in results["receive_costs"].items():
        print(f"| {name} | {figures['cpu_s_per_gb']:.2f} | {figures['mb_per_s']:.0f} |")
    for key, what in (
        ("profile", "two transfers of the largest study"),
        ("profile_one_instance", "one instance per request"),
    ):
        if key not in results:
            continue
        profile = results[key]
        print(f"\npy-spy, gateway worker, {what}: {profile['samples']} samples of request threads")
        print("self:")
        for frame, share in profile["self"]:
            print(f"  {100 * share:5.1f} %  {frame}")
        print("inclusive:")
        for frame, share in profile["inclusive"]:
            print(f"  {100 * share:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
