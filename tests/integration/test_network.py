"""The associations the broker requests: their reactor thread cannot take the response to a
request (pynetdicom 3.0's pause race, `network.PauseSafeAssociation`); the C-MOVE relay's
association to a destination (`store_session.StoreSession`), against pynetdicom's SCP."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from broker.dicom import network
from broker.dicom.archive import (
    RETRIEVE_SYNTAXES,
    ArchiveEndpoint,
    ArchiveError,
    ArchiveProtocolError,
    ArchiveRefused,
    DimseArchive,
)
from broker.dicom.network import (
    NODELAY_HANDLERS,
    EncodedInstance,
    PauseSafeAssociation,
    RelaisAE,
    command_set,
    us_value,
)
from broker.dicom.part10 import FileMeta, file_meta
from broker.dicom.store_session import (
    StoreSession,
    StoreSessionError,
    StoreSessionProtocolError,
)


@pytest.fixture
def echo_port() -> Iterator[int]:
    scp = AE(ae_title="ECHO")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=NODELAY_HANDLERS)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def associate(port: int) -> PauseSafeAssociation:
    ae = RelaisAE(ae_title="RELAIS")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", port, evt_handlers=NODELAY_HANDLERS)
    assert assoc.is_established
    assert isinstance(assoc, PauseSafeAssociation)
    return assoc


class AlwaysAwake(threading.Event):
    """A checkpoint whose wait never blocks: the reactor as it is when the previous request's
    `set()` has just woken it, and a new request clears the checkpoint."""

    def wait(self, timeout: float | None = None) -> bool:
        return True


def test_a_reactor_that_is_awake_takes_nothing_while_a_request_holds_the_association(
    echo_port: int,
) -> None:
    assoc = associate(echo_port)
    try:
        assoc._reactor_checkpoint = AlwaysAwake()
        assoc._reactor_checkpoint.set()
        assoc._reactor_checkpoint.clear()  # a request begins: pynetdicom waits for the pause
        assert assoc._is_paused  # at once, though the reactor keeps running
        response = C_ECHO()
        response.MessageIDBeingRespondedTo = 1
        response.Status = 0x0000
        assoc.dimse.msg_queue.put((1, response))  # the request's response arrives
        time.sleep(0.05)  # the reactor loops about fifty times meanwhile
        assert assoc.dimse.msg_queue.qsize() == 1  # still there for the request
        assoc._reactor_checkpoint.set()  # the request is over: the reactor reads again
        deadline = time.monotonic() + 2
        while assoc.dimse.msg_queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert assoc.dimse.msg_queue.qsize() == 0  # so the check above could have failed
    finally:
        assoc._reactor_checkpoint = threading.Event()
        assoc._reactor_checkpoint.set()
        assoc.release()


def test_many_requests_on_one_association_lose_no_response(echo_port: int) -> None:
    assoc = associate(echo_port)
    try:
        statuses = [assoc.send_c_echo() for _ in range(300)]
    finally:
        assoc.release()
    assert all(status and status.Status == 0x0000 for status in statuses)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_association_s_threads_wake_for_their_work_not_their_clock(
    echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ends' DUL and reactor threads sleep until they have work: with their turn at a
    minute, requests are still answered and the association released at once, its threads
    ended (they would wait for the turn, and the requests time out after 2 s)."""
    monkeypatch.setattr(network, "WAKING_TURN", 60.0)
    threads = threading.active_count()
    started = time.monotonic()
    assoc = associate(echo_port)
    statuses = [assoc.send_c_echo() for _ in range(20)]
    assoc.release()
    assert all(status and status.Status == 0x0000 for status in statuses)
    while threading.active_count() > threads and time.monotonic() - started < 10:
        time.sleep(0.01)  # the accepting end's threads end as it answers the release
    assert threading.active_count() == threads
    assert time.monotonic() - started < 10


