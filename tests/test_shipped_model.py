"""The weights shipped in models/: they load against their manifest, find the lungs of
phantoms they never saw, and `dcn-node analyze` runs end to end with them. Their lesion and
classification accuracy is measured by `dcn-node evaluate` (figures in models/README.md)."""

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


@pytest.mark.slow
def test_shipped_model_on_unseen_phantoms(engine: Engine, tmp_path: Path) -> None:
    results = {}
    for normal in (False, True):
        case = generate_phantom(tmp_path / f"case-{normal}", seed=990_001, slices=None,
                                thickness_mm=5.0, matrix=512, normal=normal)
        volume = load_dicom_folder(case.series_dir)
        truth = np.load(case.ground_truth_path)
        result = engine.analyze(volume)
        results[normal] = result
        assert _dsc(result.lung, truth["lung"]) > 0.95
        # Lesion accuracy varies a lot from phantom to phantom with these weights (the
        # model card has the 40-case figures: lesion DSC 0.60); it is not checked here.
    # The probability of one case is not checked either: on this pair the weights score
    # 0.31 with and without lesions (a miss, as 3 of 20 held-out lesion phantoms are).
    assert all(0.0 <= r.probability <= 1.0 for r in results.values())


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
