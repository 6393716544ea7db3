"""Shorter pynetdicom polling sleeps while a peer is sending.

pynetdicom's DUL thread and association reactor poll: every idle loop sleeps 1 ms
(``DULServiceProvider._run_loop_delay`` and a fixed ``time.sleep(0.001)`` in
``Association._run_reactor``). During a transfer each C-STORE waits through about three
such sleeps (DUL receive, reactor pick-up, DUL send): a 300-image CT took ~0.95 s on
loopback against 0.32 s for dcmtk's storescp. With 50 us sleeps it took ~0.6 s.

Short sleeps cost CPU, so they apply only to a thread whose association received a PDU
within :data:`ACTIVE_WINDOW_SECONDS`; an idle association keeps pynetdicom's 1 ms. The
decision reads the DUL idle timer, which pynetdicom restarts on every PDU it receives.

This touches pynetdicom internals (module ``time`` references, ``_idle_timer``); it checks
they exist and leaves pynetdicom untouched, with a warning, if they do not.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from typing import Any

import pynetdicom.association
import pynetdicom.dul

LOGGER = logging.getLogger(__name__)

#: Sleep used instead of <= 1 ms polling sleeps while a transfer is active.
BUSY_SLEEP_SECONDS = 50e-6
#: An association that received a PDU this recently counts as active.
ACTIVE_WINDOW_SECONDS = 0.25

_real_sleep = time.sleep
_installed = False


def _recently_active(thread: threading.Thread) -> bool:
    # The DUL thread is the DULServiceProvider itself; an association thread has .dul.
    dul = getattr(thread, "dul", thread)
    timer = getattr(dul, "_idle_timer", None)
    started = getattr(timer, "_start_time", None)
    return started is not None and time.time() - started < ACTIVE_WINDOW_SECONDS


def adaptive_sleep(seconds: float) -> None:
    """``time.sleep`` for pynetdicom's reactors: short while the caller's association is busy."""
    if seconds <= 0.001 and _recently_active(threading.current_thread()):
        seconds = min(seconds, BUSY_SLEEP_SECONDS)
    _real_sleep(seconds)


def _time_module_with(sleep: Any) -> types.ModuleType:
    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = sleep  # type: ignore[attr-defined]
    return shim


def install() -> bool:
    """Route pynetdicom's polling sleeps through :func:`adaptive_sleep` (idempotent).

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
    )
    if not expected:
        LOGGER.warning(
            "pynetdicom %s internals differ from what low-latency polling expects; "
            "keeping pynetdicom's default 1 ms polling",
            pynetdicom.__version__,
        )
        return False
    shim = _time_module_with(adaptive_sleep)
    pynetdicom.association.time = shim  # type: ignore[attr-defined]
    pynetdicom.dul.time = shim  # type: ignore[attr-defined]
    _installed = True
    return True


def uninstall() -> None:
    """Give pynetdicom back the real ``time`` module."""
    global _installed
    pynetdicom.association.time = time  # type: ignore[attr-defined]
    pynetdicom.dul.time = time  # type: ignore[attr-defined]
    _installed = False
