"""The audit trail: a hash chain the database keeps append-only, verified from the CLI.

Runs on SQLite (default) and PostgreSQL (DATABASE_URL). Tampering goes through
``audit.triggers.append_only_suspended``, the one way around the database's refusal.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import itertools
import os
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, transaction
from django.urls import reverse

from audit import chain
from audit.events import EventCode, Outcome
from audit.models import HASHED_FIELDS, AuditEvent
from audit.selectors import (
    audit_chain_head,
    audit_events_filter,
    audit_events_for_correlation,
    audit_events_for_patient,
    audit_events_iter,
)
from audit.services import (
    Actor,
    ActorKind,
    AuditImmutable,
    AuditTransactionRequired,
    AuditValueError,
    PatientRef,
    audit_record,
    audit_verify,
)
from audit.triggers import append_only_suspended

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("audit_writer.py")
ON_POSTGRES = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
requires_postgres = pytest.mark.skipif(not ON_POSTGRES, reason="needs PostgreSQL (DATABASE_URL)")

NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
DOCTOR = Actor(
    kind=ActorKind.USER,
    user_id=7,
    username="dr.martin",
    institution="560000019",
    role="referring_doctor",
    address="10.1.2.3",
)
PATIENT = PatientRef(
    patient_id="6a0c1b8e-2f54-4e39-8d0b-1f6c7a9e3b21",
    identifiers=(
        {"issuer": "CH-PORTMAEL", "value": "IPP0042", "kind": "ipp"},
        {"issuer": "1.2.250.1.213.1.4.8", "value": "180127512345678", "kind": "ins"},
    ),
)


def record(
    count: int = 1,
    *,
    code: EventCode = EventCode.MANIFEST_READ,
    actor: Actor = DOCTOR,
    now: dt.datetime = NOW,
    **kwargs: Any,
) -> list[AuditEvent]:
    """``count`` events, a minute apart, each in its own transaction."""
    events = []
    for n in range(count):
        with transaction.atomic():
            events.append(
                audit_record(
                    code=code,
                    actor=actor,
                    now=now + dt.timedelta(minutes=n),
                    **{"details": {"n": n}, **kwargs},
                )
            )
    return events


def verify(*args: str) -> str:
    out = io.StringIO()
    call_command("audit_verify", *args, stdout=out)
    return out.getvalue()


def verify_fails(*args: str) -> str:
    with pytest.raises(CommandError) as failure:
        verify(*args)
    assert failure.value.returncode == 1
    return str(failure.value)


def tamper(*statements: str) -> None:
    with transaction.atomic(), append_only_suspended(), connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def refused(statement: str) -> None:
    with (
        pytest.raises(IntegrityError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement)


@pytest.fixture
def committed_db(transactional_db: None) -> Iterator[None]:
    """Committed transactions, then an emptied audit table so the teardown flush can run.

    (The flush deletes every row: the triggers would refuse it for audit rows.)
    """
    yield
    with append_only_suspended(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM audit_auditevent")


# ---------------------------------------------------------------------------
# Writing


def test_events_are_chained_in_one_contiguous_sequence(db: None) -> None:
    first, second, third = record(3)
    assert [e.sequence for e in (first, second, third)] == [1, 2, 3]
    assert first.prev_hash == chain.GENESIS_HASH
    assert second.prev_hash == first.hash
    assert third.prev_hash == second.hash
    assert audit_chain_head() == (3, third.hash)


def test_an_event_carries_its_dicom_coding_and_everything_said_about_it(db: None) -> None:
    correlation = uuid.uuid4()
    with transaction.atomic():
        event = audit_record(
            code=EventCode.API_KEY_REVOKE,
            actor=DOCTOR,
            now=dt.datetime(2026, 3, 29, 3, 30, 0, 1234, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            outcome=Outcome.MINOR_FAILURE,
            patient=PATIENT,
            objects=[{"type": "api-key", "prefix": "AbC123"}],
            purpose_of_use="treatment",
            correlation_id=correlation,
            details={"reason": "lost"},
        )
    stored = AuditEvent.objects.get(sequence=event.sequence)
    assert (stored.code, stored.event_id, stored.event_type, stored.action, stored.outcome) == (
        "security:api-key:revoke",
        "110113",
        "110136",
        "D",
        4,
    )
    assert stored.recorded_at == dt.datetime(2026, 3, 29, 1, 30, 0, 1234, tzinfo=dt.UTC)
    assert stored.recorded_at.utcoffset() == dt.timedelta(0)
    assert (stored.actor_kind, stored.actor_user_id, stored.actor_username) == (
        "user",
        7,
        "dr.martin",
    )
    assert (stored.actor_institution, stored.actor_role, stored.actor_address) == (
        "560000019",
        "referring_doctor",
        "10.1.2.3",
    )
    assert stored.patient_id == PATIENT.patient_id
    assert stored.patient_identifiers == list(PATIENT.identifiers)
    assert stored.participant_objects == [{"type": "api-key", "prefix": "AbC123"}]
    assert (stored.purpose_of_use, stored.correlation_id) == ("treatment", correlation)
    assert stored.details == {"reason": "lost"}


def test_an_event_read_back_from_the_database_hashes_as_it_was_written(db: None) -> None:
    (written,) = record(
        patient=PATIENT,
        objects=[{"type": "study", "uid": "1.2.250.1.59.3", "accession": "A-1", "instances": 412}],
        correlation_id=uuid.uuid4(),
        details={
            "zèbre": {"b": [3, 2, 1], "a": None, "ok": True},
            "ratio": 0.1,
            "at": dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC),
            "big": 2**70,
            "name": "Éloïse Ŀ 日本 🩻",
        },
    )
    stored = AuditEvent.objects.get(sequence=written.sequence)
    assert stored.details["ratio"] == "0.1"  # floats are audited as their exact text
    assert chain.compute_hash(stored.prev_hash, stored.chain_record()) == written.hash
    assert stored.hash == written.hash


def test_every_column_but_the_two_hashes_is_hashed() -> None:
    columns = {field.attname for field in AuditEvent._meta.concrete_fields}
    assert set(HASHED_FIELDS) == columns - {"prev_hash", "hash"}


def test_audit_record_outside_a_transaction_is_refused(transactional_db: None) -> None:
    with pytest.raises(AuditTransactionRequired):
        audit_record(code=EventCode.MANIFEST_READ, actor=DOCTOR, now=NOW)
    assert not AuditEvent.objects.exists()


def test_a_rolled_back_transaction_consumes_no_sequence(db: None) -> None:
    record(1)
    with contextlib.suppress(ZeroDivisionError), transaction.atomic():
        record(1)
        1 / 0  # noqa: B018 - the service that failed after auditing
    (after,) = record(1)
    assert after.sequence == 2
    assert after.prev_hash == AuditEvent.objects.get(sequence=1).hash


@pytest.mark.parametrize(
    "kwargs",
    [
        {"now": dt.datetime(2026, 1, 1, 12, 0)},  # naive
        {"code": "registry:manifest:teleport"},
        {"details": {"cannot": {1, 2}}},
        {"details": ["not", "a", "mapping"]},
        {"objects": [{"uid": "1.2.3"}]},
        {"objects": {"type": "study"}},
        {"purpose_of_use": "x" * 65},
        {"correlation_id": "2b8e7c8e-4f7a-4d64-9a57-1f0d3c0b4b1e"},
    ],
    ids=[
        "naive time",
        "unknown code",
        "set in details",
        "details not a mapping",
        "object without type",
        "objects not a sequence",
        "purpose too long",
        "correlation id not a UUID",
    ],
)
def test_a_value_that_cannot_be_audited_is_refused_before_writing(
    db: None, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(AuditValueError), transaction.atomic():
        audit_record(**{"code": EventCode.MANIFEST_READ, "actor": DOCTOR, "now": NOW, **kwargs})
    assert not AuditEvent.objects.exists()


def test_actors_name_who_acted() -> None:
    assert Actor.system() == Actor(kind=ActorKind.SYSTEM, user_id=None, username="relais")
    assert Actor.anonymous("192.0.2.1").address == "192.0.2.1"
    assert Actor.for_institution("350000014", name="PACS").kind is ActorKind.INSTITUTION
    assert Actor(kind="user", user_id=3, username="u").kind is ActorKind.USER
    with pytest.raises(AuditValueError):
        Actor(kind=ActorKind.USER, user_id=None, username="who")
    with pytest.raises(AuditValueError):
        Actor(kind="robot", user_id=None, username="r2")
    with pytest.raises(AuditValueError):
        Actor(kind=ActorKind.USER, user_id="7", username="who")  # type: ignore[arg-type]


def test_a_patient_identifier_is_issuer_value_and_kind() -> None:
    with pytest.raises(AuditValueError):
        PatientRef(patient_id="p", identifiers=({"issuer": "X", "value": "1"},))
    with pytest.raises(AuditValueError):
        PatientRef(patient_id="", identifiers=())


# ---------------------------------------------------------------------------
# Append only


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_auditevent SET details = '{}' WHERE sequence = 2",
        "UPDATE audit_auditevent SET outcome = 0",
        "DELETE FROM audit_auditevent WHERE sequence = 2",
        "DELETE FROM audit_auditevent",
    ],
)
def test_the_database_refuses_to_change_or_delete_an_event(db: None, statement: str) -> None:
    record(3)
    refused(statement)
    assert AuditEvent.objects.count() == 3
    assert verify().startswith("intact: 3 events")


@pytest.mark.postgres
@requires_postgres
def test_postgresql_refuses_to_truncate_the_trail(db: None) -> None:
    record(1)
    refused("TRUNCATE audit_auditevent")
    assert AuditEvent.objects.count() == 1


def test_the_model_refuses_to_save_or_delete_a_recorded_event(db: None) -> None:
    (event,) = record(1)
    event.details = {"edited": True}
    with pytest.raises(AuditImmutable):
        event.save()
    with pytest.raises(AuditImmutable):
        event.delete()
    with pytest.raises(AuditImmutable):
        AuditEvent.objects.filter(sequence=1).update(outcome=8)
    with pytest.raises(AuditImmutable):
        AuditEvent.objects.filter(sequence=1).delete()
    assert AuditEvent.objects.get(sequence=1).details == {"n": 0}


# ---------------------------------------------------------------------------
# Verification


def test_an_untouched_chain_verifies_and_the_check_is_itself_audited(db: None) -> None:
    *_, last = record(5)
    assert verify() == f"intact: 5 events, last sequence 5, head hash {last.hash}\n"
    check = AuditEvent.objects.get(sequence=6)
    assert (check.code, check.event_id, check.action, check.outcome) == (
        EventCode.AUDIT_VERIFY,
        "110101",
        "R",
        Outcome.SUCCESS,
    )
    assert check.actor_kind == ActorKind.SYSTEM
    assert check.details["head_hash"] == last.hash
    assert check.prev_hash == last.hash
    assert verify().startswith("intact: 6 events, last sequence 6")


def test_an_empty_trail_verifies(db: None) -> None:
    assert verify() == f"intact: 0 events, last sequence 0, head hash {chain.GENESIS_HASH}\n"


def test_verification_catches_an_edited_event(db: None) -> None:
    record(4)
    tamper("UPDATE audit_auditevent SET actor_username = 'someone.else' WHERE sequence = 3")
    message = verify_fails()
    assert message.startswith("broken at sequence 3: hash does not match the content")


def test_verification_catches_an_edited_event_whose_hash_was_recomputed(db: None) -> None:
    record(4)
    edited = AuditEvent.objects.get(sequence=2)
    edited.details = {"n": 99}
    forged = chain.compute_hash(edited.prev_hash, edited.chain_record())
    with transaction.atomic(), append_only_suspended(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE audit_auditevent SET details = %s, hash = %s WHERE sequence = 2",
            ['{"n": 99}', forged],
        )
    assert verify_fails().startswith("broken at sequence 3: prev_hash does not link to sequence 2")


def test_verification_catches_a_deleted_event(db: None) -> None:
    record(4)
    tamper("DELETE FROM audit_auditevent WHERE sequence = 2")
    assert verify_fails().startswith("broken at sequence 2: sequence 2 is missing")


def test_verification_catches_a_deleted_first_event(db: None) -> None:
    record(2)
    tamper("DELETE FROM audit_auditevent WHERE sequence = 1")
    assert verify_fails().startswith("broken at sequence 1: sequence 1 is missing")


def test_verification_catches_a_reordered_pair(db: None) -> None:
    record(4)
    tamper(
        "UPDATE audit_auditevent SET sequence = 1000 WHERE sequence = 2",
        "UPDATE audit_auditevent SET sequence = 2 WHERE sequence = 3",
        "UPDATE audit_auditevent SET sequence = 3 WHERE sequence = 1000",
    )
    assert verify_fails().startswith("broken at sequence 2: prev_hash does not link to sequence 1")


def test_a_failed_verification_is_audited_as_a_serious_failure(db: None) -> None:
    record(3)
    tamper("DELETE FROM audit_auditevent WHERE sequence = 2")
    verify_fails()
    check = AuditEvent.objects.get(sequence=4)
    assert (check.code, check.outcome) == (EventCode.AUDIT_VERIFY, Outcome.SERIOUS_FAILURE)
    assert check.details["broken_sequence"] == 2


def test_verification_reads_the_chain_in_chunks(db: None) -> None:
    record(7)
    tamper("UPDATE audit_auditevent SET purpose_of_use = 'x' WHERE sequence = 5")
    result = audit_verify(actor=Actor.system(), now=NOW, chunk_size=2)
    assert (result.intact, result.broken_sequence, result.checked) == (False, 5, 4)
    assert [e.sequence for e in audit_events_iter(chunk_size=3)] == list(range(1, 9))


def test_verification_can_start_from_a_sequence(db: None) -> None:
    events = record(5)
    assert verify("--from-sequence", "3") == (
        f"intact: 3 events, last sequence 5, head hash {events[-1].hash}\n"
    )
    tamper("DELETE FROM audit_auditevent WHERE sequence = 2")
    assert verify_fails("--from-sequence", "3").startswith("broken at sequence 2")
    assert verify("--from-sequence", "100").startswith("intact: 0 events, last sequence 7")


def test_a_bad_starting_sequence_is_a_usage_error(db: None) -> None:
    with pytest.raises(CommandError) as failure:
        verify("--from-sequence", "0")
    assert failure.value.returncode == 2


# ---------------------------------------------------------------------------
# Reading


def test_events_of_one_correlation_come_in_order(db: None) -> None:
    correlation = uuid.uuid4()
    record(1, correlation_id=correlation)
    record(1)
    record(1, correlation_id=correlation)
    assert [e.sequence for e in audit_events_for_correlation(correlation)] == [1, 3]


def test_a_patients_access_report_covers_a_period(db: None) -> None:
    record(4, patient=PATIENT)  # 10:00, 10:01, 10:02, 10:03
    record(1, patient=PatientRef(patient_id="someone-else"))
    since, until = NOW + dt.timedelta(minutes=1), NOW + dt.timedelta(minutes=3)
    assert [e.sequence for e in audit_events_for_patient(PATIENT.patient_id)] == [1, 2, 3, 4]
    report = audit_events_for_patient(PATIENT.patient_id, since=since, until=until)
    assert [e.sequence for e in report] == [2, 3]


def test_events_can_be_filtered_by_code_actor_outcome_and_time(db: None) -> None:
    record(2)
    record(
        1,
        code=EventCode.API_KEY_REFUSED,
        actor=Actor.anonymous("192.0.2.9"),
        outcome=Outcome.MINOR_FAILURE,
    )
    assert [e.sequence for e in audit_events_filter(code=EventCode.API_KEY_REFUSED)] == [3]
    assert [e.sequence for e in audit_events_filter(actor_user_id=7)] == [1, 2]
    assert [e.sequence for e in audit_events_filter(outcome=Outcome.MINOR_FAILURE)] == [3]
    assert [e.sequence for e in audit_events_filter(since=NOW + dt.timedelta(minutes=1))] == [2]


def test_the_admin_shows_the_trail_but_changes_nothing(admin_client: Any) -> None:
    record(1)
    changelist = reverse("admin:audit_auditevent_changelist")
    assert admin_client.get(changelist).status_code == 200
    assert admin_client.get(reverse("admin:audit_auditevent_change", args=[1])).status_code == 200
    assert admin_client.get(reverse("admin:audit_auditevent_add")).status_code == 403
    assert admin_client.post(reverse("admin:audit_auditevent_delete", args=[1])).status_code == 403
    response = admin_client.post(
        changelist, {"action": "delete_selected", "_selected_action": ["1"], "post": "yes"}
    )
    assert response.status_code in (200, 302)
    assert AuditEvent.objects.filter(sequence=1).exists()


# ---------------------------------------------------------------------------
# Several processes writing at once


WRITERS = 4
EVENTS_PER_WRITER = 50


def run_writers(env: dict[str, str], go_file: Path) -> None:
    """Start the writers, let them all set Django up, then release them together."""
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(WRITER),
                "write",
                f"writer-{n}",
                str(EVENTS_PER_WRITER),
                str(go_file),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(WRITERS)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n", process.communicate()[1]
        go_file.touch()
        for process in processes:
            _, errors = process.communicate(timeout=120)
            assert process.returncode == 0, errors
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def assert_written_together(writers: list[str]) -> None:
    """Every writer's events are there, and interleaved: the writers did run at once."""
    assert Counter(writers) == {f"writer-{n}": EVENTS_PER_WRITER for n in range(WRITERS)}
    switches = sum(1 for a, b in itertools.pairwise(writers) if a != b)
    assert switches > WRITERS - 1, "the writers ran one after the other: nothing was tested"