def test_requests_that_arrive_together_are_each_answered_without_waiting_for_a_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accepting reactor takes one message a turn: three requests queued while its
    handler works are answered one after the other, not one a turn (a minute here)."""
    monkeypatch.setattr(network, "WAKING_TURN", 60.0)

    def slow_echo(event: Any) -> int:
        time.sleep(0.2)
        return 0x0000

    scp = AE(ae_title="ECHO")
    scp.add_supported_context(Verification)
    server = scp.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[*NODELAY_HANDLERS, (evt.EVT_C_ECHO, slow_echo)],
    )
    try:
        assoc = associate(server.server_address[1])
        context_id = assoc.accepted_contexts[0].context_id
        assoc._reactor_checkpoint.clear()  # this thread reads the responses itself
        started = time.monotonic()
        for message_id in (1, 2, 3):  # sent back to back, as a pipelining peer does
            request = C_ECHO()
            request.MessageID = message_id
            request.AffectedSOPClassUID = Verification
            assoc.dimse.send_msg(request, context_id)
        answered = [assoc.dimse.get_msg(block=True)[1] for _ in range(3)]
        elapsed = time.monotonic() - started
        assoc._reactor_checkpoint.set()
        assoc.release()
    finally:
        server.shutdown()
    assert [response.MessageIDBeingRespondedTo for response in answered] == [1, 2, 3]
    assert all(response.Status == 0x0000 for response in answered)
    assert elapsed < 10


def test_an_accepted_association_released_from_another_thread_does_not_wait_for_a_turn(
    echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request from another thread waits for the reactor to park: beginning it wakes the
    reactor (the turn is a minute here; the release would wait for it)."""
    monkeypatch.setattr(network, "WAKING_TURN", 60.0)
    assoc = associate(echo_port)
    deadline = time.monotonic() + 5
    accepted: list[Any] = []
    while not accepted and time.monotonic() < deadline:
        accepted = [
            thread
            for thread in threading.enumerate()
            if isinstance(thread, Association) and thread.is_acceptor and thread.is_established
        ]
        time.sleep(0.01)
    (acceptor,) = accepted
    started = time.monotonic()
    acceptor.release()
    elapsed = time.monotonic() - started
    while not assoc.is_released and time.monotonic() < deadline + 10:
        time.sleep(0.01)
    assert acceptor.is_released
    assert assoc.is_released  # the requesting end answered the release
    assert elapsed < 10


def test_an_association_s_wake_up_sockets_close_as_it_ends(echo_port: int) -> None:
    threads = threading.active_count()
    associate(echo_port).release()  # pynetdicom's first association opens what it keeps
    before = open_descriptors()
    for _ in range(10):
        associate(echo_port).release()
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    # no garbage collection asked for: each association's pairs close as its threads end
    assert open_descriptors() <= before


def part10(
    transfer_syntax: str = ExplicitVRLittleEndian, pixel_data: bytes = bytes(range(256)) * 32
) -> tuple[bytes, FileMeta]:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "CHU0012345"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixel_data
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    meta = file_meta(data)
    assert meta is not None
    return data, meta


@contextmanager
def store_scp(
    *syntaxes: str, max_pdu: int = 16384, answer: int | str = 0x0000
) -> Iterator[tuple[int, list[Any]]]:
    """A storage SCP accepting CT images in these transfer syntaxes; yields its port and
    what it received: (transfer syntax, the data set's bytes as they came, (originator AE,
    originator message ID)). It answers `answer`, or aborts the association ("abort")."""
    received: list[Any] = []

    def on_store(event: Any) -> Any:
        if answer == "abort":
            event.assoc.abort()
            return 0x0000
        request = event.request
        received.append(
            (
                event.context.transfer_syntax,
                request.DataSet.getvalue(),
                (request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID),
            )
        )
        if answer == 0x0000:
            return 0x0000
        status = Dataset()
        status.Status = answer
        status.ErrorComment = "disk full"
        return status

    ae = AE(ae_title="STORE")
    ae.require_called_aet = True
    ae.maximum_pdu_size = max_pdu
    ae.add_supported_context(CTImageStorage, list(syntaxes))
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[*NODELAY_HANDLERS, (evt.EVT_C_STORE, on_store)],
    )
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


def session(port: int, *syntaxes: str, called: str = "STORE", **timeouts: Any) -> StoreSession:
    context = build_context(CTImageStorage, list(syntaxes or RETRIEVE_SYNTAXES[:4]))
    return StoreSession.open(
        "127.0.0.1",
        port,
        calling_ae_title="RELAIS",
        called_ae_title=called,
        contexts=[context],
        **timeouts,
    )


