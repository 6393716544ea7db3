"""pynetdicom transport tuning: event-driven waits instead of 1 ms polling, bulk reads.

Measured on a 300-image 512x512 CT sent by dcmtk's storescu over loopback; see
bench/ingest.py. Both changes touch pynetdicom internals, are checked against the version
they were written for, and leave pynetdicom untouched (with a warning) when it differs.

Waits instead of polling sleeps
-------------------------------
pynetdicom's two threads per association poll: the DUL thread (socket reader/writer) and
the association reactor (runs our C-STORE handler) each sleep 1 ms whenever a loop found
nothing to do (``DULServiceProvider._run_loop_delay`` and a fixed ``time.sleep(0.001)`` in
``Association._run_reactor``). A C-STORE crosses three such sleeps: the reactor picking up
the decoded message, then the DUL thread picking up our response, then reading the next
request. storescu sends one image at a time, so each sleep is paid per image: ~1 ms each,
about as long as dcmtk's storescp needs for a whole image.

:func:`event_wait` replaces those two sleeps only. It still returns after at most the same
1 ms (so pynetdicom's timers and checks keep their cadence), but returns *at once* when
the thread has work:

- an acceptor's reactor waits on the DIMSE message queue's own condition, which pynetdicom's
  ``queue.put`` notifies when the DUL thread hands over a decoded message (and passes the
  notification on, since ``put`` wakes only one waiter);
- the DUL thread waits in ``select`` on its socket and on a wake-up socket pair that
  :func:`_send_pdu_and_wake` writes to when the reactor queues a response.

No thread spins: an earlier version that slept 0-50 us while busy starved other
associations of the GIL on 2 cores (C-STOREs stalled past 30 s under 8 senders).

Responses stay with the thread waiting for them
-----------------------------------------------
pynetdicom's pause of a requestor's reactor (while ``send_c_store`` waits for its response)
reads a flag the reactor may have set just before it woke; on a busy CPU, with a peer that
answers fast, the reactor can take the response and drop it as unexpected, and the sender
times out after 30 s. :func:`_get_msg_leaving_responses` leaves responses in a requestor's
queue for the blocking ``get_msg`` of the thread that sent the request.

C-STORE responses
-----------------
pynetdicom turns every response primitive into a pydicom command-set Dataset and encodes it
twice (once to measure the group length): ~18 % of the node's CPU per C-STORE. A C-STORE-RSP
without an error comment or offending element is six fixed elements, so
:func:`encode_store_response` writes them directly (implicit VR little endian, as PS3.7
6.3.1 requires); tests/test_transport_tuning.py checks the bytes equal pynetdicom's for
every status. Anything else, or an association with an ``EVT_DIMSE_SENT`` handler bound,
goes through pynetdicom's own encoder.

Bulk reads
----------
``AssociationSocket.recv`` reads 4096 bytes per ``socket.recv`` call and appends each chunk
to a bytearray: ~37,000 Python-level calls for a 150 MB series. :func:`bulk_recv` reads
straight into one preallocated buffer with ``recv_into``, as many bytes as the kernel has.
The buffer grows with what arrives (at most :data:`MAX_PREALLOCATION_BYTES` ahead), never
to the length a peer merely declares, and PDUs over the receiving AE's limit are refused
before anything is read (:func:`dcn_node.limits.check_pdu_length`). The Storage SCP always
installs the bulk reads for that reason (:func:`install_bulk_recv`); the waits follow
``node.transport_tuning``.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
import types
from typing import Any

import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dul
import pynetdicom.transport
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dcn_node.limits import check_pdu_length

LOGGER = logging.getLogger(__name__)

#: The read buffer is allocated at most this far ahead of the bytes that arrived.
MAX_PREALLOCATION_BYTES = 4 * 1024 * 1024

#: pynetdicom's polling interval (both reactors); only sleeps of this length are replaced.
POLL_SECONDS = 0.001

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
            messages.not_empty.wait(seconds)
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
    if pair is not None:
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


def _element(element: int, value: bytes) -> bytes:
    """A command-group (0000,eeee) element in implicit VR little endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\0" if len(encoded) % 2 else encoded


