"""The broker's DICOM server against DCMTK's real clients: C-ECHO, C-STORE of manifests,
the admission of archives, DICOM over TLS, and TCP_NODELAY on every socket."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from audit.events import EventCode
from audit.models import AuditEvent
from broker.dicom import network
from broker.dicom.network import NODELAY_HANDLERS, TLSFiles, tls_client_context, tls_server_context
from broker.dicom.scp import BrokerSCP, SCPConfig
from broker.intake import IntakeRegistrar
from broker.models import IntakeItem, Manifest
from broker.services import institution_update
from tests.conftest import NOW, SYSTEM, Region
from tests.dicom_factories import dataset_to_bytes, make_kos_dataset
from tests.peers.certificates import CertificateAuthority
from tests.peers.dcmtk import run_tool
from tests.registry_helpers import kos_for, study_uid

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class Running:
    port: int
    scp: BrokerSCP

    def registered(self) -> None:
        """Wait until the registrar has registered what the SCP queued."""
        assert self.scp.registrar is not None
        assert self.scp.registrar.wait_idle(timeout=20)


def _serve(config: SCPConfig) -> Iterator[Running]:
    scp = BrokerSCP(config, registrar=IntakeRegistrar())
    server = scp.start(block=False)
    assert server is not None
    try:
        yield Running(port=server.server_address[1], scp=scp)
    finally:
        scp.shutdown()


@pytest.fixture
def broker(region: Region) -> Iterator[Running]:
    yield from _serve(SCPConfig(ae_title="RELAIS", bind="127.0.0.1", port=0, timeout=10))


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _refusals() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(code=EventCode.DICOM_ASSOCIATION_REFUSED))


def test_echoscu_from_a_registered_archive_succeeds(broker):
    result = run_tool("echoscu", ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port])
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr
    assert _refusals() == []


def test_an_unknown_calling_ae_is_rejected_at_association_and_audited(broker):
    result = run_tool("echoscu", ["-aet", "INTRUDER", "-aec", "RELAIS", "127.0.0.1", broker.port])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in output
    assert "Calling AE Title Not Recognized" in output
    (event,) = _refusals()
    assert event.details["reason"] == "calling-ae-unknown"
    assert event.outcome == 4
    assert event.participant_objects[0]["calling_ae"] == "INTRUDER"


def test_a_known_ae_title_from_another_address_is_rejected(broker, region):
    institution_update(institution=region.portmael, dicom_host="192.0.2.17", actor=SYSTEM, now=NOW)
    result = run_tool(
        "echoscu", ["-aet", "PORTMAEL_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port]
    )
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    (event,) = _refusals()
    assert event.details["reason"] == "address-mismatch"


def test_the_called_ae_title_must_be_the_brokers(broker):
    result = run_tool(
        "echoscu", ["-aet", "CHUB_PACS", "-aec", "NOT_RELAIS", "127.0.0.1", broker.port]
    )
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    (event,) = _refusals()
    assert event.details["reason"] == "called-ae-unknown"


def test_an_inactive_institution_is_rejected(broker, region):
    institution_update(institution=region.chu, active=False, actor=SYSTEM, now=NOW)
    result = run_tool("echoscu", ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port])
    assert result.returncode != 0
    (event,) = _refusals()
    assert event.details["reason"] == "institution-inactive"


def test_storescu_registers_manifests_through_the_registration_service(
    broker, region, tmp_path, monkeypatch
):
    decoded_by_the_broker: list[str] = []  # the C-STORE-RQ command sets it decoded itself
    message_to_primitive = network._StoreRequestMessage.message_to_primitive

    def spied(message: network._StoreRequestMessage) -> object:
        primitive = message_to_primitive(message)
        decoded_by_the_broker.append(str(primitive.AffectedSOPInstanceUID))
        return primitive

    monkeypatch.setattr(network._StoreRequestMessage, "message_to_primitive", spied)
    files = [
        _write(tmp_path, f"kos{n}.dcm", kos_for(region.chu, f"IPP{n}", study=n)) for n in range(5)
    ]
    result = run_tool(
        "storescu", ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port, *files]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(decoded_by_the_broker) == 5
    broker.registered()
    manifests = Manifest.objects.filter(source_institution=region.chu)
    assert manifests.count() == 5
    registered = AuditEvent.objects.filter(code=EventCode.MANIFEST_REGISTER)
    assert registered.count() == 5
    actor = registered.first()
    assert actor.actor_username == "dicom:350000014:CHUB_PACS"
    assert actor.actor_institution == "350000014"

    # The same files again: idempotent, success, nothing new.
    again = run_tool(
        "storescu", ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port, *files]
    )
    assert again.returncode == 0
    broker.registered()
    assert manifests.count() == 5
    assert registered.count() == 5


def test_an_image_is_refused_with_sop_class_not_supported(broker, tmp_path):
    import datetime as dt

    from tests.peers.studies import SyntheticPatient, make_study

    (image,) = make_study(
        patient=SyntheticPatient("DURAND", "Paul", dt.date(1960, 1, 2), "M"),
        patient_id="X1",
        issuer="CHU-BELLECOMBE",
        modality="CT",
        study_date=dt.date(2026, 1, 5),
        study_time=None,
        accession_number="A1",
        description="Scanner",
        series_count=1,
        instances_per_series=1,
    )
    path = _write(tmp_path, "ct.dcm", image)
    result = run_tool(
        "storescu", ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port, path]
    )
    assert "Received Store Response (Refused: SOPClassNotSupported)" in result.stderr
    assert Manifest.objects.count() == 0


def test_a_broken_manifest_is_refused_and_its_rejection_audited(broker, region, tmp_path):
    dataset = make_kos_dataset()
    del dataset.CurrentRequestedProcedureEvidenceSequence
    path = _write(tmp_path, "broken.dcm", dataset_to_bytes(dataset))
    result = run_tool(
        "storescu", ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port, path]
    )
    output = result.stdout + result.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in output
    assert Manifest.objects.count() == 0
    (rejected,) = AuditEvent.objects.filter(code=EventCode.MANIFEST_REJECT)
    assert rejected.actor_username == "dicom:350000014:CHUB_PACS"


def test_a_uid_reused_for_other_content_is_refused_at_registration_and_audited(
    broker, region, tmp_path
):
    """A conflict with the registry shows only at registration, after the C-STORE was
    answered: the refusal is audited with the receipt's correlation ID, nothing changes."""
    first = kos_for(region.chu, "IPP1", study=1, sop_instance_uid="1.2.3.4")
    other = kos_for(region.chu, "IPP1", study=2, sop_instance_uid="1.2.3.4")
    args = ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", broker.port]
    assert run_tool("storescu", [*args, _write(tmp_path, "a.dcm", first)]).returncode == 0
    assert run_tool("storescu", [*args, _write(tmp_path, "b.dcm", other)]).returncode == 0
    broker.registered()
    (manifest,) = Manifest.objects.all()
    assert manifest.study_instance_uid == study_uid(1)
    (rejected,) = AuditEvent.objects.filter(code=EventCode.MANIFEST_REJECT)
    assert rejected.details["error"] == "registry:manifest:uid-reused"
    assert rejected.actor_username == "dicom:350000014:CHUB_PACS"
    assert IntakeItem.objects.count() == 0


