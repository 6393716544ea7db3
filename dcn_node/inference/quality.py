"""The quality gate: can a whole-lung COVID-19 probability be given for this series at all?

It looks only at the image and its classical anatomy (:mod:`dcn_node.inference.anatomy`),
never at the model, so a model that sees lungs where there are none cannot pass it. A series
whose lungs are missing (not a chest), cut by the field of view or by the scan range, or
whose slices are too thick is **not assessable**: the node reports that, with the reason,
instead of a probability.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from dcn_node.config import QualityGateSettings as GateSettings
from dcn_node.inference.anatomy import Anatomy


class NotAssessable(enum.Enum):
    """Why a series gets no probability. The value is the code in summary.json."""

    NO_LUNGS = "no_lungs"
    LUNGS_CUT_BY_FIELD_OF_VIEW = "lungs_cut_by_field_of_view"
    LUNGS_CUT_BY_SCAN_RANGE = "lungs_cut_by_scan_range"
    SLICES_TOO_THICK = "slices_too_thick"


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on one series."""

    assessable: bool
    reason: NotAssessable | None
    #: A sentence for people: what was measured and why it fails.
    detail: str
    #: Air-filled lung found by the classical mask (ml).
    classical_lung_volume_ml: float

    def as_dict(self) -> dict[str, object]:
        return {
            "assessable": self.assessable,
            "reason": self.reason.value if self.reason else None,
            "detail": self.detail,
            "classical_lung_volume_ml": round(self.classical_lung_volume_ml, 1),
        }


def _region_hint(body: np.ndarray, pixel_spacing_mm: float) -> str:
    """A guess at the body region from the largest body cross-section (cm^2)."""
    area_cm2 = float(body.reshape(len(body), -1).sum(1).max(initial=0)) * \
        (pixel_spacing_mm / 10.0) ** 2
    if area_cm2 == 0:
        return "no body found"
    if area_cm2 < 120:
        return f"largest body cross-section {area_cm2:.0f} cm^2: an extremity?"
    if area_cm2 < 350:
        return f"largest body cross-section {area_cm2:.0f} cm^2: a head or neck?"
    return f"largest body cross-section {area_cm2:.0f} cm^2: an abdomen or pelvis?"


def assess(anatomy: Anatomy, pixel_spacing_mm: float, slice_spacing_mm: float,
           settings: GateSettings | None = None) -> GateResult:
    """The gate's verdict, checks in order: slice spacing, lungs present, field of view,
    scan range. The first that fails gives the reason."""
    settings = settings or GateSettings()
    lung = anatomy.lung
    voxel_ml = pixel_spacing_mm ** 2 * slice_spacing_mm / 1000.0
    lung_ml = float(lung.sum()) * voxel_ml

    def verdict(reason: NotAssessable | None, detail: str) -> GateResult:
        return GateResult(reason is None or not settings.enabled, reason, detail, lung_ml)

    if slice_spacing_mm > settings.max_slice_spacing_mm:
        return verdict(NotAssessable.SLICES_TOO_THICK,
                       f"slices {slice_spacing_mm:g} mm apart, more than the "
                       f"{settings.max_slice_spacing_mm:g} mm the model can read")
    if lung_ml < settings.min_lung_volume_ml:
        return verdict(NotAssessable.NO_LUNGS,
                       f"no lungs: {lung_ml:.0f} ml of air-filled lung found, less than "
                       f"{settings.min_lung_volume_ml:g} ml; not a chest CT "
                       f"({_region_hint(anatomy.body, pixel_spacing_mm)})")
    areas = lung.reshape(len(lung), -1).sum(1)
    with_lung = np.flatnonzero(areas)
    edge = np.zeros(len(lung), dtype=bool)
    edge |= lung[:, 0, :].any(1) | lung[:, -1, :].any(1)
    edge |= lung[:, :, 0].any(1) | lung[:, :, -1].any(1)
    edge_fraction = float(edge[with_lung].mean())
    if edge_fraction > settings.max_edge_slice_fraction:
        return verdict(NotAssessable.LUNGS_CUT_BY_FIELD_OF_VIEW,
                       f"the field of view cuts the lungs on {100 * edge_fraction:.0f} % of "
                       "the slices with lung")
    largest = float(areas.max())
    ends = {"inferior (base)": float(areas[0]), "superior (apex)": float(areas[-1])}
    for end, area in ends.items():
        if area > settings.max_end_slice_area_fraction * largest:
            return verdict(NotAssessable.LUNGS_CUT_BY_SCAN_RANGE,
                           f"the scan range cuts the lungs at the {end} end: its last slice "
                           f"still shows {100 * area / largest:.0f} % of the largest lung "
                           "cross-section")
    return GateResult(True, None, "lungs fully covered", lung_ml)
