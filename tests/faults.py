"""kill -9 at random moments of receive, inference and send, as often as asked.

Shared by tests/test_faults.py (a few rounds) and bench/faults.py (20 and more). One
``dcn-node serve`` child process (untrained lite models, CPU) sends its results to a
:class:`~tests.recording_pacs.RecordingPacs`; each round starts a new CT series from a
sender that behaves like a PACS (it keeps every instance not answered Success and sends it
again after a failure), sleeps a random time, notes what the node was doing, kills it with
SIGKILL and restarts it. At the end every sender must be done, every series ``done``, the
outbox empty, and the PACS must hold exactly one result set per series: each SOP Instance
UID of the set, none more (a re-send of the same UID supersedes; it is counted).
"""

from __future__ import annotations

import collections
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dcn_node.net import transport_tuning
from tests.conftest import NODE_AET
from tests.dicom_factory import ct_series
from tests.node_process import NodeProcess
from tests.recording_pacs import RecordingPacs


class RetryingSender(threading.Thread):
    """Sends a series like a PACS does: what was not answered Success is sent again.

    ``per_association``: release the association after this many C-STOREs and open a new
    one for the rest (a PACS that sends a study in several associations; behind a load
    balancer each may reach another receiver). ``pause_seconds``: wait this long after
    each acknowledged instance (keeps an association open long enough to be cut).
    """

    def __init__(self, datasets: list[Dataset], port: int, *, deadline_seconds: float = 600,
                 calling_aet: str = "PACS", per_association: int | None = None,
                 pause_seconds: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.datasets = datasets
        self.port = port
        self.calling_aet = calling_aet
        self.per_association = per_association
        self.pause_seconds = pause_seconds
        self.acknowledged: set[str] = set()
        self.failures = 0  # C-STOREs without a Success (node killed, refused ...)
        #: Why each failure happened (status, or the exception).
        self.failure_reasons: list[str] = []
        self.associations = 0
        self.refusals = 0  # associations not established (node down, backpressure)
        self._deadline = time.monotonic() + deadline_seconds
        self.sending = threading.Event()

    @property
    def done(self) -> bool:
        return len(self.acknowledged) == len(self.datasets)

    def run(self) -> None:
        # Stock pynetdicom's requestor can lose a fast response to its own reactor (its
        # pause is racy; pynetdicom issues #842/#850 describe the symptom): a PACS has no
        # such race, so the stand-in for one must not have it either.
        transport_tuning.install_safeguards()
        while not self.done and time.monotonic() < self._deadline:
            ae = AE(ae_title=self.calling_aet)
            ae.add_requested_context(CTImageStorage)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
            if not assoc.is_established:
                self.refusals += 1
                time.sleep(0.3)
                continue
            self.associations += 1
            failures_before = self.failures
            self.sending.set()
            try:
                todo = [ds for ds in self.datasets if ds.SOPInstanceUID not in self.acknowledged]
                for ds in todo[:self.per_association]:
                    status = assoc.send_c_store(ds)
                    if getattr(status, "Status", None) == 0x0000:
                        self.acknowledged.add(ds.SOPInstanceUID)
                        time.sleep(self.pause_seconds)
                    else:
                        self.failures += 1
                        self.failure_reasons.append(
                            f"status {getattr(status, 'Status', 'none (aborted/timeout)')}")
                        break
            except Exception as exc:  # the node died under us: try again
                self.failures += 1
                self.failure_reasons.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.sending.clear()
                if assoc.is_established:
                    assoc.release()
            if not self.done and self.failures > failures_before:
                time.sleep(0.3)  # after a failure; the next batch goes at once


def node_activity(spool_dir: Path, senders: list[RetryingSender]) -> set[str]:
    """What the node is doing now: receive, inference, send (any of them), or idle."""
    phases = set()
    if any(s.sending.is_set() for s in senders):
        phases.add("receive")
    try:
        db = sqlite3.connect(f"file:{spool_dir / 'index.sqlite3'}?mode=ro", uri=True,
                             timeout=5)
        try:
            if db.execute("SELECT COUNT(*) FROM jobs WHERE state='processing'").fetchone()[0]:
                phases.add("inference")
            if db.execute("SELECT COUNT(*) FROM deliveries WHERE state='pending'").fetchone()[0]:
                phases.add("send")
        finally:
            db.close()
    except sqlite3.Error:
        pass  # not created yet
    return phases or {"idle"}


@dataclass
class KillReport:
    rounds: int = 0
    series: int = 0
    instances: int = 0
    kills_by_phase: collections.Counter[str] = field(default_factory=collections.Counter)
    sender_failures: int = 0
    result_objects: int = 0
    resends: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        phases = ", ".join(f"{k} {v}" for k, v in sorted(self.kills_by_phase.items()))
        return [
            f"kill -9 rounds survived: {self.rounds} (node busy with: {phases})",
            f"series: {self.series}, instances acknowledged: {self.instances}, "
            f"C-STOREs to retry after kills: {self.sender_failures}",
            f"result objects at the PACS: {self.result_objects} distinct, "
            f"{self.resends} re-sent with the same UID (superseding), 0 missing, 0 extra",
            f"{self.seconds:.0f} s",
        ]


def kill_rounds(workdir: Path, models: Path, rounds: int, *, seed: int = 0,
                max_delay_seconds: float = 6.0, slices: int = 20, matrix: int = 64,
                pacs_delay_seconds: float = 0.5, log: object = print) -> KillReport:
    """Run ``rounds`` rounds of send + kill -9 + restart; check everything at the end.

    ``pacs_delay_seconds`` slows each C-STORE at the PACS, so that kills also land while
    results are being sent. Raises AssertionError with what is missing or duplicated.
    """
    rng = random.Random(seed)
    started = time.monotonic()
    pacs = RecordingPacs(delay_seconds=pacs_delay_seconds)
    pacs.start()
    node = NodeProcess(
        workdir,
        destinations=[pacs.destination()],
        inference={"enabled": True, "device": "cpu", "models_dir": str(models)},
        sender={"retry_initial_seconds": 0.3, "retry_max_interval_seconds": 1.0,
                "dimse_timeout_seconds": 30},
        completion={"quiet_seconds": 1.5, "check_interval_seconds": 0.2, "min_slices": 5},
    )
    report = KillReport(rounds=rounds)
    senders: list[RetryingSender] = []
    try:
        node.start()
        for number in range(rounds):
            series = ct_series(slices, announce=True, rows=matrix, columns=matrix)
            sender = RetryingSender(series, node.port)
            senders.append(sender)
            sender.start()
            time.sleep(rng.uniform(0.1, max_delay_seconds))
            phases = node_activity(node.workdir / "spool", senders)
            node.kill()
            for phase in phases:
                report.kills_by_phase[phase] += 1
            log(f"round {number + 1}/{rounds}: killed while {'+'.join(sorted(phases))}")  # type: ignore[operator]
            node.start()
        deadline = time.monotonic() + 120 + 20 * rounds
        studies = [s.datasets[0].StudyInstanceUID for s in senders]
        while time.monotonic() < deadline:
            if all(s.done for s in senders) and all(pacs.complete(st) for st in studies):
                break
            time.sleep(0.5)
        for sender in senders:
            sender.join(5)
        # Let in-flight deliveries settle, then look at the node's own account.
        time.sleep(1.0)
        status = node.status()
        _check(senders, pacs, status, node.workdir / "spool")
        report.series = len(senders)
        report.instances = sum(len(s.acknowledged) for s in senders)
        report.sender_failures = sum(s.failures for s in senders)
        report.result_objects = len(pacs.stored)
        report.resends = pacs.resends()
        assert node.terminate() == 0
    finally:
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(10)
        pacs.stop()
    report.seconds = time.monotonic() - started
    return report


def _check(senders: list[RetryingSender], pacs: RecordingPacs, status: dict,
           spool_dir: Path) -> None:
    problems = []
    by_series = {s["series_instance_uid"]: s for s in status["series"]}
    for sender in senders:
        first = sender.datasets[0]
        if not sender.done:
            problems.append(f"{first.SeriesInstanceUID}: sender has "
                            f"{len(sender.acknowledged)}/{len(sender.datasets)} acknowledged")
        record = by_series.get(first.SeriesInstanceUID)
        if record is None or record["state"] != "done":
            problems.append(f"{first.SeriesInstanceUID}: node state "
                            f"{record and record['state']} ({record and record['reason']})")
        stored = {p.stem for p in spool_dir.joinpath("instances").rglob(
            f"{first.SeriesInstanceUID}/*.dcm")}
        missing = sender.acknowledged - stored
        if missing:
            problems.append(f"{first.SeriesInstanceUID}: {len(missing)} acknowledged "
                            "instances not in the spool")
        at_pacs = pacs.uids_of(first.StudyInstanceUID)
        newest = _newest_result_set(spool_dir, first.SeriesInstanceUID)
        if not pacs.complete(first.StudyInstanceUID) or at_pacs != newest:
            problems.append(f"{first.SeriesInstanceUID}: PACS holds {len(at_pacs)} result "
                            f"objects, the newest result set has {len(newest)}; "
                            f"extra {len(at_pacs - newest)}, missing {len(newest - at_pacs)}")
    pending = {name: c.get("pending", 0) + c.get("dead", 0)
               for name, c in status["outbox"].items()}
    if any(pending.values()):
        problems.append(f"outbox not empty: {pending}")
    assert not problems, "\n".join(problems)


def _newest_result_set(spool_dir: Path, series_instance_uid: str) -> set[str]:
    """SOP Instance UIDs of the newest result set the node recorded for a series."""
    db = sqlite3.connect(f"file:{spool_dir / 'index.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute(
            "SELECT DISTINCT d.sop_instance_uid FROM deliveries d WHERE d.result_set_id = ("
            "SELECT MAX(result_set_id) FROM result_sets WHERE series_instance_uid = ?)",
            (series_instance_uid,)).fetchall()
    finally:
        db.close()
    return {r[0] for r in rows}
