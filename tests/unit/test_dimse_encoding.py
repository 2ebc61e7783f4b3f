"""The command sets the broker encodes itself are the bytes pynetdicom (pydicom) would send."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from broker.dicom.network import store_response_command

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
