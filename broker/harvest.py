"""Harvest: the prior studies of an archive, made into manifests and registered.

When a hospital joins the region, its archive is queried study by study (the study list,
then each study's series and instances), a KOS is built for each study (`kos.build_kos`)
and registered through the same service as any other manifest.

- **Idempotent.** A manifest's SOP Instance UID is derived from the study's description
  (`kos.derive_kos_uids`): a study already harvested unchanged is recognised by that UID
  and left alone; a study that changed (series added or removed) gets a new manifest,
  which replaces the old one.
- **Resumable.** Studies go in (study date, study UID) order; each batch of manifests is
  registered in the transaction that moves the checkpoint past it, so an interrupted run
  (even ``kill -9``) resumes after the last committed study and never registers a study
  twice; it tries again the studies the interrupted run failed (counted once, by the run
  that resumes).
- **Gentle.** At most ``max_rate`` studies a second are described (each description is one
  or two queries to the archive); descriptions are fetched ahead by ``workers`` threads
  while the previous ones are registered.
- **Pruning** (``prune``): once every study of the range has been seen, the source's approved
  manifests of that range whose study is no longer in the archive are deprecated.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from django.db import transaction
from django.utils import timezone

from audit.events import EventCode, Outcome
from audit.services import audit_record
from audit.types import Actor
from broker.dicom.archive import (
    ArchiveClient,
    ArchiveError,
    ArchiveNotFound,
    ArchiveProtocolError,
    ArchiveTimeout,
    ArchiveUnreachable,
    StudySummary,
)
from broker.dicom.kos import (
    KOSError,
    ParsedKOS,
    StudyDescription,
    build_kos_parsed,
    derive_kos_uids,
)
from broker.errors import Conflict
from broker.models import (
    HarvestCheckpoint,
    HarvestStatus,
    Institution,
    Manifest,
    ManifestStatus,
)
from broker.registration import manifests_register
from broker.services import manifest_deprecate

logger = logging.getLogger(__name__)

_TIMEOUTS_TO_STOP = 3  # consecutive studies the archive did not answer in time

OUTCOMES = ("new", "unchanged", "replaced", "failed", "deprecated")


@dataclass
class HarvestProgress:
    """What a progress display needs, after each study."""

    done: int
    total: int
    counts: Counter[str]


@dataclass
class HarvestSummary:
    institution: str
    transport: str
    date_range: str
    total: int
    resumed_after: int  # studies already done by an interrupted run
    counts: Counter[str]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (study UID, reason)
    seconds: float = 0.0


class RateLimiter:
    """At most ``rate`` acquisitions a second, shared by threads (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)


def date_range_key(since: dt.date | None, until: dt.date | None) -> str:
    return f"{since.isoformat() if since else ''}..{until.isoformat() if until else ''}"


def _order(study: StudySummary) -> tuple[dt.date, str]:
    return (study.study_date or dt.date.min, study.study_instance_uid)


