"""The command sets the broker encodes itself are the bytes pynetdicom (pydicom) would send;
those it decodes itself give the primitives pynetdicom would make."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from broker.dicom.network import (
    StoreRequestCommand,
    _StoreRequestMessage,
    store_request_command,
    store_response_command,
)

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def pynetdicom_command(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 0))
    ((_context, pdv),) = pdata.presentation_data_value_list
    assert pdv[0] == 0x03  # a command, its last fragment
    return pdv[1:]


@pytest.mark.parametrize("status", [0x0000, 0x0122, 0xA700, 0xB000])
@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.3.45", ""])
def test_a_c_store_response_is_encoded_as_pynetdicom_does(status: int, instance: str) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 65535
    response.AffectedSOPClassUID = KOS
    if instance:
        response.AffectedSOPInstanceUID = instance
    response.Status = status
    assert store_response_command(response) == pynetdicom_command(response)


def test_a_response_with_more_to_say_is_left_to_pynetdicom() -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.AffectedSOPClassUID = KOS
    response.Status = 0xA900
    response.ErrorComment = "not a KOS"
    assert store_response_command(response) is None
    request = C_STORE()
    request.MessageID = 1
    assert store_response_command(request) is None


def test_a_uid_that_is_not_ascii_is_left_to_pynetdicom() -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.AffectedSOPClassUID = KOS
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        response.AffectedSOPInstanceUID = "1.2.\u00e9"  # as pynetdicom decodes such a byte
    response.Status = 0x0000
    assert store_response_command(response) is None


def test_the_shared_success_status_cannot_be_changed() -> None:
    from broker.dicom.store_session import _SUCCESS

    for change in (
        lambda: setattr(_SUCCESS, "Status", 0xA700),
        lambda: _SUCCESS.__setitem__(0x00000902, None),
        lambda: _SUCCESS.add_new(0x00000902, "LO", "changed"),
        lambda: _SUCCESS.__delitem__(0x00000900),
        lambda: delattr(_SUCCESS, "Status"),
    ):
        with pytest.raises(AttributeError):
            change()
    assert _SUCCESS.Status == 0x0000
    assert len(_SUCCESS) == 1


# ----------------------------------------------------------------- C-STORE-RQ, received

_uids = st.from_regex(r"[12](\.[1-9][0-9]{0,8}){1,12}", fullmatch=True).filter(
    lambda uid: len(uid) <= 64
)
_titles = st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True)


def store_request_pdatas(request: C_STORE, context_id: int, max_pdu: int) -> list[P_DATA]:
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(context_id, max_pdu))


def received(message: DIMSEMessage, pdatas: list[P_DATA]) -> C_STORE:
    done = [message.decode_msg(pdata) for pdata in pdatas]
    assert done[-1]
    assert not any(done[:-1])
    return message.message_to_primitive()  # type: ignore[return-value]


def as_seen(primitive: C_STORE) -> tuple[object, ...]:
    return (
        primitive.MessageID,
        primitive.AffectedSOPClassUID,
        type(primitive.AffectedSOPClassUID),
        primitive.AffectedSOPInstanceUID,
        primitive.Priority,
        primitive.MoveOriginatorApplicationEntityTitle,
        primitive.MoveOriginatorMessageID,
        primitive.DataSet.getvalue(),
        primitive._context_id,
    )


@settings(max_examples=300, deadline=None)
@given(
    message_id=st.integers(0, 0xFFFF),
    sop_class=_uids,
    sop_instance=_uids,
    priority=st.sampled_from([0, 1, 2]),
    originator=st.one_of(st.none(), st.tuples(_titles, st.integers(0, 0xFFFF))),
    data=st.binary(min_size=1, max_size=3000),
    context_id=st.sampled_from([1, 3, 255]),
    max_pdu=st.sampled_from([0, 256, 1024, 16384]),
)
def test_a_store_request_decoded_by_the_broker_is_the_primitive_pynetdicom_makes(
    message_id, sop_class, sop_instance, priority, originator, data, context_id, max_pdu
) -> None:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = priority
    if originator is not None:
        request.MoveOriginatorApplicationEntityTitle = originator[0]
        request.MoveOriginatorMessageID = originator[1]
    request.DataSet = io.BytesIO(data)
    pdatas = store_request_pdatas(request, context_id, max_pdu)
    first_context, first = pdatas[0].presentation_data_value_list[0]
    command = store_request_command(first[1:])
    assert command is not None
    ours = received(_StoreRequestMessage(first_context, command), pdatas)
    theirs = received(DIMSEMessage(), store_request_pdatas(request, context_id, max_pdu))
    assert as_seen(ours) == as_seen(theirs)


def command_bytes(elements: list[tuple[int, bytes]], *, group_length: int | None = None) -> bytes:
    body = b"".join(
        struct.pack("<HHI", 0, element, len(value)) + value for element, value in elements
    )
    length = len(body) if group_length is None else group_length
    return struct.pack("<HHII", 0, 0, 4, length) + body


PLAIN = [
    (0x0002, b"1.2.840.10008.5.1.4.1.1.88.59\0"),
    (0x0100, struct.pack("<H", 0x0001)),
    (0x0110, struct.pack("<H", 7)),
    (0x0700, struct.pack("<H", 0)),
    (0x0800, struct.pack("<H", 0x0000)),
    (0x1000, b"1.2.3.45\0"),
]


def test_a_plain_command_set_is_decoded_with_its_padding_taken_off() -> None:
    assert store_request_command(command_bytes(PLAIN)) == StoreRequestCommand(
        message_id=7,
        sop_class_uid=KOS,
        sop_instance_uid="1.2.3.45",
        priority=0,
        move_originator_ae_title=None,
        move_originator_message_id=None,
    )


def replaced(element: int, value: bytes) -> list[tuple[int, bytes]]:
    return [(e, value if e == element else v) for e, v in PLAIN]


@pytest.mark.parametrize(
    "command",
    [
        command_bytes(PLAIN, group_length=10),  # a group length that is not true
        command_bytes(PLAIN)[:-3],  # cut
        command_bytes(PLAIN[:-1]),  # no SOP Instance UID
        command_bytes([*PLAIN[:2], PLAIN[1], *PLAIN[2:]]),  # an element twice
        command_bytes(list(reversed(PLAIN))),  # out of order
        command_bytes([*PLAIN, (0x0902, b"comment ")]),  # an element a C-STORE-RQ has not
        command_bytes(replaced(0x0100, struct.pack("<H", 0x0020))),  # a C-FIND-RQ
        command_bytes(replaced(0x0800, struct.pack("<H", 0x0101))),  # no data set
        command_bytes(replaced(0x0110, b"\x07\x00\x00\x00")),  # US of 4 bytes
        command_bytes(replaced(0x1000, b"1.2.\xe9\0")),  # not ASCII
        command_bytes(replaced(0x1000, b"1.2\\3.4")),  # two values
        command_bytes(replaced(0x1000, b"\0\0")),  # empty
        struct.pack("<HHI", 8, 0x0018, 2) + b"1\0",  # not the command group
        b"",
    ],
)
def test_what_is_not_a_plain_store_request_is_left_to_pynetdicom(command: bytes) -> None:
    assert store_request_command(command) is None


def test_a_command_fragment_after_the_command_set_is_refused() -> None:
    """pynetdicom then aborts the association (an invalid message)."""
    command = store_request_command(command_bytes(PLAIN))
    assert command is not None
    message = _StoreRequestMessage(1, command)
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[1, b"\x03" + command_bytes(PLAIN)], [1, b"\x01xx"]]
    assert message.decode_msg(pdata)
    with pytest.raises(ValueError, match="command fragment after"):
        message.message_to_primitive()
