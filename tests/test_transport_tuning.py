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


def test_a_requestors_reactor_leaves_responses_to_the_waiting_thread() -> None:
    import queue
    from types import SimpleNamespace

    from dcn_node.transport_tuning import _get_msg_leaving_responses

    response = _response(0x0000, 1, "1.2.3")
    request = C_STORE()
    request.MessageID = 2
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.4"
    request.Priority = 2
    request.DataSet = __import__("io").BytesIO(b"\0")
    requestor = SimpleNamespace(assoc=SimpleNamespace(is_requestor=True),
                                msg_queue=queue.Queue(), dimse_timeout=1)
    requestor.msg_queue.put((1, response))
    # The reactor's poll (block=False) does not take it; the user thread's wait does.
    assert _get_msg_leaving_responses(requestor, block=False) == (None, None)
    assert _get_msg_leaving_responses(requestor, block=True) == (1, response)
    requestor.msg_queue.put((1, request))  # a request (from the peer) is the reactor's
    assert _get_msg_leaving_responses(requestor, block=False) == (1, request)
    acceptor = SimpleNamespace(assoc=SimpleNamespace(is_requestor=False),
                               msg_queue=queue.Queue(), dimse_timeout=1)
    acceptor.msg_queue.put((1, response))  # acceptors: pynetdicom's behaviour unchanged
    assert _get_msg_leaving_responses(acceptor, block=False) == (1, response)
