"""The intake queue of manifests received over DIMSE, and ``manage.py dicomserver`` itself
(its registrar process), run as a real process against the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from audit.events import EventCode
from audit.models import AuditEvent
from audit.types import Actor, ActorKind
from broker.dicom.kos import load_parsed_kos, parse_kos
from broker.errors import UnprocessableManifest
from broker.intake import intake_drain, intake_receive
from broker.models import IntakeItem, Manifest
from tests.conftest import NOW, Region
from tests.peers.dcmtk import run_tool
from tests.peers.orthanc import free_port
from tests.registry_helpers import kos_for

ROOT = Path(__file__).resolve().parents[2]
PACS = Actor(
    kind=ActorKind.INSTITUTION,
    user_id=None,
    username="dicom:350000014:CHUB_PACS",
    institution="350000014",
    role="institution_system",
    address="127.0.0.1",
)


@pytest.mark.django_db
def test_a_manifest_refused_on_its_face_is_audited_and_never_queued(region: Region):
    with pytest.raises(UnprocessableManifest):
        intake_receive(data=b"not dicom", institution=region.chu, actor=PACS, now=NOW)
    assert IntakeItem.objects.count() == 0
    (event,) = AuditEvent.objects.filter(code=EventCode.MANIFEST_REJECT)
    assert event.actor_username == PACS.username


@pytest.mark.django_db
def test_the_institution_with_the_oldest_waiting_manifest_is_drained_first(region: Region):
    """One institution a drain, the one whose oldest waiting manifest is the oldest; a
    manifest set aside (failed) does not make its institution wait for a drain."""
    intake_receive(
        data=kos_for(region.portmael, "PM-1", study=10),
        institution=region.portmael,
        actor=PACS,
        now=NOW,
    )
    for n in range(2):
        intake_receive(
            data=kos_for(region.chu, f"IPP{n}", study=n),
            institution=region.chu,
            actor=PACS,
            now=NOW,
        )
    oldest = IntakeItem.objects.filter(institution=region.portmael).get()

    first = intake_drain(now=NOW)
    assert [r.manifest.source_institution for r in first] == [region.portmael]
    assert not IntakeItem.objects.filter(pk=oldest.pk).exists()
    second = intake_drain(now=NOW)
    assert [r.manifest.source_institution for r in second] == [region.chu, region.chu]
    assert intake_drain(now=NOW) == []

    intake_receive(
        data=kos_for(region.portmael, "PM-2", study=11),
        institution=region.portmael,
        actor=PACS,
        now=NOW,
    )
    IntakeItem.objects.update(failed_at=NOW)  # set aside: for an operator, not a registrar
    assert intake_drain(now=NOW) == []


@pytest.mark.django_db
def test_queued_manifests_are_registered_once_and_leave_the_queue(region: Region):
    for n in range(3):
        intake_receive(
            data=kos_for(region.chu, f"IPP{n}", study=n),
            institution=region.chu,
            actor=PACS,
            now=NOW,
        )
    # The same document twice: queued twice, registered once ("unchanged" the second time).
    intake_receive(
        data=kos_for(region.chu, "IPP0", study=0), institution=region.chu, actor=PACS, now=NOW
    )
    assert IntakeItem.objects.count() == 4
    results = intake_drain(limit=2, now=NOW)
    assert [r.outcome for r in results] == ["new", "new"]
    assert IntakeItem.objects.count() == 2
    results = intake_drain(now=NOW)
    assert [r.outcome for r in results] == ["new", "unchanged"]
    assert intake_drain(now=NOW) == []
    assert Manifest.objects.count() == 3
    registered = AuditEvent.objects.filter(code=EventCode.MANIFEST_REGISTER)
    assert {e.actor_username for e in registered} == {PACS.username}


@pytest.mark.django_db
def test_the_checks_parse_is_queued_with_the_manifest_and_registered_without_parsing_again(
    region: Region, monkeypatch
):
    from broker import registration

    data = kos_for(region.chu, "IPP1", study=1)
    item = intake_receive(data=data, institution=region.chu, actor=PACS, now=NOW)
    item.refresh_from_db()
    assert load_parsed_kos(bytes(item.parsed), sha256=item.sha256) == parse_kos(data)
    # Queued before the parse was kept (or under another format): parsed at registration.
    older = intake_receive(
        data=kos_for(region.chu, "IPP2", study=2), institution=region.chu, actor=PACS, now=NOW
    )
    IntakeItem.objects.filter(pk=older.pk).update(parsed=None)
    # A kept parse that is not that of the row's bytes (an operator's edit, say): not used.
    other = intake_receive(
        data=kos_for(region.chu, "IPP3", study=3), institution=region.chu, actor=PACS, now=NOW
    )
    IntakeItem.objects.filter(pk=other.pk).update(parsed=item.parsed)
    parses = []

    def counting_parse(data: bytes):
        parses.append(data)
        return parse_kos(data)

    monkeypatch.setattr(registration, "parse_kos", counting_parse)
    results = intake_drain(now=NOW)

    assert [r.outcome for r in results] == ["new", "new", "new"]
    assert parses == [bytes(older.data), bytes(other.data)]
    for queued in (data, bytes(older.data), bytes(other.data)):
        manifest = Manifest.objects.get(sop_instance_uid=parse_kos(queued).sop_instance_uid)
        assert bytes(manifest.kos_bytes) == queued
        assert manifest.study_instance_uid == parse_kos(queued).study_instance_uid


@pytest.mark.django_db
def test_a_manifest_that_cannot_be_registered_is_set_aside_and_the_queue_goes_on(
    region: Region, monkeypatch
):
    from broker import intake

    poison = intake_receive(
        data=kos_for(region.chu, "IPP1", study=1), institution=region.chu, actor=PACS, now=NOW
    )
    intake_receive(
        data=kos_for(region.chu, "IPP2", study=2), institution=region.chu, actor=PACS, now=NOW
    )
    real = intake.manifests_register

    parsed_given: list[object] = []

    def failing(*, documents, **kwargs):
        parsed_given.append(kwargs["parsed"])
        if bytes(poison.data) in documents:
            raise RuntimeError("registry bug")
        return real(documents=documents, **kwargs)

    monkeypatch.setattr(intake, "manifests_register", failing)
    with pytest.raises(RuntimeError):
        intake_drain(now=NOW)  # the batch holding it fails as a whole: nothing changes
    assert IntakeItem.objects.count() == 2
    assert [intake.intake_retry_oldest(now=NOW) for _ in range(3)] == ["failed"] * 3
    # Alone, after its batch failed, its bytes are parsed again (not its kept parse).
    assert parsed_given[-3:] == [[None]] * 3
    poison.refresh_from_db()
    assert poison.failed_at is not None
    assert poison.attempts == 3
    assert "registry bug" in poison.last_error
    (set_aside,) = AuditEvent.objects.filter(
        code=EventCode.MANIFEST_REJECT, details__error="registry:intake:set-aside"
    )
    assert set_aside.correlation_id == poison.correlation_id
    # The rest of the queue is not held up by it.
    assert [r.outcome for r in intake_drain(now=NOW)] == ["new"]
    assert intake.intake_pending() == 0
    assert Manifest.objects.count() == 1


def _children_running(parent: int, command: str) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if command.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user, host, port = db["USER"] or "postgres", db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


@pytest.mark.django_db(transaction=True)
def test_dicomserver_runs_its_registrar_process_and_stops_cleanly(region: Region, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "dicomserver", "--port", str(port)],
        env={
            **os.environ,
            "DATABASE_URL": _database_url(),
            "RELAIS_DATA_DIR": str(settings.DATA_DIR),
            "LOG_LEVEL": "WARNING",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        args = ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", port]
        deadline = time.monotonic() + 30
        while run_tool("echoscu", args).returncode != 0:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "dicomserver never answered C-ECHO"
            time.sleep(0.2)
        files = []
        for n in range(3):
            path = tmp_path / f"{n}.dcm"
            path.write_bytes(kos_for(region.chu, f"IPP{n}", study=n))
            files.append(path)
        assert run_tool("storescu", [*args, *files[:2]]).returncode == 0
        deadline = time.monotonic() + 30
        while Manifest.objects.count() < 2:
            assert time.monotonic() < deadline, "the registrar registered nothing"
            time.sleep(0.05)
        # The registrar dies: dicomserver starts another, and the queue is registered.
        (registrar,) = _children_running(server.pid, "intake_registrar")
        os.kill(registrar, signal.SIGKILL)
        assert run_tool("storescu", [*args, files[2]]).returncode == 0
        deadline = time.monotonic() + 30
        while Manifest.objects.count() < 3:
            assert time.monotonic() < deadline, "no registrar took over"
            time.sleep(0.05)
        assert IntakeItem.objects.count() == 0
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "Relais DICOM server RELAIS on 127.0.0.1" in out
    assert "stopped" in out
