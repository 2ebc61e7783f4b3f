"""Harvest of prior studies from real Orthanc archives, over DICOMweb and DIMSE."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection

from audit.events import EventCode, Outcome
from audit.models import AuditEvent
from broker.archives import institution_archive
from broker.dicom.archive import ArchiveTimeout, DicomWebArchive
from broker.harvest import HarvestProgress, RateLimiter, harvest_run
from broker.models import (
    HarvestCheckpoint,
    HarvestStatus,
    Institution,
    Manifest,
    ManifestStatus,
    PatientIdentifier,
)
from broker.services import institution_update
from tests.conftest import NOW, SYSTEM, Region
from tests.integration.conftest import pointed_at
from tests.peers.fixtures import BROKER_MODALITY
from tests.peers.orthanc import free_port
from tests.peers.studies import (
    CHUB_AE,
    DUPONT_CHUB_IPP,
    DUPONT_PORTMAEL_IPP,
    MARIE_DUPONT,
    PAUL_MARTIN,
    PORTMAEL_AE,
    synthetic_study,
)

ROOT = Path(__file__).resolve().parents[2]
BROKER = {BROKER_MODALITY: (BROKER_MODALITY, "127.0.0.1", 11112)}


def _harvest(institution: Institution, transport: str, **options):
    return harvest_run(
        institution=institution,
        client_factory=lambda: institution_archive(institution, transport),
        transport=transport,
        actor=SYSTEM,
        **options,
    )


def _manifests(institution: Institution):
    return Manifest.objects.filter(source_institution=institution, status=ManifestStatus.APPROVED)


@pytest.mark.django_db
@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_harvest_registers_one_manifest_per_study_then_changes_nothing(
    region: Region, orthanc_region, transport
):
    chu = pointed_at(region.chu, orthanc_region.archives[CHUB_AE])
    expected = {s.study_instance_uid: s for s in orthanc_region.studies[CHUB_AE]}

    first = _harvest(chu, transport)

    assert first.total == len(expected)
    assert first.counts["new"] == len(expected)
    assert first.counts["failed"] == 0
    manifests = {m.study_instance_uid: m for m in _manifests(chu)}
    assert manifests.keys() == expected.keys()
    for uid, manifest in manifests.items():
        study = expected[uid]
        assert manifest.instance_count == study.instance_count
        assert manifest.series_count == len(study.series_uids)
        assert manifest.accession_number == study.accession_number
        assert manifest.study_date == study.study_date
    checkpoint = HarvestCheckpoint.objects.get(institution=chu, transport=transport)
    assert checkpoint.status == HarvestStatus.COMPLETED

    registered = AuditEvent.objects.filter(code=EventCode.MANIFEST_REGISTER).count()
    second = _harvest(chu, transport)
    assert second.counts["unchanged"] == len(expected)
    assert second.counts["new"] == second.counts["replaced"] == 0
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_REGISTER).count() == registered
    assert _manifests(chu).count() == len(expected)
    finished = AuditEvent.objects.filter(code=EventCode.HARVEST_FINISH).order_by("sequence")
    assert [e.details["counts"].get("unchanged", 0) for e in finished] == [0, len(expected)]


@pytest.mark.django_db
@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_the_ins_read_from_the_archive_links_the_patient_across_hospitals(
    region: Region, orthanc_region, transport
):
    chu = pointed_at(region.chu, orthanc_region.archives[CHUB_AE])
    portmael = pointed_at(region.portmael, orthanc_region.archives[PORTMAEL_AE])
    _harvest(chu, transport)
    _harvest(portmael, transport)
    at_chu = PatientIdentifier.objects.get(issuer=chu.patient_id_issuer, value=DUPONT_CHUB_IPP)
    at_pm = PatientIdentifier.objects.get(
        issuer=portmael.patient_id_issuer, value=DUPONT_PORTMAEL_IPP
    )
    assert at_chu.patient_id == at_pm.patient_id
    ins = PatientIdentifier.objects.get(value=MARIE_DUPONT.ins)
    assert ins.patient_id == at_chu.patient_id
    # A patient without INS stays on their own.
    martin = PatientIdentifier.objects.get(issuer=chu.patient_id_issuer, value="CHU0007731")
    assert martin.patient_id != at_chu.patient_id


@pytest.mark.django_db
def test_a_date_range_harvests_only_its_studies(region: Region, orthanc_region):
    chu = pointed_at(region.chu, orthanc_region.archives[CHUB_AE])
    since, until = dt.date(2025, 1, 1), dt.date(2025, 12, 31)
    expected = {
        s.study_instance_uid
        for s in orthanc_region.studies[CHUB_AE]
        if since <= s.study_date <= until
    }
    summary = _harvest(chu, "dicomweb", since=since, until=until)
    assert summary.counts["new"] == len(expected) == 2
    assert {m.study_instance_uid for m in _manifests(chu)} == expected


def _archive_of(region: Region, orthanc_factory, prefix: str, *, count: int, first_day: dt.date):  # type: ignore[no-untyped-def]
    """A CHU archive of its own holding ``count`` studies a day apart from ``first_day``, and
    the CHU pointed at it."""
    archive = orthanc_factory(CHUB_AE, modalities=BROKER)
    studies = [_study(f"{prefix}{n}", when=first_day + dt.timedelta(days=n)) for n in range(count)]
    for study in studies:
        archive.upload_many(study.instances)
    return archive, pointed_at(region.chu, archive), studies


def _study(
    seed: str,
    *,
    series_count: int = 2,
    when: dt.date = dt.date(2025, 4, 1),
    issuer: str = "CHU-BELLECOMBE",
    issuer_oid: str = "1.2.250.1.999.350000014",
):
    return synthetic_study(
        patient=PAUL_MARTIN,
        patient_id="CHU0007731",
        issuer=issuer,
        issuer_oid=issuer_oid,
        institution_name="CHU de Bellecombe",
        modality="CT",
        study_date=when,
        study_time=dt.time(10, 0),
        accession_number=f"ACC-{seed}",
        description="TDM",
        series_count=series_count,
        instances_per_series=2,
        body_part="CHEST",
        seed=seed,
    )


@pytest.mark.django_db
@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_a_changed_study_is_replaced_and_a_gone_one_pruned(
    region: Region, orthanc_factory, transport
):
    archive = orthanc_factory(CHUB_AE, modalities=BROKER)
    kept, shrunk, gone = _study("kept"), _study("shrunk", series_count=3), _study("gone")
    grown_before = _study("grown", series_count=1)
    for study in (kept, shrunk, gone, grown_before):
        archive.upload_many(study.instances)
    chu = pointed_at(region.chu, archive)
    assert _harvest(chu, transport).counts["new"] == 4

    archive.delete_series(shrunk.series_uids[2])
    archive.upload_many(_study("grown", series_count=2).instances)  # a series added
    archive.delete_study(gone.study_instance_uid)

    summary = _harvest(chu, transport, prune=True)
    assert summary.counts["replaced"] == 2, (summary.counts, summary.failures)
    assert summary.counts["unchanged"] == 1
    assert summary.counts["deprecated"] == 1
    current = {m.study_instance_uid: m for m in _manifests(chu)}
    assert set(current) == {
        kept.study_instance_uid,
        shrunk.study_instance_uid,
        grown_before.study_instance_uid,
    }
    assert current[shrunk.study_instance_uid].series_count == 2
    assert current[grown_before.study_instance_uid].series_count == 2
    assert (
        Manifest.objects.get(study_instance_uid=gone.study_instance_uid).status
        == ManifestStatus.DEPRECATED
    )
    # One approved manifest per study, the replaced ones deprecated and linked.
    assert Manifest.objects.filter(source_institution=chu).count() == 6

    # The pruned study comes back as it was: it gets an approved manifest again (its first
    # manifest's UID is taken by the deprecated one), and then stays unchanged.
    archive.upload_many(gone.instances)
    back = _harvest(chu, transport)
    assert back.counts["new"] == 1
    assert back.counts["unchanged"] == 3
    assert _manifests(chu).filter(study_instance_uid=gone.study_instance_uid).count() == 1
    again = _harvest(chu, transport)
    assert again.counts["unchanged"] == 4, (again.counts, again.failures)


@pytest.mark.django_db
@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_prune_deprecates_only_what_the_archive_confirms_gone(
    region: Region, orthanc_factory, monkeypatch, transport
):
    """A listing paged by offset can miss a study that is still there (others deleted while it
    is read): asked for alone, the archive says it holds it, and it is not deprecated."""
    from broker.dicom.archive import DimseArchive

    archive = orthanc_factory(CHUB_AE, modalities=BROKER)
    missed, gone = _study("missed"), _study("gone")
    for study in (missed, gone):
        archive.upload_many(study.instances)
    chu = pointed_at(region.chu, archive)
    assert _harvest(chu, transport).counts["new"] == 2
    archive.delete_study(gone.study_instance_uid)
    kind = DimseArchive if transport == "dimse" else DicomWebArchive
    listing = kind.find_studies

    def missing_one(self, **kwargs):  # type: ignore[no-untyped-def]
        return [
            s for s in listing(self, **kwargs) if s.study_instance_uid != missed.study_instance_uid
        ]

    monkeypatch.setattr(kind, "find_studies", missing_one)
    summary = _harvest(chu, transport, prune=True)
    assert summary.counts["deprecated"] == 1
    statuses = dict(Manifest.objects.values_list("study_instance_uid", "status"))
    assert statuses == {
        missed.study_instance_uid: ManifestStatus.APPROVED,
        gone.study_instance_uid: ManifestStatus.DEPRECATED,
    }


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("transport", "resumed_over"),
    [("dicomweb", "dicomweb"), ("dimse", "dimse"), ("dicomweb", "dimse")],
)
def test_an_interrupted_harvest_resumes_after_its_last_committed_study(
    region: Region, orthanc_factory, transport, resumed_over
):
    """Resumed over either transport: one checkpoint per archive and date range."""
    archive, chu, _studies = _archive_of(
        region, orthanc_factory, "s", count=7, first_day=dt.date(2025, 1, 1)
    )

    def interrupt(state: HarvestProgress) -> None:
        if state.done == 4:  # after the second batch of two has committed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _harvest(chu, transport, batch=2, progress=interrupt)
    checkpoint = HarvestCheckpoint.objects.get(institution=chu, transport=transport)
    assert checkpoint.status == HarvestStatus.RUNNING
    committed = _manifests(chu).count()
    assert committed == 4
    failed = AuditEvent.objects.filter(code=EventCode.HARVEST_FINISH).get()
    assert failed.outcome == 8

    # Meanwhile a study dated before the cursor appeared in the archive: resumed, it is
    # harvested too.
    late = _study("late", when=dt.date(2024, 6, 1))
    archive.upload_many(late.instances)

    summary = _harvest(chu, resumed_over, batch=2)
    assert summary.resumed_after == 4
    assert summary.counts["new"] == 8
    assert _manifests(chu).count() == 8
    checkpoint = HarvestCheckpoint.objects.get(institution=chu)
    assert (checkpoint.transport, checkpoint.status) == (resumed_over, HarvestStatus.COMPLETED)


@pytest.mark.django_db
def test_two_harvests_of_one_archive_never_run_at_once(region: Region, orthanc_region):
    from django.utils import timezone

    from broker.harvest import HarvestBusy

    chu = pointed_at(region.chu, orthanc_region.archives[CHUB_AE])
    HarvestCheckpoint.objects.create(
        institution=chu,
        transport="dicomweb",
        date_range="..",
        status=HarvestStatus.RUNNING,
        owner="another-node:4242",
        started_at=timezone.now(),
        updated_at=timezone.now(),
    )
    with pytest.raises(HarvestBusy, match="another-node:4242"):
        _harvest(chu, "dicomweb")
    # A run on another node that has not moved for a long while is taken for dead.
    HarvestCheckpoint.objects.update(updated_at=timezone.now() - dt.timedelta(hours=1))
    assert _harvest(chu, "dicomweb").counts["new"] == 6
    assert HarvestCheckpoint.objects.get().owner == ""


@pytest.mark.django_db
def test_an_archive_that_goes_away_stops_the_harvest_resumably(region: Region, orthanc_factory):
    from broker.dicom.archive import ArchiveUnreachable

    archive, chu, studies = _archive_of(
        region, orthanc_factory, "o", count=12, first_day=dt.date(2023, 1, 1)
    )

    def pull_the_plug(state: HarvestProgress) -> None:
        if state.done == 2:
            archive.process.kill()  # gone at once, mid-run
            archive.process.wait()

    with pytest.raises(ArchiveUnreachable):
        _harvest(chu, "dicomweb", batch=2, workers=1, progress=pull_the_plug)
    checkpoint = HarvestCheckpoint.objects.get(institution=chu)
    assert checkpoint.status == HarvestStatus.RUNNING  # resumable, not "completed"
    registered = _manifests(chu).count()
    assert 2 <= registered < len(studies)
    assert checkpoint.counts.get("failed", 0) == 0
    finished = AuditEvent.objects.get(code=EventCode.HARVEST_FINISH)
    assert finished.outcome == 8
    assert "ArchiveUnreachable" in finished.details["error"]


# A clinic merged into the CHU's archive: its studies stay filed under the clinic's own patient
# ID domain, which is not the CHU's. The registry refuses such a manifest (kos:unknown-issuer).
CLINIC_ISSUER = ("CLINIQUE-DES-LILAS", "1.2.250.1.999.777777777")


@pytest.mark.django_db
@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_a_study_the_registry_refuses_fails_alone_and_a_rerun_registers_it_once_corrected(
    region: Region, orthanc_factory, transport
):
    archive = orthanc_factory(CHUB_AE, modalities=BROKER)
    good = [_study(f"g{n}", when=dt.date(2025, 2, 1) + dt.timedelta(days=2 * n)) for n in range(3)]
    issuer, issuer_oid = CLINIC_ISSUER
    merged = _study("merged", when=dt.date(2025, 2, 2), issuer=issuer, issuer_oid=issuer_oid)
    for study in (*good, merged):
        archive.upload_many(study.instances)
    chu = pointed_at(region.chu, archive)
    merged_uid = merged.study_instance_uid

    summary = _harvest(chu, transport, batch=2)  # the refused study in the first batch

    assert summary.counts["new"] == 3
    assert summary.counts["failed"] == 1
    ((failed_uid, reason),) = summary.failures
    assert failed_uid == merged_uid
    assert reason.startswith("kos:unknown-issuer: ")
    assert issuer in reason
    assert {m.study_instance_uid for m in _manifests(chu)} == {s.study_instance_uid for s in good}
    checkpoint = HarvestCheckpoint.objects.get(institution=chu)
    assert checkpoint.status == HarvestStatus.COMPLETED
    finished = AuditEvent.objects.get(code=EventCode.HARVEST_FINISH)
    assert finished.outcome == Outcome.MINOR_FAILURE
    assert finished.details["counts"]["failed"] == 1
    assert finished.details["failures"] == [{"study": merged_uid, "reason": reason}]

    # The command names the study and the reason on stderr, and exits non-zero.
    command = ("harvest", "--institution", chu.finess, "--transport", transport, "--no-progress")
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError, match=r"^1 studies failed$"):
        call_command(*command, stdout=out, stderr=err)
    assert f"failed {merged_uid}: kos:unknown-issuer: " in err.getvalue()
    assert "  unchanged  3\n" in out.getvalue()
    assert "  failed     1\n" in out.getvalue()

    # The archive's study is filed again under the CHU's domain: the next run registers it.
    archive.delete_study(merged_uid)
    archive.upload_many(_study("merged", when=dt.date(2025, 2, 2)).instances)
    out = StringIO()
    call_command(*command, stdout=out)
    assert "  new        1\n" in out.getvalue()
    assert "  failed     0\n" in out.getvalue()
    assert _manifests(chu).filter(study_instance_uid=merged_uid).count() == 1
    assert _manifests(chu).count() == 4
    last = AuditEvent.objects.filter(code=EventCode.HARVEST_FINISH).order_by("sequence").last()
    assert last is not None
    assert last.outcome == Outcome.SUCCESS


def _time_out_on(monkeypatch, silent: set[str]) -> None:
    """The DICOMweb archive does not answer for the studies in ``silent`` (changed at will)."""
    describe_study = DicomWebArchive.describe_study

    def describe_or_time_out(self, study_instance_uid, *, expected_instances=None):
        if study_instance_uid in silent:
            raise ArchiveTimeout(
                f"QIDO-RS of study {study_instance_uid}: no answer within 5 s",
                transport=self.transport,
            )
        return describe_study(self, study_instance_uid, expected_instances=expected_instances)

    monkeypatch.setattr(DicomWebArchive, "describe_study", describe_or_time_out)


@pytest.mark.django_db
def test_studies_timing_out_fail_alone_but_three_in_a_row_stop_the_harvest_resumably(
    region: Region, orthanc_factory, monkeypatch
):
    _archive, chu, studies = _archive_of(
        region, orthanc_factory, "t", count=8, first_day=dt.date(2022, 1, 1)
    )
    uids = [s.study_instance_uid for s in studies]
    # The archive does not answer for the 2nd study, then for the 5th, 6th and 7th in a row.
    silent = {uids[1], uids[4], uids[5], uids[6]}
    _time_out_on(monkeypatch, silent)

    with pytest.raises(ArchiveTimeout):
        _harvest(chu, "dicomweb", batch=2, workers=1)

    # A study that times out on its own is that study's failure; three in a row stop the run
    # at the third, before its batch: the batches before it stay committed, resumable.
    assert {m.study_instance_uid for m in _manifests(chu)} == {uids[0], uids[2], uids[3]}
    checkpoint = HarvestCheckpoint.objects.get(institution=chu)
    assert checkpoint.status == HarvestStatus.RUNNING  # not "completed"
    assert checkpoint.cursor_study_uid == uids[5]
    assert checkpoint.counts["new"] == 3
    assert checkpoint.counts["failed"] == 3
    finished = AuditEvent.objects.get(code=EventCode.HARVEST_FINISH)
    assert finished.outcome == Outcome.SERIOUS_FAILURE
    assert "ArchiveTimeout" in finished.details["error"]

    # The archive answers again: the rerun resumes, retries the studies that timed out and
    # counts no failure.
    silent.clear()
    summary = _harvest(chu, "dicomweb", batch=2, workers=1)
    assert summary.resumed_after == 3
    assert summary.counts["new"] == 8
    assert summary.counts["failed"] == 0, summary.counts
    assert summary.failures == []
    assert {m.study_instance_uid for m in _manifests(chu)} == set(uids)
    assert HarvestCheckpoint.objects.get(institution=chu).status == HarvestStatus.COMPLETED
    last = AuditEvent.objects.filter(code=EventCode.HARVEST_FINISH).order_by("sequence").last()
    assert last is not None
    assert last.outcome == Outcome.SUCCESS


@pytest.mark.django_db
def test_a_resumed_harvest_tries_again_the_registered_studies_the_interrupted_run_failed(
    region: Region, orthanc_factory, monkeypatch
):
    _archive, chu, studies = _archive_of(
        region, orthanc_factory, "r", count=6, first_day=dt.date(2021, 1, 1)
    )
    assert _harvest(chu, "dicomweb").counts["new"] == 6
    uids = [s.study_instance_uid for s in studies]

    # Harvested again: the archive does not answer for the 2nd study (it has a manifest
    # already), and the run is interrupted after its second batch.
    silent = {uids[1]}
    _time_out_on(monkeypatch, silent)

    def interrupt(state: HarvestProgress) -> None:
        if state.done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _harvest(chu, "dicomweb", batch=2, workers=1, progress=interrupt)
    checkpoint = HarvestCheckpoint.objects.get(institution=chu)
    assert (checkpoint.cursor_study_uid, checkpoint.counts["failed"]) == (uids[3], 1)

    silent.clear()
    summary = _harvest(chu, "dicomweb", batch=2, workers=1)
    assert summary.resumed_after == 3  # the 2nd study is tried again
    assert summary.counts["unchanged"] == 6
    assert summary.counts["failed"] == 0, summary.counts


@pytest.mark.django_db
def test_a_failed_study_gone_from_the_archive_before_the_resume_is_no_longer_a_failure(
    region: Region, orthanc_factory, monkeypatch
):
    archive, chu, studies = _archive_of(
        region, orthanc_factory, "g", count=5, first_day=dt.date(2021, 2, 1)
    )
    uids = [s.study_instance_uid for s in studies]
    _time_out_on(monkeypatch, {uids[1]})

    def interrupt(state: HarvestProgress) -> None:
        if state.done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _harvest(chu, "dicomweb", batch=2, workers=1, progress=interrupt)
    interrupted = AuditEvent.objects.filter(code=EventCode.HARVEST_FINISH).get()
    assert [f["study"] for f in interrupted.details["failures"]] == [uids[1]]
    archive.delete_study(uids[1])  # deleted at the source before the resume

    summary = _harvest(chu, "dicomweb", batch=2, workers=1)
    assert summary.counts["new"] == 4
    assert summary.counts["failed"] == 0, (summary.counts, summary.failures)
    assert HarvestCheckpoint.objects.get(institution=chu).failed_studies == []


def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user, host, port = db["USER"] or "postgres", db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


def _harvest_command(*arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "harvest", *arguments],
        env={
            **os.environ,
            "DATABASE_URL": _database_url(),
            "RELAIS_DATA_DIR": str(settings.DATA_DIR),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_kill_9_mid_harvest_then_a_rerun_gives_exactly_one_manifest_per_study(
    region: Region, orthanc_factory, transport
):
    _archive, chu, studies = _archive_of(
        region, orthanc_factory, "k", count=30, first_day=dt.date(2024, 1, 1)
    )

    process = _harvest_command(
        "--institution", chu.finess, "--transport", transport, "--max-rate", "20", "--no-progress"
    )
    deadline = time.monotonic() + 60
    while _manifests(chu).count() < 5:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    interrupted = _manifests(chu).count()
    assert 5 <= interrupted < len(studies)
    checkpoint = HarvestCheckpoint.objects.get(institution=chu)
    assert (checkpoint.transport, checkpoint.status) == (transport, HarvestStatus.RUNNING)

    rerun = _harvest_command("--institution", chu.finess, "--transport", transport)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert "done by the interrupted run" in out
    assert "30/30" in err  # the progress bar: done/total, rate and ETA
    assert "study/s" in err
    assert _manifests(chu).count() == len(studies)
    for study in studies:
        assert Manifest.objects.filter(study_instance_uid=study.study_instance_uid).count() == 1


@pytest.mark.django_db
def test_the_command_prints_a_summary_and_refuses_bad_input(region: Region, orthanc_region):
    chu = pointed_at(region.chu, orthanc_region.archives[CHUB_AE])
    from io import StringIO

    out = StringIO()
    call_command("harvest", "--institution", chu.finess, "--no-progress", stdout=out)
    text = out.getvalue()
    assert "6 studies" in text
    assert "new        6" in text
    with pytest.raises(CommandError, match="no institution"):
        call_command("harvest", "--institution", "999999999", "--no-progress")
    with pytest.raises(CommandError, match="is after"):
        call_command(
            "harvest", "--institution", chu.finess, "--since", "2026-01-01", "--until", "2025-01-01"
        )
    institution_update(institution=chu, dicomweb_url="", actor=SYSTEM, now=NOW)
    with pytest.raises(CommandError, match="no DICOMweb URL"):
        call_command("harvest", "--institution", chu.finess, "--transport", "dicomweb")


@pytest.mark.django_db
@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_an_unreachable_archive_stops_the_harvest_with_a_clear_error(region: Region, transport):
    port = free_port()  # nothing listens there
    chu = institution_update(
        institution=region.chu,
        dicom_port=port,
        dicomweb_url=f"http://127.0.0.1:{port}/dicom-web",
        actor=SYSTEM,
        now=NOW,
    )
    with pytest.raises(CommandError, match="resumable"):
        call_command(
            "harvest", "--institution", chu.finess, "--transport", transport, "--no-progress"
        )
    assert Manifest.objects.count() == 0
    finished = AuditEvent.objects.get(code=EventCode.HARVEST_FINISH)
    assert finished.outcome == 8


def test_the_rate_limiter_spaces_acquisitions():
    limiter = RateLimiter(50)
    start = time.monotonic()
    for _ in range(11):
        limiter.acquire()
    assert time.monotonic() - start >= 0.19  # ten intervals of 20 ms
    unlimited = RateLimiter(None)
    start = time.monotonic()
    for _ in range(1000):
        unlimited.acquire()
    assert time.monotonic() - start < 0.5


@pytest.mark.django_db
def test_an_institution_chooses_only_a_transport_it_has(region: Region):
    from broker.errors import InvalidInput

    assert region.chu.transport == "dimse"
    assert region.staubin.transport == "dicomweb"
    with pytest.raises(InvalidInput, match="DIMSE transport needs"):
        institution_update(
            institution=region.staubin, archive_transport="dimse", actor=SYSTEM, now=NOW
        )
    chu = institution_update(
        institution=region.chu,
        dicomweb_url="http://127.0.0.1:8042/dicom-web",
        archive_transport="dimse",
        actor=SYSTEM,
        now=NOW,
    )
    assert chu.transport == "dimse"


@pytest.mark.django_db(transaction=True)
def test_the_migration_to_one_checkpoint_per_range_keeps_the_last_updated(region: Region):
    """Migration 0007: checkpoints were per transport too; of one archive's checkpoints of a
    date range, the one last updated is kept."""
    from django.db.migrations.executor import MigrationExecutor
    from django.utils import timezone

    executor = MigrationExecutor(connection)
    executor.migrate([("broker", "0006_harvest_failed_studies")])
    old = executor.loader.project_state([("broker", "0006_harvest_failed_studies")]).apps
    checkpoints = old.get_model("broker", "HarvestCheckpoint")
    now = timezone.now()
    for transport, age in (("dicomweb", 2), ("dimse", 1)):
        checkpoints.objects.create(
            institution_id=region.chu.pk,
            transport=transport,
            date_range="..",
            status="running",
            started_at=now,
            updated_at=now - dt.timedelta(hours=age),
        )
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())
    (kept,) = HarvestCheckpoint.objects.all()
    assert kept.transport == "dimse"
