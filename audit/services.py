"""Writing to the audit trail, and checking it.

:func:`audit_record` is the one way to write an audit event. Every service calls it
inside its own ``transaction.atomic()``, so the event commits with the change it
describes, or neither does.

The chain is global: each event takes the next sequence and links to the hash of the
one before. Writers are serialised while they hold the chain: on PostgreSQL by a
transaction-level advisory lock taken by :func:`audit_record` and held until the
caller's transaction ends; on SQLite by the write lock every transaction takes at
``BEGIN IMMEDIATE`` (``transaction_mode`` in settings). Call it late in the transaction:
other audited transactions wait for this one to end from that point on.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from django.db import connection, transaction

from audit import chain
from audit.events import EventCode, Outcome, spec_for
from audit.models import AuditEvent
from audit.selectors import audit_chain_head, audit_events_iter
from audit.types import (
    Actor,
    ActorKind,
    AuditError,
    AuditImmutable,
    AuditTransactionRequired,
    AuditValueError,
    PatientRef,
)

__all__ = [
    "Actor",
    "ActorKind",
    "AuditEntry",
    "AuditError",
    "AuditImmutable",
    "AuditTransactionRequired",
    "AuditValueError",
    "PatientRef",
    "VerifyResult",
    "audit_record",
    "audit_record_many",
    "audit_verify",
]

# pg_advisory_xact_lock key of the audit chain: "RELAISAU" in ASCII, as a signed bigint.
CHAIN_LOCK_KEY: Final = int.from_bytes(b"RELAISAU", "big", signed=True)
# Events per INSERT statement: well under SQLite's and PostgreSQL's limits on parameters.
INSERT_CHUNK: Final = 500
# psycopg caches its parsing of a statement of at most 50 parameters (psycopg._queries).
COPY_ABOVE_PARAMETERS: Final = 50


def _lock_chain() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CHAIN_LOCK_KEY])
    # SQLite: the transaction began with BEGIN IMMEDIATE and holds the write lock.


def _check_length(event: AuditEvent, names: Sequence[str]) -> None:
    # What a column can hold: refused the same way on every database, never truncated.
    for name in names:
        limit = AuditEvent._meta.get_field(name).max_length
        value = getattr(event, name)
        if limit is not None and len(value) > limit:
            raise AuditValueError(f"{name} longer than {limit} characters: {value[:80]!r}")


def _json(what: str, value: object) -> chain.JSONValue:
    try:
        return chain.json_value(value)
    except chain.CanonicalError as exc:
        raise AuditValueError(f"{what}: {exc}") from exc


def _text(what: str, value: str) -> str:
    if not isinstance(value, str):
        raise AuditValueError(f"{what} must be a string, not {value!r}")
    return str(_json(what, value))


def _objects(objects: Sequence[Mapping[str, Any]]) -> list[chain.JSONValue]:
    if isinstance(objects, str | bytes | Mapping):
        raise AuditValueError("objects is a sequence of mappings, one per object")
    result = []
    for item in objects:
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str):
            raise AuditValueError(f'each object is a mapping with a "type": {item!r}')
        result.append(_json("objects", item))
    return result


@dataclass(frozen=True)
class AuditEntry:
    """One event to append with :func:`audit_record_many` (the arguments of audit_record)."""

    code: EventCode
    actor: Actor
    now: dt.datetime
    outcome: Outcome = Outcome.SUCCESS
    patient: PatientRef | None = None
    objects: Sequence[Mapping[str, Any]] = ()
    purpose_of_use: str = ""
    correlation_id: uuid.UUID | None = None
    details: Mapping[str, Any] | None = None


def audit_record(
    *,
    code: EventCode,
    actor: Actor,
    now: dt.datetime,
    outcome: Outcome = Outcome.SUCCESS,
    patient: PatientRef | None = None,
    objects: Sequence[Mapping[str, Any]] = (),
    purpose_of_use: str = "",
    correlation_id: uuid.UUID | None = None,
    details: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the audit trail, in the caller's transaction.

    Raises :class:`AuditTransactionRequired` outside ``transaction.atomic()`` and
    :class:`AuditValueError` for a value that cannot be audited as given (an unknown
    code, a naive ``now``, an unserialisable detail, an over-long field).
    """
    entry = AuditEntry(
        code=code,
        actor=actor,
        now=now,
        outcome=outcome,
        patient=patient,
        objects=objects,
        purpose_of_use=purpose_of_use,
        correlation_id=correlation_id,
        details=details,
    )
    return audit_record_many([entry])[0]


