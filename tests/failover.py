"""Receivers behind haproxy sharing a spool folder and one PostgreSQL store (cluster mode),
results to a real Orthanc: the cluster, the account of what became of each series, and the
kill -9 rounds. Shared by tests/test_failover.py (a series split across three receivers, a
receiver killed mid-series, a few rounds) and bench/failover.py (20 rounds and more).

Each receiver is a ``dcn-node receive`` child process with its own node id, config and log,
the shared spool folder and store, and its ``/readyz`` on a port of its own, which haproxy
checks; the model runs in ``dcn-node worker`` processes (untrained lite models, CPU) that
take the jobs from RabbitMQ. Without a broker the receivers are ``dcn-node serve`` nodes
(all roles: each also runs the model, taking jobs from the store). Series come from a
:class:`RetryingSender` through haproxy, a few instances per association, so that the
balancer spreads one series over the receivers; what was not answered Success is sent
again, as a PACS does.

What is checked of each series (:func:`account`):

* lost: instances the sender got Success for that are not in the store's index, not in
  the shared spool folder, or not among the instances the SEG at Orthanc references (the
  analysed series);
* analyses: result sets recorded per generation (exactly one each);
* duplicate result sets at Orthanc: result series beyond one per kind (SEG, SC, SR, KOS),
  or result objects of the series that are not in its newest result set;
* re-sends: C-STOREs Orthanc stored beyond one per recorded delivery (Orthanc's own count,
  :meth:`~tests.orthanc.Orthanc.stores`); a kill between the PACS's answer and the
  record of it re-sends the same object under the same UID (superseding, not a second set);
* the series' state (``done``) and an empty outbox.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import random
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from dcn_node.store.spool import Spool
from tests.dicom_factory import ct_series
from tests.faults import RetryingSender
from tests.haproxy import HAProxy, Receiver
from tests.node_process import NodeProcess
from tests.orthanc import ORTHANC_AET, Orthanc

#: The destination name of Orthanc in the nodes' configs.
DESTINATION = "orthanc"


_PORTS = random.SystemRandom()
#: Every port :func:`listening_port` returned (its owner may not have bound it yet).
_HANDED_OUT: set[int] = set()
#: Nodes write every thread's stack to their log on SIGABRT (see :meth:`Cluster.stop`).
_FAULTHANDLER = {"PYTHONFAULTHANDLER": "1"}


def listening_port() -> int:
    """A free port below the kernel's ephemeral range (32768 and up on Linux).

    A cluster picks a dozen ports before its processes bind them, one after the other,
    over many seconds; a port from ``bind(0)`` is an ephemeral one, which an outgoing
    connection meanwhile (haproxy's health checks, the nodes' own clients) may take as its
    source port: the node then fails with EADDRINUSE. Ports from below that range are
    handed out only to those who ask for them by number. None is handed out twice in one
    test run: two picks of the same still-unbound port gave two nodes one metrics port.
    """
    for _ in range(200):
        port = _PORTS.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port between 20000 and 32000")


class Cluster:
    """``receivers`` receive nodes and ``workers`` worker processes on one store, spool
    folder and broker (``broker_url``), the receivers behind one haproxy. Without a
    broker: ``receivers`` serve nodes (all roles), no workers."""

    def __init__(self, workdir: Path, store_url: str, models: Path, pacs: Orthanc, *,
                 broker_url: str | None = None, receivers: int = 3, workers: int = 2,
                 quiet_seconds: float = 3.0, lease_seconds: float = 3.0) -> None:
        self.workdir = workdir
        self.store_url = store_url
        self.spool_dir = workdir / "shared-spool"
        self.nodes: dict[str, NodeProcess] = {}
        model = {"enabled": True, "device": "cpu", "models_dir": str(models)}
        common: dict[str, Any] = {
            "store": {"url": store_url, "lease_seconds": lease_seconds},
            # Workers record the deliveries of their results: the receivers' destinations.
            "destinations": [{"name": DESTINATION, "ae_title": ORTHANC_AET,
                              "host": "127.0.0.1", "port": pacs.dicom_port}],
            "logging": {"format": "json"},
        }
        if broker_url is not None:
            common["broker"] = {"url": broker_url, "republish_interval_seconds": 0.5,
                                "connect_timeout_seconds": 1.0}
        backends = []
        for number in range(1, receivers + 1):
            name = f"receiver-{number}"
            (workdir / name).mkdir(parents=True, exist_ok=True)
            health_port = listening_port()
            self.nodes[name] = NodeProcess(
                workdir / name, command="receive" if broker_url else "serve",
                spool_dir=self.spool_dir, env=_FAULTHANDLER,
                node={"id": name, "port": listening_port()},
                metrics={"host": "127.0.0.1", "port": health_port},
                sender={"retry_initial_seconds": 0.3, "retry_max_interval_seconds": 1.0,
                        "dimse_timeout_seconds": 30},
                completion={"quiet_seconds": quiet_seconds, "check_interval_seconds": 0.2,
                            "min_slices": 5},
                **({} if broker_url else {"inference": model}), **common)
            backends.append(Receiver(name, self.nodes[name].port, health_port))
        #: The names of the worker processes (none without a broker).
        self.workers: list[str] = []
        for number in range(1, (workers if broker_url else 0) + 1):
            name = f"worker-{number}"
            (workdir / name).mkdir(parents=True, exist_ok=True)
            self.nodes[name] = NodeProcess(
                workdir / name, command="worker", spool_dir=self.spool_dir,
                env=_FAULTHANDLER, node={"id": name},
                metrics={"host": "127.0.0.1", "port": listening_port()},
                inference=model, **common)
            self.workers.append(name)
        self.receivers = [r.name for r in backends]
        self.haproxy = HAProxy(workdir / "haproxy", backends, port=listening_port())
        #: Per node that did not stop on SIGTERM: the end of its log, stacks included.
        self.stuck: dict[str, str] = {}
        self._observer: Spool | None = None

    @property
    def port(self) -> int:
        """The DICOM port senders use: haproxy's."""
        return self.haproxy.port

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        self.haproxy.start()
        for name in self.receivers:
            self.haproxy.wait_until(name, "UP", timeout=120)

    def kill(self, name: str) -> None:
        """kill -9 the receiver."""
        self.nodes[name].kill()

    def restart(self, name: str, *, wait_up: bool = True) -> None:
        """Start it again (same id, port and config; a worker: until its /readyz answers
        200); a receiver with ``wait_up``: until haproxy routes to it again."""
        self.nodes[name].start()
        if wait_up and name in self.receivers:
            self.haproxy.wait_until(name, "UP", timeout=120)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every node still running (their exit codes), then haproxy. A node that
        does not stop within 30 s gets SIGABRT, which makes Python's faulthandler write
        every thread's stack to its log (:attr:`stuck`), and exit code None."""
        codes: dict[str, int | None] = {}
        try:
            for name, node in self.nodes.items():
                if node.process is not None and node.process.poll() is None:
                    try:
                        codes[name] = node.terminate()
                    except subprocess.TimeoutExpired:
                        codes[name] = None
                        node.process.send_signal(signal.SIGABRT)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            node.process.wait(10)
                        self.stuck[name] = node.log_path.read_text(errors="replace")[-6000:]
        finally:
            for node in self.nodes.values():
                if node.process is not None and node.process.poll() is None:
                    node.process.kill()
                    node.process.wait(10)
            self.haproxy.stop()
            if self._observer is not None:
                self._observer.close()
                self._observer = None
        return codes

    @property
    def store(self) -> Spool:
        """The store as the test reads it (its own connection, under its own id)."""
        if self._observer is None:
            self._observer = Spool(self.spool_dir, url=self.store_url, node_id="observer")
        return self._observer

    def activity(self, name: str, senders: list[RetryingSender]) -> set[str]:
        """What the node is doing now: receive (an association open to it through
        haproxy), inference (it holds a job), send (it holds a delivery)."""
        phases = set()
        if name in self.haproxy.busy() and any(s.sending.is_set() for s in senders):
            phases.add("receive")
        now = self.store.now()
        if self.store.query("SELECT COUNT(*) FROM jobs WHERE state='processing' AND "
                            "lease_owner=? AND lease_expires_at>?", (name, now))[0][0]:
            phases.add("inference")
        if self.store.query("SELECT COUNT(*) FROM deliveries WHERE state='pending' AND "
                            "lease_owner=? AND lease_expires_at>?", (name, now))[0][0]:
            phases.add("send")
        return phases

    def received(self, name: str) -> int:
        """Instances the receiver stored since it started (its /metrics)."""
        backend = next(r for r in self.haproxy.receivers if r.name == name)
        url = f"http://127.0.0.1:{backend.health_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return int(sum(sample.value for family in text_string_to_metric_families(text)
                       for sample in family.samples
                       if sample.name == "dcn_instances_received_total"))

    def summaries(self) -> list[dict[str, Any]]:
        """Every series summary line the receivers logged (JSON), restarts included."""
        lines = []
        for node in self.nodes.values():
            if node.log_path.exists():
                for line in node.log_path.read_text(errors="replace").splitlines():
                    if '"series_summary"' in line:
                        entry = json.loads(line)
                        if entry.get("event") == "series_summary":
                            lines.append(entry)
        return lines


