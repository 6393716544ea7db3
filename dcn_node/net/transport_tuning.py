"""pynetdicom transport tuning: the receive path of a C-STORE without pynetdicom's
per-message overheads (event-driven waits instead of 1 ms polling, C-STOREs served on the
thread that read them, P-DATA and command sets read directly, bulk socket reads).

What each change replaces, why it is safe and what it buys: docs/fast-receive-path.md.
The only code that reaches into pynetdicom's internals; written for one pynetdicom release
(:data:`PYNETDICOM_VERSION`, pinned in constraints.txt): :func:`install` leaves any other
untouched, with one WARNING. The C-STORE command sets themselves are read and written by
:mod:`dcn_node.net.store_codec`.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import types
from io import BytesIO
from typing import Any

import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_primitives
import pynetdicom.dul
import pynetdicom.transport
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dcn_node.net.limits import check_pdu_length, dataset_too_large
from dcn_node.net.store_codec import (
    _CheckedUID,
    _command_elements,
    _plain_store_fields,
    _StoreFields,
    encode_store_response,
)

LOGGER = logging.getLogger(__name__)

#: The pynetdicom release this was written and tested for (pinned in constraints.txt). With
#: any other, :func:`install` leaves pynetdicom as it is, with one WARNING.
PYNETDICOM_VERSION = "3.0.4"

#: The read buffer is allocated at most this far ahead of the bytes that arrived.
MAX_PREALLOCATION_BYTES = 4 * 1024 * 1024

#: pynetdicom's polling interval (both reactors); only sleeps of this length are replaced.
POLL_SECONDS = 0.001

#: An acceptor reactor's poll when C-STOREs are served inline (woken early by any message
#: or DUL indication; the poll only bounds how late it sees a kill or a network timeout).
INLINE_REACTOR_POLL_SECONDS = 0.02

_real_sleep = time.sleep
_installed = False
_bulk_installed = False


def _dul_wait(dul: pynetdicom.dul.DULServiceProvider, seconds: float) -> None:
    """Sleep up to ``seconds``; return early when the socket has bytes or a PDU is queued."""
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        _real_sleep(seconds)
        return
    # The pair first, then the queue: a response queued after this check writes a byte
    # the select below sees.
    wake_read = _wake_pair(dul)[0]
    if dul.to_provider_queue.queue:
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes buffered inside the SSL object: select cannot see them
    try:
        readable, _, _ = select.select([sock, wake_read], [], [], seconds)
    except (OSError, ValueError):  # socket closed under us: pynetdicom notices next loop
        return
    if wake_read in readable:
        try:
            wake_read.recv(4096)
        except OSError:  # nothing left to drain, or closing
            pass


def _reactor_wait(assoc: pynetdicom.association.Association, seconds: float) -> None:
    """Sleep up to ``seconds``; return early when a decoded DIMSE message is queued."""
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        if not messages.queue:
            # With C-STOREs served on the DUL thread, the reactor only has the rare
            # message and the DUL's indications (release, abort), which notify this
            # condition too: it may sleep longer and leave the GIL to the DUL thread.
            inline = isinstance(messages, _InlineStoreQueue)
            messages.not_empty.wait(INLINE_REACTOR_POLL_SECONDS if inline else seconds)
        if messages.queue:
            # ``Queue.put`` wakes one waiter: if another thread also waits in ``get_msg``
            # (a handler using pynetdicom's send_* on this association), pass the wake-up
            # on, or it sleeps through its DIMSE timeout.
            messages.not_empty.notify()


def event_wait(seconds: float) -> None:
    """``time.sleep`` for pynetdicom's reactors: the 1 ms polls become waits that end
    early when the calling thread has work (see the module docstring); every other sleep
    is a plain sleep."""
    if seconds == POLL_SECONDS:
        thread = threading.current_thread()
        if isinstance(thread, pynetdicom.dul.DULServiceProvider):
            _dul_wait(thread, seconds)
            return
        # Acceptors only: a requestor's user thread takes its responses off the same
        # queue, and pynetdicom's pause of the requestor reactor is racy; waking that
        # reactor at the moment a response lands lets it take the response
        # ("unexpected C-STORE service message") and the user thread times out.
        if (isinstance(thread, pynetdicom.association.Association) and thread.is_acceptor
                and thread.dimse is not None):
            _reactor_wait(thread, seconds)
            return
    _real_sleep(seconds)


def _wake_pair(dul: Any) -> tuple[socket.socket, socket.socket]:
    pair = getattr(dul, "_dcn_wake_pair", None)
    if pair is None:
        pair = socket.socketpair()
        for end in pair:
            end.setblocking(False)
        dul._dcn_wake_pair = pair
    return pair


_original_send_pdu = pynetdicom.dul.DULServiceProvider.send_pdu
_original_run_reactor = pynetdicom.dul.DULServiceProvider.run_reactor


def _send_pdu_and_wake(self: Any, primitive: Any) -> None:
    """``DULServiceProvider.send_pdu`` that also wakes the DUL thread's wait."""
    _original_send_pdu(self, primitive)
    pair = getattr(self, "_dcn_wake_pair", None)
    # A response queued by the DUL thread itself (a C-STORE served inline) is sent on its
    # next loop: only another thread needs to wake it.
    if pair is not None and threading.current_thread() is not self:
        try:
            pair[1].send(b"\0")
        except OSError:
            pass  # already a wake-up pending, or closing


