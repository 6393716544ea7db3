"""systemd service notifications (``sd_notify``) without a dependency.

With ``Type=notify`` the unit waits for ``READY=1``; with ``WatchdogSec=`` systemd restarts
the node when ``WATCHDOG=1`` stops arriving. Both go as datagrams to ``$NOTIFY_SOCKET``;
outside systemd (no such variable) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

LOGGER = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ``STATUS=...``) to
    the service manager. Returns whether it was sent (False outside systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        LOGGER.warning("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], address, exc)
        return False
    return True


def watchdog_seconds() -> float | None:
    """The watchdog timeout systemd set for this process (``WatchdogSec=``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None
