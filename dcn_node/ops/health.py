"""Health of a running node: liveness (threads alive) and readiness (fit to take work).

``/healthz`` answers from :class:`Liveness`, ``/readyz`` from :class:`Readiness`; both are
assembled by :meth:`dcn_node.node.Node.liveness` and :meth:`~dcn_node.node.Node.readiness`
from the small checks here. The systemd watchdog is fed only while the node is live.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

#: The readiness checks, in the order they are reported (also the ``check`` label values).
READINESS_CHECKS = ("scp", "model", "spool", "store", "broker", "outbox")


@dataclass(frozen=True)
class Readiness:
    """One answer of every readiness check: ``None`` when it passes, else the reason."""

    checks: dict[str, str | None]

    @property
    def ok(self) -> bool:
        return all(reason is None for reason in self.checks.values())

    def to_json(self) -> bytes:
        body: dict[str, object] = {"status": "ready" if self.ok else "not ready"}
        reasons = {name: reason for name, reason in self.checks.items() if reason is not None}
        if reasons:
            body["reasons"] = reasons
        return json.dumps(body).encode()


@dataclass(frozen=True)
class Liveness:
    """Which of the node's threads are no longer running (empty: alive)."""

    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> bytes:
        if self.ok:
            return json.dumps({"status": "alive"}).encode()
        return json.dumps({"status": "not alive", "reasons": list(self.problems)}).encode()


def spool_problem(spool_dir: Path, min_free_bytes: int) -> str | None:
    """Why the spool cannot take instances: not writable, or free space below the limit
    (where C-STOREs are answered 0xA700). Writes and removes a small probe file."""
    probe = spool_dir / "incoming" / f"readyz-{os.getpid()}-{threading.get_ident()}-" \
                                     f"{uuid.uuid4().hex[:8]}.tmp"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return f"spool not writable: {exc.strerror or exc}"
    free = spool_free_bytes(spool_dir)
    if free < min_free_bytes:
        return f"spool has {free} bytes free, below storage.min_free_bytes ({min_free_bytes})"
    return None


def spool_free_bytes(spool_dir: Path) -> int:
    """Bytes available to the node's user on the spool's file system."""
    stats = os.statvfs(spool_dir)
    return stats.f_bavail * stats.f_frsize


def outbox_problem(oldest_pending_age: dict[str, float], stuck_seconds: float) -> str | None:
    """Why the outbox counts as stuck: a destination's oldest undelivered object is older
    than ``stuck_seconds`` (0 turns the check off)."""
    if not stuck_seconds:
        return None
    stuck = sorted(name for name, age in oldest_pending_age.items() if age > stuck_seconds)
    if not stuck:
        return None
    worst = max(oldest_pending_age[name] for name in stuck)
    return (f"results undelivered for over {stuck_seconds:.0f} s to {', '.join(stuck)} "
            f"(oldest {worst:.0f} s)")
