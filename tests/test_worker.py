"""The model worker in a running node: queued series are analyzed, failures recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dcn_node.inference.engine import Engine, ModelIntegrityError
from dcn_train.phantom import generate_phantom
from tests.conftest import send_datasets, wait_for
from tests.dicom_factory import ct_series


def test_engine_refuses_weights_that_differ_from_the_manifest(untrained_models: Path,
                                                              tmp_path: Path) -> None:
    copy = tmp_path / "models"
    copy.mkdir()
    for path in untrained_models.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    weights = copy / "lite-spm.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        Engine(copy, "lite", "cpu")


def test_engine_output_geometry_and_determinism(untrained_models: Path, tmp_path: Path) -> None:
    from dcn_node.volume import load_dicom_folder

    case = generate_phantom(tmp_path / "case", seed=11, slices=24, matrix=128)
    volume = load_dicom_folder(case.series_dir)
    engine = Engine(untrained_models, "lite", "cpu")  # no gate settings: raw maps
    first, second = engine.analyze(volume), engine.analyze(volume)
    assert first.lung.shape == first.lesion.shape == (24, 128, 128)
    assert first.slice_probabilities.shape == (24,)
    assert [a.shape[1] for a in first.attention] == [64, 64, 32, 16]
    assert 0.0 <= first.probability <= 1.0
    np.testing.assert_array_equal(first.lesion, second.lesion)
    assert first.probability == second.probability


def test_queued_series_is_analyzed_and_failures_are_recorded(
    start_node, untrained_models: Path, tmp_path: Path
) -> None:
    import pydicom

    case = generate_phantom(tmp_path / "case", seed=12, slices=30, matrix=128)
    datasets = [pydicom.dcmread(p) for p in sorted(case.series_dir.glob("*.dcm"))]
    node = start_node(inference={"enabled": True, "device": "cpu",
                                 "models_dir": str(untrained_models)})
    assert send_datasets(datasets, node.receiver.port) == [0] * 30
    record = wait_for(lambda: next(iter(node.spool.list_series("done")), None), timeout=60)
    job = node.spool.list_jobs("done")[0]
    summary = json.loads((node.spool.results_dir(job) / "summary.json").read_text())
    assert summary["series_instance_uid"] == record.series_instance_uid
    assert summary["slices"] == 30
    masks = np.load(node.spool.results_dir(job) / "masks.npz")
    assert masks["lesion"].shape == (30, 128, 128)
    assert list(masks["sop_instance_uids"]) == list(case.sop_instance_uids)

    # A series the volume loader cannot read fails with its reason; the node carries on.
    broken = ct_series(20)
    for ds in broken:
        ds.BitsAllocated = 8  # pixel data length no longer matches: decoding fails
    assert send_datasets(broken, node.receiver.port) == [0] * 20
    failed = wait_for(lambda: next(iter(node.spool.list_series("failed")), None), timeout=60)
    assert failed.series_instance_uid == broken[0].SeriesInstanceUID
    assert failed.reason
    assert node.spool.list_jobs("failed")[0].reason == failed.reason


def test_failure_reasons_are_decided_from_the_exception() -> None:
    """Fixed reasons (metrics labels) come from the exception's type where the series
    failed, never parsed back out of the recorded text."""
    from dcn_node.errors import FailureReason, InvalidInstanceError

    of = FailureReason.of_analysis
    assert of(InvalidInstanceError("bad J2K", code="undecodable")) is FailureReason.UNDECODABLE
    assert of(MemoryError()) is FailureReason.OUT_OF_MEMORY
    assert of(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 9 GB")) is FailureReason.OUT_OF_MEMORY
    assert of(ValueError("encoding results: looks like an encoder message")) \
        is FailureReason.MODEL_ERROR  # text that merely looks like another reason
    assert of(RuntimeError("shape mismatch")) is FailureReason.MODEL_ERROR
