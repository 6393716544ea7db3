"""The ``pattern`` mapping: features that tell a COVID-19 pattern (multifocal, bilateral,
peripheral ground glass) from one solid mass, their logistic regression, and the engine
and manifest that carry it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine, ModelIntegrityError
from dcn_node.inference.pattern import FEATURES, pattern_features, pattern_probability
from dcn_node.volume import Volume
from dcn_train.calibration import calibrate, fit_pattern


def _chest(slices: int = 20, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Two box lungs either side of the midline, at -850 HU in soft tissue."""
    lung = np.zeros((slices, size, size), bool)
    lung[:, 20:76, 10:44] = True
    lung[:, 20:76, 52:86] = True
    hu = np.where(lung, -850, 40).astype(np.int16)
    return lung, hu


def test_covid_pattern_and_a_solid_mass_differ_in_every_shape_feature() -> None:
    lung, hu = _chest()
    covid = np.zeros_like(lung)
    for z, r, c in [(4, 22, 10), (8, 60, 81), (12, 70, 10), (15, 24, 81)]:  # subpleural
        covid[z:z + 3, r:r + 5, c:c + 5] = True
    hu_covid = np.where(covid, -550, hu).astype(np.int16)
    mass = np.zeros_like(lung)
    mass[8:14, 40:54, 24:38] = True  # one solid lump deep in the right lung
    hu_mass = np.where(mass, 30, hu).astype(np.int16)
    probabilities = np.full(len(lung), 0.9)
    f_covid = pattern_features(lung, covid, hu_covid, 2.0, probabilities, 0.9)
    f_mass = pattern_features(lung, mass, hu_mass, 2.0, probabilities, 0.9)
    assert f_covid["bilateral"] == pytest.approx(0.5) and f_mass["bilateral"] == 0.0
    assert f_covid["ground_glass"] == 1.0 and f_mass["ground_glass"] == 0.0
    assert f_covid["peripheral"] == 1.0 and f_mass["peripheral"] < 0.5
    assert f_covid["largest_part"] == pytest.approx(0.25) and f_mass["largest_part"] == 1.0
    assert f_covid["spm_logit"] == f_mass["spm_logit"] == pytest.approx(np.log(9))
    # Nothing outlined: the shape features take their "no pattern" values.
    empty = pattern_features(lung, np.zeros_like(lung), hu, 2.0, probabilities * 0, 0.1)
    assert empty["involvement"] == pytest.approx(-4.0)
    assert (empty["bilateral"], empty["ground_glass"], empty["largest_part"]) == (0, 0, 1)
    # Lesion outside the lung mask does not count (the engine never outlines it there).
    outside = np.zeros_like(lung)
    outside[:, 0:5, 0:5] = True
    assert pattern_features(lung, outside, hu, 2.0, probabilities, 0.5)["involvement"] \
        == pytest.approx(-4.0)


def _toy_rows(rng: np.random.Generator, n: int) -> tuple[list[dict[str, float]], np.ndarray]:
    """Positives bilateral ground glass, negatives solid and one-sided; the SPM noisy."""
    labels = np.arange(n) % 2
    rows = []
    for label in labels:
        rows.append({
            "spm_logit": rng.normal(0.5 * label, 2), "max_slice_logit": rng.normal(3, 2),
            "involvement": rng.normal(-2, 0.5), "peripheral": rng.uniform(0.3, 1),
            "bilateral": rng.uniform(0.2, 0.5) if label else rng.uniform(0, 0.25),
            "ground_glass": rng.uniform(0.5, 1) if label else rng.uniform(0, 0.6),
            "largest_part": rng.uniform(0.2, 0.9) if label else rng.uniform(0.6, 1)})
    return rows, labels


def test_pattern_fit_learns_the_shape_and_the_engine_reads_it(tmp_path: Path) -> None:
    from dcn_train.evaluation import auc

    rng = np.random.default_rng(3)
    rows, labels = _toy_rows(rng, 120)
    pattern = fit_pattern(rows, labels)
    assert pattern["features"] == list(FEATURES)
    test_rows, test_labels = _toy_rows(rng, 200)
    scores = [pattern_probability(row, pattern) for row in test_rows]
    assert auc(test_labels, np.array(scores)) > 0.9
    assert auc(test_labels, np.array([r["spm_logit"] for r in test_rows])) < 0.7

    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    before = json.loads((models / "lite-manifest.json").read_text())
    raw = {"fcn": np.array([1 / (1 + np.exp(-r["spm_logit"])) for r in test_rows]),
           "pattern": np.array(scores)}
    report = calibrate(models, "lite", test_labels, raw, tmp_path / "out", pattern=pattern)
    manifest = json.loads((models / "lite-manifest.json").read_text())
    assert report["mapping"] == manifest["mapping"] == "pattern"
    assert manifest["pattern"] == pattern
    assert manifest["model_version"] != before["model_version"]

    # The engine runs the pattern mapping on a volume and reports what it weighed.
    engine = Engine(models, "lite", "cpu")
    lung, hu = _chest(slices=12, size=128)
    volume = Volume(hu=hu, sop_instance_uids=[f"1.2.3.{i}" for i in range(12)],
                    frame_numbers=[1] * 12, pixel_spacing=(2.5, 2.5),
                    slice_offsets=np.arange(12) * 5.0, study_instance_uid="1.2",
                    series_instance_uid="1.2.9")
    result = engine.analyze(volume)
    assert set(result.pattern_features) == set(FEATURES)
    expected = pattern_probability(result.pattern_features, pattern)
    assert result.uncalibrated_probability == pytest.approx(expected)

    # Weights missing or over other features: refused, never guessed.
    del manifest["pattern"]
    (models / "lite-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="pattern"):
        Engine(models, "lite", "cpu")
