"""``broker.bulk.bulk_insert``: ``bulk_create``'s rows and keys, by COPY on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError

from broker.bulk import bulk_insert
from broker.models import IdentifierKind, IdentifierLinkHistory, Patient, PatientIdentifier
from tests.conftest import NOW, Region

pytestmark = pytest.mark.django_db


def _identifiers(patients: list[Patient], region: Region, prefix: str) -> list[PatientIdentifier]:
    return [
        PatientIdentifier(
            patient=patient,
            issuer=region.chu.patient_id_issuer,
            value=f"{prefix}{n}",
            kind=IdentifierKind.IPP,
            institution=region.chu,
            family_name="D'ARTAGNAN\tÉlodie \\N",
            birth_date=dt.date(1980, 2, 29) if n % 2 else None,
            created_at=NOW + dt.timedelta(microseconds=n),
            updated_at=NOW,
        )
        for n, patient in enumerate(patients)
    ]


def test_rows_get_their_keys_and_read_back_as_built_their_foreign_keys_included(region):
    patients = bulk_insert(Patient, [Patient(created_at=NOW) for _ in range(3)])
    identifiers = bulk_insert(PatientIdentifier, _identifiers(patients, region, "B"))
    history = bulk_insert(
        IdentifierLinkHistory,
        [
            IdentifierLinkHistory(
                identifier=identifier,
                from_patient=None,
                to_patient=identifier.patient,
                reason=IdentifierLinkHistory.Reason.CREATED,
                actor="test",
                correlation_id=uuid.uuid4(),
                at=NOW,
            )
            for identifier in identifiers
        ],
    )

    for model, rows in ((Patient, patients), (PatientIdentifier, identifiers)):
        fields = [field.attname for field in model._meta.concrete_fields]
        assert all(row.pk is not None and not row._state.adding for row in rows)
        stored = {row.pk: row for row in model.objects.filter(pk__in=[r.pk for r in rows])}
        for row in rows:
            assert {f: getattr(stored[row.pk], f) for f in fields} == {
                f: getattr(row, f) for f in fields
            }
    assert [h.identifier_id for h in history] == [i.pk for i in identifiers]
    assert IdentifierLinkHistory.objects.filter(identifier__in=identifiers).count() == 3
    # The keys are the sequence's: a row created afterwards comes after them.
    assert Patient.objects.create(created_at=NOW).pk > max(p.pk for p in patients)


def test_a_taken_key_raises_djangos_integrity_error_and_stores_nothing(region):
    # What a concurrent registration meets: manifests_register retries on IntegrityError.
    patients = bulk_insert(Patient, [Patient(created_at=NOW) for _ in range(2)])
    bulk_insert(PatientIdentifier, _identifiers(patients, region, "T"))

    with pytest.raises(IntegrityError), transaction.atomic():
        bulk_insert(PatientIdentifier, _identifiers(patients, region, "T"))
    assert PatientIdentifier.objects.filter(value__startswith="T").count() == 2


def test_an_unsaved_related_row_is_refused_as_bulk_create_refuses_it(region):
    unsaved = Patient(created_at=NOW)
    rows = _identifiers([unsaved, unsaved], region, "U")

    with pytest.raises(ValueError, match="unsaved related object"):
        bulk_insert(PatientIdentifier, rows)


@pytest.mark.postgres
def test_postgresql_takes_them_by_copy(region):
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        bulk_insert(Patient, [Patient(created_at=NOW) for _ in range(3)])
    # Only the keys go through execute(); the rows go by COPY.
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["SELECT"]
    assert Patient.objects.count() == 3


@pytest.mark.postgres
def test_a_transaction_that_must_be_rolled_back_refuses_the_copy_too(region):
    # As cursor.execute() refuses any query once an error inside the atomic block was caught.
    rows = [Patient(pk=10_000 + n, created_at=NOW) for n in range(2)]  # keys given: no query
    with transaction.atomic():
        connection.needs_rollback = True  # what Django sets after an error inside this block
        with pytest.raises(TransactionManagementError):
            bulk_insert(Patient, rows)
    assert not Patient.objects.filter(pk__gte=10_000).exists()
