"""The pynetdicom transport tuning (dcn_node/net/transport_tuning.py): the hand-encoded C-STORE
response is byte for byte pynetdicom's, and a tuned SCP answers real associations."""

from __future__ import annotations

import logging

import pytest
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dcn_node.net.transport_tuning import encode_store_response


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

    from dcn_node.net.transport_tuning import _get_msg_leaving_responses

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


# -- C-STORE requests decoded directly -------------------------------------------------------


def _received_store_request(instance_uid: str, priority: int = 2, message_id: int = 7,
                            move_originator: str | None = None):  # type: ignore[no-untyped-def]
    """A C-STORE-RQ message as pynetdicom's DIMSE layer holds it once received."""
    import io

    from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage

    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = instance_uid
    request.Priority = priority
    if move_originator is not None:
        request.MoveOriginatorApplicationEntityTitle = move_originator
        request.MoveOriginatorMessageID = 3
    request.DataSet = io.BytesIO(b"\x08\x00\x18\x00" + b"\0" * 60)
    sent = C_STORE_RQ()
    sent.primitive_to_message(request)
    received = DIMSEMessage()
    done = False
    for pdata in sent.encode_msg(1, 16382):
        done = received.decode_msg(pdata)
    assert done
    return received


_REQUEST_FIELDS = ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                   "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
                   "_context_id", "_dataset_path", "_dataset_file")


@pytest.mark.parametrize("priority", [0, 1, 2])
@pytest.mark.parametrize("instance_uid", ["1.2.3.4", "1.2.3.45", "2.25.0",
                                          "1." + "2" * 62])
@pytest.mark.parametrize("message_id", [0, 1, 65535])
def test_store_requests_read_directly_equal_pynetdicom(priority: int, instance_uid: str,
                                                       message_id: int) -> None:
    from pynetdicom.dimse_messages import DIMSEMessage

    from dcn_node.net.transport_tuning import install, store_request_from_message

    assert install()
    message = _received_store_request(instance_uid, priority, message_id)
    fast = store_request_from_message(message)
    reference = DIMSEMessage.message_to_primitive(message)
    assert fast is not None
    for field in _REQUEST_FIELDS:
        assert getattr(fast, field) == getattr(reference, field), field
    assert fast.DataSet is reference.DataSet  # the received buffer itself, not a copy
    assert isinstance(fast.AffectedSOPInstanceUID, type(reference.AffectedSOPInstanceUID))
    # The response repeats the request's UIDs; pynetdicom's primitive takes them as they are.
    response = C_STORE()
    response.AffectedSOPInstanceUID = fast.AffectedSOPInstanceUID
    assert response.AffectedSOPInstanceUID is fast.AffectedSOPInstanceUID


@pytest.mark.parametrize("instance_uid", ["1.02.3", "1.2.x", "1.2..3", "1.2.3 4"])
def test_unusual_store_requests_are_left_to_pynetdicom(instance_uid: str) -> None:
    """Non-conformant UIDs get pynetdicom's own warnings or errors."""
    from dcn_node.net.transport_tuning import store_request_from_message

    assert store_request_from_message(_received_store_request(instance_uid)) is None


def test_store_requests_of_move_sub_operations_are_left_to_pynetdicom() -> None:
    from dcn_node.net.transport_tuning import store_request_from_message

    message = _received_store_request("1.2.3", move_originator="MOVER")
    assert store_request_from_message(message) is None


def test_command_sets_with_other_elements_are_left_to_pynetdicom() -> None:
    import struct

    from dcn_node.net.transport_tuning import _command_elements

    good = _received_store_request("1.2.3").encoded_command_set.getvalue()
    assert _command_elements(good) is not None
    extra = struct.pack("<HHI", 0x0000, 0x0900, 2) + b"\0\0"  # Status: not in a request
    assert _command_elements(good + extra) is None
    assert _command_elements(good[:-1]) is None  # torn last value
    assert _command_elements(good + good[:20]) is None  # repeated elements


# -- C-STOREs served on the DUL thread --------------------------------------------------------