def subprocess_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": database_url, "RELAIS_DATA_DIR": str(tmp_path / "var")}


@pytest.fixture
def sqlite_file_env(tmp_path: Path) -> dict[str, str]:
    """A migrated SQLite file database of this test's own, as the real settings use it."""
    env = subprocess_env(tmp_path, f"sqlite:///{tmp_path / 'relais.sqlite3'}")
    subprocess.run([sys.executable, str(WRITER), "migrate"], cwd=ROOT, env=env, check=True)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_concurrent_writers_on_sqlite_leave_one_unbroken_chain(
    sqlite_file_env: dict[str, str], tmp_path: Path
) -> None:
    run_writers(sqlite_file_env, tmp_path / "go")

    verified = manage(sqlite_file_env, "audit_verify", "--skip-checks")
    total = WRITERS * EVENTS_PER_WRITER
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"intact: {total} events, last sequence {total}, ")
    with contextlib.closing(sqlite3.connect(tmp_path / "relais.sqlite3")) as db:
        writers = db.execute(
            "SELECT actor_username FROM audit_auditevent "
            "WHERE code = 'registry:manifest:query' ORDER BY sequence"
        ).fetchall()
    assert_written_together([writer for (writer,) in writers])


def test_the_command_exits_1_on_a_broken_chain_and_0_on_an_intact_one(
    sqlite_file_env: dict[str, str], tmp_path: Path
) -> None:
    env = sqlite_file_env
    subprocess.run([sys.executable, str(WRITER), "write", "w", "3"], cwd=ROOT, env=env, check=True)
    assert manage(env, "audit_verify", "--skip-checks").returncode == 0

    with contextlib.closing(sqlite3.connect(tmp_path / "relais.sqlite3")) as db:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM audit_auditevent WHERE sequence = 2")
        db.execute("DROP TRIGGER audit_auditevent_refuse_delete")
        db.execute("DELETE FROM audit_auditevent WHERE sequence = 2")
        db.commit()

    broken = manage(env, "audit_verify", "--skip-checks")
    assert broken.returncode == 1
    assert "broken at sequence 2: sequence 2 is missing" in broken.stderr


