"""Claims that hold while their holder works: who this node is, and a thread that renews.

A node claims a job (:meth:`~dcn_node.store.spool.Spool.claim_next_job`) or deliveries
(:meth:`~dcn_node.store.outbox.Outbox.claim`) under a lease in its name; in a store shared
by several nodes (PostgreSQL) the lease runs out unless renewed, and the work is then
anyone's. :class:`LeaseKeeper` renews what this node holds every third of the lease, on
one thread, until the holder finishes (a renewal that no longer applies drops the claim).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Hashable

from dcn_node.errors import StoreUnavailableError

LOGGER = logging.getLogger(__name__)


def default_node_id() -> str:
    """``host-pid-xxxx``: unique to this process (and to each node object in it)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class LeaseKeeper:
    """Renews the leases of the claims registered with :meth:`hold` until they end.

    Parameters
    ----------
    every_seconds:
        How often each held claim is renewed (a third of the lease, say).
    name:
        The thread's name.

    Each claim is held with its own ``renew`` function, which extends the lease and
    returns whether the claim is still its holder's; False (finished, or taken over
    after the lease ran out) ends the holding. :meth:`release` ends it at once.
    """

    def __init__(self, every_seconds: float, name: str = "lease-keeper") -> None:
        self.every_seconds = every_seconds
        self._held: dict[Hashable, Callable[[], bool]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def hold(self, key: Hashable, renew: Callable[[], bool]) -> None:
        """Renew ``key``'s lease with ``renew`` from now on (starts the thread)."""
        with self._lock:
            self._held[key] = renew
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._held.pop(key, None)

    def holds(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._held

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_seconds):
            with self._lock:
                held = list(self._held.items())
            for key, renew in held:
                try:
                    still = renew()
                except StoreUnavailableError as exc:  # logged by the store; next time
                    LOGGER.debug("Lease of %s not renewed: %s", key, exc)
                    continue
                except Exception:  # try again next time
                    LOGGER.exception("Renewing the lease of %s failed", key)
                    continue
                if not still:
                    LOGGER.debug("Lease of %s no longer held (finished or taken over)", key)
                    self.release(key)
