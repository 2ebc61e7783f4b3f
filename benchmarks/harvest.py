#!/usr/bin/env python
"""Harvest rate against a real Orthanc, next to Orthanc answering the same queries alone.

    .venv/bin/python benchmarks/harvest.py [--studies 400] [--database-url URL] [--rounds 3]
                                           [--transport dicomweb dimse] [--workers 2]

One Orthanc. In each round, for each transport in turn, it is loaded with N new synthetic
studies (2 series x 3 small images each, their own issuer and date range), and:

- the peer: the queries a harvest makes (the study list, then for each study its instances,
  and its patient: DICOMweb one instance-level QIDO and one WADO-RS metadata; DIMSE a STUDY
  and an IMAGE C-FIND), sent by a minimal client (httpx keep-alive / one pynetdicom
  association) with the same number of concurrent workers, nothing done with the answers;
  measured before and after the harvest, the mean of the two times taken;
- the broker: ``harvest_run`` into an empty registry (fresh database: PostgreSQL
  ``relais_bench_harvest`` on the server of ``--database-url``, or a SQLite file): the same
  queries through the archive client, a KOS built, registered and audited per study.

The figure is the ratio of the two rates (studies/s), median over the rounds: alternating
keeps a busy moment of the shared machine from landing on one side only.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_database import fresh_database  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--transport", nargs="+", default=["dicomweb", "dimse"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--batch", type=int, default=None, help="studies registered a transaction (harvest's own)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds, each transport in turn (new studies each)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the harvest's main thread (figures off)"
    )
    return parser.parse_args()


def load_archive(archive, count: int, issuer: str, first_day: dt.date) -> None:  # type: ignore[no-untyped-def]
    from tests.peers.studies import SyntheticPatient, synthetic_study

    def instances():  # type: ignore[no-untyped-def]
        for n in range(count):
            study = synthetic_study(
                # people of their own in each round: Orthanc files studies by Patient ID
                # (issuer ignored), and the broker would link namesakes across issuers
                patient=SyntheticPatient(
                    f"PATIENT{n}", issuer.replace("-", ""), dt.date(1960, 1, 1), "F"
                ),
                patient_id=f"{issuer}-{n:06d}",
                issuer=issuer,
                issuer_oid=None,
                institution_name="Hôpital du banc",
                modality="CT",
                study_date=first_day + dt.timedelta(days=n),
                study_time=dt.time(9, 0),
                accession_number=f"A{n}",
                description="TDM",
                series_count=2,
                instances_per_series=3,
                body_part="CHEST",
                seed=f"bench-{issuer}-{n}",
            )
            yield from study.instances

    archive.upload_many(instances())


def peer_dicomweb(archive, workers: int, date_range: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds for the harvest's QIDO/WADO-RS queries, sent with plain httpx."""
    import httpx

    from broker.dicom.archive import _INSTANCE_FIELDS, _STUDY_FIELDS

    base = archive.dicomweb_url
    headers = {"Accept": "application/dicom+json", "Accept-Encoding": "identity"}
    client = httpx.Client(trust_env=False, headers=headers, timeout=60)
    start = time.perf_counter()
    studies = []
    offset = 0
    while True:
        query = "&".join(f"includefield={t}" for t in _STUDY_FIELDS)
        page = client.get(
            f"{base}/studies?StudyDate={date_range}&{query}&limit=500&offset={offset}"
        ).json()
        studies += [s["0020000D"]["Value"][0] for s in page]
        if len(page) < 500:
            break
        offset += 500

    def describe(uid: str) -> None:
        query = "&".join(f"includefield={t}" for t in _INSTANCE_FIELDS)
        rows = client.get(f"{base}/studies/{uid}/instances?{query}&limit=500&offset=0").json()
        series = rows[0]["0020000E"]["Value"][0]
        sop = rows[0]["00080018"]["Value"][0]
        client.get(f"{base}/studies/{uid}/series/{series}/instances/{sop}/metadata").json()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(describe, studies))
    client.close()
    return time.perf_counter() - start