def encode_store_response(primitive: Any) -> bytes | None:
    """The command set of a C-STORE-RSP, as pynetdicom would encode it, or None when the
    response carries more than the six usual elements (pynetdicom encodes those)."""
    if (primitive.OffendingElement is not None or primitive.ErrorComment is not None
            or primitive.AffectedSOPClassUID is None or primitive.AffectedSOPInstanceUID is None
            or primitive.MessageIDBeingRespondedTo is None or primitive.Status is None):
        return None
    body = b"".join((
        _element(0x0002, _uid(primitive.AffectedSOPClassUID)),
        _element(0x0100, struct.pack("<H", 0x8001)),  # CommandField: C-STORE-RSP
        _element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _element(0x0800, struct.pack("<H", 0x0101)),  # CommandDataSetType: no data set
        _element(0x0900, struct.pack("<H", primitive.Status)),
        _element(0x1000, _uid(primitive.AffectedSOPInstanceUID)),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


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


def install_bulk_recv() -> None:
    """Install :func:`bulk_recv` (idempotent): big reads, bounded allocation, PDU limit."""
    global _bulk_installed
    if not _bulk_installed:
        pynetdicom.transport.AssociationSocket.recv = bulk_recv  # type: ignore[method-assign]
        _bulk_installed = True


def install() -> bool:
    """Install :func:`event_wait` and :func:`bulk_recv` into pynetdicom (idempotent).

    Returns ``True`` when installed, ``False`` when pynetdicom's internals differ from what
    this was written for (then pynetdicom keeps its own timing).
    """
    global _installed
    if _installed:
        return True
    expected = (
        getattr(pynetdicom.association, "time", None) is time
        and getattr(pynetdicom.dul, "time", None) is time
        and hasattr(pynetdicom.dul.DULServiceProvider, "_is_transport_event")
        and hasattr(pynetdicom.transport.AssociationSocket, "recv")
        and getattr(pynetdicom.dul.DULServiceProvider, "run_reactor", None)
        is _original_run_reactor
        and hasattr(pynetdicom.dimse.DIMSEServiceProvider, "maximum_pdu_size")
        and hasattr(pynetdicom.dimse.DIMSEServiceProvider, "get_msg")
    )
    if not expected:
        LOGGER.warning(
            "pynetdicom %s internals differ from what event-driven waits expect; "
            "keeping pynetdicom's default transport",
            pynetdicom.__version__,
        )
        return False
    shim = _time_module_with(event_wait)
    pynetdicom.association.time = shim  # type: ignore[attr-defined]
    pynetdicom.dul.time = shim  # type: ignore[attr-defined]
    dul_class = pynetdicom.dul.DULServiceProvider
    dul_class.send_pdu = _send_pdu_and_wake  # type: ignore[method-assign]
    dul_class.run_reactor = _run_reactor_then_close_wake_pair  # type: ignore[method-assign]
    pynetdicom.dimse.DIMSEServiceProvider.send_msg = (  # type: ignore[method-assign]
        _send_msg_fast_store_response)
    pynetdicom.dimse.DIMSEServiceProvider.get_msg = (  # type: ignore[method-assign]
        _get_msg_leaving_responses)
    install_bulk_recv()
    _installed = True
    return True


def uninstall() -> None:
    """Give pynetdicom back the real ``time`` module and its own socket reads."""
    global _installed, _bulk_installed
    pynetdicom.association.time = time  # type: ignore[attr-defined]
    pynetdicom.dul.time = time  # type: ignore[attr-defined]
    pynetdicom.transport.AssociationSocket.recv = _original_recv  # type: ignore[method-assign]
    pynetdicom.dul.DULServiceProvider.send_pdu = _original_send_pdu  # type: ignore
    pynetdicom.dul.DULServiceProvider.run_reactor = _original_run_reactor  # type: ignore
    pynetdicom.dimse.DIMSEServiceProvider.send_msg = _original_send_msg  # type: ignore
    pynetdicom.dimse.DIMSEServiceProvider.get_msg = _original_get_msg  # type: ignore
    _installed = _bulk_installed = False