def split_series(slices: int, matrix: int) -> list[Dataset]:
    """A CT series that announces its size (completion waits for all of it or quiet)."""
    return ct_series(slices, announce=True, rows=matrix, columns=matrix)


@dataclass
class SeriesAccount:
    """What became of one sent series (see the module's docstring)."""

    series_instance_uid: str
    sent: int
    acknowledged: int
    lost: int
    state: str | None
    generation: int | None
    analyses: dict[int, int]  # generation -> result sets recorded
    inference_runs: dict[int, int]  # generation -> inference_start events (a kill re-runs)
    result_objects: int  # at Orthanc, of this series
    duplicate_sets: int
    extra_objects: int
    missing_objects: int
    resends: int
    lost_detail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.state == "done" and self.duplicate_sets == 0
                and self.extra_objects == 0 and self.missing_objects == 0
                and self.acknowledged == self.sent
                and bool(self.analyses) and set(self.analyses.values()) == {1})


def account(cluster: Cluster, pacs: Orthanc, sender: RetryingSender) -> SeriesAccount:
    """The account of the series ``sender`` sent (see the module's docstring)."""
    store = cluster.store
    first = sender.datasets[0]
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    acknowledged = set(sender.acknowledged)
    indexed = {row[0] for row in store.query(
        "SELECT sop_instance_uid FROM instances WHERE series_instance_uid=?", (series,))}
    on_disk = {p.stem for p in cluster.spool_dir.joinpath("instances").rglob(f"{series}/*.dcm")}
    record = store.get_series(study, series)
    sets = store.query("SELECT result_set_id, generation FROM result_sets WHERE "
                       "series_instance_uid=? ORDER BY result_set_id", (series,))
    analyses = dict(collections.Counter(int(g) for _, g in sets))
    runs = dict(collections.Counter(g for g, event, _, _ in store.timeline(study, series)
                                    if event == "inference_start"))
    newest: dict[str, str] = {}
    recorded: collections.Counter[str] = collections.Counter()
    if sets:
        newest = dict(store.query(
            "SELECT sop_instance_uid, kind FROM deliveries WHERE result_set_id=? AND "
            "destination=?", (sets[-1][0], DESTINATION)))
        recorded.update(row[0] for row in store.query(
            "SELECT d.sop_instance_uid FROM deliveries d JOIN result_sets r ON "
            "r.result_set_id = d.result_set_id WHERE r.series_instance_uid=? AND "
            "d.destination=? AND d.state='sent'", (series, DESTINATION)))
    at_pacs = orthanc_results(pacs, study, series)
    kinds: dict[str, set[str]] = collections.defaultdict(set)
    for uid, result_series in at_pacs.items():
        kinds[newest.get(uid, "unknown")].add(result_series)
    duplicate_sets = sum(len(s) - 1 for s in kinds.values())
    stores = pacs.stores()
    resends = sum(max(0, stores[uid] - recorded[uid]) for uid in at_pacs)
    referenced = seg_references(pacs, [u for u, k in newest.items() if k == "seg"])
    lost_detail = []
    for what, have in (("index", indexed), ("spool folder", on_disk),
                       ("SEG references", referenced)):
        missing = acknowledged - have
        if missing:
            lost_detail.append(f"{len(missing)} acknowledged not in the {what}")
    lost = len(acknowledged - (indexed & on_disk & referenced))
    return SeriesAccount(
        series_instance_uid=series, sent=len(sender.datasets), acknowledged=len(acknowledged),
        lost=lost, state=record.state if record else None,
        generation=record.generation if record else None, analyses=analyses,
        inference_runs=runs, result_objects=len(at_pacs), duplicate_sets=duplicate_sets,
        extra_objects=len(set(at_pacs) - set(newest)),
        missing_objects=len(set(newest) - set(at_pacs)), resends=resends,
        lost_detail=lost_detail)