def audit_record_many(entries: Sequence[AuditEntry]) -> list[AuditEvent]:
    """Append several events, in order, in the caller's transaction, with one insert.

    The same checks as :func:`audit_record`; the chain is taken once for all of them, so a
    service that handles a batch (an import, a harvest) pays for the lock once.
    """
    if not connection.in_atomic_block:
        raise AuditTransactionRequired(
            "audit_record runs inside the transaction of the change it records"
        )
    events = [_build_event(entry) for entry in entries]
    if not events:
        return []
    _lock_chain()
    head = audit_chain_head()
    sequence, prev_hash = head if head else (0, chain.GENESIS_HASH)
    for event in events:
        sequence += 1
        event.sequence, event.prev_hash = sequence, prev_hash
        event.hash = prev_hash = chain.compute_hash(event.prev_hash, event.chain_record())
    _insert(events)
    return events


def _insert(events: Sequence[AuditEvent]) -> None:
    """The events' rows, values prepared by the model's own fields: one INSERT, or on
    PostgreSQL a COPY once there are more than a few.

    Every audited write pays for this: the ORM's save() cost this machine about a
    millisecond of CPU per event, this a tenth of it (docs/performance.md). psycopg parses
    again, in Python, every statement of more than 50 parameters: for the batches of a
    registration (two events per manifest) that was a tenth of its CPU, which COPY does
    not pay. The model's manager refuses bulk_create, and its save() refuses an update:
    appending to the chain here is the one way in.
    """
    fields = AuditEvent._meta.concrete_fields
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    rows = iter(
        [
            [field.get_db_prep_save(getattr(event, field.attname), connection) for field in fields]
            for event in events
        ]
    )  # prepared before the COPY: an error in its middle would abort the transaction
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(events) * len(fields) > COPY_ABOVE_PARAMETERS:
            # Checked, and errors raised as Django's, as through cursor.execute().
            connection.validate_no_broken_transaction()
            with (
                connection.wrap_database_errors,
                cursor.cursor.copy(
                    f"COPY {AuditEvent._meta.db_table} ({columns}) FROM STDIN"
                ) as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        else:
            placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
            for start in range(0, len(events), INSERT_CHUNK):
                chunk = events[start : start + INSERT_CHUNK]
                cursor.execute(
                    f"INSERT INTO {AuditEvent._meta.db_table} ({columns}) VALUES "  # noqa: S608
                    + ", ".join([placeholders] * len(chunk)),
                    [value for _ in chunk for value in next(rows)],
                )
    for event in events:
        event._state.adding = False
        event._state.db = connection.alias


def _build_event(entry: AuditEntry) -> AuditEvent:
    code, outcome, actor, now = entry.code, entry.outcome, entry.actor, entry.now
    patient, correlation_id, details = entry.patient, entry.correlation_id, entry.details
    try:
        code = EventCode(code)
        outcome = Outcome(outcome)
    except ValueError as exc:
        raise AuditValueError(str(exc)) from None
    if not isinstance(actor, Actor):
        raise AuditValueError(f"actor must be an Actor, not {actor!r}")
    if not isinstance(now, dt.datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise AuditValueError("now must be timezone-aware")
    if correlation_id is not None and not isinstance(correlation_id, uuid.UUID):
        raise AuditValueError(f"correlation_id must be a UUID, not {correlation_id!r}")
    if details is not None and not isinstance(details, Mapping):
        raise AuditValueError(f"details must be a mapping, not {details!r}")
    spec = spec_for(code)
    event = AuditEvent(
        recorded_at=now.astimezone(dt.UTC),
        code=code.value,
        event_id=spec.event_id.code,
        event_type=spec.event_type.code if spec.event_type else "",
        action=spec.action.value,
        outcome=outcome.value,
        actor_kind=actor.kind.value,
        actor_user_id=actor.user_id,
        actor_username=_text("actor username", actor.username),
        actor_institution=_text("actor institution", actor.institution),
        actor_role=_text("actor role", actor.role),
        actor_address=_text("actor address", actor.address),
        patient_id=_text("patient id", patient.patient_id) if patient else "",
        patient_identifiers=_json("patient identifiers", patient.identifiers) if patient else [],
        participant_objects=_objects(entry.objects),
        purpose_of_use=_text("purpose of use", entry.purpose_of_use),
        correlation_id=correlation_id,
        details=_json("details", details or {}),
    )
    _check_length(event, ("actor_address", "patient_id", "purpose_of_use"))
    return event


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`audit_verify` found, from ``from_sequence`` to the head of the chain."""

    intact: bool
    from_sequence: int
    checked: int
    last_sequence: int
    head_hash: str
    broken_sequence: int | None = None
    problem: str = ""

    def summary(self) -> str:
        if self.intact:
            return (
                f"intact: {self.checked} events, last sequence {self.last_sequence}, "
                f"head hash {self.head_hash}"
            )
        return f"broken at sequence {self.broken_sequence}: {self.problem}"


def _check_chain(*, from_sequence: int, chunk_size: int) -> VerifyResult:
    if from_sequence == 1:
        checker = chain.ChainChecker()
    else:
        anchor = (
            AuditEvent.objects.filter(sequence=from_sequence - 1).values_list("hash", flat=True)
        ).first()
        if anchor is None:
            head = audit_chain_head()
            if head is None or head[0] < from_sequence - 1:
                # Nothing at or after from_sequence: nothing to check.
                last, head_hash = head or (0, chain.GENESIS_HASH)
                return VerifyResult(True, from_sequence, 0, last, head_hash)
            return VerifyResult(
                False,
                from_sequence,
                0,
                from_sequence - 2,
                "",
                from_sequence - 1,
                f"sequence {from_sequence - 1}, the one before the first checked, is missing",
            )
        checker = chain.ChainChecker(first_sequence=from_sequence, anchor_hash=anchor)

    for event in audit_events_iter(from_sequence=from_sequence, chunk_size=chunk_size):
        broken = checker.check(
            sequence=event.sequence,
            prev_hash=event.prev_hash,
            hash=event.hash,
            record=event.chain_record(),
        )
        if broken is not None:
            return VerifyResult(
                False,
                from_sequence,
                checker.checked,
                checker.last_sequence,
                checker.head_hash,
                broken.sequence,
                broken.problem,
            )
    return VerifyResult(
        True, from_sequence, checker.checked, checker.last_sequence, checker.head_hash
    )


def audit_verify(
    *, actor: Actor, now: dt.datetime, from_sequence: int = 1, chunk_size: int = 2000
) -> VerifyResult:
    """Recompute the chain from ``from_sequence`` and record that the trail was checked.

    The chain is read in chunks of ``chunk_size`` events by sequence (memory stays flat),
    outside any transaction so that writers are not held up; the first break found is
    reported: a missing sequence (a deleted row), a ``prev_hash`` that does not link to
    the event before (rows reordered or replaced), a hash that does not match the content
    (an edited row). Then an ``audit:chain:verify`` event (Audit Log Used) records the
    outcome, in a transaction of its own.

    A deletion of the last events cannot be seen from inside the chain: compare the head
    hash with one kept elsewhere (a previous verification, the syslog collector).
    """
    if from_sequence < 1:
        raise AuditValueError("sequences start at 1")
    if chunk_size < 1:
        raise AuditValueError("chunk_size must be positive")
    result = _check_chain(from_sequence=from_sequence, chunk_size=chunk_size)
    details: dict[str, object] = {
        "from_sequence": result.from_sequence,
        "checked": result.checked,
        "last_sequence": result.last_sequence,
        "head_hash": result.head_hash,
        "intact": result.intact,
    }
    if not result.intact:
        details.update(broken_sequence=result.broken_sequence, problem=result.problem)
    with transaction.atomic():
        audit_record(
            code=EventCode.AUDIT_VERIFY,
            actor=actor,
            now=now,
            outcome=Outcome.SUCCESS if result.intact else Outcome.SERIOUS_FAILURE,
            objects=[{"type": "audit-log", "name": "relais"}],
            details=details,
        )
    return result
