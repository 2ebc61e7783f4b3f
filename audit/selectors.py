"""Reading the audit trail. Every list is ordered, and served by a named index."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

from django.db import connection
from django.db.models import QuerySet

from audit.events import EventCode, Outcome
from audit.models import AuditEvent


def audit_chain_head() -> tuple[int, str] | None:
    """The last event's sequence and hash, or None for an empty trail (every audited write
    reads it: plain SQL on the primary key's index)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT sequence, hash FROM audit_auditevent ORDER BY sequence DESC LIMIT 1")
        row = cursor.fetchone()
    return (int(row[0]), str(row[1])) if row else None


def audit_events_iter(*, from_sequence: int = 1, chunk_size: int = 2000) -> Iterator[AuditEvent]:
    """Every event from ``from_sequence`` on, in sequence order, read ``chunk_size`` at a time.

    Keyset pagination on the primary key: each chunk is one indexed range query, and no
    more than one chunk is in memory, however long the trail.
    """
    after = from_sequence - 1
    while True:
        events = AuditEvent.objects.filter(sequence__gt=after).order_by("sequence")
        chunk = list(events[:chunk_size])
        yield from chunk
        if len(chunk) < chunk_size:
            return
        after = chunk[-1].sequence


def audit_events_for_correlation(correlation_id: uuid.UUID) -> QuerySet[AuditEvent]:
    """Everything one request or exchange caused, in order."""
    return AuditEvent.objects.filter(correlation_id=correlation_id).order_by("sequence")


def audit_events_for_patient(
    patient_id: str, *, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> QuerySet[AuditEvent]:
    """Who did what with this patient's data, and when: ``since`` <= time < ``until``."""
    events = AuditEvent.objects.filter(patient_id=patient_id)
    if since is not None:
        events = events.filter(recorded_at__gte=since)
    if until is not None:
        events = events.filter(recorded_at__lt=until)
    return events.order_by("recorded_at", "sequence")


def audit_events_filter(
    *,
    code: EventCode | None = None,
    actor_user_id: int | None = None,
    outcome: Outcome | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Events matching every criterion given (``since`` <= time < ``until``), in order."""
    events = AuditEvent.objects.all()
    if code is not None:
        events = events.filter(code=EventCode(code).value)
    if actor_user_id is not None:
        events = events.filter(actor_user_id=actor_user_id)
    if outcome is not None:
        events = events.filter(outcome=Outcome(outcome).value)
    if since is not None:
        events = events.filter(recorded_at__gte=since)
    if until is not None:
        events = events.filter(recorded_at__lt=until)
    return events.order_by("sequence")