def store(port: int, instance: Dataset, *syntaxes: str) -> Dataset:
    assoc = session(port, *(syntaxes or (ExplicitVRLittleEndian, ImplicitVRLittleEndian)))
    assert assoc.is_established, assoc.rejection
    try:
        return assoc.send_c_store(instance, msg_id=7, originator_aet="PM_PACS", originator_id=3)
    finally:
        assoc.release()


@pytest.mark.parametrize("max_pdu", [16384, 4096, 0])
def test_an_instance_is_sent_as_stored_in_pdus_the_peer_accepts(max_pdu: int) -> None:
    data, meta = part10()
    with store_scp(ExplicitVRLittleEndian, max_pdu=max_pdu) as (port, received):
        status = store(port, EncodedInstance(data, meta))
    assert status.Status == 0x0000
    ((syntax, dataset, originator),) = received
    assert syntax == ExplicitVRLittleEndian
    assert dataset == data[meta.dataset_offset :]  # byte for byte, not re-encoded
    assert originator == ("PM_PACS", 3)


def test_an_instance_the_peer_takes_only_in_another_syntax_is_converted() -> None:
    data, meta = part10()
    with store_scp(ImplicitVRLittleEndian) as (port, received):
        status = store(port, EncodedInstance(data, meta))
    assert status.Status == 0x0000
    ((syntax, dataset, _),) = received
    assert syntax == ImplicitVRLittleEndian
    original = dcmread(io.BytesIO(data))
    copy = read_dataset(io.BytesIO(dataset), is_implicit_VR=True, is_little_endian=True)
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    assert copy.PixelData == original.PixelData


def test_a_decoded_dataset_is_encoded_for_the_destination() -> None:
    data, _meta = part10()
    original = dcmread(io.BytesIO(data))
    with store_scp(ImplicitVRLittleEndian) as (port, received):
        status = store(port, original)
    assert status.Status == 0x0000
    ((_, dataset, _),) = received
    copy = read_dataset(io.BytesIO(dataset), is_implicit_VR=True, is_little_endian=True)
    assert copy.PixelData == original.PixelData


def test_a_compressed_instance_the_peer_does_not_take_fails_alone() -> None:
    data, meta = part10()
    compressed = EncodedInstance(data, replace(meta, transfer_syntax_uid=JPEG2000Lossless))
    with store_scp(ExplicitVRLittleEndian) as (port, received):
        assoc = session(port, ExplicitVRLittleEndian, JPEG2000Lossless)
        try:
            with pytest.raises(ValueError, match="does not accept"):
                assoc.send_c_store(compressed)
            assert assoc.is_established  # nothing was sent: the next instance goes
            assert assoc.send_c_store(EncodedInstance(data, meta)).Status == 0x0000
        finally:
            assoc.release()
    assert len(received) == 1


def test_an_empty_data_set_is_refused_without_sending() -> None:
    data, meta = part10()
    empty = data[: meta.dataset_offset]
    with store_scp(ExplicitVRLittleEndian) as (port, received):
        assoc = session(port, ExplicitVRLittleEndian)
        try:
            with pytest.raises(ValueError, match="empty data set"):
                assoc.send_c_store(EncodedInstance(empty, meta))
            assert assoc.is_established
            assert assoc.failures == 1
        finally:
            assoc.release()
    assert received == []


def test_a_deflated_instance_is_inflated_for_a_destination_that_does_not_take_it() -> None:
    data, _meta = part10(DeflatedExplicitVRLittleEndian)
    meta = file_meta(data)
    assert meta is not None
    assert meta.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    with store_scp(ExplicitVRLittleEndian) as (port, received):
        status = store(port, EncodedInstance(data, meta), ExplicitVRLittleEndian)
    assert status.Status == 0x0000
    ((syntax, dataset, _),) = received
    assert syntax == ExplicitVRLittleEndian
    copy = read_dataset(io.BytesIO(dataset), is_implicit_VR=False, is_little_endian=True)
    assert copy.PixelData == dcmread(io.BytesIO(data)).PixelData


def test_a_failure_status_comes_back_with_its_comment() -> None:
    data, meta = part10()
    with store_scp(ExplicitVRLittleEndian, answer=0xA700) as (port, _received):
        status = store(port, EncodedInstance(data, meta))
    assert status.Status == 0xA700
    assert status.ErrorComment == "disk full"


