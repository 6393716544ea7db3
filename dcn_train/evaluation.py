"""The paper's metrics (3.2.2) and tables shaped like its Tables 2 and 3."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn
    from matplotlib.typing import LegendLocType

LOGGER = logging.getLogger(__name__)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over every threshold (scores descending)."""
    order = np.argsort(-scores, kind="stable")
    labels = labels[order].astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    tpr = np.concatenate([[0.0], np.cumsum(labels) / max(positives, 1)])
    fpr = np.concatenate([[0.0], np.cumsum(~labels) / max(negatives, 1)])
    return fpr, tpr


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability a positive outranks a negative (ties 1/2)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    # Mann-Whitney: average ranks count ties as one half; O(n log n) for pixel-level AUCs.
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


@dataclass
class PixelCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        self.tp += int(np.count_nonzero(predicted & truth))
        self.fp += int(np.count_nonzero(predicted & ~truth))
        self.fn += int(np.count_nonzero(~predicted & truth))

    @property
    def dsc(self) -> float:
        return 2 * self.tp / max(2 * self.tp + self.fp + self.fn, 1)

    @property
    def precision(self) -> float:
        return self.tp / max(self.tp + self.fp, 1)

    @property
    def recall(self) -> float:
        return self.tp / max(self.tp + self.fn, 1)


@dataclass
class Classification:
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def add(self, label: int, score: float) -> None:
        self.labels.append(int(label))
        self.scores.append(float(score))

    def metrics(self, threshold: float = 0.5) -> dict[str, float]:
        y = np.asarray(self.labels, bool)
        s = np.asarray(self.scores)
        p = s >= threshold
        tp, tn = int((p & y).sum()), int((~p & ~y).sum())
        fp, fn = int((p & ~y).sum()), int((~p & y).sum())
        sen = tp / max(tp + fn, 1)
        spc = tn / max(tn + fp, 1)
        # Accuracy as (TP + TN) / all: equation 12 prints TP + FP, a typo.
        return {
            "Acc": (tp + tn) / max(len(y), 1), "Sen": sen, "Spc": spc, "AA": (sen + spc) / 2,
            "AUC": auc(y, s), "n": len(y),
        }


def segmentation_table(lung: PixelCounts, lesion: PixelCounts) -> str:
    lines = ["Table 2 (shape): segmentation performance", f"{'':8}{'DSC':>10}{'Precision':>11}"
             f"{'Recall':>9}"]
    for name, counts in (("Lung", lung), ("Lesion", lesion)):
        lines.append(f"{name:8}{counts.dsc:>10.2%}{counts.precision:>11.2%}{counts.recall:>9.2%}")
    return "\n".join(lines)


def classification_table(slice_level: Classification, individual: Classification,
                         threshold: float = 0.5) -> str:
    """Slice level at 0.5 (the DCN's own output); individual at the decision threshold."""
    lines = ["Table 3 (shape): classification performance",
             f"{'':12}{'Acc':>9}{'Sen':>9}{'Spc':>9}{'AA':>9}{'AUC':>8}{'n':>7}"]
    for name, result in (("Slice", slice_level), ("Individual", individual)):
        m = result.metrics(threshold if name == "Individual" else 0.5)
        lines.append(f"{name:12}{m['Acc']:>9.2%}{m['Sen']:>9.2%}{m['Spc']:>9.2%}"
                     f"{m['AA']:>9.2%}{m['AUC']:>8.4f}{m['n']:>7}")
    return "\n".join(lines)


