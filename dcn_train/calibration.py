"""Calibration of the patient-level probability and the shipped decision threshold.

On validation cases (seeds the networks and the mapping never trained on, and never the
held-out evaluation seeds):

1. the individual-level mapping is chosen: the trained three-layer SPM (``fcn``, the paper)
   or the largest slice probability (``max``, the paper's Table 4 ablation), whichever ranks
   the validation cases better (ROC AUC; a tie keeps ``fcn``). A mapping learned from a few
   dozen curves can rank worse than its own first input;
2. its raw probability is recalibrated by Platt scaling (a logistic regression on its logit);
3. the decision threshold is the lowest one that keeps specificity at or above the target
   (0.95) on the validation negatives.

All three are written into the model manifest, which the engine reads; the reliability
diagram (PNG) and the expected calibration error before and after go next to it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from dcn_node.inference.engine import calibrated as calibrated_by

LOGGER = logging.getLogger(__name__)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def fit_platt(labels: np.ndarray, probabilities: np.ndarray, *, l2: float = 1e-3
              ) -> dict[str, float]:
    """``scale`` and ``shift`` of sigmoid(scale * logit(p) + shift), by Newton's method with
    a backtracking line search on the (lightly L2-regularised) log-likelihood: a full Newton
    step overshoots when many probabilities sit at the clip (a saturated largest slice
    probability), and the fit must still converge there."""
    x = _logit(np.asarray(probabilities, float))
    y = np.asarray(labels, float)
    features = np.stack([x, np.ones_like(x)], axis=1)

    def loss(w: np.ndarray) -> float:
        z = features @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w)

    w = np.array([1.0, 0.0])  # start at the identity
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(features @ w, -500, 500)))
        gradient = features.T @ (p - y) + l2 * w
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        size, current = 1.0, loss(w)
        while loss(w - size * step) > current and size > 1e-6:
            size /= 2
        w = w - size * step
        if np.abs(size * step).max() < 1e-9:
            break
    return {"scale": float(w[0]), "shift": float(w[1])}


def threshold_for_specificity(labels: np.ndarray, scores: np.ndarray,
                              min_specificity: float = 0.95) -> float:
    """The lowest threshold at which at least ``min_specificity`` of the negatives score
    below it: halfway between the k-th lowest negative score and the next higher score."""
    labels = np.asarray(labels, bool)
    negatives = np.sort(np.asarray(scores, float)[~labels])
    if not len(negatives):
        raise ValueError("no negative cases to set a threshold on")
    k = math.ceil(min_specificity * len(negatives))
    below = negatives[k - 1]
    higher = np.asarray(scores, float)[np.asarray(scores, float) > below]
    above = float(higher.min()) if len(higher) else min(1.0, below + 1e-3)
    return float((below + above) / 2)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray,
                               bins: int = 10) -> float:
    labels = np.asarray(labels, float)
    probabilities = np.asarray(probabilities, float)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(labels[chosen].mean() - probabilities[chosen].mean())
    return float(error)


def reliability_png(path: Path, labels: np.ndarray, curves: dict[str, np.ndarray],
                    bins: int = 10) -> None:
    from dcn_train.evaluation import save_curves_png

    labels = np.asarray(labels, float)
    lines = []
    edges = np.linspace(0, 1, bins + 1)
    for name, probabilities in curves.items():
        index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            chosen = index == b
            if chosen.any():
                xs.append(float(np.mean(probabilities[chosen])))
                ys.append(float(labels[chosen].mean()))
        ece = expected_calibration_error(labels, probabilities, bins)
        lines.append((f"{name} (ECE {ece:.3f})", xs, ys, "o"))
    save_curves_png(path, lines, title="Reliability, validation phantoms (not for diagnostic "
                    "use)", xlabel="predicted probability",
                    ylabel="observed frequency of COVID-19", legend="upper left")


def choose_mapping(labels: np.ndarray, raw_by_mapping: dict[str, np.ndarray]
                   ) -> tuple[str, dict[str, float]]:
    """The mapping whose raw probabilities rank ``labels`` best (AUC), and every AUC; on a
    tie the first one given (``fcn``, the paper's)."""
    from dcn_train.evaluation import auc

    aucs = {name: round(auc(labels, np.asarray(raw, float)), 4)
            for name, raw in raw_by_mapping.items()}
    return max(aucs, key=aucs.__getitem__), aucs  # max keeps the first of equals


def calibrate(models_dir: Path, profile: str, labels: np.ndarray,
              raw_by_mapping: dict[str, np.ndarray], out_dir: Path,
              min_specificity: float = 0.95) -> dict[str, Any]:
    """Choose the mapping, fit, pick the threshold, write the reliability PNG and update the
    manifest (a new model version: all three change every reported probability).
    ``raw_by_mapping``: the uncalibrated probability of each validation case under each
    candidate mapping (``fcn``, ``max``)."""
    from dcn_node.inference.weights import manifest_path, model_version_for

    mapping, mapping_auc = choose_mapping(labels, raw_by_mapping)
    raw = np.asarray(raw_by_mapping[mapping], float)
    calibration = fit_platt(labels, raw)
    calibrated = np.asarray(calibrated_by(raw, calibration))
    threshold = threshold_for_specificity(labels, calibrated, min_specificity)
    y = np.asarray(labels, bool)
    report = {
        "cases": int(len(y)), "positives": int(y.sum()), "negatives": int((~y).sum()),
        "ece_before": round(expected_calibration_error(y, raw), 4),
        "ece_after": round(expected_calibration_error(y, calibrated), 4),
        "specificity": round(float((calibrated[~y] < threshold).mean()), 4),
        "sensitivity": round(float((calibrated[y] >= threshold).mean()), 4),
        "min_specificity": min_specificity,
        "mapping_auc": mapping_auc,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    reliability_png(out_dir / "reliability.png", y, {"raw": raw, "calibrated": calibrated})
    path = manifest_path(models_dir, profile)
    manifest = json.loads(path.read_text())
    manifest["mapping"] = mapping
    manifest["calibration"] = {k: round(v, 6) for k, v in calibration.items()}
    manifest["decision_threshold"] = round(threshold, 6)
    manifest["calibration_report"] = report
    extra = json.dumps([manifest["calibration"], manifest["decision_threshold"]])
    if mapping != "fcn":  # versions of fcn-mapped weights stay what they were
        extra += mapping
    manifest["model_version"] = model_version_for(profile, manifest["files"], extra)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    LOGGER.info("mapping %s, calibration %s, threshold %.4f: %s", mapping, calibration,
                threshold, report)
    return {"mapping": mapping, "calibration": calibration, "decision_threshold": threshold,
            **report, "model_version": manifest["model_version"]}