def _run_reactor_then_close_wake_pair(self: Any) -> None:
    try:
        _original_run_reactor(self)
    finally:
        pair = self.__dict__.pop("_dcn_wake_pair", None)
        for end in pair or ():
            end.close()


_original_get_msg = pynetdicom.dimse.DIMSEServiceProvider.get_msg


def _get_msg_leaving_responses(self: Any, block: bool = False) -> Any:
    """``DIMSEServiceProvider.get_msg`` that never hands a requestor's reactor a response.

    The reactor polls with ``block=False``; the user thread in ``send_c_store`` & co. waits
    with ``block=True`` for its response. pynetdicom pauses the reactor for that, but the
    pause reads a flag the reactor may have set a moment before it woke, so on a busy CPU
    the reactor can still take the response ("Received unexpected C-STORE service
    message") and the user thread times out. A fast peer (ours) makes that likelier, so
    responses stay in the queue for the thread they belong to."""
    if not block and self.assoc.is_requestor:
        with self.msg_queue.mutex:
            head = self.msg_queue.queue[0] if self.msg_queue.queue else None
        if head is not None and head[1] is not None and not head[1].is_valid_request:
            return None, None
    return _original_get_msg(self, block)


_original_send_msg = pynetdicom.dimse.DIMSEServiceProvider.send_msg