def test_every_socket_of_an_association_has_tcp_nodelay(broker):
    ae = AE(ae_title="CHUB_PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", broker.port, ae_title="RELAIS", evt_handlers=NODELAY_HANDLERS)
    try:
        assert assoc.is_established
        mine = assoc.dul.socket.socket
        assert mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        server = broker.scp.server
        (accepted,) = server.active_associations
        theirs = accepted.dul.socket.socket
        assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        assoc.release()


@pytest.fixture
def tls_broker(region: Region, tmp_path: Path) -> Iterator[tuple[Running, CertificateAuthority]]:
    ca = CertificateAuthority(tmp_path / "pki")
    server = ca.issue("relais")
    context = tls_server_context(TLSFiles(server.certificate, server.private_key, ca.certificate))
    for running in _serve(
        SCPConfig(ae_title="RELAIS", bind="127.0.0.1", port=0, timeout=10, tls=context)
    ):
        yield running, ca


def test_dicom_over_tls_with_a_certificate_of_the_regions_ca(tls_broker):
    running, ca = tls_broker
    client = ca.issue("chub-pacs")
    # DCMTK's echoscu over TLS, with the archive's certificate.
    result = run_tool(
        "echoscu",
        [
            "+tls",
            client.private_key,
            client.certificate,
            "+cf",
            ca.certificate,
            "-aet",
            "CHUB_PACS",
            "-aec",
            "RELAIS",
            "127.0.0.1",
            running.port,
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # pynetdicom as a client, with the broker's own client context.
    ae = AE(ae_title="CHUB_PACS")
    ae.add_requested_context(Verification)
    context = tls_client_context(
        TLSFiles(client.certificate, client.private_key, ca.certificate),
        ca_certificates=ca.certificate,
    )
    assoc = ae.associate(
        "127.0.0.1",
        running.port,
        ae_title="RELAIS",
        tls_args=(context, "127.0.0.1"),
        evt_handlers=NODELAY_HANDLERS,
    )
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_tls_refuses_plain_connections_and_unknown_certificates(tls_broker, tmp_path):
    running, _ = tls_broker
    plain = run_tool(
        "echoscu", ["-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", running.port], timeout=30
    )
    assert plain.returncode != 0
    stranger = CertificateAuthority(tmp_path / "other-pki", name="Another CA").issue("stranger")
    foreign = run_tool(
        "echoscu",
        [
            "+tls",
            stranger.private_key,
            stranger.certificate,
            "-ic",
            "-aet",
            "CHUB_PACS",
            "-aec",
            "RELAIS",
            "127.0.0.1",
            running.port,
        ],
        timeout=30,
    )
    assert foreign.returncode != 0
    assert not AuditEvent.objects.filter(code=EventCode.MANIFEST_REGISTER).exists()
    # The server audits a failed handshake in the connection's thread, maybe after the
    # client has given up: wait for it.
    deadline = time.monotonic() + 10
    while [e.details["reason"] for e in _refusals()].count("tls-handshake") < 2:
        assert time.monotonic() < deadline, [e.details for e in _refusals()]
        time.sleep(0.05)


def test_a_silent_tcp_client_does_not_stop_a_tls_server_for_others(tls_broker):
    """The TLS handshake happens in each connection's thread, not in the accept loop."""
    running, ca = tls_broker
    client = ca.issue("chub-pacs")
    with socket.create_connection(("127.0.0.1", running.port)):  # connects, says nothing
        result = run_tool(
            "echoscu",
            [
                "+tls", client.private_key, client.certificate, "+cf", ca.certificate,
                "-to", "5", "-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", running.port,
            ],
            timeout=30,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_over_tls_an_institution_may_require_its_own_certificate(tls_broker, region):
    running, ca = tls_broker
    institution_update(institution=region.chu, dicom_tls_subject="chub-pacs", actor=SYSTEM, now=NOW)
    own, other = ca.issue("chub-pacs"), ca.issue("portmael-pacs")

    def echo(client):
        return run_tool(
            "echoscu",
            [
                "+tls", client.private_key, client.certificate, "+cf", ca.certificate,
                "-aet", "CHUB_PACS", "-aec", "RELAIS", "127.0.0.1", running.port,
            ],
        )  # fmt: skip

    assert echo(own).returncode == 0
    refused = echo(other)  # a certificate of the region's CA, but another archive's
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    (event,) = _refusals()
    assert event.details["reason"] == "tls-subject-mismatch"
    assert "portmael-pacs" in event.details["message"]
