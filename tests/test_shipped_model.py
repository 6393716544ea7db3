"""The weights shipped in dcn_node/models/: they load against their manifest, find the lungs
of phantoms they never saw, and `dcn-node analyze` runs end to end with them. Their lesion and
classification accuracy is measured by `dcn-node evaluate` (figures in the model card,
dcn_node/models/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine
from dcn_node.inference.weights import load_manifest, sha256_of
from dcn_node.volume import load_dicom_folder
from dcn_train.evaluation import PixelCounts
from dcn_train.phantom import generate_phantom


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(DEFAULT_MODELS_DIR, "lite", "cpu")


def test_model_card_names_the_shipped_weights_and_their_sha256() -> None:
    manifest = load_manifest(DEFAULT_MODELS_DIR, "lite")
    card = (DEFAULT_MODELS_DIR / "README.md").read_text()
    assert manifest["model_version"] in card
    for entry in manifest["files"].values():
        assert sha256_of(DEFAULT_MODELS_DIR / entry["file"]) == entry["sha256"]
        assert entry["sha256"] in card
        assert (DEFAULT_MODELS_DIR / entry["file"]).stat().st_size < 20_000_000


def _dsc(predicted: np.ndarray, truth: np.ndarray) -> float:
    counts = PixelCounts()
    counts.add(predicted, truth)
    return counts.dsc


#: What the shipped weights answer on fixed phantoms they never saw (recorded with
#: lite-20261203-b5386b14 on this project's 2-core CPU, bfloat16 autocast): probability,
#: lung voxels, lesion voxels. New weights must record theirs here (the model card's figures
#: come from `dcn-node evaluate`; this pins the weights' behaviour, not their quality).
KNOWN_OUTPUTS = {
    # seed, matrix, normal: a small lesion (949 voxels) the weights miss, and its normal twin
    (990_001, 512, False): (0.0022, 1_811_377, 1_939),
    (990_001, 512, True): (0.0022, 1_811_234, 1_400),
    # the phantom of the OHIF test: 186 ml of lesions, called positive
    (6, 256, False): (0.9992, None, None),
}
MODEL_OF_KNOWN_OUTPUTS = "lite-20261203-b5386b14"


@pytest.mark.slow
def test_shipped_model_gives_its_known_outputs(engine: Engine, tmp_path: Path) -> None:
    assert engine.model_version == MODEL_OF_KNOWN_OUTPUTS, "record the new weights' outputs"
    for (seed, matrix, normal), (probability, lung, lesion) in KNOWN_OUTPUTS.items():
        case = generate_phantom(tmp_path / f"case-{seed}-{normal}", seed=seed, slices=None,
                                thickness_mm=5.0, matrix=matrix, normal=normal)
        volume = load_dicom_folder(case.series_dir)
        truth = np.load(case.ground_truth_path)
        result = engine.analyze(volume)
        assert result.probability == pytest.approx(probability, abs=0.02), (seed, normal)
        assert result.positive == (probability >= engine.decision_threshold)
        assert _dsc(result.lung, truth["lung"]) > 0.95
        if lung is not None:
            assert int(result.lung.sum()) == pytest.approx(lung, rel=0.005)
            assert int(result.lesion.sum()) == pytest.approx(lesion, rel=0.15)
        assert not (result.lesion & ~result.lung).any()  # lesions only inside the lungs


@pytest.mark.slow
def test_analyze_prints_a_sensible_summary(tmp_path: Path) -> None:
    case = generate_phantom(tmp_path / "case", seed=990_002, slices=None, thickness_mm=5.0,
                            matrix=512)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "dcn_node", "analyze", str(case.series_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    summary = json.loads(done.stdout)
    assert summary["series_instance_uid"] == case.series_instance_uid
    assert summary["slices"] == case.slices
    assert 0 < summary["lesion_volume_ml"] < summary["lung_volume_ml"]
    assert 0 < summary["involvement_percent"] < 100
    for kind in ("seg", "sc", "sr", "ko"):
        assert list((out / kind).glob("*.dcm")), kind
