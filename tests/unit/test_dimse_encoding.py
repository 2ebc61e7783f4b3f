"""The command sets the broker encodes itself are the bytes pynetdicom (pydicom) would send;
those it decodes itself give the primitives pynetdicom would make."""

from __future__ import annotations

import io
import struct
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from broker.dicom.network import (
    StoreRequestCommand,
    StoreResponseDIMSE,
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
        type(primitive.AffectedSOPInstanceUID),
        primitive.Priority,
        primitive.MoveOriginatorApplicationEntityTitle,
        primitive.MoveOriginatorMessageID,
        primitive.DataSet.getvalue(),
        primitive._context_id,
        primitive._dataset_path,
        primitive._dataset_file,
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
    ours = received(_StoreRequestMessage(first_context, command, first[1:]), pdatas)
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
    """pynetdicom then aborts the association (an invalid message). Where pynetdicom decodes
    the command set, it takes such a stream (it adds the fragment to the command set decoded
    already): the broker's path is stricter there, on purpose (PS3.8 E.2)."""
    command = store_request_command(command_bytes(PLAIN))
    assert command is not None
    message = _StoreRequestMessage(1, command, command_bytes(PLAIN))
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[1, b"\x03" + command_bytes(PLAIN)], [1, b"\x01xx"]]
    assert message.decode_msg(pdata)
    with pytest.raises(ValueError, match="command fragment after"):
        message.message_to_primitive()


def outcome(message: DIMSEMessage, pdatas: list[P_DATA]) -> object:
    """What the DIMSE provider would queue: the primitive as seen, or the error that aborts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings on odd values, on either path
        try:
            for pdata in pdatas:
                if message.decode_msg(pdata):
                    break
            return as_seen(message.message_to_primitive())  # type: ignore[arg-type]
        except Exception as exc:
            return type(exc)


def the_brokers(encoded: bytes, context_id: int) -> DIMSEMessage:
    command = store_request_command(encoded)
    return DIMSEMessage() if command is None else _StoreRequestMessage(context_id, command, encoded)


_paddings = st.sampled_from(["", "\0", " ", "  ", "\0\0", " \0", "\t"])


@settings(max_examples=400, deadline=None)
@given(
    message_id=st.integers(0, 0xFFFF),
    sop_class=st.tuples(st.sampled_from(["", " "]), _uids, _paddings),
    sop_instance=st.tuples(st.sampled_from(["", " "]), _uids, _paddings),
    priority=st.integers(0, 4),
    data_set_type=st.sampled_from([0x0000, 0x0001, 0x0101, 0x0102, 0xFEFE]),
    originator=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(["", " ", "  ", "\t"]),
            st.from_regex(r"[A-Z][A-Z0-9_ ]{0,17}", fullmatch=True),
            st.sampled_from(["", " ", "\0"]),
            st.integers(0, 0xFFFF),
        ),
    ),
)
def test_any_command_set_gives_what_pynetdicom_gives_on_either_path(
    message_id, sop_class, sop_instance, priority, data_set_type, originator
) -> None:
    """Raw command sets, padded as peers pad them (and as they should not): the broker's path,
    or pynetdicom's where it declines, queues the same primitive, or refuses alike."""
    elements = [
        (0x0002, "".join(sop_class).encode("ascii")),
        (0x0100, struct.pack("<H", 0x0001)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0700, struct.pack("<H", priority)),
        (0x0800, struct.pack("<H", data_set_type)),
        (0x1000, "".join(sop_instance).encode("ascii")),
    ]
    if originator is not None:
        lead, title, pad, originator_id = originator
        elements += [
            (0x1030, f"{lead}{title}{pad}".encode("ascii")),
            (0x1031, struct.pack("<H", originator_id)),
        ]
    encoded = command_bytes(elements)
    values = [[5, b"\x03" + encoded]]
    if data_set_type != 0x0101:
        values.append([5, b"\x02" + b"data set"])
    pdata = P_DATA()
    pdata.presentation_data_value_list = values
    assert outcome(the_brokers(encoded, 5), [pdata]) == outcome(DIMSEMessage(), [pdata])


