"""Faults: kill -9 at random moments, a real full disk, a slow PACS, a PACS answering
failure statuses, the model running out of memory. Nothing acknowledged is lost, every
result reaches the PACS once (a re-send of the same UID supersedes), the node carries on.
Longer kill -9 runs: bench/faults.py."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcn_node.store.outbox import Outbox
from tests.conftest import send_datasets, wait_for
from tests.dicom_factory import ct_series
from tests.faults import kill_rounds
from tests.recording_pacs import RecordingPacs

STATUS_OUT_OF_RESOURCES = 0xA700


def inference_on(models: Path, pacs: RecordingPacs, **sender: float) -> dict:
    return {
        "destinations": [pacs.destination()],
        "inference": {"enabled": True, "device": "cpu", "models_dir": str(models)},
        "sender": {"retry_initial_seconds": 0.3, "retry_max_interval_seconds": 1.0, **sender},
    }


@pytest.fixture
def pacs() -> Iterator[RecordingPacs]:
    peer = RecordingPacs()
    peer.start()
    yield peer
    peer.stop()


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_and_delivers_once(
    tmp_path: Path, untrained_models: Path
) -> None:
    report = kill_rounds(tmp_path, untrained_models, rounds=4, seed=3, max_delay_seconds=5)
    print("\n".join(report.lines()))
    assert report.series == 4 and report.instances == 4 * 20


def test_slow_pacs_times_out_then_gets_each_result_once(
    start_node, untrained_models: Path
) -> None:
    # Slower than the sender's DIMSE timeout on each object's first C-STORE only: the
    # sender gives up, retries, and the second copy (same UID) supersedes the first.
    pacs = RecordingPacs(delay_seconds=2.5, slow_attempts=1)
    pacs.start()
    try:
        node = start_node(**inference_on(untrained_models, pacs, dimse_timeout_seconds=1.0))
        series = ct_series(20, announce=True, rows=64, columns=64)
        assert send_datasets(series, node.receiver.port) == [0] * 20
        study = series[0].StudyInstanceUID
        outbox = Outbox(node.spool)
        wait_for(lambda: outbox.deliveries() and not outbox.deliveries(state="pending"),
                 timeout=120, interval=0.2)
        sent = outbox.deliveries(state="sent")
        assert sent and not outbox.deliveries(state="dead")
        assert pacs.uids_of(study) == {d.sop_instance_uid for d in sent}
        assert all(d.attempts >= 2 for d in sent)  # the first attempt timed out
    finally:
        pacs.stop()


def test_pacs_answering_out_of_resources_gets_each_result_once(
    start_node, untrained_models: Path
) -> None:
    # 0xA700 twice for every object, then Success: retried with backoff, stored once.
    pacs = RecordingPacs(status_for=lambda kind, attempt: 0xA700 if attempt <= 2 else 0)
    pacs.start()
    try:
        node = start_node(**inference_on(untrained_models, pacs))
        series = ct_series(20, announce=True, rows=64, columns=64)
        assert send_datasets(series, node.receiver.port) == [0] * 20
        outbox = Outbox(node.spool)
        wait_for(lambda: outbox.deliveries() and not outbox.deliveries(state="pending"),
                 timeout=120, interval=0.2)
        sent = outbox.deliveries(state="sent")
        assert len(sent) == len(outbox.deliveries())
        assert all(d.attempts == 3 for d in sent)
        assert pacs.resends() == 0
        assert pacs.uids_of(series[0].StudyInstanceUID) == {d.sop_instance_uid for d in sent}
    finally:
        pacs.stop()


class _RunsOutOfMemory:
    """The real engine, except that its first analysis raises torch.OutOfMemoryError, as a
    CUDA allocation that does not fit does (injected at the engine boundary: a real
    out-of-memory needs a GPU or a machine-sized allocation)."""

    def __init__(self, models: Path) -> None:
        from dcn_node.inference.engine import Engine

        self.engine = Engine(models, "lite", "cpu")
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def analyze(self, volume: object) -> object:
        import torch

        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return self.engine.analyze(volume)


def test_out_of_memory_in_the_model_fails_that_series_and_the_node_carries_on(
    spool_dir: Path, untrained_models: Path, pacs: RecordingPacs, caplog
) -> None:
    from dcn_node.config import parse_settings
    from dcn_node.node import Node
    from tests.conftest import test_config
    from tests.test_metrics import value

    caplog.set_level(logging.INFO, logger="dcn_node")
    # Completion by the announced count; a long quiet period so that a stall under load
    # cannot complete a series early.
    settings = parse_settings(test_config(spool_dir, **inference_on(untrained_models, pacs),
                                          completion={"quiet_seconds": 30}))
    node = Node(settings, engine_factory=lambda: _RunsOutOfMemory(untrained_models))
    node.start()
    try:
        wait_for(lambda: node.worker.engine_loaded, timeout=60)
        first = ct_series(20, announce=True, rows=64, columns=64)
        assert send_datasets(first, node.receiver.port) == [0] * 20
        failed = wait_for(lambda: node.spool.list_series("failed"), timeout=60)[0]
        assert failed.series_instance_uid == first[0].SeriesInstanceUID
        assert failed.reason.startswith("OutOfMemoryError: CUDA out of memory")
        assert "failed" in caplog.text and "OutOfMemoryError" in caplog.text

        second = ct_series(20, announce=True, rows=64, columns=64)
        assert send_datasets(second, node.receiver.port) == [0] * 20
        wait_for(lambda: pacs.complete(second[0].StudyInstanceUID), timeout=120)
        assert node.liveness().ok
        assert value(node, "dcn_series_failed_total", reason="out_of_memory") == 1
        assert value(node, "dcn_series_total", outcome="processed") == 1
    finally:
        node.stop(timeout=5)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that really fills up (ENOSPC), as root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                   check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_answers_out_of_resources_and_resumes_when_space_returns(
    start_node, small_disk: Path
) -> None:
    spool = small_disk / "spool"
    node = start_node(storage={"spool_dir": str(spool), "min_free_bytes": 0})
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 600_000))  # leaves room for a few instances
    series = ct_series(20, rows=128, columns=128)  # 32 KiB of pixels each
    statuses = send_datasets(series, node.receiver.port)
    assert 0 in statuses and STATUS_OUT_OF_RESOURCES in statuses, statuses
    stored = [ds for ds, status in zip(series, statuses, strict=True) if status == 0]
    refused = [ds for ds, status in zip(series, statuses, strict=True) if status != 0]
    assert set(statuses) == {0, STATUS_OUT_OF_RESOURCES}
    assert list(node.spool.incoming_dir.iterdir()) == []  # nothing half written
    files = {p.stem for p in node.spool.instances_dir.rglob("*.dcm")}
    assert files == {ds.SOPInstanceUID for ds in stored}

    filler.unlink()  # space comes back: the PACS re-sends what was refused
    assert send_datasets(refused, node.receiver.port) == [0] * len(refused)
    record = wait_for(lambda: next(iter(node.spool.list_series("queued")), None), timeout=20)
    assert record.instances == 20
