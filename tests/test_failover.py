"""Three ``dcn-node receive`` nodes behind haproxy (L4) and two ``dcn-node worker``
processes on RabbitMQ, one shared spool folder, one PostgreSQL store, Orthanc as the PACS
(tests/failover.py): a series split across the three receivers is analysed once and
reaches Orthanc as one result set; a receiver killed (-9) mid-series loses nothing
acknowledged and duplicates nothing; a few kill rounds across receivers and workers
(bench/failover.py runs 20)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.failover import Cluster, account, failover_rounds, split_series, wait_settled
from tests.faults import RetryingSender
from tests.haproxy import require_haproxy
from tests.orthanc import Orthanc
from tests.postgres import PostgresServer
from tests.rabbitmq import RabbitMQ

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path, postgres_server: PostgresServer, untrained_models: Path,
            counting_pacs: Orthanc, broker: RabbitMQ) -> Iterator[Cluster]:
    require_haproxy()
    nodes = Cluster(tmp_path, postgres_server.new_database(), untrained_models, counting_pacs,
                    broker_url=broker.url, receivers=3, workers=2)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def test_a_series_split_across_three_receivers_is_analysed_once_per_generation(
        cluster: Cluster, counting_pacs: Orthanc) -> None:
    """24 slices in 8 associations through haproxy, spread over the three receivers: one
    analysis, one result set at Orthanc. A late slice (to whichever receiver haproxy picks)
    makes generation 1: analysed once too; Orthanc stores each object once per set."""
    series = split_series(25, 64)
    sender = RetryingSender(series[:-1], cluster.port, per_association=3)
    sender.start()
    sender.join(180)
    assert sender.done and sender.failures == 0, sender.failure_reasons
    assert sender.associations == 8
    # The balancer spread the associations, and every receiver stored part of the series.
    received = {name: cluster.received(name) for name in cluster.receivers}
    assert sum(received.values()) == len(series) - 1
    assert all(count > 0 for count in received.values()), received
    assert wait_settled(cluster, counting_pacs, [sender], timeout=240)
    first = account(cluster, counting_pacs, sender)
    assert first.ok, first
    assert first.analyses == {0: 1} and first.inference_runs == {0: 1}
    assert first.resends == 0

    late = RetryingSender(series[-1:], cluster.port)
    late.start()
    late.join(60)
    assert late.done, late.failure_reasons
    whole = RetryingSender(series, cluster.port)  # the account of both sends (not started)
    whole.acknowledged = sender.acknowledged | late.acknowledged
    assert wait_settled(cluster, counting_pacs, [whole], timeout=240)
    result = account(cluster, counting_pacs, whole)
    assert result.ok, result
    assert result.generation == 1 and result.acknowledged == len(series)
    assert result.analyses == {0: 1, 1: 1} and result.inference_runs == {0: 1, 1: 1}
    kinds = {kind for (kind,) in cluster.store.query(
        "SELECT DISTINCT kind FROM deliveries")}
    assert kinds == {"seg", "sc", "sr", "ko"}
    assert result.duplicate_sets == 0 and result.result_objects >= len(kinds)
    # Orthanc stored each result object once per set it belongs to: no receiver sent any
    # of them twice (the same UIDs in both sets: the newer supersedes).
    stores = counting_pacs.stores()
    sent = collections.Counter(uid for (uid,) in cluster.store.query(
        "SELECT sop_instance_uid FROM deliveries WHERE state='sent'"))
    assert {uid: stores[uid] for uid in sent} == dict(sent)
    assert result.resends == 0
    # One summary line per generation, from whichever receiver saw its set delivered.
    summaries = [s for s in cluster.summaries()
                 if s.get("series_instance_uid") == result.series_instance_uid]
    assert sorted((s["generation"], s["outcome"]) for s in summaries) == [
        (0, "delivered"), (1, "delivered")]


def test_a_receiver_killed_mid_series_loses_nothing_acknowledged(
        cluster: Cluster, counting_pacs: Orthanc) -> None:
    """kill -9 of the receiver an association is sending to through haproxy; the sender
    sends the rest again through haproxy (to the other two), the killed one restarts."""
    series = split_series(30, 64)
    sender = RetryingSender(series, cluster.port, per_association=5, pause_seconds=0.2)
    sender.start()

    def busy_receiver() -> str | None:
        """The receiver of the second association, in its middle."""
        busy = cluster.haproxy.busy()
        return busy[0] if len(sender.acknowledged) in (6, 7, 8) and len(busy) == 1 else None

    victim = wait_for(busy_receiver, timeout=120, interval=0.02)
    cluster.kill(victim)
    acknowledged_at_kill = len(sender.acknowledged)
    sender.join(180)
    assert sender.done, sender.failure_reasons
    assert sender.failures >= 1, "the kill cut no association"
    assert acknowledged_at_kill < len(series)
    cluster.restart(victim)
    assert wait_settled(cluster, counting_pacs, [sender], timeout=240)

    result = account(cluster, counting_pacs, sender)
    assert result.lost == 0, result.lost_detail
    assert result.state == "done"
    assert result.duplicate_sets == 0 and result.extra_objects == 0
    assert result.missing_objects == 0
    assert result.analyses and set(result.analyses.values()) == {1}, result.analyses
    assert result.resends == 0
    assert result.ok, result


def test_kill_rounds_across_receivers_and_workers(cluster: Cluster, counting_pacs: Orthanc) -> None:
    """bench/failover.py's rounds, three of them: a receiver receiving, a worker
    analysing, a receiver sending."""
    report = failover_rounds(cluster, counting_pacs, 3, seed=3, slices=12, max_delay_seconds=6.0)
    print("\n".join(report.lines()))
    assert report.settled, "\n".join(report.lines())
    assert report.lost == 0 and report.duplicate_sets == 0, "\n".join(report.lines())
    assert report.states == {"done": 3}, "\n".join(report.lines())
    assert report.ok, "\n".join(report.lines())
    assert set(report.exit_codes.values()) == {0}, (report.exit_codes, cluster.stuck)