def harvest_run(
    *,
    institution: Institution,
    client_factory: Callable[[], ArchiveClient],
    transport: str,
    actor: Actor,
    since: dt.date | None = None,
    until: dt.date | None = None,
    prune: bool = False,
    max_rate: float | None = None,
    restart: bool = False,
    batch: int = 25,
    workers: int = 2,
    progress: Callable[[HarvestProgress], None] | None = None,
) -> HarvestSummary:
    """Harvest ``institution``'s archive over [since, until]; see the module docstring.

    Raises `ArchiveError` when the archive cannot even list its studies; a study that
    cannot be described or registered is counted as failed, with its reason, and the run
    goes on.
    """
    if since and until and since > until:
        raise ValueError(f"--since {since} is after --until {until}")
    started = time.monotonic()
    key = date_range_key(since, until)
    checkpoint = _checkpoint(institution, transport, key, restart=restart)
    correlation_id = uuid.uuid4()
    resumed = checkpoint.cursor_study_uid != ""
    _audit(
        EventCode.HARVEST_START,
        institution,
        actor,
        correlation_id,
        details={"transport": transport, "range": key, "resumed": resumed, "prune": prune},
    )
    counts: Counter[str] = Counter({k: int(v) for k, v in checkpoint.counts.items()})
    summary = HarvestSummary(
        institution=institution.finess,
        transport=transport,
        date_range=key,
        total=0,
        resumed_after=0,
        counts=counts,
    )
    try:
        listed_at = timezone.now()
        with client_factory() as lister:
            studies = sorted(lister.find_studies(since=since, until=until), key=_order)
        cursor = (checkpoint.cursor_study_date or dt.date.min, checkpoint.cursor_study_uid)
        # Resuming: after the cursor, and any study before it that the interrupted run
        # failed or that has no manifest from this source yet (one that appeared in the
        # archive since, with an older date).
        known = _studies_with_manifests(institution) if resumed else set()
        # The studies the interrupted run failed are tried again; one no longer listed (gone
        # from the archive, or out of the range now) is no longer a failure.
        listed = {s.study_instance_uid for s in studies}
        retried = {uid for uid in checkpoint.failed_studies if uid in listed}
        if len(retried) < len(checkpoint.failed_studies):
            checkpoint.failed_studies = [u for u in checkpoint.failed_studies if u in retried]
            counts["failed"] = len(checkpoint.failed_studies)
            checkpoint.counts = dict(counts)
        todo = [
            s
            for s in studies
            if not resumed
            or _order(s) > cursor
            or s.study_instance_uid not in known
            or s.study_instance_uid in retried
        ]
        summary.total = len(studies)
        summary.resumed_after = len(studies) - len(todo)
        done = summary.resumed_after
        checkpoint.total = len(studies)
        checkpoint.save(update_fields=["total", "failed_studies", "counts"])
        chunk: list[tuple[StudySummary, StudyDescription | ArchiveError]] = []
        timeouts = 0
        described_ahead = _described(todo, client_factory, max_rate, workers, batch)
        with contextlib.closing(described_ahead) as stream:
            for study, described in stream:
                # The archive is gone (unreachable, or timing out study after study): stop
                # here, resumable, rather than fail every remaining study and call the run
                # complete. One study that times out on its own is only that study's failure.
                timeouts = timeouts + 1 if isinstance(described, ArchiveTimeout) else 0
                if isinstance(described, ArchiveUnreachable) or timeouts >= _TIMEOUTS_TO_STOP:
                    raise described
                chunk.append((study, described))
                if len(chunk) < batch and len(chunk) + done < len(studies):
                    continue
                _harvest_chunk(institution, actor, correlation_id, chunk, checkpoint, summary)
                done += len(chunk)
                chunk = []
                if progress is not None:
                    progress(HarvestProgress(done=done, total=len(studies), counts=counts))
        if chunk:
            _harvest_chunk(institution, actor, correlation_id, chunk, checkpoint, summary)
        if prune:
            with client_factory() as confirming:
                counts["deprecated"] += _prune(
                    institution,
                    {s.study_instance_uid for s in studies},
                    since,
                    until,
                    actor,
                    listed_at=listed_at,
                    archive=confirming,
                )
        checkpoint.status = HarvestStatus.COMPLETED
        checkpoint.finished_at = timezone.now()
        checkpoint.counts = dict(counts)
        checkpoint.updated_at = checkpoint.finished_at
        checkpoint.owner = ""
        checkpoint.save()
    except BaseException as exc:
        # Interrupted (Ctrl-C) or the archive is gone: the checkpoint stays "running", so
        # the next run resumes; what was committed stays.
        summary.seconds = time.monotonic() - started
        try:
            _audit(
                EventCode.HARVEST_FINISH,
                institution,
                actor,
                correlation_id,
                outcome=Outcome.SERIOUS_FAILURE,
                details={
                    "transport": transport,
                    "range": key,
                    "counts": dict(checkpoint.counts),  # what committed
                    "failures": [
                        {"study": uid, "reason": why} for uid, why in summary.failures[:100]
                    ],
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                },
            )
            _release(checkpoint)
        except Exception:  # the registry itself may be what failed: keep the first error
            logger.exception("harvest: the interruption could not be audited")
        raise
    summary.seconds = time.monotonic() - started
    _audit(
        EventCode.HARVEST_FINISH,
        institution,
        actor,
        correlation_id,
        outcome=Outcome.MINOR_FAILURE if counts["failed"] else Outcome.SUCCESS,
        details={
            "transport": transport,
            "range": key,
            "total": summary.total,
            "counts": dict(counts),
            "failures": [{"study": uid, "reason": why} for uid, why in summary.failures[:100]],
        },
    )
    return summary


