"""The gateway's DIMSE side with real peers: a PACS (DCMTK's findscu and movescu, a storescp
as its store) queries and retrieves a shared study through the broker's SCP; the study comes
from a real Orthanc."""

from __future__ import annotations

import datetime as dt
import io
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from django.utils import timezone

from audit.events import EventCode
from audit.models import AuditEvent
from broker.dicom.scp import BrokerSCP, SCPConfig
from broker.models import Institution, Manifest, ManifestStatus, Role
from broker.services import institution_update
from consent.models import Directive
from consent.services import directive_amend, directive_record
from sharing import services
from tests.conftest import NOW, SYSTEM, Region, make_user
from tests.integration.conftest import harvested
from tests.peers.dcmtk import require_tool, run_tool
from tests.peers.fixtures import OrthancRegion
from tests.peers.orthanc import free_port
from tests.peers.studies import CHUB_AE

pytestmark = pytest.mark.django_db(transaction=True)

PACS_AE = "PM_PACS"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Port-Maël's PACS store: DCMTK's storescp, writing what it receives to a folder."""
    port, folder = free_port(), tmp_path / "received"
    folder.mkdir()
    with subprocess.Popen(
        [require_tool("storescp"), "-aet", PACS_AE, "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as process:
        time.sleep(0.3)
        try:
            yield port, folder
        finally:
            process.terminate()


@pytest.fixture
def world(region: Region, orthanc_region: OrthancRegion, store, referring_doctor, radiologist):
    archive = orthanc_region.archives[CHUB_AE]
    chu = harvested(region.chu, archive)
    portmael = institution_update(
        institution=region.portmael,
        ae_title=PACS_AE,
        dicom_host="127.0.0.1",
        dicom_port=store[0],
        actor=SYSTEM,
        now=NOW,
    )
    study = orthanc_region.studies[CHUB_AE][0]
    manifest = Manifest.objects.get(
        study_instance_uid=study.study_instance_uid, status=ManifestStatus.APPROVED
    )
    patient = manifest.source_identifier.patient
    # Port-Maël's doctor asks for the CHU's study; a CHU radiologist approves; the patient
    # consented to sharing with Port-Maël.
    ticket = services.request_create(
        user=referring_doctor,
        purpose="treatment",
        patient=patient,
        institution=portmael,
        studies=[study.study_instance_uid],
        justification="suivi",
        actor=SYSTEM,
        now=timezone.now(),
    )
    if ticket.state == "pending":
        services.request_approve(user=radiologist, ticket=ticket, actor=SYSTEM, now=timezone.now())
    clerk = make_user("clerk.chu", [(chu, Role.ADMISSIONS_CLERK)])
    directive_record(
        patient=patient,
        institution=chu,
        recorder=clerk,
        kind="consent",
        scope="institution",
        value=portmael.finess,
        note="consentement oral",
        actor=SYSTEM,
        now=timezone.now(),
    )
    scp = BrokerSCP(SCPConfig(ae_title="RELAIS", bind="127.0.0.1", port=0, timeout=20))
    server = scp.start(block=False)
    assert server is not None
    try:
        yield {
            "port": server.server_address[1],
            "study": study,
            "received": store[1],
            "ticket": ticket,
            "other": orthanc_region.studies[CHUB_AE][1],
            "study_source": chu,
            "portmael": portmael,
            "clerk": clerk,
        }
    finally:
        scp.shutdown()


def dicom_files(folder: Path) -> dict[str, bytes]:
    found = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        found[str(ds.SOPInstanceUID)] = path.read_bytes()
    return found


def test_a_pacs_queries_then_retrieves_a_shared_study_by_c_move(world):
    study = world["study"]
    found = run_tool(
        "findscu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID",
        ],
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert study.study_instance_uid in found.stdout + found.stderr
    assert world["other"].study_instance_uid not in found.stdout + found.stderr  # no ticket
    moved = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE,
            "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_instance_uid}",
        ],
        timeout=120,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stdout + moved.stderr
    received = dicom_files(world["received"])
    uploaded = {str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID): d for d in study.instances}
    assert received.keys() == uploaded.keys()
    for uid, data in received.items():
        original = pydicom.dcmread(io.BytesIO(uploaded[uid]))
        copy = pydicom.dcmread(io.BytesIO(data))
        assert copy.PixelData == original.PixelData
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert end.details["instances"] == len(uploaded)
    assert end.correlation_id == world["ticket"].public_id
    permit = AuditEvent.objects.filter(code=EventCode.ACCESS_DECIDE, outcome=0).last()
    assert permit.details["dimse"] == "C-MOVE"


def test_c_move_refusals(world):
    study = world["study"]

    def move(uid: str, destination: str) -> str:
        moved = run_tool(
            "movescu",
            [
                "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", destination,
                "127.0.0.1", world["port"],
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
            ],
        )  # fmt: skip
        return moved.stdout + moved.stderr

    # Another destination than the institution's registered AE.
    assert "Refused: MoveDestinationUnknown" in move(study.study_instance_uid, "ELSEWHERE")
    # A study no ticket of the institution reaches.
    refused = move(world["other"].study_instance_uid, PACS_AE)
    assert "Received Final Move Response (Failed" in refused, refused
    assert not list(world["received"].iterdir())
    refusals = AuditEvent.objects.filter(code=EventCode.ACCESS_DECIDE, outcome=4)
    assert {e.details["why"] for e in refusals} == {
        "destination 'ELSEWHERE' is not registered",
        "no live ticket of this institution reaches it",
    }


def test_a_study_whose_consent_has_lapsed_is_neither_listed_nor_moved(world):
    """The patient's consent to Port-Maël ends while the ticket lives (an opt-in with an end
    date: nothing revokes the ticket when it passes). What a C-MOVE would be refused, a C-FIND
    does not list."""
    uid = world["study"].study_instance_uid
    directive = Directive.objects.get(kind="consent")
    directive_amend(
        directive=directive,
        institution=world["study_source"],
        recorder=world["clerk"],
        scope="institution",
        value=world["portmael"].finess,
        valid_until=timezone.now() + dt.timedelta(seconds=4),
        note="consentement jusqu'à la fin de la consultation",
        actor=SYSTEM,
        now=timezone.now(),
    )
    assert uid in find(world, "STUDY", "StudyInstanceUID")
    time.sleep(4.2)
    world["ticket"].refresh_from_db()
    assert world["ticket"].state == "approved"
    assert uid not in find(world, "STUDY", "StudyInstanceUID")
    series = find(world, "SERIES", f"StudyInstanceUID={uid}", "SeriesInstanceUID")
    assert "Final Find Response (Success)" in series
    assert "(Pending)" not in series  # no match (the query itself is echoed, with the UID)
    moved = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE,
            "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
        ],
    )  # fmt: skip
    assert "Received Final Move Response (Failed" in moved.stdout + moved.stderr
    assert not list(world["received"].iterdir())


def find(world, level: str, *keys: str) -> str:
    found = run_tool(
        "findscu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "127.0.0.1", world["port"],
            "-k", f"QueryRetrieveLevel={level}", *(a for key in keys for a in ("-k", key)),
        ],
    )  # fmt: skip
    assert found.returncode == 0, found.stdout + found.stderr
    return found.stdout + found.stderr


def test_queries_at_study_series_and_image_level_with_matching(world):
    study = world["study"]
    uid = study.study_instance_uid
    name = study.patient.family
    date = study.study_date.strftime("%Y%m%d")
    # Study level: a wildcard on the name, a date range; only the keys asked for come back.
    answer = find(
        world,
        "STUDY",
        f"PatientName={name[:3].lower()}*",
        f"StudyDate=-{date}",
        "StudyInstanceUID",
        "RetrieveAETitle",
    )
    assert uid in answer
    assert "RELAIS" in answer
    assert "AccessionNumber" not in answer
    assert uid not in find(world, "STUDY", f"StudyDate={int(date) + 1}-", "StudyInstanceUID")
    # Series level: each series of the manifest.
    answer = find(world, "SERIES", f"StudyInstanceUID={uid}", "SeriesInstanceUID", "Modality")
    assert all(series in answer for series in study.series_uids)
    assert answer.count("Find Response:") == len(study.series_uids)
    # Image level: the instances of one series.
    series = study.series_uids[0]
    answer = find(
        world, "IMAGE", f"StudyInstanceUID={uid}", f"SeriesInstanceUID={series}", "SOPInstanceUID"
    )
    assert answer.count("Find Response:") == len(study.sop_instance_uids(1))
    assert all(sop in answer for sop in study.sop_instance_uids(1))
    # Below the study level, the study must be named.
    refused = find(world, "SERIES", "StudyInstanceUID", "SeriesInstanceUID")
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in refused  # 0xA900
    # The study no ticket reaches stays invisible at every level.
    other = world["other"].study_instance_uid
    assert "Find Response:" not in find(
        world, "SERIES", f"StudyInstanceUID={other}", "SeriesInstanceUID"
    )


def test_a_pacs_moves_one_series_only(world):
    study = world["study"]
    series = study.series_uids[1]
    moved = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE, "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.study_instance_uid}",
            "-k", f"SeriesInstanceUID={series}",
        ],
        timeout=120,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert dicom_files(world["received"]).keys() == set(study.sop_instance_uids(2))
    # A series that is not the study's: refused, audited, nothing sent.
    refused = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE, "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.study_instance_uid}",
            "-k", "SeriesInstanceUID=1.2.3.4",
        ],
    )  # fmt: skip
    assert "Received Final Move Response (Failed" in refused.stdout + refused.stderr
    assert len(list(world["received"].iterdir())) == len(study.sop_instance_uids(2))
    denied = AuditEvent.objects.filter(code=EventCode.ACCESS_DECIDE, outcome=4).last()
    assert denied.details["why"] == "nothing asked for is in the study's manifest"


def test_a_malformed_move_is_refused_as_such_and_audited(world):
    study = world["study"]
    refused = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE, "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study.study_instance_uid}",
        ],
    )  # fmt: skip
    output = refused.stdout + refused.stderr
    assert "Final Move Response (Error: DataSetDoesNotMatchSOPClass)" in output, output  # A900
    assert not list(world["received"].iterdir())
    denied = AuditEvent.objects.filter(code=EventCode.ACCESS_DECIDE, outcome=4).last()
    assert denied.details["why"] == "a SERIES-level C-MOVE names the series"
    assert denied.details["study"] == study.study_instance_uid


def test_the_destination_is_offered_the_study_in_the_syntaxes_an_archive_stores():
    from pydicom.uid import CTImageStorage, JPEG2000Lossless, JPEGLosslessSV1

    from broker.dicom.scp import _move_kwargs

    contexts = _move_kwargs({CTImageStorage})["contexts"]
    offered = {(c.abstract_syntax, c.transfer_syntax[0]) for c in contexts}
    assert (CTImageStorage, JPEGLosslessSV1) in offered
    assert (CTImageStorage, JPEG2000Lossless) in offered
    assert len(_move_kwargs()["contexts"]) <= 128


def test_a_move_missing_instances_at_the_source_is_not_a_success(world):
    """The manifest lists an instance the archive no longer holds: the others are sent, and
    the final status says that one failed (0xB000, with the Failed SOP Instance UID List)."""
    from broker.models import ManifestInstance

    study = world["study"]
    manifest = Manifest.objects.get(
        study_instance_uid=study.study_instance_uid, status=ManifestStatus.APPROVED
    )
    series = manifest.series.order_by("id").first()
    gone = "1.2.826.0.1.3680043.8.498.99.1"
    ManifestInstance.objects.create(
        series=series, sop_instance_uid=gone, sop_class_uid=study.sop_class_uid
    )
    moved = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE, "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_instance_uid}",
        ],
        timeout=120,
    )  # fmt: skip
    output = moved.stdout + moved.stderr
    assert "Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in output
    assert len(dicom_files(world["received"])) == len(study.instances)


def test_a_move_whose_source_archive_is_down_fails_and_is_audited(world):
    """The source archive cannot be reached: the move's final status is a failure (0xC000),
    nothing reaches the destination, and the transfer is audited with its outcome."""
    source = world["study_source"]
    source.dicomweb_url = "http://127.0.0.1:9/dicom-web/"  # nothing listens there
    source.save(update_fields=["dicomweb_url"])
    uid = world["study"].study_instance_uid
    moved = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE, "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
        ],
        timeout=120,
    )  # fmt: skip
    output = moved.stdout + moved.stderr
    assert "Received Final Move Response (Failed" in output, output
    assert not list(world["received"].iterdir())
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert end.outcome == 8
    assert end.details["instances"] == 0


def test_pending_responses_are_spaced_and_the_final_one_counts_everything(world, monkeypatch):
    """Pending C-MOVE responses are optional (PS3.4 C.4.2.3.1): the broker sends the first at
    once and then at most one every PENDING_INTERVAL; the final response counts every
    sub-operation (here asked by pynetdicom, which hands over each response)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    from broker.dicom import scp

    monkeypatch.setattr(scp, "PENDING_INTERVAL", 60.0)
    study = world["study"]
    assert len(study.instances) >= 3
    ae = AE(ae_title=PACS_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", world["port"], ae_title="RELAIS")
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study.study_instance_uid
    try:
        responses = [
            (status.Status, status)
            for status, _identifier in assoc.send_c_move(
                query, PACS_AE, StudyRootQueryRetrieveInformationModelMove
            )
        ]
    finally:
        assoc.release()
    statuses = [code for code, _ in responses]
    assert statuses == [0xFF00, 0x0000]  # one pending, then the final response
    final = responses[-1][1]
    assert final.NumberOfCompletedSuboperations == len(study.instances)
    assert final.NumberOfFailedSuboperations == 0
    assert len(dicom_files(world["received"])) == len(study.instances)


def test_a_destination_that_is_down_fails_the_move_and_the_transfer_is_audited(world, store):
    """The PACS's store is not listening: the move fails (0xA801, pynetdicom's answer when the
    destination cannot be reached), nothing is left open, and the transfer the broker had
    begun is recorded as ended, with nothing sent."""
    study = world["study"]
    with socket.socket() as holder:  # a port where nothing listens
        holder.bind(("127.0.0.1", 0))
        dead_port = holder.getsockname()[1]
    Institution.objects.filter(ae_title=PACS_AE).update(dicom_port=dead_port)
    moved = run_tool(
        "movescu",
        [
            "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE, "127.0.0.1", world["port"],
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_instance_uid}",
        ],
        timeout=60,
    )  # fmt: skip
    assert "MoveDestinationUnknown" in moved.stdout + moved.stderr
    begin = AuditEvent.objects.get(code=EventCode.TRANSFER_BEGIN)
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert end.correlation_id == begin.correlation_id == world["ticket"].public_id
    assert end.outcome == 8  # serious failure
    assert end.details["instances"] == 0
    assert end.details["error"] == "the move destination could not be associated"
    assert not list(world["received"].iterdir())
    deadline = time.monotonic() + 10  # the fetch stops after the instance it is reading
    while any(t.name == "C-MOVE fetch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the fetch thread outlived the move"
        time.sleep(0.01)


def test_a_destination_that_aborts_mid_move_ends_the_move_and_is_audited(world):
    """Port-Maël's PACS takes the first instance, then aborts the association: the move ends
    at once with a failure (not one failed sub-operation per remaining instance), and the
    transfer is recorded with the one instance delivered."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list[str] = []

    def on_store(event):
        if received:
            event.assoc.abort()
            return 0xA700
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    pacs = AE(ae_title=PACS_AE)
    pacs.supported_contexts = AllStoragePresentationContexts
    server = pacs.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        Institution.objects.filter(ae_title=PACS_AE).update(dicom_port=server.server_address[1])
        study = world["study"]
        assert len(study.instances) >= 3
        moved = run_tool(
            "movescu",
            [
                "-S", "-aet", PACS_AE, "-aec", "RELAIS", "-aem", PACS_AE,
                "127.0.0.1", world["port"], "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={study.study_instance_uid}",
            ],
            timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
    output = moved.stdout + moved.stderr
    assert "Final Move Response (Refused: OutOfResourcesSubOperations)" in output, output
    assert len(received) == 1
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert end.outcome == 8
    assert end.details["instances"] == 1
    assert end.details["error"] == "the destination ended the association"


def test_the_reachable_study_of_a_move_is_the_one_a_full_listing_gives(
    world, referring_doctor, radiologist
):
    """`institution_reachable` for one study (a C-MOVE's) skips the tickets that do not name
    it, and finds what the full listing finds: here a ticket on every study of the patient,
    made after the ticket on one study, and a study no ticket reaches."""
    from sharing.dimse import institution_reachable

    portmael = Institution.objects.get(ae_title=PACS_AE)
    ticket = world["ticket"]
    later = services.request_create(
        user=referring_doctor,
        purpose="treatment",
        patient=ticket.patient,
        institution=portmael,
        studies=None,  # every study of the patient held by the CHU
        source_institution=world["study_source"],
        justification="bilan",
        actor=SYSTEM,
        now=timezone.now(),
    )
    if later.state == "pending":
        services.request_approve(user=radiologist, ticket=later, actor=SYSTEM, now=timezone.now())
    now = timezone.now()
    everything = institution_reachable(portmael, now)
    assert everything[world["study"].study_instance_uid].ticket == ticket  # the first made
    for uid, found in everything.items():
        alone = institution_reachable(portmael, now, study_instance_uid=uid)
        assert alone.keys() == {uid}
        assert (alone[uid].ticket, alone[uid].manifest) == (found.ticket, found.manifest)
    assert institution_reachable(portmael, now, study_instance_uid="1.2.3.4") == {}