def test_pdv_items_are_split_as_pynetdicom_splits_them() -> None:
    import struct

    from pynetdicom.pdu import P_DATA_TF

    from dcn_node.net.transport_tuning import _pdv_items

    def item(context_id: int, data: bytes) -> bytes:
        return struct.pack(">LB", len(data) + 1, context_id) + data

    body = item(1, b"\x03command") + item(3, b"\x00" + bytes(range(256)) * 40) + item(5, b"\x02")
    pdu = P_DATA_TF()
    pdu.decode(struct.pack(">BBL", 4, 0, len(body)) + body)
    expected = pdu.to_primitive().presentation_data_value_list
    assert _pdv_items(bytearray(body)) == [tuple(pair) for pair in expected]
    assert _pdv_items(bytearray(item(1, b""))) is None  # no control header
    assert _pdv_items(bytearray(body + b"\0\0\0")) is None  # torn item header
    assert _pdv_items(bytearray(body[:-1])) is None  # item longer than the PDU
    assert _pdv_items(bytearray()) == []


def test_message_assembly_reads_back_to_back_messages_and_hands_others_on() -> None:
    """Two C-STOREs whose PDVs arrive in one PDU, then the same split PDV by PDV, then a
    C-ECHO (not a C-STORE: pynetdicom's DIMSE layer gets its command whole)."""
    import io
    import queue
    from types import SimpleNamespace

    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
    from pynetdicom.dimse_primitives import C_ECHO

    from dcn_node.net.transport_tuning import _MessageAssembly

    def pdvs(message, primitive):  # type: ignore[no-untyped-def]
        message.primitive_to_message(primitive)
        return [tuple(pdv) for pdata in message.encode_msg(1, 200)
                for pdv in pdata.presentation_data_value_list]

    requests = []
    for n in (1, 2):
        request = C_STORE()
        request.MessageID, request.Priority = n, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, f"1.2.{n}"
        request.DataSet = io.BytesIO(bytes([n]) * 1000)  # 6 fragments of <= 194 bytes
        requests.append(request)
    echo = C_ECHO()
    echo.MessageID = 3
    handed_on = []
    dimse = SimpleNamespace(message=None, msg_queue=queue.Queue(),
                            receive_primitive=lambda p: handed_on.append(
                                list(p.presentation_data_value_list)))
    dul = SimpleNamespace(assoc=SimpleNamespace(dimse=dimse, ae=None),
                          event_queue=queue.Queue())
    assembly = _MessageAssembly(dul)
    both = pdvs(C_STORE_RQ(), requests[0]) + pdvs(C_STORE_RQ(), requests[1])
    assembly.receive(both)  # one PDU
    for pdv in both:  # one PDU per PDV
        assembly.receive([pdv])
    echo_pdvs = pdvs(C_ECHO_RQ(), echo)
    assembly.receive(echo_pdvs)
    received = [dimse.msg_queue.get_nowait()[1] for _ in range(4)]
    assert [(r.MessageID, r.AffectedSOPInstanceUID, r.DataSet.getvalue()) for r in received] \
        == [(n, f"1.2.{n}", bytes([n]) * 1000) for n in (1, 2, 1, 2)]
    assert dimse.msg_queue.empty() and dul.event_queue.empty()  # nothing aborted
    assert handed_on == [echo_pdvs] and not assembly.busy