def orthanc_results(pacs: Orthanc, study: str, source_series: str) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID of every object Orthanc holds in ``study``
    outside the source series: the result objects."""
    found = {}
    for series in pacs.series_of_study(study):
        uid = series["MainDicomTags"]["SeriesInstanceUID"]
        if uid == source_series:
            continue
        for instance in pacs.get(f"/series/{series['ID']}/instances"):
            found[instance["MainDicomTags"]["SOPInstanceUID"]] = uid
    return found


def seg_references(pacs: Orthanc, seg_uids: list[str]) -> set[str]:
    """The source instances the SEG(s) reference (Referenced Series Sequence)."""
    referenced: set[str] = set()
    for uid in seg_uids:
        matches = pacs.request("POST", "/tools/find", {"Level": "Instance",
                                                       "Query": {"SOPInstanceUID": uid}})
        for instance_id in matches:
            ds = pydicom.dcmread(io.BytesIO(pacs.request("GET", f"/instances/{instance_id}/file")))
            for item in ds.ReferencedSeriesSequence:
                referenced |= {str(r.ReferencedSOPInstanceUID)
                               for r in item.ReferencedInstanceSequence}
    return referenced


def wait_settled(cluster: Cluster, pacs: Orthanc, senders: list[RetryingSender],
                 timeout: float) -> bool:
    """Until every sender is done, every series ``done`` with its newest result set at
    Orthanc and nothing pending in the outbox (or ``timeout``); True when settled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.done for s in senders) and _all_done(cluster, pacs, senders):
            return True
        time.sleep(0.5)
    return False