class HarvestBusy(Exception):
    """Another harvest is running over the same checkpoint."""


_STALE_LEASE = dt.timedelta(minutes=10)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str, updated_at: datetime, now: datetime) -> bool:
    """Whether the run that holds a checkpoint may still be going on."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return now - updated_at < _STALE_LEASE  # another node: trust a recent heartbeat
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"harvest" in cmdline or int(pid) == os.getpid()


def _checkpoint(
    institution: Institution, transport: str, key: str, *, restart: bool
) -> HarvestCheckpoint:
    now = timezone.now()
    me = _owner()
    with transaction.atomic():
        checkpoint, created = HarvestCheckpoint.objects.select_for_update().get_or_create(
            institution=institution,
            date_range=key,
            defaults={
                "transport": transport,
                "status": HarvestStatus.RUNNING,
                "started_at": now,
                "updated_at": now,
                "owner": me,
            },
        )
        if created:
            return checkpoint
        if (
            checkpoint.status == HarvestStatus.RUNNING
            and checkpoint.owner not in ("", me)
            and _owner_alive(checkpoint.owner, checkpoint.updated_at, now)
        ):
            raise HarvestBusy(
                f"another harvest of {institution.finess} ({checkpoint.transport}, {key}) "
                "is running: "
                f"{checkpoint.owner}, last progress at {checkpoint.updated_at:%Y-%m-%d %H:%M:%S}"
            )
        if restart or checkpoint.status != HarvestStatus.RUNNING:
            checkpoint.cursor_study_date = None
            checkpoint.cursor_study_uid = ""
            checkpoint.counts = {}
            checkpoint.failed_studies = []
            checkpoint.started_at = now
            checkpoint.finished_at = None
        checkpoint.status = HarvestStatus.RUNNING
        checkpoint.transport = transport  # a resumed run may take the other one
        checkpoint.owner = me
        checkpoint.updated_at = now
        checkpoint.save()
    return checkpoint


def _release(checkpoint: HarvestCheckpoint) -> None:
    """The run is over (completed, or stopped and resumable): nobody holds it."""
    HarvestCheckpoint.objects.filter(pk=checkpoint.pk, owner=_owner()).update(owner="")


def _described(
    studies: list[StudySummary],
    client_factory: Callable[[], ArchiveClient],
    max_rate: float | None,
    workers: int,
    batch: int,
) -> Iterator[tuple[StudySummary, StudyDescription | ArchiveError]]:
    """Each study with its description (or the archive's error), in order, fetched ahead
    by ``workers`` threads, each with its own client, at most ``max_rate`` a second.

    The caller takes them by batches of ``batch`` and registers each batch before it takes
    the next: the threads fetch a batch and more ahead, so that they keep the archive busy
    while a batch is registered."""
    limiter = RateLimiter(max_rate)
    local = threading.local()
    clients: list[ArchiveClient] = []
    clients_lock = threading.Lock()

    def describe(study: StudySummary) -> StudyDescription | ArchiveError:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = client_factory()
            with clients_lock:
                clients.append(client)
        limiter.acquire()
        try:
            return client.describe_study(
                study.study_instance_uid, expected_instances=study.number_of_instances
            )
        except ArchiveError as exc:
            return exc
        except Exception as exc:  # a UID the client refuses (legacy data), a bad answer...
            return ArchiveProtocolError(
                f"study {study.study_instance_uid!r}: {type(exc).__name__}: {exc}",
                transport=client.transport,
                retryable=False,
            )

    window = max(1, batch) + max(1, workers) * 4
    futures: list[Future[StudyDescription | ArchiveError] | None] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="harvest") as pool:
        try:
            next_index = 0
            for index, study in enumerate(studies):
                while next_index < len(studies) and next_index < index + window:
                    futures.append(pool.submit(describe, studies[next_index]))
                    next_index += 1
                future = futures[index]
                assert future is not None
                futures[index] = None
                yield study, future.result()
        finally:
            for left in futures:
                if left is not None:
                    left.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            with clients_lock:
                for client in clients:
                    client.close()


def _candidate_uids(derived: str, count: int) -> list[str]:
    """The SOP Instance UIDs a study's manifest may carry, for one description: the derived
    UID, then variants of it for when that UID is taken by a deprecated manifest (a study
    pruned and back, or changed and changed back)."""
    return [derived] + [
        f"2.25.{uuid.uuid5(_UID_VARIANTS, f'{derived}#{n}').int}" for n in range(1, count + 1)
    ]


_UID_VARIANTS = uuid.UUID("6f1c2b0e-3d55-4c8e-9a51-8d3c0b7e2a41")


def _harvest_chunk(
    institution: Institution,
    actor: Actor,
    correlation_id: uuid.UUID,
    chunk: list[tuple[StudySummary, StudyDescription | ArchiveError]],
    checkpoint: HarvestCheckpoint,
    summary: HarvestSummary,
) -> None:
    """Register the manifests of a run of studies, and move the checkpoint past its last
    study, in one transaction.

    A study whose approved manifest from this source is the one its description gives
    (same derived UID) is unchanged; otherwise it gets a new manifest, under the first UID
    of `_candidate_uids` no manifest of the source has used. A study the archive could not
    describe, or that makes no valid manifest, has failed.
    """
    counts = summary.counts
    failures: list[tuple[str, str]] = []  # this chunk's
    described_ok: list[tuple[StudySummary, StudyDescription]] = []
    for study, described in chunk:
        if isinstance(described, ArchiveError):
            failures.append((study.study_instance_uid, str(described)))
        else:
            described_ok.append((study, described))
    existing: dict[str, dict[str, str]] = {}  # study UID -> {SOP instance UID: status}
    # By study UID alone, the source checked here: with the source in the WHERE clause,
    # PostgreSQL may read the source's every manifest while its statistics lag behind a
    # registry this very harvest fills (see registration._approved_manifests).
    for study_uid, sop_uid, status, source_id in Manifest.objects.filter(
        study_instance_uid__in=[d.study_instance_uid for _, d in described_ok],
    ).values_list("study_instance_uid", "sop_instance_uid", "status", "source_institution_id"):
        if source_id == institution.pk:
            existing.setdefault(study_uid, {})[sop_uid] = status
    now = timezone.now()
    pending: list[tuple[StudySummary, bytes, ParsedKOS]] = []
    for study, described in described_ok:
        try:
            derived, series_instance_uid = derive_kos_uids(described)
            used = existing.get(described.study_instance_uid, {})
            candidates = _candidate_uids(derived, len(used))
            if any(used.get(uid) == ManifestStatus.APPROVED for uid in candidates):
                counts["unchanged"] += 1
                continue
            sop_instance_uid = next(uid for uid in candidates if uid not in used)
            data, parsed = build_kos_parsed(
                described,
                now=now,
                sop_instance_uid=sop_instance_uid,
                series_instance_uid=series_instance_uid,
            )
        except KOSError as exc:
            failures.append((study.study_instance_uid, f"{exc.code}: {exc.message}"))
            continue
        pending.append((study, data, parsed))
    last = chunk[-1][0]
    with transaction.atomic():
        if pending:
            results = manifests_register(
                documents=[data for _, data, _ in pending],
                parsed=[parsed for _, _, parsed in pending],
                institution=institution,
                actor=actor,
                now=now,
                correlation_id=correlation_id,
            )
            for (study, _, _), result in zip(pending, results, strict=True):
                if result.error is not None:
                    failures.append(
                        (study.study_instance_uid, f"{result.error.code}: {result.error.detail}")
                    )
                else:
                    counts[result.outcome] += 1
        cursor = (checkpoint.cursor_study_date or dt.date.min, checkpoint.cursor_study_uid)
        if _order(last) > cursor:  # a resumed run's late studies come before the cursor
            checkpoint.cursor_study_date = last.study_date
            checkpoint.cursor_study_uid = last.study_instance_uid
        # Failed: the studies that failed and were not harvested since, this run's and an
        # interrupted run's alike (a resumed run tries those again: each is counted once).
        tried = {study.study_instance_uid for study, _ in chunk}
        failed_now = [uid for uid, _ in failures]
        failed = [uid for uid in checkpoint.failed_studies if uid not in tried] + failed_now
        counts["failed"] = len(failed)
        checkpoint.failed_studies = failed
        checkpoint.counts = dict(counts)
        checkpoint.updated_at = now
        checkpoint.save(
            update_fields=[
                "cursor_study_date",
                "cursor_study_uid",
                "counts",
                "failed_studies",
                "updated_at",
            ]
        )
    summary.failures.extend(failures)


def _studies_with_manifests(institution: Institution) -> set[str]:
    return set(
        Manifest.objects.filter(source_institution=institution).values_list(
            "study_instance_uid", flat=True
        )
    )


def _prune(
    institution: Institution,
    present: set[str],
    since: dt.date | None,
    until: dt.date | None,
    actor: Actor,
    *,
    listed_at: datetime,
    archive: ArchiveClient,
) -> int:
    """Deprecate the source's approved manifests of the range whose study has gone.

    Only manifests registered before the archive was listed: one registered meanwhile (a
    study stored in the PACS during the harvest) is not in the listing, yet not gone. And
    only a study the archive, asked for it alone, says it does not hold: a listing paged by
    offset can miss a study that is still there when others are deleted while it is read,
    and any other answer (the archive failing) deprecates nothing.
    """
    manifests = Manifest.objects.filter(
        source_institution=institution,
        status=ManifestStatus.APPROVED,
        registered_at__lt=listed_at,
    )
    if since is not None:
        manifests = manifests.filter(study_date__gte=since)
    if until is not None:
        manifests = manifests.filter(study_date__lte=until)
    gone = [
        m for m in manifests.only("id", "study_instance_uid") if m.study_instance_uid not in present
    ]
    deprecated = 0
    for manifest in gone:
        try:
            archive.describe_study(manifest.study_instance_uid)
        except ArchiveNotFound:
            pass  # gone indeed
        except (ArchiveUnreachable, ArchiveTimeout) as exc:
            logger.warning(
                "harvest --prune: stopped, the archive cannot confirm what is gone: %s", exc
            )
            break
        except ArchiveError as exc:
            logger.warning(
                "harvest --prune: study %s left as it is, the archive could not confirm it is "
                "gone: %s",
                manifest.study_instance_uid,
                exc,
            )
            continue
        else:
            logger.info(
                "harvest --prune: study %s is still in the archive (missed by the listing)",
                manifest.study_instance_uid,
            )
            continue
        try:
            manifest_deprecate(
                manifest=manifest,
                actor=actor,
                now=timezone.now(),
                reason="harvest: the study is no longer in the source archive",
            )
            deprecated += 1
        except Conflict:  # replaced or deprecated meanwhile: nothing left to prune
            continue
    return deprecated


def _audit(
    code: EventCode,
    institution: Institution,
    actor: Actor,
    correlation_id: uuid.UUID,
    *,
    details: dict[str, object],
    outcome: Outcome = Outcome.SUCCESS,
) -> None:
    with transaction.atomic():
        audit_record(
            code=code,
            actor=actor,
            now=timezone.now(),
            outcome=outcome,
            correlation_id=correlation_id,
            objects=[{"type": "institution", "finess": institution.finess}],
            details={"institution": institution.finess, **details},
        )
