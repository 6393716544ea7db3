"""The pynetdicom transport tuning (dcn_node/transport_tuning.py): the hand-encoded C-STORE
response is byte for byte pynetdicom's, and a tuned SCP answers real associations."""

from __future__ import annotations

import pytest
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dcn_node.transport_tuning import encode_store_response


def _response(status: int, message_id: int, instance_uid: str) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = instance_uid
    primitive.Status = status
    return primitive


def _pynetdicom_bytes(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 0))
    ((context_id, value),) = pdata.presentation_data_value_list
    assert context_id == 1 and value[0] == 0x03  # command, last fragment
    return bytes(value[1:])


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC000, 0xB000, 0x0107])
@pytest.mark.parametrize("uid", ["1.2.3.4", "1.2.3.45", None])
@pytest.mark.parametrize("message_id", [1, 2, 65535])
def test_store_response_bytes_equal_pynetdicom(status: int, uid: str | None,
                                               message_id: int) -> None:
    primitive = _response(status, message_id, uid or generate_uid())
    assert encode_store_response(primitive) == _pynetdicom_bytes(primitive)


def test_responses_with_more_than_six_elements_are_left_to_pynetdicom() -> None:
    with_comment = _response(0xC000, 1, "1.2.3")
    with_comment.ErrorComment = "cannot parse"
    assert encode_store_response(with_comment) is None
    with_offending = _response(0xA900, 1, "1.2.3")
    with_offending.OffendingElement = [0x00080018]
    assert encode_store_response(with_offending) is None
    without_class = C_STORE()
    without_class.MessageIDBeingRespondedTo = 1
    without_class.Status = 0xC000
    assert encode_store_response(without_class) is None
