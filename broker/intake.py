"""Manifests received over DIMSE: checked and queued on receipt, registered in batches.

A C-STORE is answered as soon as its manifest is *checked* (everything registration would
refuse on the document's face: not a KOS, malformed, unknown issuer, too large; refused
there with its DICOM status and audited) and *durably queued* (`IntakeItem`). The
registrar registers the queue in batches through the same service as the REST API
(`manifests_register`), deleting each item in the transaction that registers it: every
received manifest is registered exactly once, crash or not. A refusal found only at
registration (a SOP Instance UID reused for other content, a study already registered
for another patient) is audited as a ``registry:manifest:reject`` event with the
correlation ID of its receipt.

Why not register inside the C-STORE: one registration transaction costs several
milliseconds (parse, identity, audit chain), a batch of fifty costs little more per
manifest; a PACS sending over one association waits for each response, so only a queue
lets its manifests be registered in batches.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from datetime import datetime
from itertools import groupby

from django.db import DatabaseError, close_old_connections, connection, transaction
from django.utils import timezone

from audit.types import Actor, ActorKind
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
    sop_instance_uid, error = manifest_check(data=data, institution=institution)
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
    return IntakeItem.objects.create(
        institution=institution,
        received_at=now,
        sop_instance_uid=sop_instance_uid,
        sha256=_sha256(data),
        data=data,
        actor_username=actor.username,
        actor_address=actor.address,
        correlation_id=correlation_id,
    )


def intake_drain(
    *, limit: int = DEFAULT_BATCH, now: datetime | None = None
) -> list[RegistrationResult]:
    """Register up to ``limit`` queued manifests, oldest first, in one transaction."""
    with transaction.atomic():
        items = list(
            IntakeItem.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("institution")
            .order_by("id")[:limit]
        )
        results: list[RegistrationResult] = []
        for _, run in groupby(items, key=lambda i: (i.institution_id, i.actor_username)):
            batch = list(run)
            results += manifests_register(
                documents=[bytes(item.data) for item in batch],
                institution=batch[0].institution,
                actor=_actor(batch[0]),
                now=now or timezone.now(),
                correlation_id=batch[0].correlation_id,
            )
        IntakeItem.objects.filter(id__in=[item.id for item in items]).delete()
    return results


def intake_pending() -> int:
    return IntakeItem.objects.count()


def _actor(item: IntakeItem) -> Actor:
    return Actor(
        kind=ActorKind.INSTITUTION,
        user_id=None,
        username=item.actor_username,
        institution=item.institution.finess,
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
        failures = 0
        while True:
            try:
                close_old_connections()
                if not intake_drain(limit=self.batch):
                    if not self._wake.is_set():
                        self._idle.set()
                    return
                failures = 0
            except DatabaseError:
                failures += 1
                logger.exception("intake: the registry is unavailable (attempt %d)", failures)
                connection.close()
                if self._stopping.wait(min(30.0, 0.5 * 2**failures)):
                    return