def test_store_requests_are_served_on_the_thread_that_read_them(monkeypatch) -> None:
    """A marked AE reads P-DATA directly and runs its C-STORE handler on the DUL thread;
    C-ECHO still goes to the reactor; failures in the handler are answered as pynetdicom
    answers them; release is prompt."""
    import threading
    import time

    import pynetdicom.dul
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE, _config, evt
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import Verification

    from dcn_node.net import transport_tuning

    # As in the node (dcn_node/ops/logs.py): pynetdicom's PDU-level log handlers unbound;
    # bound, they need pynetdicom's own PDU reading.
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    assert transport_tuning.install()
    threads: list[threading.Thread] = []
    split = []
    real_pdv_items = transport_tuning._pdv_items
    monkeypatch.setattr(transport_tuning, "_pdv_items",
                        lambda body: split.append(len(body)) or real_pdv_items(body))
    assembled = []
    real_store_request = transport_tuning._store_request
    monkeypatch.setattr(transport_tuning, "_store_request",
                        lambda *args: assembled.append(args[1]) or real_store_request(*args))

    received: dict[str, tuple[bytes, str | None]] = {}

    def on_store(event: evt.Event) -> int:
        threads.append(threading.current_thread())
        request = event.request
        received[request.AffectedSOPInstanceUID] = (
            request.DataSet.getvalue(), request.MoveOriginatorApplicationEntityTitle)
        if event.request.AffectedSOPInstanceUID.endswith(".666"):
            raise RuntimeError("handler failure")
        return 0x0000

    scp = AE(ae_title="INLINE")
    scp.maximum_pdu_size = 1024  # a dataset of many fragments in many PDUs
    scp.add_supported_context(CTImageStorage)
    scp.add_supported_context(Verification)
    transport_tuning.serve_stores_inline(scp)
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        scu = AE(ae_title="SENDER")
        scu.add_requested_context(CTImageStorage)
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="INLINE")
        assert assoc.is_established
        statuses, sent = [], {}
        # Plain requests (assembled directly), a failing handler, a C-MOVE sub-operation
        # and a non-conformant UID (both left to pynetdicom's DIMSE layer).
        for suffix, originator in (("1", None), ("2", None), ("666", None), ("3", None),
                                   ("4", "MOVER"), ("05", None)):
            ds = Dataset()
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = "1.2.826.0.1." + suffix
            ds.PatientComments = suffix * 3000  # 3 PDUs of 1 kB at least (LT: <= 10240)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            kwargs = {"originator_aet": originator, "originator_id": 9} if originator else {}
            statuses.append(assoc.send_c_store(ds, **kwargs).Status)
            sent[ds.SOPInstanceUID] = (encode(ds, True, True), originator)
        assert assoc.send_c_echo().Status == 0x0000
        started = time.monotonic()
        assoc.release()
        released_in = time.monotonic() - started
    finally:
        server.shutdown()
    # 0xC211: pynetdicom's "handler failed"
    assert statuses == [0x0000, 0x0000, 0xC211, 0x0000, 0x0000, 0x0000]
    assert received == sent  # every byte, however it was assembled
    assert len(assembled) == 4  # the plain requests, assembled without pynetdicom
    assert len(threads) == 6
    assert all(isinstance(t, pynetdicom.dul.DULServiceProvider) for t in threads)
    assert len(split) >= 2 * 4 + 1  # command and dataset of each C-STORE, the C-ECHO
    assert released_in < 1.0


def test_another_pynetdicom_release_falls_back_to_stock_with_one_warning(
        monkeypatch, start_node, caplog) -> None:
    import pynetdicom

    from dcn_node.net import transport_tuning
    from tests.conftest import send_datasets
    from tests.dicom_factory import ct_series

    transport_tuning.uninstall()
    monkeypatch.setattr(pynetdicom, "__version__", "3.0.5")
    caplog.set_level(logging.WARNING, logger="dcn_node")
    try:
        node = start_node(node={"transport_tuning": True})
        assert not transport_tuning._installed
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "dcn_node.net.transport_tuning" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "3.0.5" in warnings[0] and "3.0.4" in warnings[0]
        assert send_datasets(ct_series(3), node.receiver.port) == [0, 0, 0]
    finally:
        transport_tuning.uninstall()


def test_debug_logging_does_not_change_the_receive_path(monkeypatch, start_node) -> None:
    """At DEBUG, C-STOREs are still read by the fast path (pynetdicom's PDU log handlers,
    which need its own reading, are never bound; their lines would be filtered anyway)."""
    from pynetdicom import _config

    from dcn_node.net import transport_tuning
    from dcn_node.ops.logs import configure_logging
    from tests.conftest import send_datasets
    from tests.dicom_factory import ct_series

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("dcn_node").level)
    try:
        configure_logging("DEBUG")
        assert _config.LOG_HANDLER_LEVEL == "none"
        assembled = []
        real = transport_tuning._store_request
        monkeypatch.setattr(transport_tuning, "_store_request",
                            lambda *args: assembled.append(1) or real(*args))
        node = start_node(node={"transport_tuning": True})
        assert send_datasets(ct_series(4), node.receiver.port) == [0] * 4
        assert len(assembled) == 4
    finally:
        root.handlers[:], level, own = saved
        root.setLevel(level)
        logging.getLogger("dcn_node").setLevel(own)
