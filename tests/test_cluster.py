"""Nodes sharing one PostgreSQL store (cluster mode), in process: a series sent to one of
them is analysed once per generation and each result object reaches the PACS once, and a
worker whose lease another node took over records nothing."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dcn_node.config import parse_settings
from dcn_node.inference.engine import AnalysisResult, Engine
from dcn_node.node import Node
from dcn_node.store.spool import Spool
from dcn_node.volume import Volume
from dcn_train.phantom import generate_phantom
from tests.conftest import send_datasets, test_config, wait_for
from tests.postgres import PostgresServer
from tests.recording_pacs import RecordingPacs


@pytest.fixture
def pacs() -> Iterator[RecordingPacs]:
    """A slow PACS: a result set takes longer to send than a lease lasts (renewed)."""
    peer = RecordingPacs(delay_seconds=0.6)
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture
def phantom(tmp_path: Path) -> list[pydicom.Dataset]:
    case = generate_phantom(tmp_path / "case", seed=12, slices=30, matrix=128)
    return [pydicom.dcmread(p) for p in sorted(case.series_dir.glob("*.dcm"))]


def cluster_sections(url: str, node_id: str, models: Path, pacs: RecordingPacs,
                     lease_seconds: float = 1.5) -> dict[str, Any]:
    return {"node": {"id": node_id},
            "store": {"url": url, "lease_seconds": lease_seconds},
            "inference": {"enabled": True, "device": "cpu", "models_dir": str(models)},
            "destinations": [pacs.destination()],
            "sender": {"retry_initial_seconds": 0.5}}


def events(spool: Spool, study: str, series: str, event: str) -> int:
    return sum(1 for _, name, _, _ in spool.timeline(study, series) if name == event)


@pytest.mark.slow
def test_two_nodes_analyse_each_generation_once_and_deliver_each_object_once(
        start_node, postgres_server: PostgresServer, untrained_models: Path,
        pacs: RecordingPacs, phantom: list[pydicom.Dataset]) -> None:
    """Both nodes' workers and senders take work from the shared store; the leases (1.5 s,
    shorter than an analysis or a sending pass to the slow PACS) are renewed while the
    work runs, so the other node never takes it over. A late slice makes generation 1,
    analysed once too; its objects (the same UIDs, mostly) are sent once more each."""
    url = postgres_server.new_database()
    first = start_node(**cluster_sections(url, "node-a", untrained_models, pacs))
    second = start_node(**cluster_sections(url, "node-b", untrained_models, pacs))
    study, series = phantom[0].StudyInstanceUID, phantom[0].SeriesInstanceUID
    for generation, part in enumerate((phantom[:-1], phantom[-1:])):
        assert send_datasets(part, first.receiver.port) == [0] * len(part)
        done = ["done"] * (generation + 1)
        wait_for(lambda done=done: [j.state for j in first.spool.list_jobs()] == done,
                 timeout=120)
        wait_for(lambda: not first.outbox.backlog(), timeout=60)
    time.sleep(3)  # twice a lease: nothing is taken over and sent again

    jobs = first.spool.list_jobs()
    assert [(j.generation, j.claim) for j in jobs] == [(0, 1), (1, 1)]  # claimed once each
    starts = [g for g, name, _, _ in second.spool.timeline(study, series)
              if name == "inference_start"]
    assert starts == [0, 1]
    assert events(second.spool, study, series, "results_recorded") == 2
    assert first.spool.query("SELECT COUNT(*) FROM result_sets") == [(2,)]
    sent = first.outbox.deliveries(state="sent")
    assert len(sent) == 8 and first.outbox.counts() == {"pacs": {"sent": 8}}
    # Every C-STORE the PACS saw is one recorded delivery: none was sent twice.
    assert pacs.attempts == collections.Counter(d.sop_instance_uid for d in sent)
    assert pacs.complete(study)
    record = second.spool.get_series(study, series)
    assert record is not None and (record.state, record.generation) == ("done", 1)


class _TakenOverWhileAnalysing(Engine):
    """Runs the model; before returning, another node takes the job over (as when this
    node's lease ran out: it stalled, or was cut off from the database)."""

    def __init__(self, other: Spool, url: str, *args: Any) -> None:
        super().__init__(*args)
        self._other, self._url = other, url

    def analyze(self, volume: Volume) -> AnalysisResult:  # type: ignore[override]
        import psycopg

        result = super().analyze(volume)
        with psycopg.connect(self._url, autocommit=True) as conn:
            conn.execute("UPDATE jobs SET lease_expires_at = 0 WHERE state = 'processing'")
        assert self._other.claim_next_job("node-b", lease_seconds=600.0) is not None
        return result


@pytest.mark.slow
def test_a_worker_whose_lease_was_taken_over_records_no_result(
        spool_dir: Path, postgres_server: PostgresServer, untrained_models: Path,
        pacs: RecordingPacs, phantom: list[pydicom.Dataset]) -> None:
    url = postgres_server.new_database()
    other = Spool(spool_dir, url=url)
    settings = parse_settings(test_config(
        spool_dir, **cluster_sections(url, "node-a", untrained_models, pacs, 600.0)))
    node = Node(settings, engine_factory=lambda: _TakenOverWhileAnalysing(
        other, url, untrained_models, "lite", "cpu"))
    recorded: list[int | None] = []
    record_result_set = node.outbox.record_result_set
    node.outbox.record_result_set = (  # type: ignore[method-assign]
        lambda *args, **kwargs: recorded.append(record_result_set(*args, **kwargs))
        or recorded[-1])
    node.start()
    try:
        assert send_datasets(phantom, node.receiver.port) == [0] * len(phantom)
        wait_for(lambda: recorded, timeout=120)
        assert recorded == [None]  # the encoder tried, and the fence refused it
        (job,) = node.spool.list_jobs()
        assert (job.state, job.claim) == ("processing", 2)  # node-b's claim, untouched
        assert node.spool.query("SELECT lease_owner FROM jobs") == [("node-b",)]
        assert node.outbox.deliveries() == [] and not pacs.attempts
        assert events(node.spool, job.study_instance_uid, job.series_instance_uid,
                      "results_recorded") == 0
    finally:
        node.stop(timeout=5)
        other.close()
