"""Calibration of the individual probability: the mapping chosen on validation cases,
Platt scaling, the threshold for a specificity target, and the manifest the engine reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine, calibrated
from dcn_train.calibration import (
    calibrate,
    choose_mapping,
    expected_calibration_error,
    fit_platt,
    threshold_for_specificity,
)


def test_platt_recovers_a_known_logistic_model() -> None:
    rng = np.random.default_rng(5)
    raw = rng.uniform(0.01, 0.99, 20000)
    truth = {"scale": 2.0, "shift": -0.5}
    labels = rng.random(raw.size) < calibrated(raw, truth)
    fitted = fit_platt(labels, raw)
    assert fitted["scale"] == pytest.approx(2.0, abs=0.1)
    assert fitted["shift"] == pytest.approx(-0.5, abs=0.1)
    # Calibrated probabilities match the observed frequencies better than the raw ones.
    assert expected_calibration_error(labels, calibrated(raw, fitted)) < \
        expected_calibration_error(labels, raw)


def test_platt_converges_when_many_probabilities_are_saturated() -> None:
    # The largest slice probabilities of 60 validation phantoms (lite-20261202-f71343c8,
    # rounded): half the positives at exactly 1.0 (bfloat16). A plain Newton step from the
    # identity overshot on them to a scale of 2.7e5.
    negatives = [0.2134, 0.248, 0.2644, 0.2991, 0.3425, 0.3748, 0.455, 0.6109, 0.7178,
                 0.728, 0.7994, 0.8069, 0.8267, 0.8344, 0.8376, 0.8459, 0.8539, 0.8783,
                 0.9005, 0.9208, 0.923, 0.9284, 0.9294, 0.9334, 0.9592, 0.9649, 0.9674,
                 0.9864, 0.9906, 0.9977]
    positives = [0.6379, 0.6935, 0.9274, 0.9906, 0.9924, 0.9931, 0.9976, 0.9977, 0.9982,
                 0.9982, 0.9984, 0.9993, 0.9999, 0.9999] + [1.0] * 16
    labels = np.array([0] * len(negatives) + [1] * len(positives))
    raw = np.array(negatives + positives)
    fitted = fit_platt(labels, raw)
    assert 0.1 < fitted["scale"] < 10 and abs(fitted["shift"]) < 20
    # The fit is better than no calibration at all on the data it was fitted to.
    assert expected_calibration_error(labels, calibrated(raw, fitted)) < \
        expected_calibration_error(labels, raw)


def test_threshold_keeps_the_specificity_target() -> None:
    labels = np.array([0] * 10 + [1] * 5)
    scores = np.array([.05, .1, .15, .2, .25, .3, .35, .4, .45, .9,
                       .5, .6, .7, .8, .95])
    threshold = threshold_for_specificity(labels, scores, 0.9)
    assert threshold == pytest.approx((0.45 + 0.5) / 2)  # 9 of 10 negatives below
    assert (scores[labels == 0] < threshold).mean() >= 0.9
    with pytest.raises(ValueError):
        threshold_for_specificity(np.ones(3), np.array([.1, .2, .3]))


def test_mapping_with_the_better_validation_ranking_is_chosen() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    fcn = np.array([0.2, 0.6, 0.3, 0.5, 0.4, 0.9])  # one negative outranks two positives
    best = np.array([0.1, 0.3, 0.2, 0.8, 0.7, 0.99])
    assert choose_mapping(labels, {"fcn": fcn, "max": best})[0] == "max"
    mapping, aucs = choose_mapping(labels, {"fcn": best, "max": best.copy()})
    assert mapping == "fcn" and aucs == {"fcn": 1.0, "max": 1.0}  # a tie keeps the paper's


def test_calibration_is_written_to_the_manifest_and_used_by_the_engine(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    before = json.loads((models / "lite-manifest.json").read_text())
    rng = np.random.default_rng(1)
    labels = np.array([0] * 20 + [1] * 20)
    fcn = np.clip(rng.normal(0.5, 0.2, 40), 0.01, 0.99)  # no better than chance
    largest = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.1, 40), 0.01, 0.99)
    report = calibrate(models, "lite", labels, {"fcn": fcn, "max": largest},
                       tmp_path / "calibration", min_specificity=0.95)
    manifest = json.loads((models / "lite-manifest.json").read_text())
    assert report["mapping"] == manifest["mapping"] == "max"
    assert manifest["model_version"] != before["model_version"]
    assert manifest["calibration_report"]["specificity"] >= 0.95
    assert (tmp_path / "calibration" / "reliability.png").stat().st_size > 1000

    engine = Engine(models, "lite", "cpu")
    assert engine.mapping == "max" and engine.decision_threshold == manifest["decision_threshold"]
    slices = torch.tensor([0.1, 0.7, 0.3])
    raw = float(torch.sigmoid(engine.spm(slices)))
    assert raw == pytest.approx(0.7, abs=1e-5)  # the largest slice probability
    # The caller may still ask for the trained mapping (calibration needs its raw output).
    assert Engine(models, "lite", "cpu", mapping="fcn").spm.mode == "fcn"


@pytest.mark.slow
def test_calibrate_command_on_validation_phantoms_and_refit(tmp_path: Path) -> None:
    """`dcn-node calibrate` end to end on 4 validation phantoms (the whole DICOM path), then
    `--refit` from its cases.json: same fit, no inference."""
    import subprocess
    import sys

    models, out = tmp_path / "models", tmp_path / "calibration"
    shutil.copytree(DEFAULT_MODELS_DIR, models)
    command = [sys.executable, "-m", "dcn_node", "calibrate", "--models", str(models),
               "--cases", "4", "--out", str(out), "--device", "cpu"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((out / "cases.json").read_text())
    assert [row["label"] for row in rows] == [1, 0, 1, 0]
    for row in rows:  # the largest slice probability clamped as the engine's `max` does
        assert 0.0 < row["max_slice_probability"] < 1.0
        assert 0.0 < row["slabs_probability"] < 1.0
    manifest = json.loads((models / "lite-manifest.json").read_text())
    assert manifest["mapping"] in ("fcn", "max", "slabs")
    assert set(manifest["calibration_report"]["mapping_auc"]) == {"fcn", "max", "slabs"}
    # A run from before the slabs mapping (no slabs_probability in its rows) gets it from
    # the slice probabilities it saved: the same values.
    for row in rows:
        del row["slabs_probability"]
    from dcn_train.calibration import slabs_probabilities

    recomputed = slabs_probabilities(rows, out / "outputs")
    saved = json.loads((out / "cases.json").read_text())
    np.testing.assert_allclose(recomputed, [row["slabs_probability"] for row in saved],
                               rtol=1e-6)

    refit = subprocess.run([*command, "--refit", "--mapping", "fcn"], capture_output=True,
                           text=True, timeout=120)
    assert refit.returncode == 0, refit.stderr[-2000:]
    assert "case 5" not in refit.stderr  # nothing analysed again
    again = json.loads((models / "lite-manifest.json").read_text())
    assert again["mapping"] == "fcn"
    assert again["calibration"] == {k: round(v, 6) for k, v in fit_platt(
        np.array([row["label"] for row in rows]),
        np.array([row["probability"] for row in rows])).items()}