def test_the_session_counts_what_the_destination_took_and_refused() -> None:
    data, meta = part10()
    with store_scp(ExplicitVRLittleEndian, answer=0xA700) as (port, _received):
        assoc = session(port, ExplicitVRLittleEndian)
        try:
            assoc.send_c_store(EncodedInstance(data, meta))
        finally:
            assoc.release()
    assert (assoc.stored, assoc.failures) == (0, 1)
    with store_scp(ExplicitVRLittleEndian) as (port, _received):
        assoc = session(port, ExplicitVRLittleEndian)
        try:
            assoc.send_c_store(EncodedInstance(data, meta))
        finally:
            assoc.release()
    assert (assoc.stored, assoc.failures) == (1, 0)


def test_an_association_the_destination_rejects_is_not_established() -> None:
    with store_scp(ExplicitVRLittleEndian) as (port, _received):
        assoc = session(port, called="SOMEONE")
    assert not assoc.is_established
    assert "rejected" in assoc.rejection
    assoc.dul.socket.close()  # what pynetdicom's C-MOVE service does then
    with pytest.raises(StoreSessionError):
        assoc.send_c_store(EncodedInstance(*part10()))


def test_nobody_listening_is_not_established() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assoc = session(port)
    assert not assoc.is_established
    assert "cannot connect" in assoc.rejection


def test_a_destination_that_aborts_fails_the_send_and_the_association() -> None:
    data, meta = part10()
    with store_scp(ExplicitVRLittleEndian, answer="abort") as (port, _received):
        assoc = session(port, ExplicitVRLittleEndian)
        with pytest.raises(StoreSessionError, match="aborted"):
            assoc.send_c_store(EncodedInstance(data, meta))
        assert not assoc.is_established
        with pytest.raises(StoreSessionError):
            assoc.send_c_store(EncodedInstance(data, meta))
        assoc.release()  # nothing left to release: no error


def test_the_meta_of_a_part10_file() -> None:
    data, meta = part10()
    assert meta.transfer_syntax_uid == ExplicitVRLittleEndian
    assert meta.sop_class_uid == CTImageStorage
    assert data[meta.dataset_offset : meta.dataset_offset + 4] == b"\x08\x00\x16\x00"
    assert file_meta(data[:100]) is None
    assert file_meta(data[:128] + b"DICX" + data[132:]) is None
    assert file_meta(data[: meta.dataset_offset - 10]) is None  # cut in the meta group


def test_a_destination_that_stops_reading_fails_the_send_and_the_association() -> None:
    """Its DUL thread stalls on the first P-DATA (a hung PACS, a full disk): the send gives
    up after the network timeout and aborts, instead of blocking the C-MOVE for ever."""
    stalled = threading.Event()
    release = threading.Event()

    def on_pdu(event: Any) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF" and not stalled.is_set():
            stalled.set()
            release.wait(15)

    # more than the kernel's buffers hold
    data, meta = part10(pixel_data=b"\0" * (48 * 1024 * 1024))

    scp = AE(ae_title="STORE")
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = scp.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_PDU_RECV, on_pdu), (evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    try:
        assoc = session(
            server.server_address[1], ExplicitVRLittleEndian, network_timeout=1, dimse_timeout=1
        )
        assert assoc.is_established
        started = time.monotonic()
        with pytest.raises(StoreSessionError, match="took nothing"):
            assoc.send_c_store(EncodedInstance(data, meta))
        assert time.monotonic() - started < 10
        assert not assoc.is_established
    finally:
        release.set()
        server.shutdown()


# ---------------------------------------------------------------- C-GET on the calling thread


@contextmanager
def get_scp(
    instances: list[bytes],
    *,
    final: int = 0x0000,
    abort_after: int | None = None,
    idle_timeout: float | None = None,
) -> Iterator[int]:
    """A pynetdicom Query/Retrieve GET SCP sending `instances` (Part 10 bytes) back by C-STORE,
    then the final status `final`; or aborting the association after `abort_after` of them."""

    def on_get(event: Any) -> Iterator[Any]:
        yield len(instances) + (final != 0x0000)  # the failure counts as a sub-operation
        for number, data in enumerate(instances):
            if abort_after is not None and number == abort_after:
                event.assoc.abort()
                return
            yield 0xFF00, dcmread(io.BytesIO(data))
        if final != 0x0000:
            status = Dataset()
            status.Status = final
            status.ErrorComment = "archive on fire"
            yield status, None

    def on_find(event: Any) -> Iterator[Any]:  # the IMAGE-level C-FIND a retrieval starts with
        for data in instances:
            instance = dcmread(io.BytesIO(data))
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = STUDY_UID
            match.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
            match.SOPInstanceUID = instance.SOPInstanceUID
            match.SOPClassUID = instance.SOPClassUID
            yield 0xFF00, match

    ae = AE(ae_title="ARCHIVE")
    ae.maximum_pdu_size = 16384
    ae.network_timeout = idle_timeout  # an idle association is aborted after it (Orthanc: 30 s)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, RETRIEVE_SYNTAXES[:4], scu_role=False, scp_role=True)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[*NODELAY_HANDLERS, (evt.EVT_C_GET, on_get), (evt.EVT_C_FIND, on_find)],
    )
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        gc.collect()  # an accepted socket left open would warn here (pynetdicom leaves the
        # socket of a connection its peer closed first; `NODELAY_HANDLERS` close it)


STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def get_session(port: int, maximum_received_pdu: int = 1 << 20) -> StoreSession:
    contexts = [
        build_context(StudyRootQueryRetrieveInformationModelGet),
        *(build_context(CTImageStorage, syntax) for syntax in RETRIEVE_SYNTAXES[:4]),
    ]
    return StoreSession.open(
        "127.0.0.1",
        port,
        calling_ae_title="RELAIS",
        called_ae_title="ARCHIVE",
        contexts=contexts,
        maximum_received_pdu=maximum_received_pdu,
        extended_negotiation=[build_role(CTImageStorage, scp_role=True)],
        dimse_timeout=5,
    )


def study_query() -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY_UID
    return query


def run_get(
    port: int, maximum_received_pdu: int = 1 << 20
) -> tuple[list[bytes], Dataset | None, StoreSession]:
    assoc = get_session(port, maximum_received_pdu)
    assert assoc.is_established, assoc.rejection
    received: list[bytes] = []
    instances = assoc.c_get(
        study_query(), StudyRootQueryRetrieveInformationModelGet, source_ae_title="ARCHIVE"
    )
    while True:
        try:
            received.append(next(instances))
        except StopIteration as end:
            assoc.release()
            return received, end.value, assoc


@pytest.mark.parametrize("maximum_pdu", [16384, 1 << 20])  # a data set in 13 PDUs, or one
def test_a_c_get_yields_each_instance_as_a_part10_file_then_the_final_status(
    maximum_pdu: int,
) -> None:
    sent = [part10(pixel_data=bytes([n]) * 200_000)[0] for n in range(5)]
    with get_scp(sent) as port:
        received, status, _assoc = run_get(port, maximum_pdu)
    assert status is not None
    assert status.Status == 0x0000
    assert status.NumberOfCompletedSuboperations == 5
    assert [dcmread(io.BytesIO(d)) for d in received] == [dcmread(io.BytesIO(d)) for d in sent]
    meta = file_meta(received[0])
    assert meta is not None
    assert meta.sop_instance_uid == dcmread(io.BytesIO(sent[0])).SOPInstanceUID


def test_a_c_get_that_fails_ends_with_its_status_and_comment() -> None:
    with get_scp([part10()[0]], final=0xA702) as port:
        received, status, _assoc = run_get(port)
    assert len(received) == 1
    assert status is not None
    assert status.Status == 0xA702
    assert status.ErrorComment == "archive on fire"


def test_an_archive_that_aborts_mid_c_get_fails_it() -> None:
    with get_scp([part10()[0]] * 3, abort_after=1) as port:
        assoc = get_session(port)
        instances = assoc.c_get(
            study_query(), StudyRootQueryRetrieveInformationModelGet, source_ae_title="ARCHIVE"
        )
        assert next(instances)
        with pytest.raises(StoreSessionError, match="aborted"):
            next(instances)
    assert not assoc.is_established


