"""pynetdicom transport tuning: shorter polling sleeps while busy, bulk socket reads.

Measured on a 300-image 512x512 CT sent by dcmtk's storescu over loopback; see
bench/ingest.py. Both changes touch pynetdicom internals, are checked against the version
they were written for, and leave pynetdicom untouched (with a warning) when it differs.

Polling sleeps
--------------
pynetdicom's DUL thread and association reactor poll: every idle loop sleeps 1 ms
(``DULServiceProvider._run_loop_delay`` and a fixed ``time.sleep(0.001)`` in
``Association._run_reactor``). During a transfer each C-STORE waits through about three
such sleeps (DUL receive, reactor pick-up, DUL send): a 300-image CT took ~0.95 s on
loopback against 0.32 s for dcmtk's storescp. With 50 us sleeps it took ~0.6 s.

Short sleeps cost CPU, so they apply only to a thread whose association received a PDU
within :data:`ACTIVE_WINDOW_SECONDS`; an idle association keeps pynetdicom's 1 ms. The
decision reads the DUL idle timer, which pynetdicom restarts on every PDU it receives.

Bulk reads
----------
``AssociationSocket.recv`` reads 4096 bytes per ``socket.recv`` call and appends each chunk
to a bytearray: ~37,000 Python-level calls for a 150 MB series. :func:`bulk_recv` reads
straight into one preallocated buffer with ``recv_into``, as many bytes as the kernel has.
The buffer grows with what arrives (at most :data:`MAX_PREALLOCATION_BYTES` ahead), never
to the length a peer merely declares, and PDUs over the receiving AE's limit are refused
before anything is read (:func:`dcn_node.limits.check_pdu_length`). The Storage SCP always
installs the bulk reads for that reason (:func:`install_bulk_recv`); the polling change
follows ``node.transport_tuning``.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from typing import Any

import pynetdicom.association
import pynetdicom.dul
import pynetdicom.transport

from dcn_node.limits import check_pdu_length

LOGGER = logging.getLogger(__name__)

#: Sleep used instead of <= 1 ms polling sleeps while a transfer is active.
BUSY_SLEEP_SECONDS = 50e-6
#: An association that received a PDU this recently counts as active.
ACTIVE_WINDOW_SECONDS = 0.25

#: The read buffer is allocated at most this far ahead of the bytes that arrived.
MAX_PREALLOCATION_BYTES = 4 * 1024 * 1024

_real_sleep = time.sleep
_installed = False
_bulk_installed = False


def _recently_active(thread: threading.Thread) -> bool:
    # The DUL thread is the DULServiceProvider itself; an association thread has .dul.
    dul = getattr(thread, "dul", thread)
    timer = getattr(dul, "_idle_timer", None)
    started = getattr(timer, "_start_time", None)
    return started is not None and time.time() - started < ACTIVE_WINDOW_SECONDS


def _work_pending(thread: threading.Thread) -> bool:
    """True when the polling thread has something to do right now."""
    if isinstance(thread, pynetdicom.dul.DULServiceProvider):
        # Bytes waiting on the socket, or a primitive (our C-STORE response) to send.
        sock = thread.socket
        return bool(thread.to_provider_queue.queue) or (sock is not None and sock.ready)
    dul = getattr(thread, "dul", None)
    return dul is not None and bool(dul.to_user_queue.queue)


def adaptive_sleep(seconds: float) -> None:
    """``time.sleep`` for pynetdicom's reactors.

    While the caller's association is busy: no sleep when work is already waiting (just
    let other threads run), a short one otherwise. Idle associations keep the 1 ms poll.
    """
    if seconds <= 0.001:
        thread = threading.current_thread()
        if _recently_active(thread):
            seconds = 0.0 if _work_pending(thread) else min(seconds, BUSY_SLEEP_SECONDS)
    _real_sleep(seconds)


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
    """Install :func:`adaptive_sleep` and :func:`bulk_recv` into pynetdicom (idempotent).

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
    )
    if not expected:
        LOGGER.warning(
            "pynetdicom %s internals differ from what low-latency polling expects; "
            "keeping pynetdicom's default transport",
            pynetdicom.__version__,
        )
        return False
    shim = _time_module_with(adaptive_sleep)
    pynetdicom.association.time = shim  # type: ignore[attr-defined]
    pynetdicom.dul.time = shim  # type: ignore[attr-defined]
    install_bulk_recv()
    _installed = True
    return True


def uninstall() -> None:
    """Give pynetdicom back the real ``time`` module and its own socket reads."""
    global _installed, _bulk_installed
    pynetdicom.association.time = time  # type: ignore[attr-defined]
    pynetdicom.dul.time = time  # type: ignore[attr-defined]
    pynetdicom.transport.AssociationSocket.recv = _original_recv  # type: ignore[method-assign]
    _installed = _bulk_installed = False
