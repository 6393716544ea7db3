"""Calibration of the patient-level probability and the shipped decision threshold.

On validation cases (seeds the networks and the mapping never trained on, and never the
held-out evaluation seeds):

1. the individual-level mapping is chosen: the trained three-layer SPM (``fcn``, the paper),
   the largest slice probability (``max``, the paper's Table 4 ablation) or the mean logit
   of the highest 5 mm slabs (``slabs``), whichever ranks the validation cases best (ROC
   AUC; a tie keeps the first, ``fcn``). A mapping learned from a few
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


def fit_logistic(features: np.ndarray, labels: np.ndarray, *, l2: float = 1e-3,
                 start: np.ndarray | None = None) -> np.ndarray:
    """Weights ``w`` of P(y = 1) = sigmoid(features @ w) (add a column of ones for a bias),
    by Newton's method with a backtracking line search on the L2-regularised
    log-likelihood: a full Newton step overshoots when many inputs sit at a clip (a
    saturated largest slice probability), and the fit must still converge there."""
    features = np.asarray(features, float)
    y = np.asarray(labels, float)

    def loss(w: np.ndarray) -> float:
        z = features @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w)

    w = np.zeros(features.shape[1]) if start is None else np.asarray(start, float).copy()
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(features @ w, -500, 500)))
        gradient = features.T @ (p - y) + l2 * w
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + l2 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        size, current = 1.0, loss(w)
        while loss(w - size * step) > current and size > 1e-6:
            size /= 2
        w = w - size * step
        if np.abs(size * step).max() < 1e-9:
            break
    return w


def fit_platt(labels: np.ndarray, probabilities: np.ndarray, *, l2: float = 1e-3
              ) -> dict[str, float]:
    """``scale`` and ``shift`` of sigmoid(scale * logit(p) + shift) (:func:`fit_logistic`
    on the logit, started at the identity)."""
    x = _logit(np.asarray(probabilities, float))
    w = fit_logistic(np.stack([x, np.ones_like(x)], axis=1), labels, l2=l2,
                     start=np.array([1.0, 0.0]))
    return {"scale": float(w[0]), "shift": float(w[1])}


def fit_pattern(rows: list[dict[str, float]], labels: np.ndarray, *, l2: float = 1.0
                ) -> dict[str, Any]:
    """The ``pattern`` mapping's logistic regression (:mod:`dcn_node.inference.pattern`)
    on the features of cases the networks never trained on: standardised features, an L2
    penalty of ``l2`` on the standardised weights (a few dozen phantoms; the features
    overlap), the bias unpenalised in effect (its penalty is the same but on a column
    of ones over many cases)."""
    from dcn_node.inference.pattern import FEATURES

    x = np.array([[row[name] for name in FEATURES] for row in rows], float)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-6] = 1.0
    z = (x - mean) / scale
    w = fit_logistic(np.column_stack([z, np.ones(len(z))]), labels, l2=l2)
    return {"features": list(FEATURES), "mean": [round(float(v), 6) for v in mean],
            "scale": [round(float(v), 6) for v in scale],
            "weights": [round(float(v), 6) for v in w[:-1]], "bias": round(float(w[-1]), 6),
            "l2": l2, "cases": int(len(z)), "positives": int(np.sum(labels))}


def saved_case_features(folder: Path
                        ) -> tuple[list[int], np.ndarray, list[dict[str, float]], np.ndarray]:
    """Seeds, labels, pattern features and the SPM's uncalibrated probability of the cases
    saved in ``folder`` (``SEED.npz`` files of
    :func:`dcn_train.evaluation.save_case_outputs`), in seed order."""
    from dcn_node.inference.pattern import pattern_features

    seeds, labels, rows, spm = [], [], [], []
    for path in sorted(folder.glob("*.npz"), key=lambda p: int(p.stem)):
        with np.load(path) as saved:
            rows.append(pattern_features(
                saved["lung"], saved["lesion"], saved["hu"], float(saved["pixel_mm"]),
                saved["slice_probabilities"], float(saved["uncalibrated_probability"])))
            labels.append(int(saved["label"]))
            spm.append(float(saved["uncalibrated_probability"]))
        seeds.append(int(path.stem))
    if not rows:
        raise ValueError(f"no saved case outputs (SEED.npz) in {folder}")
    return seeds, np.asarray(labels), rows, np.asarray(spm)


def slabs_probabilities(rows: list[dict[str, Any]], outputs: Path) -> np.ndarray:
    """The ``slabs`` mapping's raw probability of each calibration case (``rows`` of a
    ``cases.json``): from its row, or, for a run made before that mapping existed, from the
    slice probabilities it saved in ``outputs`` (:func:`dcn_train.evaluation.save_case_outputs`)."""
    import torch

    from dcn_node.inference.networks import top_slab_logit

    values = []
    for row in rows:
        value = row.get("slabs_probability")
        if value is None:
            with np.load(outputs / f"{row['seed']}.npz") as saved:
                logit = top_slab_logit(torch.from_numpy(saved["slice_probabilities"]),
                                       float(saved["slice_mm"]))
            value = float(torch.sigmoid(logit))
        values.append(value)
    return np.asarray(values)


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
              min_specificity: float = 0.95, pattern: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Choose the mapping, fit, pick the threshold, write the reliability PNG and update the
    manifest (a new model version: all three change every reported probability).
    ``raw_by_mapping``: the uncalibrated probability of each validation case under each
    candidate mapping (``fcn``, ``max``, ``pattern``: then ``pattern`` is its fitted
    logistic regression, :func:`fit_pattern`, written into the manifest if chosen)."""
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
    manifest.pop("pattern", None)
    if mapping == "pattern":
        if pattern is None:
            raise ValueError("mapping 'pattern' chosen without its fitted weights")
        manifest["pattern"] = pattern
    manifest["calibration"] = {k: round(v, 6) for k, v in calibration.items()}
    manifest["decision_threshold"] = round(threshold, 6)
    manifest["calibration_report"] = report
    extra = json.dumps([manifest["calibration"], manifest["decision_threshold"]])
    if mapping != "fcn":  # versions of fcn-mapped weights stay what they were
        extra += mapping
    if mapping == "pattern":
        extra += json.dumps(pattern, sort_keys=True)
    manifest["model_version"] = model_version_for(profile, manifest["files"], extra)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    LOGGER.info("mapping %s, calibration %s, threshold %.4f: %s", mapping, calibration,
                threshold, report)
    return {"mapping": mapping, "calibration": calibration, "decision_threshold": threshold,
            **report, "model_version": manifest["model_version"]}
