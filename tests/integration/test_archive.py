"""The broker's clients of a hospital archive, over DICOMweb and DIMSE, against real peers.

Real Orthanc archives (tests/peers), a pynetdicom storage SCP as C-MOVE destination, and tiny
servers on 127.0.0.1 that misbehave on purpose (HTTP errors, a connection cut mid-answer, a
peer that never answers, an SCP that rejects the association). No mocks.
"""

from __future__ import annotations

import datetime as dt
import http.server
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from broker.dicom.archive import (
    ArchiveEndpoint,
    ArchiveNotFound,
    ArchiveProtocolError,
    ArchiveRefused,
    ArchiveTimeout,
    ArchiveUnreachable,
    DicomWebArchive,
    DimseArchive,
    MoveResult,
    Transport,
    archive_client,
)
from broker.dicom.kos import INS_NIA_OID, INS_NIR_OID, build_kos, parse_kos
from broker.dicom.multipart import MalformedMultipart, MultipartParts
from broker.dicom.network import NODELAY_HANDLERS, TLSFiles, tls_client_context, tls_server_context
from tests.peers.certificates import CertificateAuthority
from tests.peers.fixtures import BROKER_MODALITY, OrthancRegion
from tests.peers.orthanc import OrthancArchive, free_port
from tests.peers.studies import CHUB_AE, CHUB_NAME, SyntheticStudy

TRANSPORTS: list[Transport] = ["dicomweb", "dimse"]
NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)


def endpoint_of(archive: OrthancArchive, **changes: Any) -> ArchiveEndpoint:
    endpoint = ArchiveEndpoint(
        name=CHUB_NAME if archive.aet == CHUB_AE else archive.aet,
        ae_title=archive.aet,
        host="127.0.0.1",
        port=archive.dicom_port,
        dicomweb_url=f"{archive.dicomweb_url}/",
        calling_ae_title=BROKER_MODALITY,
        timeout=5.0,
    )
    return replace(endpoint, **changes)


@pytest.fixture
def chub(orthanc_region: OrthancRegion) -> OrthancArchive:
    return orthanc_region.archives[CHUB_AE]


@pytest.fixture(params=TRANSPORTS)
def client(request: pytest.FixtureRequest, chub: OrthancArchive) -> Iterator[Any]:
    """The CHU's archive, through each transport in turn."""
    with archive_client(endpoint_of(chub), request.param) as archive:
        yield archive


def studies_at(region: OrthancRegion, aet: str = CHUB_AE) -> list[SyntheticStudy]:
    return region.studies[aet]


def dupont_ct(region: OrthancRegion) -> SyntheticStudy:
    return studies_at(region)[0]