def _all_done(cluster: Cluster, pacs: Orthanc, senders: list[RetryingSender]) -> bool:
    store = cluster.store
    for sender in senders:
        first = sender.datasets[0]
        record = store.get_series(str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
        if record is None or record.state != "done":
            return False
    if store.query("SELECT COUNT(*) FROM deliveries WHERE state='pending'")[0][0]:
        return False
    return all(account(cluster, pacs, s).missing_objects == 0 for s in senders)


@dataclass
class Round:
    """One kill -9 round: whom, while doing what, and the account of its series."""

    number: int
    victim: str
    phases: set[str]
    series: SeriesAccount | None = None


@dataclass
class FailoverReport:
    rounds: list[Round]
    seconds: float
    settled: bool
    exit_codes: dict[str, int | None]
    receiver_sessions: dict[str, int]

    @property
    def lost(self) -> int:
        return sum(r.series.lost for r in self.rounds if r.series)

    @property
    def duplicate_sets(self) -> int:
        return sum(r.series.duplicate_sets + (r.series.extra_objects > 0)
                   for r in self.rounds if r.series)

    @property
    def states(self) -> collections.Counter[str]:
        return collections.Counter(str(r.series.state if r.series else None)
                                   for r in self.rounds)

    @property
    def ok(self) -> bool:
        return self.settled and all(r.series is not None and r.series.ok for r in self.rounds)

    def lines(self) -> list[str]:
        out = [f"{'round':>5}  {'killed':<11} {'while':<22} {'acked':>7} {'lost':>4} "
               f"{'dup sets':>8} {'analyses':>9} {'re-sends':>8}  state"]
        for r in self.rounds:
            s = r.series
            if s is None:
                out.append(f"{r.number:>5}  {r.victim:<11} {'+'.join(sorted(r.phases)):<22} "
                           "(no account)")
                continue
            analyses = ",".join(f"{g}:{n}" for g, n in sorted(s.analyses.items())) or "-"
            out.append(
                f"{r.number:>5}  {r.victim:<11} {'+'.join(sorted(r.phases)) or 'idle':<22} "
                f"{s.acknowledged:>3}/{s.sent:<3} {s.lost:>4} "
                f"{s.duplicate_sets + (s.extra_objects > 0):>8} {analyses:>9} "
                f"{s.resends:>8}  {s.state} (generation {s.generation})"
                + ("; " + "; ".join(s.lost_detail) if s.lost_detail else ""))
        phases = collections.Counter(p for r in self.rounds for p in (r.phases or {"idle"}))
        roles = collections.Counter(r.victim.split("-")[0] + "s" for r in self.rounds)
        resends = sum(r.series.resends for r in self.rounds if r.series)
        out += [
            f"kill -9 rounds: {len(self.rounds)} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(roles.items())) + "; victim busy with: "
            + ", ".join(f"{k} {v}" for k, v in sorted(phases.items())) + ")",
            f"lost instances: {self.lost}",
            f"duplicate result sets at Orthanc: {self.duplicate_sets}",
            "series states: " + ", ".join(f"{k} {v}" for k, v in sorted(self.states.items())),
            f"re-sent result objects (same UID, superseding): {resends}",
            "associations per receiver through haproxy: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.receiver_sessions.items())),
            f"settled: {self.settled}; exit codes at the end: {self.exit_codes}; "
            f"{self.seconds:.0f} s",
        ]
        return out


def failover_rounds(cluster: Cluster, pacs: Orthanc, rounds: int, *, seed: int = 0,
                    slices: int = 16, matrix: int = 64, per_association: int = 3,
                    max_delay_seconds: float = 8.0,
                    log: Callable[[str], None] = print) -> FailoverReport:
    """``rounds`` rounds: a new series through haproxy, a random wait, kill -9 of a node
    (one busy receiving, analysing or sending, in turn, when there is one: receivers
    receive and send, workers analyse), restart it. Then wait for every series to settle
    and account for each."""
    rng = random.Random(seed)
    started = time.monotonic()
    senders: list[RetryingSender] = []
    done_rounds: list[Round] = []
    wanted = ["receive", "inference", "send"]
    kills: collections.Counter[str] = collections.Counter()
    for number in range(1, rounds + 1):
        sender = RetryingSender(split_series(slices, matrix), cluster.port,
                                per_association=per_association, pause_seconds=0.05)
        senders.append(sender)
        sender.start()
        phase = wanted[(number - 1) % len(wanted)]
        deadline = time.monotonic() + rng.uniform(0.5, max_delay_seconds)
        activity: dict[str, set[str]] = {}
        while True:
            activity = {name: cluster.activity(name, senders) for name in cluster.nodes}
            busy = [name for name, phases in activity.items() if phase in phases]
            if busy or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # Of the candidates, one killed least so far: every node gets its turn.
        candidates = busy or sorted(cluster.nodes)
        fewest = min(kills[name] for name in candidates)
        victim = rng.choice([name for name in candidates if kills[name] == fewest])
        kills[victim] += 1
        cluster.kill(victim)
        done_rounds.append(Round(number, victim, activity[victim]))
        log(f"round {number}/{rounds}: killed {victim} while "
            f"{'+'.join(sorted(activity[victim])) or 'idle'}")
        time.sleep(rng.uniform(0.0, 2.0))
        cluster.restart(victim, wait_up=False)
    settled = wait_settled(cluster, pacs, senders, timeout=180 + 30 * rounds)
    for sender in senders:
        sender.join(5)
    for r, sender in zip(done_rounds, senders, strict=True):
        r.series = account(cluster, pacs, sender)
    sessions = cluster.haproxy.sessions()
    codes = cluster.stop()
    return FailoverReport(done_rounds, time.monotonic() - started, settled, codes, sessions)
