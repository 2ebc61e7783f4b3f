#!/usr/bin/env python
"""Registry benchmark: "all manifests of a patient by any identifier", and registration rate.

    .venv/bin/python benchmarks/registry_query.py [--manifests 1000000] [--database-url URL]

It builds a fresh benchmark database (PostgreSQL: database ``relais_bench`` on the server of
``--database-url``, dropped and re-created; SQLite: a file in a temporary folder), migrates it,
seeds N manifests in bulk (patients known at one or two of three institutions, a third of them
linked by a qualified INS; each manifest one series of two instances; every manifest row carries
the bytes of one real KOS as its document), then measures, in the same run:

- the peer: the same query in raw SQL on the same connection (no ORM), the floor to compare with;
- the selector the API uses (``patient_by_identifier`` + ``manifest_page``, 50 per page);
- the API view itself in-process (Django test client: routing, auth, serializer, query audit);
- registration through ``manifest_register`` (parse, validate, identity, audit chain), one
  transaction per manifest, sequentially, with KOS of 3 series x 10 instances and of
  4 series x 100 instances.

Prints a Markdown table; ``--json`` writes the raw figures too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_database import fresh_database  # noqa: E402

INS_OID = "1.2.250.1.213.1.4.10"
UID_ROOT = "1.2.826.0.1.3680043.10.777."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifests", type=int, default=1_000_000)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="postgres://... to benchmark PostgreSQL (default: SQLite)",
    )
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--registrations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(samples: list[float], fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    samples.append((time.perf_counter() - start) * 1000)
    return result


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-"))
    os.environ["DATABASE_URL"] = fresh_database(args.database_url, workdir, "relais_bench")
    os.environ["RELAIS_DATA_DIR"] = str(workdir / "data")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.settings")
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ["ALLOWED_HOSTS"] = "testserver,127.0.0.1"
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    vendor = connection.vendor
    rng = random.Random(args.seed)
    print(f"# Registry benchmark on {vendor}, {args.manifests:,} manifests", flush=True)

    t0 = time.perf_counter()
    institutions, identifiers_by_patient = seed(args.manifests, rng)
    seed_seconds = time.perf_counter() - t0
    print(f"seeded in {seed_seconds:.0f} s", flush=True)
    # The seeding's Python objects stay alive (the query sample is drawn from them): keep
    # them out of the garbage collector's way, or its passes would be measured as well.
    gc.collect()
    gc.freeze()
    if vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
            # Flush the bulk load now, so that its checkpoint is not measured as registration.
            cursor.execute("CHECKPOINT")
    else:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")

    results: dict[str, object] = {
        "vendor": vendor,
        "manifests": args.manifests,
        "seed_seconds": round(seed_seconds, 1),
    }
    results.update(measure_queries(args.queries, rng, identifiers_by_patient))
    results.update(measure_registration(args.registrations, institutions))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


# ---------------------------------------------------------------------------
# Seeding


def sqlite_value(value: object) -> object:
    """What Django stores in SQLite for a value of this type."""
    from django.db import connection

    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, dt.datetime):
        return connection.ops.adapt_datetimefield_value(value)
    if isinstance(value, dt.time):
        return connection.ops.adapt_timefield_value(value)
    return value


def seed(n_manifests: int, rng: random.Random):  # type: ignore[no-untyped-def]
    from django.db import connection, transaction
    from django.utils import timezone

    from audit.services import Actor
    from broker.dicom.kos import (
        PatientInfo,
        ReferencedInstance,
        SeriesDescription,
        StudyDescription,
        build_kos,
        normalise_ins_matricule,
    )
    from broker.services import institution_create

    actor = Actor.system("benchmark")
    now = timezone.now()
    institutions = [
        institution_create(
            finess=f"35000{i}014",
            name=f"Hôpital {i}",
            patient_id_issuer=f"HOSP-{i}",
            ae_title=f"PACS{i}",
            dicom_host="127.0.0.1",
            dicom_port=4242 + i,
            actor=actor,
            now=now,
        )
        for i in range(3)
    ]
    template = build_kos(
        StudyDescription(
            patient=PatientInfo(
                patient_id="TEMPLATE",
                issuer="HOSP-0",
                issuer_oid=None,
                family_name="MODELE",
                given_names="Kos",
                birth_name="MODELE",
                birth_date=dt.date(1970, 1, 1),
                sex="F",
            ),
            study_instance_uid=UID_ROOT + "1",
            accession_number="T1",
            study_date=dt.date(2024, 1, 1),
            study_time=dt.time(10, 0),
            study_description="Scanner",
            series=(
                SeriesDescription(
                    series_instance_uid=UID_ROOT + "1.1",
                    modality="CT",
                    body_part="CHEST",
                    instances=tuple(
                        ReferencedInstance("1.2.840.10008.5.1.4.1.1.2", f"{UID_ROOT}1.1.{k}")
                        for k in range(1, 3)
                    ),
                ),
            ),
            retrieve_ae_title="PACS0",
        ),
        now=now,
    )
    import hashlib

    template_sha = hashlib.sha256(template).hexdigest()

    n_patients = max(1, n_manifests // 3)
    patient_rows, identifier_rows = [], []
    identifiers_by_patient: list[list[tuple[int, str, str]]] = []
    ident_id = 0
    base_date = dt.date(2021, 1, 1)

    def ident_row(
        ident: int, p: int, issuer: str, value: str, kind: str, institution_id, ins: bool
    ):  # type: ignore[no-untyped-def]
        birth = base_date - dt.timedelta(days=p % 30000)
        given = f"PRENOM{p % 997}"
        return (
            ident,
            p,
            issuer,
            value,
            kind,
            institution_id,
            ins,
            ins,
            f"NOM{p}",
            given.title(),
            f"NOM{p}",
            birth,
            "F",
            f"NOM{p}",
            f"NOM{p}",
            given,
            False,
            now,
            now,
        )

    for p in range(1, n_patients + 1):
        patient_rows.append((p, uuid.UUID(int=rng.getrandbits(128), version=4), now))
        home = p % 3
        idents = []
        ident_id += 1
        identifier_rows.append(
            ident_row(ident_id, p, f"HOSP-{home}", f"P{p:08d}", "IPP", institutions[home].id, False)
        )
        idents.append((ident_id, f"HOSP-{home}", f"P{p:08d}"))
        if p % 3 == 0:
            other = (home + 1) % 3
            ident_id += 1
            identifier_rows.append(
                ident_row(
                    ident_id, p, f"HOSP-{other}", f"Q{p:08d}", "IPP", institutions[other].id, False
                )
            )
            idents.append((ident_id, f"HOSP-{other}", f"Q{p:08d}"))
            ident_id += 1
            ins = normalise_ins_matricule(f"2{p % 100:02d}0175{p:06d}")
            identifier_rows.append(ident_row(ident_id, p, INS_OID, ins, "INS-NIR", None, True))
            idents.append((ident_id, INS_OID, ins))
        identifiers_by_patient.append(idents)

    def manifest_rows():  # type: ignore[no-untyped-def]
        for m in range(1, n_manifests + 1):
            idents = identifiers_by_patient[(m - 1) % n_patients]
            ipps = [i for i in idents if i[1] != INS_OID]
            ident = ipps[m % len(ipps)]
            institution = institutions[int(ident[1].split("-")[1])]
            study_uid = f"{UID_ROOT}{m}"
            yield (
                m,
                f"{study_uid}.9",
                study_uid,
                f"A{m}",
                base_date + dt.timedelta(days=m % 1800),
                dt.time(10, 0),
                "Scanner",
                '["CT"]',
                '["CHEST"]',
                1,
                2,
                institution.id,
                ident[0],
                institution.ae_title,
                "",
                "",
                "Approved",
                None,
                template,
                template_sha,
                len(template),
                now,
                None,
            )

    def series_rows():  # type: ignore[no-untyped-def]
        for m in range(1, n_manifests + 1):
            study_uid = f"{UID_ROOT}{m}"
            yield (m, m, study_uid, f"{study_uid}.1", "CT", "CHEST", "PACS", "", "", 2)

    def instance_rows():  # type: ignore[no-untyped-def]
        for m in range(1, n_manifests + 1):
            for k in (1, 2):
                yield (2 * m - 2 + k, m, f"{UID_ROOT}{m}.1.{k}", "1.2.840.10008.5.1.4.1.1.2")

    tables = [
        ("broker_patient", "id, public_id, created_at", patient_rows),
        (
            "broker_patientidentifier",
            "id, patient_id, issuer, value, kind, institution_id, qualified, test, family_name, given_names, "
            "birth_name, birth_date, sex, family_key, birth_name_key, given_key, auto_link_blocked, created_at, updated_at",
            identifier_rows,
        ),
        (
            "broker_manifest",
            "id, sop_instance_uid, study_instance_uid, accession_number, study_date, study_time, "
            "study_description, modalities, body_parts, series_count, instance_count, source_institution_id, "
            "source_identifier_id, retrieve_ae_title, retrieve_location_uid, retrieve_url, status, "
            "replaced_by_id, kos_bytes, kos_sha256, kos_size, registered_at, deprecated_at",
            manifest_rows(),
        ),
        (
            "broker_manifestseries",
            "id, manifest_id, study_instance_uid, series_instance_uid, modality, body_part, retrieve_ae_title, "
            "retrieve_location_uid, retrieve_url, instance_count",
            series_rows(),
        ),
        (
            "broker_manifestinstance",
            "id, series_id, sop_instance_uid, sop_class_uid",
            instance_rows(),
        ),
    ]
    for table, columns, rows in tables:
        with transaction.atomic(), connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))"
                )
            else:
                marks = ", ".join(["%s"] * len(columns.split(",")))
                batch = []
                for row in rows:
                    batch.append(tuple(sqlite_value(v) for v in row))
                    if len(batch) == 20000:
                        cursor.executemany(
                            f"INSERT INTO {table} ({columns}) VALUES ({marks})", batch
                        )
                        batch = []
                if batch:
                    cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", batch)
        print(f"  {table} loaded", flush=True)
    return institutions, identifiers_by_patient


# ---------------------------------------------------------------------------
# Measures


RAW_SQL = """
SELECT m.id, m.sop_instance_uid, m.study_instance_uid, m.study_date, m.status
FROM broker_manifest m
JOIN broker_patientidentifier si ON si.id = m.source_identifier_id
WHERE si.patient_id = (SELECT patient_id FROM broker_patientidentifier WHERE issuer = %s AND value = %s)
  AND m.status = 'Approved'