def dataset_of(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def pynetdicom_threads() -> set[threading.Thread]:
    return {
        thread
        for thread in threading.enumerate()
        if type(thread).__module__.startswith("pynetdicom") or thread.name.startswith("relais-")
    }


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --------------------------------------------------------------------------- choosing


def test_the_client_is_dicomweb_when_the_archive_has_a_url_else_dimse(
    chub: OrthancArchive,
) -> None:
    with archive_client(endpoint_of(chub)) as both:
        assert isinstance(both, DicomWebArchive)
        assert both.transport == "dicomweb"
    with archive_client(endpoint_of(chub, dicomweb_url="")) as dimse_only:
        assert isinstance(dimse_only, DimseArchive)
        assert dimse_only.transport == "dimse"


def test_asking_for_a_transport_the_archive_lacks_is_a_clear_value_error(
    chub: OrthancArchive,
) -> None:
    with pytest.raises(ValueError, match="no DICOMweb URL"):
        archive_client(endpoint_of(chub, dicomweb_url=""), "dicomweb")
    with pytest.raises(ValueError, match="no DIMSE AE title"):
        archive_client(endpoint_of(chub, ae_title=""), "dimse")
    with pytest.raises(ValueError, match="neither a DICOMweb URL nor a DIMSE"):
        archive_client(ArchiveEndpoint(name="Nowhere"))


# --------------------------------------------------------------------------- queries


def test_echo_succeeds(client: Any) -> None:
    client.echo()


def test_find_studies_lists_every_study_with_its_attributes_sorted_by_date(
    client: Any, orthanc_region: OrthancRegion
) -> None:
    expected = sorted(
        studies_at(orthanc_region), key=lambda s: (s.study_date, s.study_instance_uid)
    )

    found = client.find_studies()

    assert [s.study_instance_uid for s in found] == [s.study_instance_uid for s in expected]
    for summary, study in zip(found, expected, strict=True):
        assert summary.patient_id == study.patient_id
        assert summary.issuer_of_patient_id == study.issuer
        assert summary.study_date == study.study_date
        assert summary.study_time == study.study_time
        assert summary.accession_number == study.accession_number
        assert summary.study_description == study.description
        assert summary.modalities == (study.modality,)
        assert summary.number_of_series == len(study.series_uids)
        assert summary.number_of_instances == study.instance_count


def test_find_studies_within_a_date_range_open_or_closed(
    client: Any, orthanc_region: OrthancRegion
) -> None:
    studies = studies_at(orthanc_region)
    since, until = dt.date(2024, 9, 20), dt.date(2025, 11, 8)  # both ends are study dates

    def uids(found: list[Any]) -> set[str]:
        return {s.study_instance_uid for s in found}

    def expected(keep: Callable[[dt.date], bool]) -> set[str]:
        return {s.study_instance_uid for s in studies if keep(s.study_date)}

    assert uids(client.find_studies(since=since, until=until)) == expected(
        lambda d: since <= d <= until
    )
    assert uids(client.find_studies(since=since)) == expected(lambda d: d >= since)
    assert uids(client.find_studies(until=until)) == expected(lambda d: d <= until)
    assert client.find_studies(since=dt.date(2030, 1, 1)) == []
    with pytest.raises(ValueError, match="reversed"):
        client.find_studies(since=until, until=since)


def test_find_studies_of_one_patient(client: Any, orthanc_region: OrthancRegion) -> None:
    study = dupont_ct(orthanc_region)
    expected = {
        s.study_instance_uid for s in studies_at(orthanc_region) if s.patient_id == study.patient_id
    }

    found = client.find_studies(patient_id=study.patient_id)

    assert {s.study_instance_uid for s in found} == expected
    assert client.find_studies(patient_id="NOBODY-0000") == []
    with pytest.raises(ValueError, match="wildcards"):
        client.find_studies(patient_id="CHU*")


def test_qido_pages_through_studies_with_limit_and_offset(
    chub: OrthancArchive, orthanc_region: OrthancRegion
) -> None:
    with DicomWebArchive(endpoint_of(chub), page_size=2) as paged:
        found = paged.find_studies()

    assert len(found) == len(studies_at(orthanc_region))
    assert len({s.study_instance_uid for s in found}) == len(found)


# --------------------------------------------------------------------------- describe


def test_describe_study_gives_series_instances_and_patient_ready_for_a_manifest(
    client: Any, orthanc_region: OrthancRegion, chub: OrthancArchive
) -> None:
    study = dupont_ct(orthanc_region)

    described = client.describe_study(study.study_instance_uid)

    assert [s.series_instance_uid for s in described.series] == list(study.series_uids)
    for number, series in enumerate(described.series, start=1):
        assert series.modality == study.modality
        assert series.body_part == study.body_part
        assert [i.sop_instance_uid for i in series.instances] == list(
            study.sop_instance_uids(number)
        )
        assert {i.sop_class_uid for i in series.instances} == {study.sop_class_uid}
    patient = described.patient
    assert (patient.patient_id, patient.issuer, patient.issuer_oid) == (
        study.patient_id,
        study.issuer,
        study.issuer_oid,
    )
    assert (patient.family_name, patient.given_names) == (
        study.patient.family,
        study.patient.given,
    )
    assert (patient.birth_date, patient.sex) == (study.patient.birth_date, study.patient.sex)
    # The INS: from the WADO-RS metadata over DICOMweb; Orthanc also returns it to C-FIND.
    assert [(o.value, o.issuer_oid) for o in patient.other_ids] == [
        (study.patient.ins, INS_NIR_OID)
    ]
    assert described.accession_number == study.accession_number
    assert (described.study_date, described.study_time) == (study.study_date, study.study_time)
    assert described.study_description == study.description
    assert described.retrieve_ae_title == CHUB_AE
    assert described.retrieve_url == f"{chub.dicomweb_url}/studies/{study.study_instance_uid}"
    assert described.institution_name == CHUB_NAME

    manifest = parse_kos(build_kos(described, now=NOW))
    assert manifest.instance_count == study.instance_count
    assert manifest.patient == described.patient


def test_describe_study_reads_an_nia_and_a_patient_without_ins(
    client: Any, orthanc_region: OrthancRegion
) -> None:
    with_nia = next(s for s in studies_at(orthanc_region) if s.patient.ins_kind == "NIA")
    without_ins = next(s for s in studies_at(orthanc_region) if s.patient.ins is None)

    nia = client.describe_study(with_nia.study_instance_uid).patient
    none = client.describe_study(without_ins.study_instance_uid).patient

    assert [(o.value, o.issuer_oid) for o in nia.other_ids] == [(with_nia.patient.ins, INS_NIA_OID)]
    assert nia.family_name == "FRANÇOIS"
    assert none.other_ids == ()


def test_describe_study_over_dimse_only_has_no_retrieve_url(
    chub: OrthancArchive, orthanc_region: OrthancRegion
) -> None:
    study = dupont_ct(orthanc_region)
    with archive_client(endpoint_of(chub, dicomweb_url="")) as dimse:
        described = dimse.describe_study(study.study_instance_uid)
    assert (described.retrieve_ae_title, described.retrieve_url) == (CHUB_AE, None)


def test_describing_a_study_the_archive_does_not_hold_is_not_found(client: Any) -> None:
    with pytest.raises(ArchiveNotFound) as raised:
        client.describe_study("1.2.826.0.1.3680043.8.498.404")
    assert CHUB_NAME in raised.value.message
    assert "1.2.826.0.1.3680043.8.498.404" in raised.value.message
    assert raised.value.transport == client.transport
    assert not raised.value.retryable


def test_an_invalid_uid_is_the_callers_error(client: Any) -> None:
    with pytest.raises(ValueError, match="not a DICOM UID"):
        client.describe_study("../../instances")


# --------------------------------------------------------------------------- retrieve


def test_retrieve_streams_the_whole_study_as_the_archive_holds_it(
    client: Any, orthanc_region: OrthancRegion
) -> None:
    study = dupont_ct(orthanc_region)
    uploaded = {dataset_of(data).SOPInstanceUID: data for data in study.instances}

    received = list(client.retrieve(study.study_instance_uid))

    assert len(received) == study.instance_count
    by_uid = {dataset_of(data).SOPInstanceUID: data for data in received}
    assert by_uid.keys() == uploaded.keys()
    for uid, data in by_uid.items():
        if client.transport == "dicomweb":
            assert data == uploaded[uid]  # byte for byte, as stored (transfer-syntax=*)
        else:  # C-GET: the same dataset, under file meta that pynetdicom writes
            original, copy = dataset_of(uploaded[uid]), dataset_of(data)
            assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert copy.PixelData == original.PixelData
            assert copy == original


def test_retrieve_one_instance_and_one_series(client: Any, orthanc_region: OrthancRegion) -> None:
    study = dupont_ct(orthanc_region)
    sop_uid = study.sop_instance_uids(2)[3]

    (single,) = client.retrieve(study.study_instance_uid, sop_instance_uid=sop_uid)
    series = list(client.retrieve(study.study_instance_uid, study.series_uids[2]))

    assert dataset_of(single).SOPInstanceUID == sop_uid
    assert sorted(dataset_of(data).SOPInstanceUID for data in series) == sorted(
        study.sop_instance_uids(3)
    )


def test_retrieving_a_study_the_archive_does_not_hold_is_not_found(client: Any) -> None:
    with pytest.raises(ArchiveNotFound):
        list(client.retrieve("1.2.826.0.1.3680043.8.498.404"))


def test_closing_a_c_get_early_aborts_it_and_leaves_no_thread(
    chub: OrthancArchive, orthanc_region: OrthancRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.dicom.store_session import StoreSession

    aborted: list[StoreSession] = []
    abort = StoreSession.abort

    def spied(self: StoreSession, provider_reason: int | None = None) -> None:
        aborted.append(self)
        abort(self, provider_reason)

    monkeypatch.setattr(StoreSession, "abort", spied)
    study = dupont_ct(orthanc_region)
    before = pynetdicom_threads()
    with DimseArchive(endpoint_of(chub)) as dimse:
        stream = dimse.retrieve(study.study_instance_uid)
        first = next(stream)
        # the C-GET runs on this thread (StoreSession.c_get): no thread of its own
        assert not [t for t in threading.enumerate() if t.name.startswith("relais-cget")]
        stream.close()
        assert aborted
        assert all(session._socket is None for session in aborted)  # its connection closed

        assert dataset_of(first).StudyInstanceUID == study.study_instance_uid
        assert wait_until(lambda: not (pynetdicom_threads() - before))
        # The archive is none the worse for it.
        assert len(list(dimse.retrieve(study.study_instance_uid, study.series_uids[0]))) == 6


def test_closing_a_wado_retrieval_early_is_clean(
    chub: OrthancArchive, orthanc_region: OrthancRegion
) -> None:
    study = dupont_ct(orthanc_region)
    with DicomWebArchive(endpoint_of(chub)) as web:
        stream = web.retrieve(study.study_instance_uid)
        next(stream)
        stream.close()
        web.echo()


# --------------------------------------------------------------------------- C-MOVE


@contextmanager
def storage_scp(ae_title: str, port: int) -> Iterator[list[Dataset]]:
    """A pynetdicom storage SCP on 127.0.0.1:port; yields the datasets as they arrive."""
    received: list[Dataset] = []

    def handle_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[*NODELAY_HANDLERS, (evt.EVT_C_STORE, handle_store)],
    )
    try:
        yield received
    finally:
        server.shutdown()


def test_move_sends_a_study_to_the_destination(
    chub: OrthancArchive, orthanc_region: OrthancRegion
) -> None:
    study = dupont_ct(orthanc_region)
    with (
        storage_scp(BROKER_MODALITY, orthanc_region.broker_port) as received,
        DimseArchive(endpoint_of(chub)) as dimse,
    ):
        result = dimse.move(study.study_instance_uid, BROKER_MODALITY)
        series = dimse.move(study.study_instance_uid, BROKER_MODALITY, study.series_uids[1])

    assert result == MoveResult(completed=study.instance_count, failed=0, warning=0)
    assert series == MoveResult(completed=study.instances_per_series, failed=0, warning=0)
    assert len(received) == study.instance_count + study.instances_per_series
    assert {ds.SOPInstanceUID for ds in received} == {
        uid for number in (1, 2, 3) for uid in study.sop_instance_uids(number)
    }


def test_move_to_an_unknown_destination_fails_with_its_status(
    chub: OrthancArchive, orthanc_region: OrthancRegion
) -> None:
    study = dupont_ct(orthanc_region)
    with DimseArchive(endpoint_of(chub)) as dimse, pytest.raises(ArchiveProtocolError) as raised:
        dimse.move(study.study_instance_uid, "NOWHERE")
    # Orthanc answers 0xC000 (unable to process), not 0xA801 (move destination unknown).
    assert "C-MOVE" in raised.value.message
    assert "to NOWHERE failed with status 0xC000" in raised.value.message


def test_moving_a_study_the_archive_does_not_hold_is_not_found(chub: OrthancArchive) -> None:
    with DimseArchive(endpoint_of(chub)) as dimse, pytest.raises(ArchiveNotFound):
        dimse.move("1.2.826.0.1.3680043.8.498.404", BROKER_MODALITY)


# --------------------------------------------------------------------------- TCP_NODELAY
# With Nagle's algorithm on, each small PDU the broker sends waits ~40 ms for the archive's
# delayed ACK: a C-FIND or a C-MOVE request at a time. The sockets are the client's own.


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_the_pynetdicom_associations_to_an_archive_turn_nagle_off(chub: OrthancArchive) -> None:
    with DimseArchive(endpoint_of(chub)) as dimse:
        # What C-ECHO and C-MOVE associate with (their association lasts one operation).
        assoc, _watch = dimse._associate([build_context(Verification)], "C-ECHO")
        try:
            assert assoc.is_established
            assert _nodelay(assoc.dul.socket.socket) == 1
        finally:
            assoc.release()


def test_the_broker_s_own_associations_to_an_archive_turn_nagle_off(chub: OrthancArchive) -> None:
    with DimseArchive(endpoint_of(chub)) as dimse:
        dimse.find_studies()
        session = dimse._finder  # the C-FIND association kept open (a StoreSession)
        assert session is not None
        assert session.is_established
        assert session._socket is not None
        assert _nodelay(session._socket) == 1


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_archive_that_is_not_running_is_unreachable_at_once(transport: Transport) -> None:
    port = free_port()
    endpoint = ArchiveEndpoint(
        name="CH de Nulle-Part",
        ae_title="NOWHERE",
        host="127.0.0.1",
        port=port,
        dicomweb_url=f"http://127.0.0.1:{port}/dicom-web",
        timeout=1.0,
        retries=1,
    )
    started = time.monotonic()
    with (
        archive_client(endpoint, transport) as archive,
        pytest.raises(ArchiveUnreachable) as raised,
    ):
        archive.echo()
    assert time.monotonic() - started < 1.0
    assert raised.value.retryable
    assert raised.value.transport == transport
    assert "CH de Nulle-Part" in raised.value.message
    assert f"127.0.0.1:{port}" in raised.value.message


def test_an_unknown_calling_ae_may_echo_but_orthanc_aborts_its_queries(
    chub: OrthancArchive,
) -> None:
    """Orthanc (DicomAlwaysAllowEcho) accepts the association of an AE it does not know,
    answers C-ECHO, then aborts at the first C-FIND (PEERS.md trap 3)."""
    with DimseArchive(endpoint_of(chub, calling_ae_title="STRANGER")) as stranger:
        stranger.echo()
        with pytest.raises(ArchiveRefused) as raised:
            stranger.find_studies()
    assert "aborted the association during C-FIND" in raised.value.message
    assert not raised.value.retryable


def test_orthanc_accepts_any_called_ae_title_unless_told_to_check(
    chub: OrthancArchive, orthanc_region: OrthancRegion
) -> None:
    """DicomCheckCalledAet is off by default: a wrong called AE title is not noticed."""
    with DimseArchive(endpoint_of(chub, ae_title="NOT_CHUB")) as misnamed:
        misnamed.echo()
        assert len(misnamed.find_studies()) == len(studies_at(orthanc_region))


def test_a_rejected_association_is_refused_with_the_reason() -> None:
    ae = AE(ae_title="STRICT_PACS")
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=NODELAY_HANDLERS)
    try:
        endpoint = ArchiveEndpoint(name="Strict", ae_title="WRONG", host="127.0.0.1", port=port)
        with DimseArchive(endpoint) as archive, pytest.raises(ArchiveRefused) as raised:
            archive.echo()
    finally:
        server.shutdown()
    assert "rejected" in raised.value.message
    assert "Called AE title not recognised" in raised.value.message


