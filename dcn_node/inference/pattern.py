"""The patient-level ``pattern`` mapping: the paper's slice-probability mapping (SPM) and
the *shape* of what the DCN outlined, weighed by a logistic regression.

Why: the DCN's slice classifier also lights up on other disease (a lung cancer, a lobar
pneumonia: slice probabilities of 0.97-0.99), so no mapping over slice probabilities alone
can tell them from COVID-19. A radiologist tells them apart by the pattern (the CO-RADS
reading): COVID-19 pneumonia is multifocal, bilateral, peripheral and mostly ground glass;
a tumour is one solid mass, a lobar pneumonia one dense region in one lung. The features
below measure exactly that on the node's own lung and lesion masks; the weights are fitted
on phantoms the networks never trained on (``dcn-node fit-pattern``) and stored in the
model manifest (``pattern``), so the node reads no data but its own outputs.

The masks are taken at every k-th pixel (at most :data:`MAX_SIDE` a side): the features
are shares and counts that do not need every pixel, and the fitting data are saved the
same way (:func:`dcn_train.evaluation.save_case_outputs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["FEATURES", "MAX_SIDE", "pattern_features", "pattern_probability", "subsample_step"]

#: The longest image side the features are computed on.
MAX_SIDE = 256
#: Lesion voxels within this distance of the lung mask's edge (in their slice) are
#: "peripheral" (COVID-19: subpleural).
PERIPHERAL_MM = 10.0
#: Lesion voxels below this HU are ground glass (consolidation and solid masses are denser).
GROUND_GLASS_BELOW_HU = -300.0
#: Logits are clipped here: a probability of 1 - 1e-4 says all there is to say.
LOGIT_CLIP = 9.0

#: The features, in the order of the manifest's weights.
FEATURES = (
    "spm_logit",  # the paper's mapping over slice probabilities (uncalibrated), logit
    "max_slice_logit",  # the largest slice probability, logit (the paper's Table 4)
    "involvement",  # log10 of lesion / lung volume (+1e-4)
    "bilateral",  # lesion volume in the less involved lung / all lesion volume (0-0.5)
    "peripheral",  # share of lesion voxels within PERIPHERAL_MM of the lung's edge
    "ground_glass",  # share of lesion voxels below GROUND_GLASS_BELOW_HU
    "largest_part",  # the largest 3-D lesion part / all lesion volume (1: one focus)
)


def subsample_step(shape: Sequence[int]) -> int:
    """Every how many pixels the features look (1 for images up to MAX_SIDE)."""
    return max(1, -(-max(shape[-2:]) // MAX_SIDE))


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return float(np.clip(math.log(p / (1 - p)), -LOGIT_CLIP, LOGIT_CLIP))


def pattern_features(lung: np.ndarray, lesion: np.ndarray, hu: np.ndarray, pixel_mm: float,
                     slice_probabilities: np.ndarray, spm_probability: float
                     ) -> dict[str, float]:
    """The :data:`FEATURES` of one series. ``lung``, ``lesion`` (bool) and ``hu`` are
    (slices, rows, columns) arrays of the same (subsampled) grid with ``pixel_mm`` pixels;
    ``slice_probabilities`` the DCN's, 0 where a slice has no lung."""
    lung_voxels = int(np.count_nonzero(lung))
    lesion = lesion & lung  # the engine's lesions already are; saved outputs too
    lesion_voxels = int(np.count_nonzero(lesion))
    lung_slices = lung.reshape(len(lung), -1).any(1)
    probabilities = np.asarray(slice_probabilities, float)[lung_slices]
    features = {
        "spm_logit": _logit(spm_probability),
        "max_slice_logit": _logit(probabilities.max() if len(probabilities) else 0.0),
        "involvement": math.log10(lesion_voxels / max(lung_voxels, 1) + 1e-4),
        "bilateral": 0.0, "peripheral": 0.0, "ground_glass": 0.0, "largest_part": 1.0,
    }
    if lesion_voxels == 0:
        return features
    # Sides: either side of the lungs' mean column (the patient's midline, near enough).
    columns = np.nonzero(lung.any(axis=(0, 1)))[0]
    weights = lung.sum(axis=(0, 1))[columns]
    middle = float(np.average(columns, weights=weights))
    per_column = lesion.sum(axis=(0, 1))
    left = float(per_column[: int(math.ceil(middle))].sum())
    features["bilateral"] = min(left, lesion_voxels - left) / lesion_voxels
    reach = PERIPHERAL_MM / max(pixel_mm, 1e-6)
    peripheral = 0
    for index in np.flatnonzero(lesion.reshape(len(lesion), -1).any(1)):
        depth = ndimage.distance_transform_edt(lung[index])
        peripheral += int(np.count_nonzero(lesion[index] & (depth <= reach)))
    features["peripheral"] = peripheral / lesion_voxels
    features["ground_glass"] = float(np.count_nonzero(
        lesion & (hu < GROUND_GLASS_BELOW_HU))) / lesion_voxels
    labels, count = ndimage.label(lesion, np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    features["largest_part"] = float(sizes.max()) / lesion_voxels
    return features


def pattern_probability(features: dict[str, float], model: dict[str, Any]) -> float:
    """The logistic regression of the manifest's ``pattern`` entry on ``features``:
    standardised by its ``mean`` and ``scale``, then ``weights`` and ``bias``."""
    names = list(model["features"])
    x = np.array([features[name] for name in names], float)
    z = (x - np.asarray(model["mean"], float)) / np.asarray(model["scale"], float)
    logit = float(z @ np.asarray(model["weights"], float) + float(model["bias"]))
    return 1.0 / (1.0 + math.exp(-max(min(logit, 500.0), -500.0)))
