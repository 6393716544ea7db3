"""Inference jobs through RabbitMQ (Celery) to `dcn-node worker` processes, on the real
servers: a private rabbitmq-server (tests/rabbitmq.py), the session's PostgreSQL
(tests/postgres.py), Orthanc as the PACS (tests/orthanc.py) and `dcn-node receive` /
`dcn-node worker` child processes (tests/node_process.py) sharing one spool folder.

- a series sent with dcmtk's storescu to a receiver is analysed by a worker (the lite
  networks, untrained) and reaches Orthanc as one SEG/SC/SR/KOS set;
- a worker killed (-9) in mid-analysis (the sleep stub) leaves the job to the other
  worker: nothing lost, exactly one result set at Orthanc, each object stored once;
- the broker stopped and started again: /readyz says why meanwhile, a task queued in the
  broker and one being analysed are not lost, a series sent afterwards is analysed;
- a publish lost (the job recorded while the broker was down) is published later;
  a duplicate task for a finished job does nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dcn_node.config import parse_settings
from dcn_node.store.spool import Spool
from tests.conftest import NODE_AET, dcmtk_env, free_port, require_tool, test_config, wait_for
from tests.dicom_factory import ct_series, write_files
from tests.failover import account
from tests.faults import RetryingSender
from tests.node_process import NodeProcess
from tests.orthanc import ORTHANC_AET, Orthanc
from tests.postgres import PostgresServer
from tests.rabbitmq import RabbitMQ

pytestmark = pytest.mark.slow

DESTINATION = "orthanc"  # the name tests/failover.py's account() reads deliveries under
QUEUE = "dcn-test"


class WorkerCluster:
    """One ``receive`` node and ``workers`` ``worker`` processes on one store, broker and
    spool folder. ``stub_seconds``: the workers sleep instead of running the model."""

    def __init__(self, workdir: Path, store_url: str, broker: RabbitMQ, counting_pacs: Orthanc,
                 models: Path, *, workers: int = 1, stub_seconds: float | None = None,
                 lease_seconds: float = 3.0) -> None:
        self.workdir = workdir
        self.store_url = store_url
        self.spool_dir = workdir / "shared-spool"
        common: dict[str, Any] = {
            "storage": {"spool_dir": str(self.spool_dir)},
            "store": {"url": store_url, "lease_seconds": lease_seconds},
            "broker": {"url": broker.url, "queue": QUEUE, "republish_interval_seconds": 0.5,
                       "connect_timeout_seconds": 1.0},
            "logging": {"format": "json"},
            # The workers record the deliveries of their results: they need the same
            # destinations as the receivers, which send them.
            "destinations": [{"name": DESTINATION, "ae_title": ORTHANC_AET,
                              "host": "127.0.0.1", "port": counting_pacs.dicom_port}],
        }
        (workdir / "receiver").mkdir(parents=True)
        self.receiver = NodeProcess(
            workdir / "receiver", command="receive", spool_dir=self.spool_dir,
            node={"id": "receiver"}, metrics={"host": "127.0.0.1", "port": free_port()},
            sender={"retry_initial_seconds": 0.3, "retry_max_interval_seconds": 1.0},
            completion={"quiet_seconds": 2.0, "check_interval_seconds": 0.2,
                        "min_slices": 5},
            **common)
        self.workers: dict[str, NodeProcess] = {}
        for number in range(1, workers + 1):
            name = f"worker-{number}"
            (workdir / name).mkdir(parents=True)
            self.workers[name] = NodeProcess(
                workdir / name, command="worker", spool_dir=self.spool_dir,
                node={"id": name},
                inference={"enabled": True, "device": "cpu", "models_dir": str(models),
                           "stub_seconds": stub_seconds},
                **common)
        self._store: Spool | None = None

    def start(self) -> None:
        self.receiver.start()
        for worker in self.workers.values():
            worker.start()

    def stop(self) -> None:
        for node in [self.receiver, *self.workers.values()]:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait(10)
        if self._store is not None:
            self._store.close()

    @property
    def store(self) -> Spool:
        if self._store is None:
            self._store = Spool(self.spool_dir, url=self.store_url, node_id="observer")
        return self._store

    def job_holder(self) -> str | None:
        """The node id holding a job now (None: no job is being analysed)."""
        rows = self.store.query("SELECT lease_owner FROM jobs WHERE state='processing' AND "
                                "lease_owner IS NOT NULL")
        return str(rows[0][0]) if rows else None

    def inference_started(self, sender: Any) -> bool:
        first = sender.datasets[0]
        return any(event == "inference_start" for _, event, _, _ in self.store.timeline(
            str(first.StudyInstanceUID), str(first.SeriesInstanceUID)))

    def done(self, senders: list[Any]) -> bool:
        for sender in senders:
            first = sender.datasets[0]
            record = self.store.get_series(str(first.StudyInstanceUID),
                                           str(first.SeriesInstanceUID))
            if record is None or record.state != "done":
                return False
        pending = self.store.query("SELECT COUNT(*) FROM deliveries WHERE state='pending'")
        return not pending[0][0]

    def log(self, name: str) -> str:
        node = self.receiver if name == "receiver" else self.workers[name]
        return node.log_path.read_text(errors="replace")


@pytest.fixture
def start_cluster(tmp_path: Path, postgres_server: PostgresServer, broker: RabbitMQ,
                  counting_pacs: Orthanc, untrained_models: Path) -> Iterator[Any]:
    clusters: list[WorkerCluster] = []

    def _start(**options: Any) -> WorkerCluster:
        cluster = WorkerCluster(tmp_path / f"cluster-{len(clusters)}",
                                postgres_server.new_database(), broker, counting_pacs,
                                untrained_models, **options)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield _start
    for cluster in clusters:
        cluster.stop()


def http(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(port: int, name: str, **labels: str) -> float | None:
    _, body = http(port, "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return None


def check_one_set_each(cluster: WorkerCluster, counting_pacs: Orthanc, senders: list[Any],
                       runs: dict[int, int] | None = None) -> None:
    """Every series: nothing lost, one result set recorded, the newest at Orthanc and no
    other, each object stored there once."""
    stores = counting_pacs.stores()
    for sender in senders:
        result = account(cluster, counting_pacs, sender)  # type: ignore[arg-type]
        assert result.ok, result
        assert result.analyses == {0: 1}, result
        if runs is not None:
            assert result.inference_runs == runs, result
        assert result.result_objects >= 4 and result.resends == 0, result
    at_pacs = cluster.store.query("SELECT sop_instance_uid FROM deliveries")
    assert {stores[uid] for (uid,) in at_pacs} == {1}


def test_a_series_sent_to_a_receiver_is_analysed_by_a_worker_and_reaches_orthanc_once(
        start_cluster: Any, counting_pacs: Orthanc, tmp_path: Path) -> None:
    cluster = start_cluster(workers=1)
    series = ct_series(24, announce=True, rows=64, columns=64)
    paths = write_files(series, tmp_path / "series")
    done = subprocess.run(
        [require_tool("storescu"), "-aet", "MODALITY1", "-aec", NODE_AET, "127.0.0.1",
         str(cluster.receiver.port), *map(str, paths)],
        capture_output=True, text=True, timeout=120, env=dcmtk_env())
    assert done.returncode == 0, done.stderr
    sender = SimpleNamespace(datasets=series,
                             acknowledged={str(ds.SOPInstanceUID) for ds in series})
    wait_for(lambda: cluster.done([sender]), timeout=240, interval=0.5)
    check_one_set_each(cluster, counting_pacs, [sender], runs={0: 1})
    kinds = {kind for (kind,) in cluster.store.query("SELECT DISTINCT kind FROM deliveries")}
    assert kinds == {"seg", "sc", "sr", "ko"}
    # The worker ran the model; the receiver did not (it has none).
    assert "Analyzing series" in cluster.log("worker-1")
    assert "Analyzing series" not in cluster.log("receiver")
    # Each process says what it does and that it is ready (the broker check included).
    for port, role in ((cluster.receiver.metrics_port, "receive"),
                       (cluster.workers["worker-1"].metrics_port, "worker")):
        assert metric(port, "dcn_role_info", role=role) == 1
        assert metric(port, "dcn_ready_check", check="broker") == 1
        assert http(port, "/readyz")[0] == 200
    assert metric(cluster.workers["worker-1"].metrics_port, "dcn_series_total",
                  outcome="processed") == 1


def test_a_worker_killed_mid_analysis_leaves_the_job_to_the_other_worker(
        start_cluster: Any, counting_pacs: Orthanc) -> None:
    """The job's holder is killed 1 s into its 6 s "analysis": the broker gives its
    message to the other worker, which finds the job still claimed (its lease has not
    run out) and does nothing; once the lease runs out the receiver publishes the job
    again and the other worker analyses it. One result set, each object stored once."""
    cluster = start_cluster(workers=2, stub_seconds=6.0, lease_seconds=3.0)
    sender = RetryingSender(ct_series(12, announce=True, rows=64, columns=64),
                            cluster.receiver.port)
    sender.start()
    holder = wait_for(cluster.job_holder, timeout=120, interval=0.1)
    wait_for(lambda: cluster.inference_started(sender), timeout=60, interval=0.1)
    time.sleep(1.0)
    assert cluster.job_holder() == holder
    cluster.workers[holder].kill()
    other = next(name for name in cluster.workers if name != holder)
    wait_for(lambda: cluster.done([sender]), timeout=180, interval=0.5)
    sender.join(10)
    check_one_set_each(cluster, counting_pacs, [sender], runs={0: 2})
    assert "Analyzing series" in cluster.log(other)
    # The killed worker comes back under its id and takes work again.
    cluster.workers[holder].start()
    second = RetryingSender(ct_series(12, announce=True, rows=64, columns=64),
                            cluster.receiver.port)
    second.start()
    wait_for(lambda: cluster.done([second]), timeout=180, interval=0.5)
    check_one_set_each(cluster, counting_pacs, [sender, second])


def test_a_broker_restart_loses_no_task_and_later_series_are_analysed(
        start_cluster: Any, counting_pacs: Orthanc, broker: RabbitMQ) -> None:
    """One worker, 5 s per series: while it analyses the first series, the second
    series' task waits in the quorum queue; the broker is stopped and started again.
    Both are analysed once; /readyz failed with the reason meanwhile; a third series
    sent afterwards is analysed too."""
    cluster = start_cluster(workers=1, stub_seconds=5.0, lease_seconds=3.0)
    port = cluster.receiver.metrics_port
    first = RetryingSender(ct_series(12, announce=True, rows=64, columns=64),
                           cluster.receiver.port)
    first.start()
    wait_for(cluster.job_holder, timeout=120, interval=0.1)
    second = RetryingSender(ct_series(12, announce=True, rows=64, columns=64),
                            cluster.receiver.port)
    second.start()
    wait_for(lambda: broker.queue_depth(QUEUE)[0] >= 1, timeout=60, interval=0.2)
    broker.stop()
    # (the receiver keeps the broker check's answer for a second)
    status, body = wait_for(lambda: (answer := http(port, "/readyz"))[0] == 503 and answer,
                            timeout=10, interval=0.2)
    reasons = json.loads(body)["reasons"]
    assert reasons["broker"].startswith("broker unreachable at amqp://")
    assert "guest:guest" not in body.decode()  # the password is blanked out
    assert metric(port, "dcn_ready_check", check="broker") == 0
    broker.start()
    wait_for(lambda: http(port, "/readyz")[0] == 200, timeout=30, interval=0.5)
    wait_for(lambda: cluster.done([first, second]), timeout=180, interval=0.5)
    third = RetryingSender(ct_series(12, announce=True, rows=64, columns=64),
                           cluster.receiver.port)
    third.start()
    wait_for(lambda: cluster.done([third]), timeout=180, interval=0.5)
    for sender in (first, second, third):
        sender.join(10)
    check_one_set_each(cluster, counting_pacs, [first, second, third])
    log = cluster.log("receiver")
    assert "Broker unreachable" in log and "Broker reachable again" in log


def test_jobs_recorded_while_the_broker_is_down_are_published_when_it_is_back(
        start_cluster: Any, counting_pacs: Orthanc, broker: RabbitMQ) -> None:
    """The receiver completes a series while the broker is down (the publish fails; the
    job waits in the store) and publishes it once the broker is back. A task published
    again for the finished job (a duplicate) does nothing."""
    cluster = start_cluster(workers=1, stub_seconds=0.5)
    broker.stop()
    sender = RetryingSender(ct_series(12, announce=True, rows=64, columns=64),
                            cluster.receiver.port)
    sender.start()
    wait_for(lambda: cluster.store.count_jobs("queued") == 1, timeout=60, interval=0.2)
    time.sleep(2.0)
    assert cluster.store.count_jobs("queued") == 1  # nothing took it meanwhile
    broker.start()
    wait_for(lambda: cluster.done([sender]), timeout=180, interval=0.5)
    check_one_set_each(cluster, counting_pacs, [sender], runs={0: 1})
    # A duplicate task for the finished job: the worker claims nothing and records nothing.
    from dcn_node.pipeline.broker import TASK_NAME, celery_app

    settings = parse_settings(test_config(cluster.spool_dir, store={"url": cluster.store_url},
                                          broker={"url": broker.url, "queue": QUEUE}))
    (job,) = cluster.store.list_jobs()
    celery_app(settings.broker).send_task(TASK_NAME, args=[job.job_id, job.generation],
                                          queue=QUEUE, routing_key=QUEUE)
    wait_for(lambda: "finished or claimed by a live worker" in cluster.log("worker-1"),
             timeout=60, interval=0.3)
    assert [(j.state, j.claim) for j in cluster.store.list_jobs()] == [("done", 1)]
    check_one_set_each(cluster, counting_pacs, [sender], runs={0: 1})
