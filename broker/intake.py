"""Manifests received over DIMSE: checked and queued on receipt, registered in batches.

A C-STORE is answered as soon as its manifest is *checked* (everything registration would
refuse on the document's face: not a KOS, malformed, unknown issuer, too large; refused
there with its DICOM status and audited) and *durably queued* (`IntakeItem`). The
registrar registers the queue in batches through the same service as the REST API
(`manifests_register`, with the check's parse kept beside the bytes: a manifest is parsed
once), deleting each item in the transaction that registers it: every
received manifest is registered exactly once, crash or not. A refusal found only at
registration (a SOP Instance UID reused for other content, a study already registered
for another patient) is audited as a ``registry:manifest:reject`` event with the
correlation ID of the association that brought it. A manifest whose registration keeps
failing (a bug, bad data the checks missed) is retried alone and, after `MAX_ATTEMPTS`,
set aside (``failed_at``, audited) for an operator, so that it never holds up the queue.
An institution deactivated while its manifests wait has them refused at registration
(audited), like any publication of an inactive institution.

Why not register inside the C-STORE: one registration transaction costs several
milliseconds (parse, identity, audit chain), a batch of fifty costs little more per
manifest; a PACS sending over one association waits for each response, so only a queue
lets its manifests be registered in batches.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import uuid
from datetime import datetime
from itertools import groupby
from operator import attrgetter

from django.db import close_old_connections, connection, transaction
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from audit.events import EventCode, Outcome
from audit.services import audit_record
from audit.types import Actor, ActorKind
from broker.dicom.kos import ParsedKOS, dump_parsed_kos, load_parsed_kos
from broker.models import Institution, IntakeItem
from broker.registration import (
    RegistrationResult,
    manifest_check,
    manifest_rejection_audit,
    manifests_register,
)

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 50


def intake_receive(
    *,
    data: bytes,
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID | None = None,
) -> IntakeItem:
    """Check a received manifest and queue it; a refusal is audited, then raised."""
    correlation_id = correlation_id or uuid.uuid4()
    kos, error = manifest_check(data=data, institution=institution)
    if error is not None:
        manifest_rejection_audit(
            code=error.code,
            message=error.detail,
            data=data,
            institution=institution,
            actor=actor,
            now=now,
            correlation_id=correlation_id,
        )
        raise error
    assert kos is not None  # manifest_check gives the parse or the refusal
    sha256 = _sha256(data)
    item = IntakeItem(
        institution=institution,
        received_at=now,
        sop_instance_uid=kos.sop_instance_uid,
        sha256=sha256,
        data=data,
        parsed=dump_parsed_kos(kos, sha256=sha256),
        actor_username=actor.username,
        actor_address=actor.address,
        correlation_id=correlation_id,
    )
    _insert(item)
    return item


def _insert(item: IntakeItem) -> None:
    """One INSERT (committed at once, in autocommit) of the item's row, values prepared by the
    model's own fields: the ORM's save() took a fifth of the C-STORE's own CPU
    (docs/performance.md); the statement is the same every time, so psycopg prepares it on a
    connection that has run it five times."""
    fields = [field for field in IntakeItem._meta.concrete_fields if not field.primary_key]
    with connection.cursor() as cursor:
        cursor.execute(
            _insert_statement(),
            [field.get_db_prep_save(getattr(item, field.attname), connection) for field in fields],
        )
        item.pk = cursor.fetchone()[0]
    item._state.adding = False
    item._state.db = connection.alias


@functools.cache
def _insert_statement() -> str:
    meta, quote = IntakeItem._meta, connection.ops.quote_name
    fields = [field for field in meta.concrete_fields if not field.primary_key]
    return (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {quote(meta.pk.column)}"
    )


MAX_ATTEMPTS = 3


def intake_drain(
    *, limit: int = DEFAULT_BATCH, now: datetime | None = None
) -> list[RegistrationResult]:
    """Register up to ``limit`` queued manifests of one institution, oldest first, in one
    transaction that also deletes them from the queue.

    One institution at a time, held (PostgreSQL: its row locked, ``SKIP LOCKED``) until
    the commit: two registrars never register one institution's manifests out of order.
    """
    with transaction.atomic():
        institution = _next_institution()
        if institution is None:
            return []
        items = list(
            IntakeItem.objects.filter(institution=institution, failed_at__isnull=True).order_by(
                "id"
            )[:limit]
        )
        return _register_items(institution, items, now or timezone.now())


def intake_retry_oldest(*, now: datetime | None = None) -> str:
    """Register the oldest waiting manifest alone (after a batch failed): if that fails
    too, count the attempt against it, and after `MAX_ATTEMPTS` set it aside (``failed_at``,
    audited) so that it no longer holds up the queue: "registered", "failed" or "empty"."""
    item = IntakeItem.objects.filter(failed_at__isnull=True).order_by("id").first()
    if item is None:
        return "empty"
    now = now or timezone.now()
    try:
        with transaction.atomic():
            locked = (
                IntakeItem.objects.select_for_update(skip_locked=True)
                .filter(pk=item.pk, failed_at__isnull=True)
                .first()
            )
            if locked is not None:
                # Alone, after its batch failed: its bytes are parsed again, not its kept parse.
                _register_items(item.institution, [locked], now, keep_parse=False)
        return "registered"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        logger.exception("intake: manifest %s could not be registered", item.sop_instance_uid)
    attempts = item.attempts + 1
    failed = attempts >= MAX_ATTEMPTS
    with transaction.atomic():
        IntakeItem.objects.filter(pk=item.pk).update(
            attempts=attempts, last_error=error, failed_at=now if failed else None
        )
        if failed:
            _audit_set_aside(item, error, now)
    return "failed"


def _next_institution() -> Institution | None:
    """The institution with the oldest waiting manifest that no other registrar holds.

    Institution by institution (a region has tens), each one's oldest waiting manifest read
    from the index of the waiting: a query that does not grow with the queue."""
    oldest_waiting = (
        IntakeItem.objects.filter(institution=OuterRef("pk"), failed_at__isnull=True)
        .order_by("id")
        .values("id")[:1]
    )
    waiting = (
        Institution.objects.annotate(first=Subquery(oldest_waiting))
        .filter(first__isnull=False)
        .order_by("first")
        .values_list("pk", flat=True)
    )
    for institution_id in waiting:
        held = (
            Institution.objects.select_for_update(no_key=True, skip_locked=True)
            .filter(pk=institution_id)
            .first()
        )
        if held is not None:
            return held
    return None


def _register_items(
    institution: Institution, items: list[IntakeItem], now: datetime, *, keep_parse: bool = True
) -> list[RegistrationResult]:
    results: list[RegistrationResult] = []
    key = attrgetter("actor_username", "actor_address", "correlation_id")
    for _, run in groupby(items, key=key):
        batch = list(run)
        results += manifests_register(
            documents=[bytes(item.data) for item in batch],
            parsed=[_kept_parse(item) if keep_parse else None for item in batch],
            institution=institution,
            actor=_actor(batch[0], institution),
            now=now,
            correlation_id=batch[0].correlation_id,
        )
    IntakeItem.objects.filter(id__in=[item.id for item in items]).delete()
    return results


def _kept_parse(item: IntakeItem) -> ParsedKOS | None:
    """The check's parse kept with the item, if it is the parse of the item's very bytes
    under today's parser (`kos.load_parsed_kos`); None: parse them again."""
    if not item.parsed:
        return None
    return load_parsed_kos(bytes(item.parsed), sha256=_sha256(bytes(item.data)))