ORDER BY m.study_date DESC NULLS LAST, m.id DESC
LIMIT 51
"""


def measure_queries(n_queries: int, rng: random.Random, identifiers_by_patient) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    from broker import selectors
    from broker.models import Manifest, Professional

    picks = []
    for _ in range(n_queries):
        idents = rng.choice(identifiers_by_patient)
        _, issuer, value = rng.choice(idents)
        picks.append((issuer, value))

    raw, orm, api = [], [], []
    found = 0
    with connection.cursor() as cursor:
        for issuer, value in picks[:100]:  # warm-up
            cursor.execute(RAW_SQL, [issuer, value])
            cursor.fetchall()
        for issuer, value in picks:
            start = time.perf_counter()
            cursor.execute(RAW_SQL, [issuer, value])
            rows = cursor.fetchall()
            raw.append((time.perf_counter() - start) * 1000)
            found += len(rows)
    for issuer, value in picks:
        start = time.perf_counter()
        patient = selectors.patient_by_identifier(issuer=issuer, value=value)
        assert patient is not None, (issuer, value)
        page = selectors.manifest_page(
            scope=Manifest.objects.all(),
            filters=selectors.ManifestFilters(patient=patient),
            cursor=None,
            limit=50,
        )
        [m.sop_instance_uid for m in page.items]
        orm.append((time.perf_counter() - start) * 1000)

    user = get_user_model().objects.create_user("bench-admin", password="unused-bench-pw-1")  # noqa: S106
    Professional.objects.create(user=user, is_region_admin=True)
    client = Client()
    client.force_login(user)
    for issuer, value in picks[: max(200, n_queries // 4)]:
        start = time.perf_counter()
        response = client.get(
            "/api/v1/manifests",
            {"issuer": issuer, "patient_id": value},
            HTTP_ACCEPT="application/json",
        )
        api.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, response.content
    return {
        "queries": n_queries,
        "avg_manifests_per_patient": round(found / len(picks), 2),
        "raw_sql_p50_ms": round(statistics.median(raw), 3),
        "raw_sql_p99_ms": round(percentile(raw, 0.99), 3),
        "selector_p50_ms": round(statistics.median(orm), 3),
        "selector_p99_ms": round(percentile(orm, 0.99), 3),
        "api_p50_ms": round(statistics.median(api), 3),
        "api_p99_ms": round(percentile(api, 0.99), 3),
    }


def measure_registration(n: int, institutions) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Registration rate through the services, one document per transaction (the REST path)
    and 100 per transaction (imports, harvests). New patients and known ones are mixed as
    in real intake: each patient gets three studies, one in three carries a qualified INS."""
    from django.utils import timezone

    from audit.services import Actor
    from broker.dicom.kos import (
        INS_NIR_TEST_OID,
        OtherPatientId,
        PatientInfo,
        ReferencedInstance,
        SeriesDescription,
        StudyDescription,
        build_kos,
        parse_kos,
    )
    from broker.services import manifest_register, manifests_register

    actor = Actor.system("benchmark")
    now = timezone.now()

    def kos(k: int, n_series: int, n_instances: int, prefix: str, hospital: int = 1) -> bytes:
        study_uid = f"{UID_ROOT}{prefix}.{k}"
        p = k // 3
        other = (
            (
                OtherPatientId(
                    value=f"1{int(prefix) % 97:02d}0175{p:06d}",  # one INS per patient and run
                    issuer=None,
                    issuer_oid=INS_NIR_TEST_OID,
                    type_of_patient_id="TEXT",
                ),
            )
            if p % 3 == 0
            else ()
        )
        return build_kos(
            StudyDescription(
                patient=PatientInfo(
                    patient_id=f"R{prefix}-{p:07d}",
                    issuer=f"HOSP-{hospital}",
                    issuer_oid=None,
                    family_name=f"REG{p}",
                    given_names="Bench",
                    birth_name=f"REG{p}",
                    birth_date=dt.date(1960, 1, 1 + p % 28),
                    sex="M",
                    other_ids=other,
                ),
                study_instance_uid=study_uid,
                accession_number=f"R{k}",
                study_date=dt.date(2026, 1, 1 + k % 28),
                study_time=dt.time(8, 0),
                study_description="Bench",
                series=tuple(
                    SeriesDescription(
                        series_instance_uid=f"{study_uid}.{s}",
                        modality="CT",
                        body_part="CHEST",
                        instances=tuple(
                            ReferencedInstance("1.2.840.10008.5.1.4.1.1.2", f"{study_uid}.{s}.{i}")
                            for i in range(1, n_instances + 1)
                        ),
                    )
                    for s in range(1, n_series + 1)
                ),
                retrieve_ae_title="PACS1",
            ),
            now=now,
        )

    out: dict[str, float] = {}
    for size, n_series, n_instances, count in [("30", 3, 10, n), ("400", 4, 100, max(60, n // 5))]:
        for mode in ("single", "batch"):
            documents = [
                kos(k, n_series, n_instances, f"{size}{int(mode == 'batch')}") for k in range(count)
            ]
            start = time.perf_counter()
            for data in documents[:50]:
                parse_kos(data)
            out[f"parse_{size}_ms"] = round((time.perf_counter() - start) / 50 * 1000, 2)
            start = time.perf_counter()
            if mode == "single":
                for data in documents:
                    result = manifest_register(
                        data=data, institution=institutions[1], actor=actor, now=now
                    )
                    assert result.outcome == "new", result
            else:
                for first in range(0, count, 100):
                    results = manifests_register(
                        documents=documents[first : first + 100],
                        institution=institutions[1],
                        actor=actor,
                        now=now,
                    )
                    assert all(r.outcome == "new" for r in results), results
            elapsed = time.perf_counter() - start
            out[f"register_{size}_{mode}_per_s"] = round(count / elapsed, 1)
            print(f"  registration {size} instances, {mode}: {count / elapsed:.1f}/s", flush=True)

    # Two hospitals publishing at once (two processes, 100 per transaction): the database
    # and the audit chain are shared, the parsing and the ORM work are not.
    global PUBLISHER_WORK
    per_publisher = n
    PUBLISHER_WORK = [
        (institutions[h].id, [kos(k, 3, 10, f"30{h}2", hospital=h) for k in range(per_publisher)])
        for h in (0, 2)
    ]
    from django.db import connections

    connections.close_all()
    context = multiprocessing.get_context("fork")
    start = time.perf_counter()
    with context.Pool(2) as pool:
        counts = pool.map(_publish, range(len(PUBLISHER_WORK)))
    elapsed = time.perf_counter() - start
    out["register_30_two_publishers_per_s"] = round(sum(counts) / elapsed, 1)
    print(f"  registration 30 instances, two publishers: {sum(counts) / elapsed:.1f}/s", flush=True)
    return out


PUBLISHER_WORK: list[tuple[int, list[bytes]]] = []


def _publish(index: int) -> int:
    from django.utils import timezone

    from audit.services import Actor
    from broker.models import Institution
    from broker.services import manifests_register

    institution_id, documents = PUBLISHER_WORK[index]
    institution = Institution.objects.get(id=institution_id)
    for first in range(0, len(documents), 100):
        results = manifests_register(
            documents=documents[first : first + 100],
            institution=institution,
            actor=Actor.system(f"benchmark-{index}"),
            now=timezone.now(),
        )
        assert all(r.outcome == "new" for r in results), results
    return len(documents)


def report(results: dict[str, object]) -> None:
    print()
    print(f"| {results['vendor']} | {results['manifests']:,} manifests | p50 | p99 |")
    print("|---|---|---|---|")
    for key, label in [
        ("raw_sql", "raw SQL, same query (peer)"),
        ("selector", "selector (ORM)"),
        ("api", "GET /api/v1/manifests in-process (incl. audit)"),
    ]:
        print(f"| | {label} | {results[f'{key}_p50_ms']} ms | {results[f'{key}_p99_ms']} ms |")
    ratio = float(results["selector_p50_ms"]) / max(float(results["raw_sql_p50_ms"]), 1e-6)  # type: ignore[arg-type]
    print(f"| | selector p50 / raw SQL p50 | {ratio:.1f} | |")
    modes = (("single", "one per transaction (REST)"), ("batch", "100 per transaction (import)"))
    for size in ("30", "400"):
        print(f"| | parse one {size}-instance KOS (kos.py) | {results[f'parse_{size}_ms']} ms | |")
        for mode, label in modes:
            rate = results[f"register_{size}_{mode}_per_s"]
            print(f"| | registration, {size}-instance KOS, {label} | {rate} manifests/s | |")
    print(
        "| | registration, 30-instance KOS, two hospitals at once (2 processes, 100 per "
        f"transaction) | {results['register_30_two_publishers_per_s']} manifests/s | |"
    )
    print(f"| | manifests per patient (avg) | {results['avg_manifests_per_patient']} | |")
    print()


if __name__ == "__main__":
    main()
