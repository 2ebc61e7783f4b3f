#!/usr/bin/env python
"""The access decision, with the consent evaluation and its durable audit record.

    .venv/bin/python benchmarks/decision.py [--patients 300] [--decisions 3000]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres]

A fresh database (PostgreSQL: ``relais_bench_decision`` on the server of
``--database-url``, dropped and re-created; SQLite: a file in a temporary folder), a region
of three institutions, N patients with two registered studies each (one at the CHU, one at
Port-Maël), a third of them with a consent, a tenth with an opposition, and one approved
ticket per patient (treatment, care team, or outside it with approval). Then, in the same
run, one client, sequentially:

- the peer: PostgreSQL's own floor, a minimal durable transaction on the same connection
  (one small INSERT, then COMMIT: what any audited write costs at least);
- the decision: ``access_decide`` in its own transaction (authentication, roles, relationship,
  scope, the consent evaluation holding the patient's row, the audit record), committed;
- the whole issuance: ``token_issue_for_ticket`` (the decision, signing, the issued-token row
  and its audit record), committed.

Prints latency percentiles (ms) and rates, and the ratios against the peer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_database import fresh_database  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--seed", type=int, default=20261128)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "p50_ms": round(at(0.50), 3),
        "p95_ms": round(at(0.95), 3),
        "p99_ms": round(at(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
        "per_second": round(len(ordered) / sum(ordered), 1),
    }


def seed(patients: int, rng: random.Random) -> tuple[list, object]:
    from django.contrib.auth import get_user_model

    from audit.services import Actor
    from broker.models import Membership, PatientIdentifier, Professional, Role
    from broker.registration import manifests_register
    from broker.services import institution_create
    from consent.services import directive_record
    from sharing import services
    from tests.registry_helpers import kos_for

    system = Actor.system("bench")
    now = dt.datetime.now(dt.UTC)
    chu = institution_create(
        finess="350000014",
        name="CHU",
        patient_id_issuer="CHU",
        dicomweb_url="http://127.0.0.1:1/dicom-web/",
        actor=system,
        now=now,
    )
    pm = institution_create(
        finess="560000019",
        name="Port-Maël",
        patient_id_issuer="PM",
        dicomweb_url="http://127.0.0.1:2/dicom-web/",
        actor=system,
        now=now,
    )
    sa = institution_create(
        finess="290000012",
        name="Saint-Aubin",
        patient_id_issuer="SA",
        dicomweb_url="http://127.0.0.1:3/dicom-web/",
        actor=system,
        now=now,
    )

    def user(name: str, institution, role: str, rpps: str):
        account = get_user_model().objects.create_user(username=name)
        professional = Professional.objects.create(user=account, rpps=rpps)
        Membership.objects.create(professional=professional, institution=institution, role=role)
        return account

    doctor = user("dr.pm", pm, Role.REFERRING_DOCTOR, "10000000001")
    outside = user("dr.sa", sa, Role.REFERRING_DOCTOR, "10000000002")
    radiologist = user("dr.chu", chu, Role.RADIOLOGIST, "10000000003")
    clerk = user("clerk.chu", chu, Role.ADMISSIONS_CLERK, "")
    for institution, prefix, offset in ((chu, "C", 0), (pm, "P", 100000)):
        documents = [
            kos_for(institution, f"{prefix}{n}", study=offset + n, family=f"NOM{n}")
            for n in range(patients)
        ]
        for start in range(0, len(documents), 100):
            manifests_register(
                documents=documents[start : start + 100],
                institution=institution,
                actor=system,
                now=now,
            )
    tickets = []
    for n in range(patients):
        patient = PatientIdentifier.objects.get(value=f"C{n}").patient
        # Link the PM identifier to the same patient, as an INS would.
        PatientIdentifier.objects.filter(value=f"P{n}").update(patient=patient)
        if n % 3 == 0:
            directive_record(
                patient=patient,
                institution=chu,
                recorder=clerk,
                kind="consent",
                scope="all",
                note="oral",
                actor=system,
                now=now,
            )
        if n % 10 == 1:
            directive_record(
                patient=patient,
                institution=chu,
                recorder=clerk,
                kind="opposition",
                scope="institution",
                value=sa.finess,
                note="écrit",
                actor=system,
                now=now,
            )
        requester, at = (doctor, pm) if n % 2 == 0 else (outside, sa)
        ticket = services.request_create(
            user=requester,
            purpose="treatment",
            patient=patient,
            institution=at,
            studies=[f"1.2.826.0.1.3680043.10.999.{n}"],
            justification="suivi",
            actor=system,
            now=now,
        )
        if ticket.state == "pending":
            services.request_approve(user=radiologist, ticket=ticket, actor=system, now=now)
            ticket.refresh_from_db()
        tickets.append((requester, ticket))
    rng.shuffle(tickets)
    return tickets, system


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relais-bench-"))
    os.environ["DATABASE_URL"] = fresh_database(args.database_url, workdir, "relais_bench_decision")
    os.environ["RELAIS_DATA_DIR"] = str(workdir / "data")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "broker.settings")
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction

    from broker.errors import PermissionDenied
    from sharing import services
    from sharing.decision import access_decide

    call_command("migrate", verbosity=0)
    vendor = connection.vendor
    rng = random.Random(args.seed)
    print(f"# Access decision benchmark on {vendor}, {args.patients} patients", flush=True)
    t0 = time.perf_counter()
    tickets, actor = seed(args.patients, rng)
    print(f"seeded in {time.perf_counter() - t0:.0f} s", flush=True)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_peer (id integer PRIMARY KEY, v text)")
        cursor.execute("VACUUM ANALYZE" if vendor == "postgresql" else "ANALYZE")
        if vendor == "postgresql":
            cursor.execute("CHECKPOINT")

    peer = []
    for n in range(args.decisions):
        start = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("INSERT INTO bench_peer VALUES (%s, %s)", [n, "x" * 64])
        peer.append(time.perf_counter() - start)

    decisions, permits = [], 0
    for n in range(args.decisions):
        user, ticket = tickets[n % len(tickets)]
        start = time.perf_counter()
        with transaction.atomic():
            decision = access_decide(
                user=user, ticket=ticket, studies=None, actor=actor, now=dt.datetime.now(dt.UTC)
            )
        decisions.append(time.perf_counter() - start)
        permits += decision.permit

    issuances, refused = [], 0
    for n in range(args.decisions):
        user, ticket = tickets[n % len(tickets)]
        start = time.perf_counter()
        try:
            services.token_issue_for_ticket(
                user=user, ticket=ticket, actor=actor, now=dt.datetime.now(dt.UTC)
            )
        except PermissionDenied:
            refused += 1
        issuances.append(time.perf_counter() - start)

    results = {
        "vendor": vendor,
        "patients": args.patients,
        "decisions": args.decisions,
        "permit_share": round(permits / args.decisions, 3),
        "peer_commit": percentiles(peer),
        "decision": percentiles(decisions),
        "issuance": percentiles(issuances),
    }
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(results: dict) -> None:
    peer = results["peer_commit"]
    print(
        f"\n{results['decisions']} of each, sequential, one client; "
        f"{results['permit_share']:.0%} of decisions permit\n"
    )
    print("| measure | p50 ms | p95 ms | p99 ms | max ms | per second | p99 / peer p99 |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (
        ("peer_commit", "peer: minimal durable transaction (INSERT + COMMIT)"),
        ("decision", "access decision + consent + audit, committed"),
        ("issuance", "token issuance (decision + token + records), committed"),
    ):
        row = results[name]
        ratio = row["p99_ms"] / peer["p99_ms"] if peer["p99_ms"] else float("nan")
        print(
            f"| {label} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['max_ms']:.1f} | {row['per_second']:,.0f} | {ratio:.1f} |"
        )


if __name__ == "__main__":
    main()