def test_closing_a_c_get_early_aborts_the_association() -> None:
    with get_scp([part10()[0]] * 3) as port:
        assoc = get_session(port)
        instances = assoc.c_get(
            study_query(), StudyRootQueryRetrieveInformationModelGet, source_ae_title="ARCHIVE"
        )
        next(instances)
        instances.close()
        assert not assoc.is_established
        assert assoc._socket is None  # closed
        received, status, _ = run_get(port)  # the archive serves the next one
    assert status is not None
    assert len(received) == 3


def test_the_sockets_of_connections_their_peer_aborts_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pynetdicom leaves the socket of a connection the peer closed first unclosed (to the
    collector, a ResourceWarning as it goes): the SCP's accepted sockets are closed."""
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with get_scp([part10()[0]] * 3) as port:
        for _ in range(50):
            session = get_session(port)
            instances = session.c_get(
                study_query(), StudyRootQueryRetrieveInformationModelGet, source_ae_title="ARCHIVE"
            )
            next(instances)
            instances.close()  # aborts the association
    gc.collect()
    assert not [u for u in unraisable if isinstance(u.exc_value, ResourceWarning)]


def test_an_instance_with_a_uid_that_is_not_ascii_gets_a_meta_group_by_pydicom() -> None:
    from broker.dicom.store_session import _part10_by_pydicom

    data = _part10_by_pydicom(
        b"\x00\x08\x00\x18",
        "1.2.840.10008.1.2.1",
        b"1.2.3\0",
        "1.2.\xe9".encode("latin-1"),
        "ARCHIVE",
    )
    read = dcmread(io.BytesIO(data), force=True)
    assert read.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert read.file_meta.MediaStorageSOPClassUID == "1.2.3"


def pdv(context: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, context, control) + fragment


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def test_messages_are_read_whatever_pdus_carry_their_fragments() -> None:
    """Several PDVs in one PDU, a message's command and data set across PDUs, the next
    message starting in the PDU that ends the last: as PS3.8 allows a peer to send them."""
    first = command_set([(0x0100, us_value(0x0001)), (0x0110, us_value(1)), (0x0800, us_value(0))])
    second = command_set([(0x0100, us_value(0x8010)), (0x0800, us_value(0x0101))])
    near, far = socket.socketpair()
    with near, far:
        session = StoreSession(near)
        far.sendall(
            p_data(pdv(3, 0x01, first[:10]), pdv(3, 0x03, first[10:]), pdv(3, 0x00, b"abc"))
            + p_data(pdv(3, 0x02, b"def"), pdv(1, 0x03, second))
        )
        context, command, fragments = session._read_message(5)
        assert fragments is not None
        assert (context, command, b"".join(fragments)) == (3, first, b"abcdef")
        assert [bytes(fragment) for fragment in fragments] == [b"abc", b"def"]  # as received
        assert session._read_message(5) == (1, second, None)
        far.sendall(p_data(pdv(3, 0x00, b"a data set first")))
        with pytest.raises(StoreSessionProtocolError, match="data set before its command"):
            session._read_message(5)
        far.sendall(struct.pack(">BBI", 0x04, 0, 0))  # a P-DATA-TF without any PDV
        with pytest.raises(StoreSessionProtocolError, match="malformed"):
            session._read_message(5)


@pytest.mark.parametrize("maximum_pdu", [16382, 1 << 20], ids=["short-pdus", "long-pdus"])
def test_long_pdus_arriving_in_pieces_are_read_whole_and_no_further(maximum_pdu: int) -> None:
    """A data set in PDUs longer than what is read at a time (DCMTK sends 128 KiB ones),
    arriving a few bytes, then many, at a time, the next message right behind it; whether the
    session offered long PDUs (a C-GET's: the header read alone) or not."""
    command = command_set(
        [(0x0100, us_value(0x0001)), (0x0110, us_value(7)), (0x0800, us_value(0))]
    )
    after = command_set([(0x0100, us_value(0x8010)), (0x0800, us_value(0x0101))])
    data = bytes(range(256)) * 1200  # 300 KiB
    stream = (
        p_data(pdv(5, 0x03, command))
        + p_data(pdv(5, 0x00, data[:150_000]))
        + p_data(pdv(5, 0x02, data[150_000:]))
        + p_data(pdv(1, 0x03, after))
    )
    near, far = socket.socketpair()
    with near, far:

        def send() -> None:
            with contextlib.suppress(OSError):  # the reader gave up: its assertion says why
                for start, size in ((0, 3), (3, 5), (8, 70_000), (70_008, 1)):
                    far.sendall(stream[start : start + size])
                    time.sleep(0.01)
                far.sendall(stream[70_009:])

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            session = StoreSession(near)
            session.maximum_received_pdu = maximum_pdu
            context, received, fragments = session._read_message(5)
            assert fragments is not None
            assert (context, received, b"".join(fragments)) == (5, command, data)
            assert session._read_message(5) == (1, after, None)
        finally:
            near.shutdown(socket.SHUT_RDWR)
            sender.join(5)


