"""Concurrent publishers on PostgreSQL: no duplicate, no half-stored manifest, one chain."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from audit.services import audit_verify
from broker.models import Manifest, Patient, PatientIdentifier
from broker.services import manifests_register
from tests.conftest import NOW, SYSTEM
from tests.registry_helpers import kos_for

INS = "2850375123456"

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_four_publishers_sending_the_same_manifests_at_once_register_each_once(region):
    documents = [
        kos_for(region.chu, f"7000{n}", study=n, ins=INS if n == 1 else None) for n in range(1, 6)
    ]
    documents += [kos_for(region.chu, "70001", study=9, ins=INS)]
    outcomes: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def publish() -> None:
        try:
            barrier.wait()
            results = manifests_register(
                documents=documents, institution=region.chu, actor=SYSTEM, now=NOW
            )
            outcomes.extend(r.outcome for r in results)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(outcomes).count("new") == len(documents)
    assert sorted(outcomes).count("unchanged") == 3 * len(documents)
    assert Manifest.objects.count() == len(documents)
    assert PatientIdentifier.objects.filter(kind="IPP").count() == 5
    assert Patient.objects.filter(identifiers__isnull=False).distinct().count() == 5
    assert audit_verify(actor=SYSTEM, now=NOW).intact