@contextmanager
def tls_echo_scp(ca: CertificateAuthority) -> Iterator[int]:
    """A pynetdicom Verification SCP over TLS with a certificate of `ca`; yields its port."""
    issued = ca.issue("strict-pacs")
    context = tls_server_context(TLSFiles(issued.certificate, issued.private_key, ca.certificate))
    ae = AE(ae_title="TLS_PACS")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, ssl_context=context, evt_handlers=NODELAY_HANDLERS
    )
    try:
        yield port
    finally:
        server.shutdown()


def test_dicom_tls_with_the_regions_ca_and_refusals_without_it(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    broker = ca.issue("relais")
    trusted = tls_client_context(
        TLSFiles(broker.certificate, broker.private_key, ca.certificate),
        ca_certificates=ca.certificate,
    )
    stranger_ca = CertificateAuthority(tmp_path / "other-pki", name="Another CA")
    untrusting = tls_client_context(None, ca_certificates=stranger_ca.certificate)
    with tls_echo_scp(ca) as port:
        endpoint = ArchiveEndpoint(
            name="Secure", ae_title="TLS_PACS", host="127.0.0.1", port=port, timeout=2.0
        )
        with DimseArchive(replace(endpoint, tls=trusted)) as secure:
            secure.echo()
        with (
            DimseArchive(replace(endpoint, tls=untrusting)) as suspicious,
            pytest.raises(ArchiveUnreachable, match="TLS handshake"),
        ):
            suspicious.echo()
        with DimseArchive(endpoint) as plain, pytest.raises(ArchiveUnreachable) as raised:
            plain.echo()
    assert "closed the connection during negotiation" in raised.value.message


@contextmanager
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    with closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_archive_that_never_answers_times_out(transport: Transport) -> None:
    with silent_listener() as port:
        endpoint = ArchiveEndpoint(
            name="Muet",
            ae_title="MUTE",
            host="127.0.0.1",
            port=port,
            dicomweb_url=f"http://127.0.0.1:{port}",
            timeout=0.3,
            retries=0,
        )
        with (
            archive_client(endpoint, transport) as archive,
            pytest.raises(ArchiveTimeout) as raised,
        ):
            archive.echo()
    assert "0.3 s" in raised.value.message
    assert raised.value.retryable


# --------------------------------------------------------------------------- HTTP faults

Reply = Callable[[http.server.BaseHTTPRequestHandler], None]


@contextmanager
def scripted_http(*replies: Reply) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 answering each request with the next reply (the last one
    again once the script is done); yields its base URL and the paths it was asked for."""
    asked: list[str] = []
    script = list(replies)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            asked.append(self.path)
            reply = script.pop(0) if len(script) > 1 else script[0]
            reply(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", asked
    finally:
        server.shutdown()
        server.server_close()


def status(code: int, body: bytes = b"", **headers: str) -> Reply:
    def reply(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        handler.wfile.write(body)

    return reply


def cut(headers: dict[str, str], body: bytes) -> Reply:
    """Send the headers and the start of a body, then close the connection."""

    def reply(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    return reply


def dribble(content_type: str, body: bytes, size: int = 7) -> Reply:
    """A body without Content-Length, in small writes, ended by closing the connection."""

    def reply(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Connection", "close")
        handler.end_headers()
        for start in range(0, len(body), size):
            handler.wfile.write(body[start : start + size])
            handler.wfile.flush()
        handler.close_connection = True

    return reply


def web_archive(url: str, **changes: Any) -> DicomWebArchive:
    return DicomWebArchive(ArchiveEndpoint(name="Faulty", dicomweb_url=url, **changes))


EMPTY_JSON = {"Content_Type": "application/dicom+json"}


def test_503_and_502_are_retried_honouring_retry_after() -> None:
    with scripted_http(
        status(503, Retry_After="0"), status(502), status(200, b"[]", **EMPTY_JSON)
    ) as (url, asked):
        started = time.monotonic()
        with web_archive(url, retries=3) as archive:
            assert archive.find_studies() == []
    assert len(asked) == 3
    assert time.monotonic() - started < 1.5  # 0 s, then one short backoff


def test_a_long_retry_after_is_not_waited_for_here_but_left_to_the_caller() -> None:
    with (
        scripted_http(status(503, Retry_After="3600")) as (url, asked),
        web_archive(url, retries=3) as archive,
        pytest.raises(ArchiveProtocolError) as raised,
    ):
        archive.echo()
    assert len(asked) == 1
    assert "Retry-After 3600 s" in raised.value.message
    assert raised.value.retryable


def test_a_500_is_not_retried_and_says_what_the_archive_said() -> None:
    with (
        scripted_http(status(500, b'{"Message": "Database locked"}')) as (url, asked),
        web_archive(url) as archive,
        pytest.raises(ArchiveProtocolError) as raised,
    ):
        archive.find_studies()
    assert len(asked) == 1
    assert "HTTP 500" in raised.value.message
    assert "Database locked" in raised.value.message
    assert not raised.value.retryable


def test_retries_stop_after_the_configured_number() -> None:
    with (
        scripted_http(status(503, Retry_After="0")) as (url, asked),
        web_archive(url, retries=2) as archive,
        pytest.raises(ArchiveProtocolError) as raised,
    ):
        archive.echo()
    assert len(asked) == 3
    assert raised.value.retryable


def test_http_401_is_refused_and_404_not_found() -> None:
    with (
        scripted_http(status(401), status(404)) as (url, _asked),
        web_archive(url) as archive,
    ):
        with pytest.raises(ArchiveRefused, match="HTTP 401"):
            archive.echo()
        with pytest.raises(ArchiveNotFound, match="HTTP 404"):
            archive.describe_study("1.2.3")


def test_a_connection_cut_in_a_json_answer_is_retried_then_reported() -> None:
    with (
        scripted_http(cut({"Content-Length": "1000"}, b"[{")) as (url, asked),
        web_archive(url, retries=1) as archive,
        pytest.raises(ArchiveProtocolError) as raised,
    ):
        archive.find_studies()
    assert len(asked) == 2
    assert "closed the connection" in raised.value.message
    assert raised.value.retryable


def multipart(
    boundary: bytes, parts: list[bytes], *, lengths: bool, preamble: bytes = b""
) -> bytes:
    body = preamble
    for part in parts:
        body += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n"
        if lengths:
            body += f"Content-Length: {len(part)}\r\n".encode()
        body += b"\r\n" + part + b"\r\n"
    return body + b"--" + boundary + b"--\r\n"


class Arrivals(io.RawIOBase):
    """A raw stream handing out `body` in the pieces `cuts` make, as a socket would."""

    def __init__(self, body: bytes, cuts: list[int]) -> None:
        self.body, self.at = body, 0
        self.ends = [*sorted({c % (len(body) + 1) for c in cuts if c}), len(body)]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.ends and self.ends[0] <= self.at:
            self.ends.pop(0)
        end = min(self.ends[0] if self.ends else len(self.body), self.at + len(buffer))
        size = end - self.at
        buffer[:size] = self.body[self.at : end]
        self.at = end
        return size


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(
        st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\r\n--q", b"\r\n-q")),
        min_size=1,
        max_size=5,
    ),
    lengths=st.sampled_from(["given", "absent", "one too short", "one too long"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    buffer_size=st.sampled_from([1, 7, 64, 8192]),
    preamble=st.sampled_from([b"", b"\r\n", b"preamble\r\n", b"a long line " * 2000 + b"\r\n"]),
)
def test_the_multipart_reader_finds_the_same_parts_however_the_bytes_arrive(
    parts: list[bytes], lengths: str, cuts: list[int], buffer_size: int, preamble: bytes
) -> None:
    """Parts may hold CRLF, "--" and most of the boundary; a wrong Content-Length is caught."""
    boundary = b"q:b"
    body = preamble
    for part in parts:
        body += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n"
        declared = {"given": 0, "one too short": -1, "one too long": 1}.get(lengths)
        if declared is not None:
            body += f"Content-Length: {len(part) + declared}\r\n".encode()
        body += b"\r\n" + part + b"\r\n"
    body += b"--" + boundary + b"--\r\nepilogue"
    reader = MultipartParts(io.BufferedReader(Arrivals(body, cuts), buffer_size), boundary)

    assert list(reader) == parts
    assert reader.finished


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\r\n--q", b"\r\n-q")),
        min_size=1,
        max_size=5,
    ),
    lengths=st.lists(
        st.sampled_from(["given", "absent", "one too short", "one too long"]),
        min_size=5,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    buffer_size=st.sampled_from([1, 7, 64, 8192]),
    head_size=st.sampled_from([1, 5, 4096]),
    takes=st.lists(
        st.sampled_from(["read", "buffered, then the raw stream", "leave"]),
        min_size=5,
        max_size=5,
    ),
)
def test_pending_parts_give_the_same_bodies_however_the_rest_is_taken(
    parts: list[bytes],
    lengths: list[str],
    cuts: list[int],
    buffer_size: int,
    head_size: int,
    takes: list[str],
) -> None:
    """`MultipartParts.pending`: the head, what the stream read ahead and the rest taken from
    under it (as the gateway's splice does) make the part; a part left unread is skipped; a
    wrong length is caught (no search: the bytes may be gone), by `boundary_follows` for a
    part taken."""
    boundary = b"q:b"
    body = b""
    for part, length in zip(parts, lengths, strict=False):
        body += b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n"
        declared = {"given": 0, "one too short": -1, "one too long": 1}.get(length)
        if declared is not None:
            body += f"Content-Length: {len(part) + declared}\r\n".encode()
        body += b"\r\n" + part + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    raw = Arrivals(body, cuts)
    reader = MultipartParts(io.BufferedReader(raw, buffer_size), boundary)
    lying = any(length.startswith("one") for length in lengths[: len(parts)])
    got: list[bytes | None] = []
    try:
        for part, take in zip(reader.pending(head_size), takes, strict=False):
            if take == "leave":
                got.append(None)
                continue
            whole = part.head
            if take == "read":
                while piece := part.read_rest(7):
                    whole += piece
            else:
                whole += part.take_buffered()
                while part.unread:  # past the buffered reader, as splice(2) reads the socket
                    piece = raw.read(part.unread)
                    assert piece, "the stream ended inside the part"
                    part.consumed(len(piece))
                    whole += piece
            assert part.unread == 0
            assert len(whole) == part.length
            if not part.boundary_follows():
                assert lying
                return
            got.append(whole)
    except MalformedMultipart:
        assert lying
        return
    assert not lying
    assert reader.finished
    expected = zip(parts, takes[: len(parts)], strict=True)
    assert got == [None if take == "leave" else part for part, take in expected]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"--q:b\r\nContent-Type: text/plain\r\n\r\nx\r\n--q:b--", "not application/dicom"),
        (b"--q:b\r\nContent-Length: -1\r\n\r\nx\r\n--q:b--", "invalid part Content-Length"),
        (b"--q:b\r\nno colon\r\n\r\nx\r\n--q:b--", "malformed part header"),
        (b"--q:b\r\n\r\n\r\n--q:b--", "part 1 is empty"),
        (b"--q:bX\r\n\r\nx\r\n--q:b--", "unexpected bytes after a boundary"),
        (b"--q:b\r\n" + b"X-Long: " + b"y" * 17000 + b"\r\n\r\nx\r\n--q:b--", "too long"),
    ],
)
def test_a_malformed_multipart_body_is_named(body: bytes, error: str) -> None:
    with pytest.raises(MalformedMultipart, match=error):
        list(MultipartParts(io.BufferedReader(io.BytesIO(body)), b"q:b"))


def test_a_lying_content_length_costs_memory_only_as_the_bytes_arrive() -> None:
    """A part claiming gigabytes is read in bounded pieces, then found cut short; one
    claiming more than an instance may be is refused at once; so is a part without length
    that never ends, and a preamble that never does."""
    body = b"--q:b\r\nContent-Length: 3000000000\r\n\r\nDICM"
    reader = MultipartParts(io.BufferedReader(io.BytesIO(body)), b"q:b")
    with pytest.raises(MalformedMultipart, match="cut"):
        list(reader)
    assert reader.where == "in the middle of instance 1"
    body = b"--q:b\r\nContent-Length: 999999999999\r\n\r\nDICM"
    with pytest.raises(MalformedMultipart, match="a part of 999999999999 bytes"):
        list(MultipartParts(io.BufferedReader(io.BytesIO(body)), b"q:b"))
    body = b"--q:b\r\n\r\n" + b"x" * 5000
    with pytest.raises(MalformedMultipart, match="larger than 1000 bytes"):
        list(MultipartParts(io.BufferedReader(io.BytesIO(body)), b"q:b", max_part_bytes=1000))
    body = b"preamble line\r\n" * 80_000
    with pytest.raises(MalformedMultipart, match="no boundary in the first MiB"):
        list(MultipartParts(io.BufferedReader(io.BytesIO(body)), b"q:b"))


def test_an_overstated_length_on_the_last_part_is_found_out() -> None:
    body = b"--b\r\nContent-Length: 100\r\n\r\n" + b"x" * 32 + b"\r\n--b--\r\n"
    assert list(MultipartParts(io.BufferedReader(io.BytesIO(body)), b"b")) == [b"x" * 32]


def test_wado_multipart_is_parsed_as_it_dribbles_in_until_the_connection_closes() -> None:
    # Parts that look like boundaries without being one, a quoted boundary, a preamble.
    boundary = b"a:b c"
    parts = [b"DICM\r\n--a:b" + bytes(range(256)) * 3, b"\r\n--a:b X", b"x" * 5000]
    content_type = 'multipart/related; type="application/dicom"; boundary="a:b c"'
    body = multipart(boundary, parts, lengths=False, preamble=b"ignored\r\n")
    with (
        scripted_http(dribble(content_type, body)) as (url, _asked),
        web_archive(url) as archive,
    ):
        assert list(archive.retrieve("1.2.3", "1.2.3.4")) == parts


def test_wado_multipart_with_part_lengths_and_an_unquoted_boundary() -> None:
    parts = [b"A" * 70000, b"B" * 3]
    body = multipart(b"xyz", parts, lengths=True)
    reply = dribble("multipart/related; boundary=xyz; type=application/dicom", body, 4096)
    with scripted_http(reply) as (url, _asked), web_archive(url) as archive:
        assert list(archive.retrieve("1.2.3")) == parts


def test_a_wado_answer_cut_mid_instance_yields_what_was_whole_then_fails() -> None:
    parts = [b"first instance", b"second instance, never finished"]
    body = multipart(b"xyz", parts, lengths=True)[:-40]
    reply = cut({"Content-Type": 'multipart/related; boundary="xyz"'}, body)
    with scripted_http(reply) as (url, asked), web_archive(url, retries=3) as archive:
        stream = archive.retrieve("1.2.3")
        assert next(stream) == parts[0]
        with pytest.raises(ArchiveProtocolError) as raised:
            next(stream)
    assert len(asked) == 1  # a streaming retrieval is never restarted behind the consumer
    assert "cut short in the middle of instance 2" in raised.value.message
    assert raised.value.retryable


def test_a_wado_answer_that_is_not_multipart_is_a_protocol_error() -> None:
    with (
        scripted_http(status(200, b"{}", Content_Type="application/json")) as (url, _asked),
        web_archive(url) as archive,
        pytest.raises(ArchiveProtocolError, match="multipart"),
    ):
        list(archive.retrieve("1.2.3"))


def test_a_wado_retrieval_is_retried_before_its_answer_and_fails_with_typed_errors() -> None:
    def hang_up(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    parts = [b"instance"]
    content_type = 'multipart/related; type="application/dicom"; boundary="xyz"'
    answer = dribble(content_type, multipart(b"xyz", parts, lengths=True), 4096)
    with (
        scripted_http(status(503, Retry_After="0"), hang_up, answer) as (url, asked),
        web_archive(url, retries=2) as archive,
    ):
        assert list(archive.retrieve("1.2.3")) == parts
    assert asked == ["/dicom-web/studies/1.2.3"] * 3
    with (
        scripted_http(status(404, b"Unknown study")) as (url, asked),
        web_archive(url, retries=2) as archive,
        pytest.raises(ArchiveNotFound, match="HTTP 404 Not Found: Unknown study"),
    ):
        list(archive.retrieve("1.2.3"))
    with (
        scripted_http(status(503, Retry_After="0")) as (url, asked),
        web_archive(url, retries=1) as archive,
        pytest.raises(ArchiveProtocolError, match="HTTP 503") as raised,
    ):
        list(archive.retrieve("1.2.3"))
    assert len(asked) == 2
    assert raised.value.retryable


def test_a_wado_retrieval_from_an_archive_down_or_silent() -> None:
    port = free_port()
    with (
        web_archive(f"http://127.0.0.1:{port}/dicom-web", retries=0) as archive,
        pytest.raises(ArchiveUnreachable, match="cannot connect"),
    ):
        list(archive.retrieve("1.2.3"))
    with (
        silent_listener() as port,
        web_archive(f"http://127.0.0.1:{port}", retries=0, timeout=0.3) as archive,
        pytest.raises(ArchiveTimeout, match=r"no answer within 0\.3 s") as raised,
    ):
        list(archive.retrieve("1.2.3"))
    assert raised.value.retryable


def test_a_wado_answer_that_stalls_mid_instance_times_out() -> None:
    def stall(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", 'multipart/related; boundary="xyz"')
        handler.end_headers()
        handler.wfile.write(b"--xyz\r\nContent-Length: 100\r\n\r\nDICM")
        handler.wfile.flush()
        time.sleep(1.0)

    with (
        scripted_http(stall) as (url, _asked),
        web_archive(url, retries=3, timeout=0.3) as archive,
        pytest.raises(ArchiveTimeout, match=r"no answer within 0\.3 s"),
    ):
        list(archive.retrieve("1.2.3"))


def test_the_client_asks_for_no_compression_and_keeps_the_connection(
    chub: OrthancArchive,
) -> None:
    seen: list[tuple[dict[str, str], int]] = []

    def echo_headers(handler: http.server.BaseHTTPRequestHandler) -> None:
        seen.append((dict(handler.headers), handler.client_address[1]))
        status(200, b"[]", **EMPTY_JSON)(handler)

    with scripted_http(echo_headers) as (url, _asked), web_archive(url) as archive:
        archive.echo()
        archive.echo()
    (first, first_port), (_second, second_port) = seen
    assert first["Accept-Encoding"] == "identity"
    assert first["Accept"] == "application/dicom+json"
    assert first_port == second_port  # one connection, kept alive
    with httpx.Client(trust_env=False) as plain:  # and Orthanc does not gzip when not asked
        response = plain.get(
            f"{chub.dicomweb_url}/studies", headers={"Accept-Encoding": "identity"}
        )
    assert "content-encoding" not in response.headers


def test_describing_a_study_asks_for_no_empty_page_when_its_count_is_known() -> None:
    rows = [
        {
            "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00080018": {"vr": "UI", "Value": [f"1.2.3.4.{n}"]},
            "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
            "00100020": {"vr": "LO", "Value": ["CHU1"]},
        }
        for n in (1, 2)
    ]
    metadata = [{**rows[0], "00100010": {"vr": "PN", "Value": [{"Alphabetic": "A^B"}]}}]
    pages = [json.dumps(rows).encode(), json.dumps(metadata).encode()]
    with (
        scripted_http(*(status(200, page, **EMPTY_JSON) for page in pages)) as (url, asked),
        web_archive(url) as archive,
    ):
        described = archive.describe_study("1.2.3", expected_instances=2)
    assert len(asked) == 2  # the instances, then one instance's metadata
    assert [s.series_instance_uid for s in described.series] == ["1.2.3.4"]
    with (
        scripted_http(
            *(status(200, page, **EMPTY_JSON) for page in [pages[0], b"[]", pages[1]])
        ) as (url, asked),
        web_archive(url) as archive,
    ):
        archive.describe_study("1.2.3", expected_instances=3)  # the study changed: page on
    assert len(asked) == 3


def test_an_archive_seen_capping_pages_is_always_paged_to_the_end() -> None:
    def rows(first: int, count: int) -> bytes:
        return json.dumps(
            [
                {
                    "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00080018": {"vr": "UI", "Value": [f"1.2.3.4.{n}"]},
                    "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
                    "00100020": {"vr": "LO", "Value": ["CHU1"]},
                }
                for n in range(first, first + count)
            ]
        ).encode()

    metadata = status(200, rows(0, 1), **EMPTY_JSON)
    script = [
        # a first study of 5 instances, the archive capping pages at 3: learnt
        status(200, rows(0, 3), **EMPTY_JSON),
        status(200, rows(3, 2), **EMPTY_JSON),
        status(200, b"[]", **EMPTY_JSON),
        metadata,
        # a second study whose listing (stale) said 3: a page of 3 is not taken as the end
        status(200, rows(10, 3), **EMPTY_JSON),
        status(200, rows(13, 1), **EMPTY_JSON),
        status(200, b"[]", **EMPTY_JSON),
        metadata,
    ]
    with scripted_http(*script) as (url, asked), web_archive(url) as archive:
        archive.describe_study("1.2.3", expected_instances=5)
        second = archive.describe_study("1.2.4", expected_instances=3)
    assert len(asked) == 8
    assert sum(len(series.instances) for series in second.series) == 4


def test_a_wado_retrieval_over_https_checks_the_archive_certificate(tmp_path: Path) -> None:
    """http.client, as httpx: the certificate checked against the trusted CAs; an archive
    whose CA is not trusted cannot be reached, one whose CA is gives its instances."""
    import ssl

    authority = CertificateAuthority(tmp_path / "ca")
    issued = authority.issue("127.0.0.1")
    parts = [b"instance over TLS"]
    content_type = 'multipart/related; type="application/dicom"; boundary="xyz"'
    reply = dribble(content_type, multipart(b"xyz", parts, lengths=True), 4096)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            reply(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(issued.certificate, issued.private_key)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        with (
            web_archive(url, retries=0) as archive,
            pytest.raises(ArchiveUnreachable, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            list(archive.retrieve("1.2.3"))
        # The region's CA trusted (RELAIS_ARCHIVE_HTTPS_CA), besides the system's.
        with web_archive(url, retries=0, https_ca=str(authority.certificate)) as archive:
            assert list(archive.retrieve("1.2.3")) == parts
        with web_archive(url, retries=0) as archive, pytest.raises(ArchiveUnreachable):
            list(archive.retrieve("1.2.3"))  # the other clients still trust the system's only
    finally:
        server.shutdown()
        server.server_close()


def test_the_region_s_https_ca_is_given_to_every_archive_client(settings: Any, tmp_path: Path):
    """RELAIS_ARCHIVE_HTTPS_CA reaches the endpoint of every institution's archive."""
    from broker.archives import institution_endpoint
    from broker.models import Institution

    ca = tmp_path / "region-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    institution = Institution(name="CHU", finess="350000001", dicomweb_url="https://pacs/dw")
    settings.RELAIS_ARCHIVE_HTTPS_CA = ca
    assert institution_endpoint(institution).https_ca == str(ca)
    settings.RELAIS_ARCHIVE_HTTPS_CA = None
    assert institution_endpoint(institution).https_ca == ""