def _audit_set_aside(item: IntakeItem, error: str, now: datetime) -> None:
    audit_record(
        code=EventCode.MANIFEST_REJECT,
        actor=_actor(item, item.institution),
        now=now,
        outcome=Outcome.SERIOUS_FAILURE,
        correlation_id=item.correlation_id,
        objects=[{"type": "document", "sha256": item.sha256, "size": len(item.data)}],
        details={
            "error": "registry:intake:set-aside",
            "message": f"registration failed {MAX_ATTEMPTS} times: {error}",
            "institution": item.institution.finess,
            "manifest": item.sop_instance_uid,
        },
    )


def intake_pending() -> int:
    return IntakeItem.objects.filter(failed_at__isnull=True).count()


def _actor(item: IntakeItem, institution: Institution) -> Actor:
    return Actor(
        kind=ActorKind.INSTITUTION,
        user_id=None,
        username=item.actor_username,
        institution=institution.finess,
        role="institution_system",
        address=item.actor_address,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class IntakeRegistrar:
    """Registers the intake queue, in batches, as long as it runs.

    It runs in its own process beside the DICOM server (``manage.py intake_registrar``,
    which ``dicomserver`` starts): registering is CPU-bound Python, and in the server's
    process it would hold the GIL while associations wait to answer. Tests run it as a
    thread of theirs. When the queue is empty it looks again every ``poll_interval``
    seconds, or as soon as `notify()` is called in its own process; several registrars
    (several nodes) share one queue (``SKIP LOCKED`` on PostgreSQL).
    """

    def __init__(self, *, batch: int = DEFAULT_BATCH, poll_interval: float = 0.05) -> None:
        self.batch = batch
        self.poll_interval = poll_interval
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Register until `stop()`; what is queued when it is called is registered first."""
        try:
            while True:
                self._drain_all()
                if self._stopping.is_set():
                    return
                self._wake.wait(self.poll_interval)
                self._wake.clear()
        finally:
            connection.close()

    def start(self) -> None:
        """Run in a thread of this process."""
        self._thread = threading.Thread(target=self.run, name="relais-intake", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the queue has been registered (after a `notify()`)."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _drain_all(self) -> None:
        """Register until the queue is empty, or until `stop()`."""
        isolating = False
        while True:
            try:
                close_old_connections()
                if isolating:
                    # A batch failed: one manifest at a time until one goes through, so that
                    # a manifest that cannot be registered is found, counted, set aside.
                    outcome = intake_retry_oldest()
                    isolating = outcome == "failed"
                    if isolating and self._stopping.wait(0.5):
                        return
                    continue
                if not intake_drain(limit=self.batch):
                    if not self._wake.is_set():
                        self._idle.set()
                    return
            except Exception:
                logger.exception("intake: the queue could not be registered")
                connection.close()
                isolating = True
                if self._stopping.wait(1.0):
                    return
            if self._stopping.is_set():
                return