def _send_msg_fast_store_response(self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` with :func:`encode_store_response` for plain
    C-STORE responses."""
    encoded = None
    if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        encoded = encode_store_response(primitive)
    if encoded is None or (self.maximum_pdu_size and
                           len(encoded) + 6 > self.maximum_pdu_size):
        _original_send_msg(self, primitive, context_id)
        return
    pdata = P_DATA()
    # Message control header 0x03: command, last fragment.
    pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
    self.dul.send_pdu(pdata)


_INLINE_ATTRIBUTE = "_dcn_serve_stores_inline"


def serve_stores_inline(ae: Any) -> None:
    """Mark a pynetdicom AE: its associations serve C-STORE requests on the DUL thread
    (takes effect with :func:`install`). Only for AEs whose C-STORE handlers send nothing
    on the association they serve (a DIMSE request from the DUL thread would wait for a
    response that same thread has to read)."""
    setattr(ae, _INLINE_ATTRIBUTE, True)


def _storage_service_for(assoc: Any, request: C_STORE) -> type | None:
    """The service class pynetdicom's ``Association._serve_request`` would pick for this
    request, when it is the Storage Service Class; else None."""
    class_uid = request.AffectedSOPClassUID
    try:
        class_uid = assoc.acceptor.accepted_common_extended[class_uid][0]
    except KeyError:
        pass
    if pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE:
        return StorageServiceClass
    assert class_uid is not None  # the caller checked request.is_valid_request
    service_class = uid_to_service_class(class_uid)
    return service_class if issubclass(service_class, StorageServiceClass) else None


def _serve_store_inline(assoc: Any, context_id: int, request: Any) -> bool:
    """Serve a complete C-STORE request on the calling (DUL) thread, as the reactor's
    ``_serve_request`` would; False when the reactor must take it instead."""
    if (not isinstance(request, C_STORE) or not request.is_valid_request
            or getattr(assoc, "_sent_release", True) or not assoc.is_established):
        return False
    context = getattr(assoc, "_accepted_cx", {}).get(context_id)
    service_class = _storage_service_for(assoc, request) if context is not None else None
    if service_class is None:
        return False  # the reactor logs and aborts, as pynetdicom does
    try:
        assoc.dimse.cancel_req = {}
        service_class(assoc).SCP(request, context)
    except Exception:
        LOGGER.exception("C-STORE service failed on association with %s; aborting",
                         getattr(assoc.requestor, "ae_title", "?"))
        threading.Thread(target=assoc.abort, name="dcn-abort", daemon=True).start()
    finally:
        assoc.dimse.cancel_req = {}
    return True


class _InlineStoreQueue(queue.Queue):
    """An acceptor's DIMSE message queue whose C-STORE requests, put by the DUL thread,
    are served there and then instead of waiting for the reactor."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if (threading.current_thread() is self._assoc.dul
                and _serve_store_inline(self._assoc, context_id, primitive)):
            return
        super().put(item, block, timeout)


class _WakingQueue(queue.Queue):
    """The DUL's queue of indications for the reactor (release, abort, ...); each put also
    wakes a reactor waiting on the DIMSE message queue in :func:`_reactor_wait`."""

    def __init__(self, wakes: queue.Queue) -> None:
        super().__init__()
        self._wakes = wakes

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self._wakes.not_empty:
            self._wakes.not_empty.notify_all()


_original_dimse_init = pynetdicom.dimse.DIMSEServiceProvider.__init__


def _dimse_init_serving_stores_inline(self: Any, assoc: Any) -> None:
    _original_dimse_init(self, assoc)
    if assoc.is_acceptor and getattr(assoc.ae, _INLINE_ATTRIBUTE, False):
        self.msg_queue = _InlineStoreQueue(assoc)
        # Created with the association, before its DUL thread starts: nothing holds the
        # queue being replaced.
        assoc.dul.to_user_queue = _WakingQueue(self.msg_queue)
        assoc.dul._dcn_assembly = _MessageAssembly(assoc.dul)


_original_set_uid = pynetdicom.dimse_primitives.set_uid


def _set_uid_trusting_checked(value: Any, name: str, allow_empty: bool = True,
                              allow_none: bool = True, validate: bool = True) -> UID | None:
    """pynetdicom's ``set_uid`` for DIMSE primitives, minus the second check of a
    :class:`_CheckedUID` (its regular-expression checks were ~6 % of the receive thread)."""
    if type(value) is _CheckedUID:
        return value
    return _original_set_uid(value, name, allow_empty, allow_none, validate)


def store_request_from_message(message: Any) -> C_STORE | None:
    """The C-STORE primitive of a received C-STORE-RQ message, read straight from its
    encoded command set; None when pynetdicom's own conversion must do it."""
    if (message._data_set_file is not None
            or not isinstance(message.encoded_command_set, BytesIO)):
        return None
    fields = _plain_store_fields(_command_elements(message.encoded_command_set.getvalue()))
    if fields is None:
        return None
    return _store_request(fields, message.context_id, message.data_set)


def _store_request(fields: _StoreFields, context_id: int, data_set: BytesIO) -> C_STORE:
    """The C-STORE primitive of a request read by :func:`_plain_store_fields`."""
    primitive = C_STORE()
    primitive.MessageID = fields.message_id
    primitive.Priority = fields.priority
    # Already checked as pynetdicom's set_uid would: conformant, 1-64 characters.
    primitive._affected_sop_class_uid = fields.class_uid
    primitive._affected_sop_instance_uid = fields.instance_uid
    primitive.DataSet = data_set
    primitive._context_id = context_id
    primitive._dataset_path = None
    primitive._dataset_file = None
    return primitive


_original_message_to_primitive = DIMSEMessage.message_to_primitive


def _store_message_to_primitive(self: Any) -> Any:
    """``C_STORE_RQ.message_to_primitive`` with :func:`store_request_from_message` first."""
    return store_request_from_message(self) or _original_message_to_primitive(self)


_P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BBL")
_PDV_LENGTH = struct.Struct(">L").unpack_from
#: Events pynetdicom triggers while reading and decoding a PDU and its DIMSE message:
#: bound handlers need its path.
_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION,
               evt.EVT_DIMSE_RECV)


class _MessageAssembly:
    """One association's DIMSE message being received through :func:`_read_pdu_data_direct`.

    A plain C-STORE request (:func:`_plain_store_fields`) is assembled here: command
    fragments, then data set fragments written into one buffer as they come (as
    pynetdicom does), then the C-STORE primitive queued as pynetdicom's
    ``receive_primitive`` would queue it. Any other message is
    handed to pynetdicom's ``receive_primitive`` from its first fragment on, and stays
    with it until pynetdicom has finished it."""

    def __init__(self, dul: Any) -> None:
        self.dul = dul
        self.command: list[tuple[int, bytes]] = []
        self.request: _StoreFields | None = None  # command of the C-STORE being read
        self.context_id = 0
        self.data = BytesIO()
        self.with_pynetdicom = False

    @property
    def dimse(self) -> Any:
        # Looked up, not kept: the assembly is made while the DIMSE provider is built.
        return self.dul.assoc.dimse

    @property
    def busy(self) -> bool:
        """A message is half read here (or handed to pynetdicom and not finished)."""
        return bool(self.command) or self.request is not None or self.with_pynetdicom

    def receive(self, items: list[tuple[int, bytes]]) -> None:
        """Take the PDVs of one P-DATA-TF PDU."""
        if self.with_pynetdicom or (self.request is None and not self.command
                                    and self.dimse.message is not None):
            self._to_pynetdicom(items)
            return
        for index, (context_id, data) in enumerate(items):
            control = data[0]
            if self.request is None:  # reading the command set
                if not control & 1:
                    self._to_pynetdicom(self.command + items[index:])
                    return
                self.command.append((context_id, data))
                if not control & 2:
                    continue
                fields = _plain_store_fields(
                    _command_elements(b"".join(d[1:] for _, d in self.command)))
                if fields is None:
                    self._to_pynetdicom(self.command + items[index + 1:])
                    return
                self.request, self.context_id, self.command = fields, context_id, []
                continue
            if control & 1 or context_id != self.context_id:
                self._abort("a command fragment or another context inside a data set")
                return
            with memoryview(data) as fragment:
                self.data.write(fragment[1:])
            if dataset_too_large(self.dul.assoc, self.data.tell()):
                self._reset()
                self.dul.event_queue.put("Evt19")  # invalid PDU -> A-ABORT
                return
            if control & 2:
                request = _store_request(self.request, self.context_id, self.data)
                self._reset()
                self.dimse.msg_queue.put((self.context_id, request))
                # PDVs after this one start the next message (pynetdicom would drop them).

    def _to_pynetdicom(self, items: list[tuple[int, bytes]]) -> None:
        self.command = []
        primitive = P_DATA()
        primitive.presentation_data_value_list.extend(items)
        self.dimse.receive_primitive(primitive)
        # pynetdicom keeps its message until it is complete (or dropped on an error).
        self.with_pynetdicom = self.dimse.message is not None

    def _reset(self) -> None:
        self.request, self.data = None, BytesIO()

    def _abort(self, reason: str) -> None:
        LOGGER.warning("Aborting association: invalid P-DATA (%s)", reason)
        self._reset()
        self.dul.event_queue.put("Evt19")  # invalid PDU -> A-ABORT


def _pdv_items(body: bytearray) -> list[tuple[int, bytes]] | None:
    """The (context ID, control header + fragment) pairs of a P-DATA-TF PDU's body, as
    pynetdicom's P-DATA primitive holds them; None when the item list is malformed."""
    items, offset, end = [], 0, len(body)
    with memoryview(body) as view:
        while offset < end:
            if offset + 6 > end:
                return None
            length = _PDV_LENGTH(body, offset)[0]
            if length < 2 or offset + 4 + length > end:
                return None
            items.append((body[offset + 4], bytes(view[offset + 5:offset + 4 + length])))
            offset += 4 + length
    return items


_original_read_pdu_data = pynetdicom.dul.DULServiceProvider._read_pdu_data


def _reads_directly(dul: Any) -> bool:
    """Whether :func:`_read_pdu_data_direct` reads this DUL's next PDU itself."""
    # Only a marked acceptor's DUL has an assembly (made with its DIMSE provider).
    assembly = dul.__dict__.get("_dcn_assembly")
    if (assembly is None or pynetdicom_config.STORE_RECV_CHUNKED_DATASET
            or isinstance(getattr(dul.socket, "socket", None), ssl.SSLSocket)
            or dul.state_machine.current_state != "Sta6"):
        return False
    if assembly.busy:
        return True  # a message half read here is finished here
    return not any(dul.assoc.get_handlers(event) for event in _PDU_EVENTS)


def _read_pdu_data_direct(self: Any) -> None:
    """``DULServiceProvider._read_pdu_data`` for a marked association in Sta6: a
    P-DATA-TF PDU goes straight to :class:`_MessageAssembly` (what DT-2 would hand the
    DIMSE layer); any other PDU is decoded and queued for the state machine as pynetdicom
    does (the same checks, events and log messages)."""
    if not _reads_directly(self):
        return _original_read_pdu_data(self)
    try:
        head = self.socket.recv(6)
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(head)
    except (OSError, TimeoutError, struct.error) as exc:
        LOGGER.error("Connection closed before the entire PDU was received (%s)", exc)
        self.event_queue.put("Evt17")  # transport connection closed
        return None
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        LOGGER.error("Unknown PDU type received '0x%02X'", pdu_type)
        self.event_queue.put("Evt19")  # unrecognised or invalid PDU
        return None
    try:
        body = self.socket.recv(pdu_length)  # refuses a PDU over the AE's limit
    except (OSError, TimeoutError) as exc:
        LOGGER.error("Connection closed before the entire PDU was received (%s)", exc)
        self.event_queue.put("Evt17")
        return None
    if len(body) != pdu_length:
        LOGGER.error("The received PDU is shorter than expected (%d of %d bytes received)",
                     len(body) + 6, pdu_length + 6)
        self.event_queue.put("Evt17")
        return None
    if pdu_type != _P_DATA_TF:
        try:
            pdu, event = self._decode_pdu(head + body)
            self.event_queue.put(event)
        except Exception as exc:
            LOGGER.error("Unable to decode the received PDU data (%s)", exc)
            self.event_queue.put("Evt19")
            return None
        self._recv_pdu.put(pdu)
        return None
    items = _pdv_items(body)
    if items is None:
        LOGGER.error("Unable to decode the received PDU data: malformed PDV item list")
        self.event_queue.put("Evt19")
        return None
    self._dcn_assembly.receive(items)
    return None


def bulk_recv(self: Any, nr_bytes: int) -> bytearray:
    """Drop-in for ``AssociationSocket.recv``: same result, one buffer, big reads; the
    buffer grows with the data, and a PDU over the AE's limit is refused (OSError)."""
    check_pdu_length(self, nr_bytes)
    buffer = bytearray(min(nr_bytes, MAX_PREALLOCATION_BYTES))
    nr_read = 0
    while nr_read < nr_bytes:
        if nr_read == len(buffer):
            buffer.extend(bytes(min(nr_bytes - nr_read, max(len(buffer),
                                                             MAX_PREALLOCATION_BYTES))))
        with memoryview(buffer) as view:
            count = self.socket.recv_into(view[nr_read:], len(buffer) - nr_read)
        if not count:
            # Connection closed: return what arrived, as pynetdicom does.
            del buffer[nr_read:]
            return buffer
        nr_read += count
    return buffer


_original_recv = pynetdicom.transport.AssociationSocket.recv


def _time_module_with(sleep: Any) -> types.ModuleType:
    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = sleep  # type: ignore[attr-defined]
    return shim


def install_safeguards() -> None:
    """Install what every dcn-node process needs whatever ``node.transport_tuning`` says
    (idempotent): :func:`bulk_recv` (bounded allocation, the PDU limit) and
    :func:`_get_msg_leaving_responses` (a requestor's responses reach the thread waiting
    for them: the node's own sender, and the test suite's senders)."""
    global _bulk_installed
    if not _bulk_installed:
        pynetdicom.transport.AssociationSocket.recv = bulk_recv  # type: ignore[method-assign]
        pynetdicom.dimse.DIMSEServiceProvider.get_msg = (  # type: ignore[method-assign]
            _get_msg_leaving_responses)
        _bulk_installed = True


def install() -> bool:
    """Install :func:`event_wait` and :func:`bulk_recv` into pynetdicom (idempotent).

    Returns ``True`` when installed, ``False`` when pynetdicom is another release than
    :data:`PYNETDICOM_VERSION` or its internals differ from what this was written for (then
    pynetdicom keeps its own path, and one WARNING says so).
    """
    global _installed
    if _installed:
        return True
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        LOGGER.warning(
            "pynetdicom %s is not the release the fast receive path was written and tested "
            "for (%s, constraints.txt); receiving with stock pynetdicom (slower, same results)",
            pynetdicom.__version__, PYNETDICOM_VERSION)
        return False
    expected = (
        getattr(pynetdicom.association, "time", None) is time
        and getattr(pynetdicom.dul, "time", None) is time
        and hasattr(pynetdicom.dul.DULServiceProvider, "_is_transport_event")
        and hasattr(pynetdicom.transport.AssociationSocket, "recv")
        and getattr(pynetdicom.dul.DULServiceProvider, "run_reactor", None)
        is _original_run_reactor
        and hasattr(pynetdicom.dimse.DIMSEServiceProvider, "maximum_pdu_size")
        and hasattr(pynetdicom.dimse.DIMSEServiceProvider, "get_msg")
        and hasattr(pynetdicom_config, "UNRESTRICTED_STORAGE_SERVICE")
        and "message_to_primitive" not in vars(C_STORE_RQ)
        and hasattr(C_STORE(), "_affected_sop_instance_uid")
        and getattr(pynetdicom.dimse_primitives, "set_uid", None) is _original_set_uid
        and pynetdicom.dul.DULServiceProvider._read_pdu_data is _original_read_pdu_data
    )
    if not expected:
        LOGGER.warning(
            "pynetdicom %s internals differ from what event-driven waits expect; "
            "keeping pynetdicom's default transport",
            pynetdicom.__version__,
        )
        return False
    shim = _time_module_with(event_wait)
    pynetdicom.association.time = shim
    pynetdicom.dul.time = shim
    dul_class = pynetdicom.dul.DULServiceProvider
    dul_class.send_pdu = _send_pdu_and_wake  # type: ignore[method-assign]
    dul_class.run_reactor = _run_reactor_then_close_wake_pair  # type: ignore[method-assign]
    pynetdicom.dimse.DIMSEServiceProvider.send_msg = (  # type: ignore[method-assign]
        _send_msg_fast_store_response)
    pynetdicom.dimse.DIMSEServiceProvider.__init__ = (  # type: ignore[method-assign]
        _dimse_init_serving_stores_inline)
    C_STORE_RQ.message_to_primitive = _store_message_to_primitive  # type: ignore
    pynetdicom.dimse_primitives.set_uid = _set_uid_trusting_checked
    dul_class._read_pdu_data = _read_pdu_data_direct  # type: ignore[method-assign]
    install_safeguards()
    _installed = True
    return True


def uninstall() -> None:
    """Give pynetdicom back the real ``time`` module and its own socket reads."""
    global _installed, _bulk_installed
    pynetdicom.association.time = time
    pynetdicom.dul.time = time
    pynetdicom.transport.AssociationSocket.recv = _original_recv  # type: ignore[method-assign]
    pynetdicom.dul.DULServiceProvider.send_pdu = _original_send_pdu  # type: ignore
    pynetdicom.dul.DULServiceProvider.run_reactor = _original_run_reactor  # type: ignore
    pynetdicom.dimse.DIMSEServiceProvider.send_msg = _original_send_msg  # type: ignore
    pynetdicom.dimse.DIMSEServiceProvider.get_msg = _original_get_msg  # type: ignore
    pynetdicom.dimse.DIMSEServiceProvider.__init__ = _original_dimse_init  # type: ignore
    pynetdicom.dimse_primitives.set_uid = _original_set_uid
    pynetdicom.dul.DULServiceProvider._read_pdu_data = _original_read_pdu_data  # type: ignore
    if "message_to_primitive" in vars(C_STORE_RQ):
        del C_STORE_RQ.message_to_primitive  # back to DIMSEMessage's
    _installed = _bulk_installed = False