def save_curves_png(path: Path, lines: list[tuple[str, Any, Any, str]], *, title: str,
                    xlabel: str, ylabel: str, legend: LegendLocType) -> None:
    """A square plot of (label, x, y, marker) lines over the diagonal, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for label, xs, ys, marker in lines:
        axis.plot(xs, ys, marker=marker or None, label=label)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.legend(loc=legend)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def save_roc_png(path: Path, curves: dict[str, Classification]) -> None:
    lines = []
    for name, result in curves.items():
        fpr, tpr = roc_curve(np.asarray(result.labels), np.asarray(result.scores))
        lines.append((f"{name} (AUC {result.metrics()['AUC']:.3f})", fpr, tpr, ""))
    save_curves_png(path, lines, title="ROC, synthetic phantoms (not for diagnostic use)",
                    xlabel="1 - specificity", ylabel="sensitivity", legend="lower right")


@dataclass
class _Scores:
    """What one engine scored on the held-out cases."""

    lung: PixelCounts = field(default_factory=PixelCounts)
    lesion: PixelCounts = field(default_factory=PixelCounts)
    slice_level: Classification = field(default_factory=Classification)
    individual: Classification = field(default_factory=Classification)

    def add(self, result: Any, truth: Any, label: int) -> None:
        self.lung.add(result.lung, truth["lung"])
        if label:
            self.lesion.add(result.lesion, truth["lesion"])
        has_lung = truth["lung"].reshape(len(truth["lung"]), -1).any(1)
        has_lesion = truth["lesion"].reshape(len(truth["lesion"]), -1).any(1)
        for s in np.flatnonzero(has_lung):
            self.slice_level.add(int(has_lesion[s]), float(result.slice_probabilities[s]))
        self.individual.add(label, result.probability)


def delta_table(optimized: _Scores, baseline: _Scores) -> str:
    """The optimized path's metrics minus the naive float32 path's, same cases."""
    rows = [("Lung DSC", optimized.lung.dsc, baseline.lung.dsc),
            ("Lesion DSC", optimized.lesion.dsc, baseline.lesion.dsc),
            ("Slice AUC", optimized.slice_level.metrics()["AUC"],
             baseline.slice_level.metrics()["AUC"]),
            ("Individual AUC", optimized.individual.metrics()["AUC"],
             baseline.individual.metrics()["AUC"])]
    lines = ["Optimized path vs naive float32 (same cases)",
             f"{'':16}{'optimized':>11}{'naive':>9}{'delta':>10}"]
    lines += [f"{name:16}{a:>11.4f}{b:>9.4f}{a - b:>+10.4f}" for name, a, b in rows]
    return "\n".join(lines)


def _generator_v2_case(case_dir: Path, seed: int, index: int) -> tuple[Path, dict, int, str]:
    """The earlier held-out set: alternately lesions and normal, 5 and 1 mm."""
    from dcn_train.phantom import generate_phantom

    thickness = (5.0, 1.0)[(index // 2) % 2]
    case = generate_phantom(case_dir, seed, thickness_mm=thickness, normal=index % 2 == 1)
    truth = dict(np.load(case.ground_truth_path))
    return case.series_dir, truth, case.label, "covid" if case.label else "normal"


def _corpus_case(case_dir: Path, seed: int, index: int) -> tuple[Path, dict, int, str]:
    """Phantoms with COVID-19, normal, or with other disease (the corpus's kinds, at its
    current version)."""
    from dcn_train.corpus import phantom_case, phantom_seed
    from dcn_train.phantom import PhantomVolume, write_series

    _, kind, thickness = phantom_seed(seed - index, index)
    volume = phantom_case(seed, kind, thickness)
    hu = np.clip(np.rint(volume.hu), -1024, 3071).astype(np.int16)
    phantom = PhantomVolume(hu, volume.lung, volume.lesion, volume.pixel_spacing_mm,
                            volume.slice_spacing_mm, volume.label)
    uids = write_series(phantom, case_dir / "series", seed)
    truth = {"lung": volume.lung, "lesion": volume.lesion,
             "sop_instance_uids": np.array(uids)}
    label_kind = kind if kind != "other" else "other:" + "+".join(volume.findings)
    return case_dir / "series", truth, volume.label, label_kind


HELD_OUT_SETS = {"phantoms-v2": _generator_v2_case, "v5": _corpus_case}


def save_case_outputs(path: Path, volume: Any, result: Any, label: int, kind: str) -> None:
    """What a patient-level mapping learns from, for one case, at most ~256 pixels a side
    (every k-th pixel, as :mod:`dcn_node.inference.pattern` looks): lung and lesion masks,
    HU, slice probabilities and the mapping's uncalibrated output, so that mappings can be
    fitted and compared without running the networks again."""
    from dcn_node.inference.pattern import subsample_step

    step = subsample_step(volume.hu.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, lung=result.lung[:, ::step, ::step], lesion=result.lesion[:, ::step, ::step],
        hu=np.asarray(volume.hu[:, ::step, ::step], np.int16),
        slice_probabilities=result.slice_probabilities,
        pixel_mm=float(volume.pixel_spacing[1]) * step, slice_mm=volume.slice_spacing_mm,
        uncalibrated_probability=float(result.uncalibrated_probability),
        probability=float(result.probability), label=int(label), kind=kind)


def evaluate_on_phantoms(engine: Any, out_dir: Path, cases: int, first_seed: int, *,
                         keep_cases: bool = False, baseline: Any = None,
                         held_out: str = "phantoms-v2", keep_outputs: bool = False) -> str:
    """Generate ``cases`` held-out phantoms of set ``held_out`` (``phantoms-v2``: the
    earlier generator, alternately with lesions and normal, 5 and 1 mm; ``v5``: COVID-19,
    normal and other disease in turn), run them through the whole path (DICOM files ->
    volume -> engine) and write ``report.txt``, ``cases.json`` and ``roc.png`` into
    ``out_dir``; returns the report. ``keep_outputs``: each case's outputs also go to
    ``out_dir/outputs/SEED.npz`` (:func:`save_case_outputs`). With a ``baseline`` engine
    (the naive float32 path) the same cases also run through it and the report ends with
    the accuracy delta."""
    import torch

    from dcn_node.inference.networks import SliceProbabilityMapping, top_slab_logit
    from dcn_node.volume import load_dicom_folder

    # The `max` and `slabs` mappings' raw outputs, as the engine would give them (clamped
    # like it), for `dcn-node calibrate`'s choice between mappings.
    largest_slice = SliceProbabilityMapping("max")
    make = HELD_OUT_SETS[held_out]
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, baseline_scores = _Scores(), _Scores()
    rows = []
    threshold = float(getattr(engine, "decision_threshold", 0.5))
    for index in range(cases):
        seed = first_seed + index
        case_dir = out_dir / "cases" / f"{seed}"
        series_dir, truth, label, kind = make(case_dir, seed, index)
        volume = load_dicom_folder(series_dir)
        if list(truth["sop_instance_uids"]) != volume.sop_instance_uids:
            raise RuntimeError(f"slice order of case {seed} differs from its ground truth")
        result = engine.analyze(volume)
        scores.add(result, truth, label)
        if keep_outputs:
            save_case_outputs(out_dir / "outputs" / f"{seed}.npz", volume, result, label, kind)
        if baseline is not None:
            baseline_scores.add(baseline.analyze(volume), truth, label)
        quality = result.quality.as_dict() if getattr(result, "quality", None) else None
        rows.append({"seed": seed, "label": label, "kind": kind,
                     "slices": int(volume.hu.shape[0]),
                     "slice_spacing_mm": round(volume.slice_spacing_mm, 3),
                     "probability": result.probability,
                     "max_slice_probability": float(torch.sigmoid(largest_slice(
                         torch.from_numpy(result.slice_probabilities)))),
                     "slabs_probability": float(torch.sigmoid(top_slab_logit(
                         torch.from_numpy(result.slice_probabilities),
                         volume.slice_spacing_mm))),
                     "assessable": quality["assessable"] if quality else True,
                     "lesion_dsc": _dsc(result.lesion, truth["lesion"]) if label else None,
                     "seconds": result.seconds})
        LOGGER.info("case %d (%s, %g mm, %d slices): p=%.3f in %.1f s", seed, kind,
                    volume.slice_spacing_mm, volume.hu.shape[0], result.probability,
                    result.seconds)
        if not keep_cases:
            shutil.rmtree(case_dir)
    parts = [
        f"Held-out {held_out}: {cases} cases, seeds {first_seed}..{first_seed + cases - 1}; "
        f"model {engine.model_version}; decision threshold {threshold:g}",
        segmentation_table(scores.lung, scores.lesion),
        classification_table(scores.slice_level, scores.individual, threshold),
        kind_table(rows, threshold),
    ]
    if baseline is not None:
        parts.append(delta_table(scores, baseline_scores))
    report = "\n\n".join(parts)
    (out_dir / "report.txt").write_text(report + "\n")
    (out_dir / "cases.json").write_text(json.dumps(rows, indent=2) + "\n")
    save_roc_png(out_dir / "roc.png", {"slice": scores.slice_level,
                                       "individual": scores.individual})
    return report


def _dsc(predicted: np.ndarray, truth: np.ndarray) -> float:
    return round(2.0 * float((predicted & truth).sum())
                 / max(1.0, float(predicted.sum() + truth.sum())), 4)


def kind_table(rows: list[dict[str, Any]], threshold: float) -> str:
    """Per kind of case: how many, and the share called positive at ``threshold``."""
    kinds: dict[str, list[float]] = {}
    for row in rows:
        kinds.setdefault(row["kind"].split(":")[0], []).append(row["probability"])
    lines = [f"Per kind (share called positive at {threshold:g})",
             f"{'':12}{'n':>5}{'positive':>10}{'median p':>10}"]
    for kind, probabilities in sorted(kinds.items()):
        values = np.asarray(probabilities)
        lines.append(f"{kind:12}{len(values):>5}{(values >= threshold).mean():>10.2%}"
                     f"{np.median(values):>10.3f}")
    return "\n".join(lines)