# ------------------------------------------------------- the provider choosing the path


@pytest.fixture
def provider() -> StoreResponseDIMSE:
    """The DIMSE provider of an association that is never started (no thread, no socket)."""
    association = Association(AE(), "requestor")
    association.dimse.__class__ = StoreResponseDIMSE
    return association.dimse


def plain_request() -> C_STORE:
    request = C_STORE()
    request.MessageID = 3
    request.AffectedSOPClassUID = KOS
    request.AffectedSOPInstanceUID = "1.2.3.45"
    request.Priority = 0
    request.DataSet = io.BytesIO(b"a KOS")
    return request


def queued(provider: StoreResponseDIMSE, pdatas: list[P_DATA]) -> C_STORE:
    for pdata in pdatas:
        provider.receive_primitive(pdata)
    _context, primitive = provider.msg_queue.get_nowait()
    assert provider.msg_queue.empty()
    return primitive


@pytest.fixture
def broker_decoded(monkeypatch) -> list[int]:
    """The message IDs of the requests the broker's path made primitives of."""
    seen: list[int] = []
    make = _StoreRequestMessage.message_to_primitive

    def spied(message: _StoreRequestMessage) -> C_STORE:
        primitive = make(message)
        seen.append(int(primitive.MessageID))
        return primitive

    monkeypatch.setattr(_StoreRequestMessage, "message_to_primitive", spied)
    return seen


def test_the_provider_takes_the_brokers_path_for_a_plain_request(provider, broker_decoded):
    primitive = queued(provider, store_request_pdatas(plain_request(), 1, 16384))
    assert broker_decoded == [3]
    assert as_seen(primitive) == as_seen(
        received(DIMSEMessage(), store_request_pdatas(plain_request(), 1, 16384))
    )


def test_a_command_set_in_two_fragments_is_left_to_pynetdicom(provider, broker_decoded):
    command_pdata, *data_pdatas = store_request_pdatas(plain_request(), 1, 16384)
    ((context_id, command),) = command_pdata.presentation_data_value_list
    assert command[0] == 0x03  # the whole command set, in one fragment
    first, second = P_DATA(), P_DATA()
    first.presentation_data_value_list = [[context_id, b"\x01" + command[1:20]]]
    second.presentation_data_value_list = [[context_id, b"\x03" + command[20:]]]
    primitive = queued(provider, [first, second, *data_pdatas])
    assert broker_decoded == []
    assert primitive.AffectedSOPInstanceUID == "1.2.3.45"
    assert primitive.DataSet.getvalue() == b"a KOS"


def test_a_handler_on_received_messages_gets_pynetdicoms_path(provider, broker_decoded):
    command_sets = []
    provider.assoc.bind(
        evt.EVT_DIMSE_RECV, lambda event: command_sets.append(event.message.command_set)
    )
    primitive = queued(provider, store_request_pdatas(plain_request(), 1, 16384))
    assert broker_decoded == []
    assert primitive.AffectedSOPInstanceUID == "1.2.3.45"
    assert command_sets[0].AffectedSOPInstanceUID == "1.2.3.45"


def test_a_handler_bound_while_a_message_arrives_still_reads_its_command_set(
    provider, broker_decoded
):
    """The path is chosen at the first P-DATA; a handler bound before the last one reads the
    command set pydicom decodes on demand."""
    command_pdata, *data_pdatas = store_request_pdatas(plain_request(), 1, 16384)
    provider.receive_primitive(command_pdata)
    command_sets = []
    provider.assoc.bind(
        evt.EVT_DIMSE_RECV, lambda event: command_sets.append(event.message.command_set)
    )
    assert queued(provider, data_pdatas).DataSet.getvalue() == b"a KOS"
    assert broker_decoded == [3]
    assert command_sets[0].AffectedSOPInstanceUID == "1.2.3.45"
    assert command_sets[0].MessageID == 3


def test_data_sets_gathered_in_files_are_left_to_pynetdicom(provider, monkeypatch):
    pdata = store_request_pdatas(plain_request(), 1, 16384)[0]
    assert provider._store_request(pdata) is not None
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    assert provider._store_request(pdata) is None