@pytest.mark.postgres
@requires_postgres
def test_concurrent_writers_on_postgresql_leave_one_unbroken_chain(
    committed_db: None, tmp_path: Path
) -> None:
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    run_writers(subprocess_env(tmp_path, url), tmp_path / "go")

    total = WRITERS * EVENTS_PER_WRITER
    sequences = list(AuditEvent.objects.order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(1, total + 1))
    assert verify().startswith(f"intact: {total} events, last sequence {total}, ")
    assert_written_together(
        list(
            audit_events_filter(code=EventCode.MANIFEST_QUERY).values_list(
                "actor_username", flat=True
            )
        )
    )


@pytest.mark.django_db
@pytest.mark.parametrize("size", [1, 3, 1007], ids=["one", "a-few", "many"])
def test_a_batch_is_stored_as_written_in_one_contiguous_chain(size: int):
    # One INSERT; on PostgreSQL a COPY above 50 parameters (a-few, many); on SQLite several
    # INSERTs above INSERT_CHUNK (many).
    from audit.services import INSERT_CHUNK, AuditEntry, audit_record_many

    assert size in (1, 3, 2 * INSERT_CHUNK + 7)
    entries = [
        AuditEntry(
            code=EventCode.MANIFEST_REGISTER,
            actor=DOCTOR,
            now=NOW + dt.timedelta(microseconds=n),
            patient=PatientRef("p-1", ({"issuer": "CHU", "value": "1", "kind": "PI"},)),
            correlation_id=uuid.UUID(int=n),
            details={"n": n, "name": "Hélène\t« » \\N", "nested": {"empty": "", "none": None}},
        )
        for n in range(size)
    ]
    with transaction.atomic():
        written = audit_record_many(entries)
    stored = list(AuditEvent.objects.order_by("sequence"))
    assert [e.sequence for e in stored] == list(range(1, len(entries) + 1))
    fields = [field.attname for field in AuditEvent._meta.concrete_fields]
    for event, row in zip(written, stored, strict=True):
        assert {f: getattr(row, f) for f in fields} == {f: getattr(event, f) for f in fields}
    assert audit_verify(actor=Actor.system(), now=NOW).intact