def test_an_empty_data_set_is_no_data_set() -> None:
    """A data set sent as one empty PDV comes back as no fragment: a C-STORE-RQ with it is
    refused, a C-FIND answer with it is no match (as when the data set was joined bytes)."""
    command = command_set([(0x0100, us_value(0x0001)), (0x0800, us_value(0))])
    near, far = socket.socketpair()
    with near, far:
        far.sendall(p_data(pdv(3, 0x03, command), pdv(3, 0x02, b"")))
        context, received, fragments = StoreSession(near)._read_message(5)
    assert (context, received, fragments) == (3, command, [])


def archive_at(port: int) -> DimseArchive:
    return DimseArchive(
        ArchiveEndpoint(name="Archive", ae_title="ARCHIVE", host="127.0.0.1", port=port, timeout=5)
    )


@pytest.mark.parametrize(
    ("scp", "error", "retryable", "message"),
    [
        ({"final": 0xA702}, ArchiveProtocolError, False, "failed with status 0xA702"),
        ({"abort_after": 1}, ArchiveRefused, False, "aborted the association during C-GET"),
    ],
)
def test_a_c_get_that_fails_is_the_archive_error_it_was(
    scp: dict[str, int], error: type[ArchiveError], retryable: bool, message: str
) -> None:
    sent = [part10()[0] for _ in range(3)]
    with get_scp(sent, **scp) as port, archive_at(port) as archive:
        received = []
        with pytest.raises(error) as raised:
            received.extend(archive.retrieve(STUDY_UID))
    assert message in raised.value.message
    assert raised.value.retryable is retryable
    assert len(received) <= 3


def test_a_c_get_of_every_instance_the_c_find_counted() -> None:
    sent = [part10()[0] for _ in range(3)]
    with get_scp(sent) as port, archive_at(port) as archive:
        received = list(archive.retrieve(STUDY_UID))
    assert [file_meta(d).sop_instance_uid for d in received] == [  # type: ignore[union-attr]
        file_meta(d).sop_instance_uid  # type: ignore[union-attr]
        for d in sent
    ]


def test_a_c_find_yields_each_match_then_the_final_status() -> None:
    sent = [part10()[0] for _ in range(3)]
    with get_scp(sent) as port:
        assoc = StoreSession.open(
            "127.0.0.1",
            port,
            calling_ae_title="RELAIS",
            called_ae_title="ARCHIVE",
            contexts=[build_context(StudyRootQueryRetrieveInformationModelFind)],
            dimse_timeout=5,
        )
        assert assoc.is_established, assoc.rejection
        query = study_query()
        query.QueryRetrieveLevel = "IMAGE"
        query.SOPInstanceUID = ""
        matches = []
        finds = assoc.c_find(query, StudyRootQueryRetrieveInformationModelFind)
        while True:
            try:
                matches.append(next(finds))
            except StopIteration as end:
                status = end.value
                break
        assoc.release()
    assert status.Status == 0x0000
    assert [m.SOPInstanceUID for m in matches] == [
        dcmread(io.BytesIO(d)).SOPInstanceUID for d in sent
    ]
    assert not assoc.is_established


def test_a_kept_c_find_association_the_archive_ended_while_idle_is_replaced() -> None:
    query = study_query()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = ""
    with get_scp([part10()[0]], idle_timeout=0.5) as port, archive_at(port) as archive:
        with archive._find_association() as (session, watch):
            assert len(archive._find(session, watch, query)) == 1
        time.sleep(1.5)  # the archive aborts the idle association meanwhile
        with archive._find_association() as (again, watch):
            assert again is not session
            assert len(archive._find(again, watch, query)) == 1