def peer_dimse(archive, workers: int, date_range: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds for the harvest's C-FINDs, sent with pynetdicom (one association a worker)."""
    import threading

    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

    from broker.dicom.archive import _IMAGE_KEYS, _PATIENT_KEYS, _STUDY_KEYS
    from broker.dicom.network import NODELAY_HANDLERS, RelaisAE

    def query(level: str, **keys: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    def associate():  # type: ignore[no-untyped-def]
        ae = RelaisAE(ae_title="RELAIS")  # as the broker: pause-safe associations
        ae.add_requested_context(FIND)
        return ae.associate(
            "127.0.0.1", archive.dicom_port, ae_title=archive.aet, evt_handlers=NODELAY_HANDLERS
        )

    start = time.perf_counter()
    assoc = associate()
    study_query = query("STUDY", StudyInstanceUID="", **dict.fromkeys(_STUDY_KEYS, ""))
    study_query.StudyDate = date_range
    studies = [
        str(ds.StudyInstanceUID)
        for status, ds in assoc.send_c_find(study_query, FIND)
        if status and status.Status in (0xFF00, 0xFF01)
    ]
    assoc.release()
    local = threading.local()
    opened = []

    def describe(uid: str) -> None:
        if getattr(local, "assoc", None) is None:
            local.assoc = associate()
            opened.append(local.assoc)
        one = query(
            "STUDY",
            StudyInstanceUID=uid,
            AccessionNumber="",
            StudyDate="",
            StudyTime="",
            StudyDescription="",
            **dict.fromkeys(_PATIENT_KEYS, ""),
        )
        one.IssuerOfPatientIDQualifiersSequence = []
        one.OtherPatientIDsSequence = []
        list(local.assoc.send_c_find(one, FIND))
        images = query("IMAGE", StudyInstanceUID=uid, **dict.fromkeys(_IMAGE_KEYS, ""))
        list(local.assoc.send_c_find(images, FIND))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(describe, studies))
    elapsed = time.perf_counter() - start
    for assoc in opened:
        assoc.release()
    return elapsed


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def database_cpu_seconds() -> float:
    """CPU time the server process behind this process's database connection has used so far:
    the registry's share of the harvest, which the broker's own process does not show (the
    peer uses no database). 0 for SQLite, or a server on another machine."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return 0.0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    try:
        return cpu_seconds(pid)
    except OSError:  # not on this machine
        return 0.0


def median(values: list[float]) -> float:
    return statistics.median(values)


def one_round(  # type: ignore[no-untyped-def]
    args: argparse.Namespace, archive, transport: str, n: int, actor, now: dt.datetime
) -> dict[str, Any]:
    """One transport's round: new studies, the peer's queries over them, the harvest."""
    from broker.archives import institution_archive
    from broker.harvest import harvest_run
    from broker.models import Manifest
    from broker.services import institution_create

    since = dt.date(1950 + (args.studies // 365 + 1) * n, 1, 1)
    until = since + dt.timedelta(days=args.studies - 1)
    date_range = f"{since:%Y%m%d}-{until:%Y%m%d}"
    load_archive(archive, args.studies, f"BENCH-{transport}-{n}", since)
    institution = institution_create(
        finess=f"35{n:06d}1",
        name=f"Hôpital du banc ({transport}, {n})",
        patient_id_issuer=f"BENCH-{transport}-{n}",
        ae_title=archive.aet,
        dicom_host="127.0.0.1",
        dicom_port=archive.dicom_port,
        dicomweb_url=archive.dicomweb_url,
        actor=actor,
        now=now,
    )
    peer = peer_dicomweb if transport == "dicomweb" else peer_dimse
    peer(archive, args.workers, date_range)  # warm Orthanc's cache

    def measured_peer() -> tuple[float, tuple[float, float, float]]:
        orthanc_cpu, own_cpu, db_cpu = (
            cpu_seconds(archive.process.pid),
            time.process_time(),
            database_cpu_seconds(),
        )
        seconds = peer(archive, args.workers, date_range)
        return seconds, (
            cpu_seconds(archive.process.pid) - orthanc_cpu,
            time.process_time() - own_cpu,
            database_cpu_seconds() - db_cpu,
        )

    # The peer measured before and after the harvest, their mean taken: a machine getting
    # busier or quieter during the round then weighs on both sides alike.
    peer_before, peer_cpu_before = measured_peer()
    orthanc_cpu, own_cpu, db_cpu = (
        cpu_seconds(archive.process.pid),
        time.process_time(),
        database_cpu_seconds(),
    )
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    summary = harvest_run(
        institution=institution,
        client_factory=lambda: institution_archive(institution, transport),
        transport=transport,
        actor=actor,
        since=since,
        until=until,
        workers=args.workers,
        **({"batch": args.batch} if args.batch else {}),
    )
    harvest_seconds = time.perf_counter() - started
    harvest_cpu = (
        cpu_seconds(archive.process.pid) - orthanc_cpu,
        time.process_time() - own_cpu,
        database_cpu_seconds() - db_cpu,
    )
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    peer_after, peer_cpu_after = measured_peer()
    peer_seconds = (peer_before + peer_after) / 2
    peer_cpu = tuple((a + b) / 2 for a, b in zip(peer_cpu_before, peer_cpu_after, strict=True))
    registered = Manifest.objects.filter(source_institution=institution).count()
    if summary.counts["failed"] or registered != args.studies:
        raise SystemExit(f"{transport}: {registered} registered, {summary.failures[:3]}")
    row = {
        "peer_studies_per_s": args.studies / peer_seconds,
        "harvest_studies_per_s": args.studies / harvest_seconds,
        "ratio": peer_seconds / harvest_seconds,
        # CPU ms per study: (Orthanc, this process, PostgreSQL) for the peer and the harvest
        "peer_cpu_ms_per_study": [1000 * c / args.studies for c in peer_cpu],
        "harvest_cpu_ms_per_study": [1000 * c / args.studies for c in harvest_cpu],
    }
    print(
        f"  round {n}: {transport} peer {row['peer_studies_per_s']:.0f}/s, "
        f"harvest {row['harvest_studies_per_s']:.0f}/s, ratio {row['ratio']:.2f} "
        f"(peer before / after: {args.studies / peer_before:.0f}/s, "
        f"{args.studies / peer_after:.0f}/s); CPU ms/study, Orthanc + client + PostgreSQL "
        f"{' + '.join(f'{c:.1f}' for c in row['peer_cpu_ms_per_study'])}, Orthanc + broker + "
        f"PostgreSQL {' + '.join(f'{c:.1f}' for c in row['harvest_cpu_ms_per_study'])}",
        flush=True,
    )
    return row


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-harvest-"))
    os.environ.update(
        DATABASE_URL=fresh_database(args.database_url, workdir, "relais_bench_harvest"),
        RELAIS_DATA_DIR=str(workdir / "data"),
        DJANGO_SETTINGS_MODULE="broker.settings",
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.core.management import call_command

    from audit.types import Actor
    from tests.peers.orthanc import start_orthanc

    call_command("migrate", verbosity=0)
    archive = start_orthanc(
        workdir / "orthanc", aet="BENCH_PACS", modalities={"RELAIS": ("RELAIS", "127.0.0.1", 11112)}
    )
    results: dict[str, object] = {
        "database": "PostgreSQL" if args.database_url else "SQLite",
        "studies": args.studies,
        "workers": args.workers,
    }
    try:
        actor = Actor.system("benchmark")
        now = dt.datetime.now(dt.UTC)
        rows: dict[str, list[dict[str, Any]]] = {transport: [] for transport in args.transport}
        # Rounds, each transport in turn: its own new studies (own issuer and date range), the
        # peer's queries over them (once to warm Orthanc's cache, once measured), then the
        # harvest. A busy moment on the shared machine then touches a round, not a side.
        for round_number in range(args.rounds):
            for n, transport in enumerate(args.transport):
                rows[transport].append(
                    one_round(
                        args, archive, transport, round_number * len(args.transport) + n, actor, now
                    )
                )
        for transport, measured in rows.items():
            results[transport] = {
                "rounds": measured,
                "ratio": median([row["ratio"] for row in measured]),
                "peer_studies_per_s": median([row["peer_studies_per_s"] for row in measured]),
                "harvest_studies_per_s": median([row["harvest_studies_per_s"] for row in measured]),
            }
    finally:
        archive.stop()
    print(
        f"| Harvest, {results['database']}, {args.studies} studies of 6 images a round, "
        f"{args.workers} workers, {args.rounds} rounds | Orthanc answering the queries alone "
        "(studies/s) | harvest (studies/s) | ratio, median (rounds) | CPU ms/study, "
        "Orthanc + client + PostgreSQL, alone | CPU ms/study, Orthanc + broker + PostgreSQL, "
        "harvest |"
    )
    print("|---|---|---|---|---|---|")
    for transport in args.transport:
        figures = results[transport]
        assert isinstance(figures, dict)
        measured = figures["rounds"]
        ratios = ", ".join(f"{row['ratio']:.2f}" for row in measured)
        peer_cpu = [
            median([row["peer_cpu_ms_per_study"][i] for row in measured]) for i in (0, 1, 2)
        ]
        harvest_cpu = [
            median([row["harvest_cpu_ms_per_study"][i] for row in measured]) for i in (0, 1, 2)
        ]
        print(
            f"| {transport} | {figures['peer_studies_per_s']:.0f} "
            f"| {figures['harvest_studies_per_s']:.0f} | {figures['ratio']:.2f} ({ratios}) "
            f"| {' + '.join(f'{cpu:.1f}' for cpu in peer_cpu)} "
            f"| {' + '.join(f'{cpu:.1f}' for cpu in harvest_cpu)} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
