"""The associations the broker requests: their reactor thread cannot take the response to a
request (pynetdicom 3.0's pause race, `network.PauseSafeAssociation`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from broker.dicom.network import NODELAY_HANDLERS, PauseSafeAssociation, RelaisAE


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
