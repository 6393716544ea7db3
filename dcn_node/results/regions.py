"""Where on the CT a finding is: the image regions the SR's measurement groups point at.

A viewer shows a TID 1500 measurement where its image region lies (OHIF draws it on that
slice and lists its numbers; a group without one is not shown at all). So each group gets a
2D region on one CT slice:

* the lesions, one by one: each 3D connected lesion is outlined on its *key slice*, the slice
  where its cross-section is largest, as a closed polygon (contourpy's marching squares);
* the patient-level assessment: the rectangle around both lungs on the slice with the largest
  lesion area (or the most lung when there is none).

Coordinates are SCOORD image coordinates (column, row) with the top-left corner of the first
pixel at (0, 0), so a pixel centre is at (column + 0.5, row + 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import contourpy
import numpy as np
from scipy import ndimage

from dcn_node.inference.anatomy import label_3d, label_sums
from dcn_node.results import common
from dcn_node.volume import Volume

#: Outlines longer than this are thinned evenly (a viewer draws them as they are).
MAX_OUTLINE_POINTS = 256


@dataclass(frozen=True)
class LesionRegion:
    """One 3D connected lesion and its outline on its key slice."""

    slice_index: int
    outline: np.ndarray  # (n, 2) float32 (column, row), closed: first point == last
    voxels: int
    area_mm2: float  # of the lesion on the key slice
    mean_hu: float  # on the key slice, inside the lesion
    side: str  # "left" or "right" (the patient's), of the centre between the lungs


def outline(mask: np.ndarray) -> np.ndarray:
    """The closed outline (column, row) of the largest connected piece of a 2D mask."""
    padded = np.pad(mask.astype(np.float32), 1)
    generator = contourpy.contour_generator(z=padded, line_type="Separate")
    # line_type "Separate": a list of (n, 2) arrays (lines() is typed for every line type).
    lines = cast(list[np.ndarray], generator.lines(0.5))
    longest = max(lines, key=len)  # the outer boundary of the largest piece
    if len(longest) > MAX_OUTLINE_POINTS:
        keep = np.linspace(0, len(longest) - 1, MAX_OUTLINE_POINTS).round().astype(int)
        longest = longest[keep]
    points = np.asarray(longest, dtype=np.float32) - 1 + 0.5  # unpad; to pixel corners
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points


def lesion_regions(volume: Volume, lesion: np.ndarray, lung: np.ndarray, count: int
                   ) -> list[LesionRegion]:
    """The ``count`` largest 3D connected lesions (26-connectivity), largest first."""
    if count <= 0 or not lesion.any():
        return []
    # Labelled inside the lesions' bounding box, 16-bit where that suffices: the labels
    # are the largest array made here (a whole-volume int32 copy would be 4 bytes a voxel).
    extents = [np.flatnonzero(lesion.any(axis=others)) for others in ((1, 2), (0, 2), (0, 1))]
    corner = [int(extent[0]) for extent in extents]
    box = tuple(slice(int(extent[0]), int(extent[-1]) + 1) for extent in extents)
    labels, parts = label_3d(lesion[box], np.ones((3, 3, 3), bool))
    sizes = label_sums(labels, parts)[0][1:].astype(np.int64)
    boxes = ndimage.find_objects(labels)
    pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    # Columns run towards the patient's left when the row direction is L (Image
    # Orientation, also from an Enhanced CT's shared functional groups).
    columns_go_left = common.patient_orientation(volume)[0].startswith("L")
    top, left = corner[1], corner[2]
    regions = []
    for label in np.argsort(-sizes, kind="stable")[:count] + 1:
        own = boxes[label - 1]
        areas = (labels[own] == label).sum(axis=(1, 2))  # within its bounding box only
        index = own[0].start + int(np.argmax(areas))
        section = labels[index] == label
        centre = np.nonzero(section)[1].mean() + left
        lung_columns = np.flatnonzero(lung[corner[0] + index].any(axis=0))
        midline = (lung_columns[0] + lung_columns[-1]) / 2 if lung_columns.size else centre
        hu = volume.hu[corner[0] + index, box[1], box[2]]
        regions.append(LesionRegion(
            slice_index=corner[0] + index,
            outline=outline(section) + np.array([left, top], np.float32),
            voxels=int(sizes[label - 1]), area_mm2=float(areas.max()) * pixel_mm2,
            mean_hu=float(hu[section].mean()),
            side="left" if (centre >= midline) == columns_go_left else "right"))
    return regions


def assessment_slice(lesion: np.ndarray, lung: np.ndarray) -> int:
    """The slice with the largest lesion area, else the most lung, else the middle one."""
    for mask in (lesion, lung):
        areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
        if areas.any():
            return int(np.argmax(areas))
    return lesion.shape[0] // 2


def lung_rectangle(lung: np.ndarray, index: int) -> np.ndarray:
    """The closed rectangle (column, row) around the lungs on slice ``index``; the whole
    image when the slice has no lung (a series the quality gate found not assessable)."""
    rows, columns = np.nonzero(lung[index])
    if rows.size:
        left, right = float(columns.min()), float(columns.max() + 1)
        top, bottom = float(rows.min()), float(rows.max() + 1)
    else:
        left, top, right, bottom = 0.0, 0.0, float(lung.shape[2]), float(lung.shape[1])
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]],
                    dtype=np.float32)
