"""Classical, model-free anatomy of a chest CT, and the constraints it puts on the model.

* :func:`body_mask`: the patient inside the body outline (table and outside air excluded).
* :func:`airway_mask`: trachea and main bronchi, tracked slice by slice from the top down
  while they stay small, dark and separate from the lungs.
* :func:`classical_lung_mask`: the paper's way of drawing lung ground truth (section 3.1.3):
  air below -320 HU inside the body, not connected to the outside air, large 3-D parts only,
  airways removed, holes filled. The quality gate and the tests use it as a reference that
  does not depend on the model.
* :func:`constrain_lung`: the model's lung mask kept to what anatomy allows: inside the body
  (a margin from its outline), near the large air-filled parts, airways out, small holes
  filled, small or soft-tissue components dropped. Lesions are then kept to this mask.

Arrays are (slices, rows, columns) with slice 0 the most inferior, as everywhere in dcn-node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Lung parenchyma and airways are below this; soft tissue, fluid and bone above (HU).
AIR_HU = -320.0
#: The body outline: tissue above this (HU).
BODY_HU = -500.0
#: Trachea and bronchi hold air darker than any parenchyma (HU).
AIRWAY_HU = -950.0
#: Air-filled parts whose mean is below this are gas (bowel, stomach, trachea), not lung:
#: lung parenchyma, even emphysematous, has vessels and septa that lift its mean.
GAS_MEAN_HU = -960.0

_STRUCT_2D = ndimage.generate_binary_structure(2, 1)
_STRUCT_3D = ndimage.generate_binary_structure(3, 1)


def _disk(radius_px: int) -> np.ndarray:
    r = max(1, int(radius_px))
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= r * r


def _large_parts(mask: np.ndarray, fraction: float) -> np.ndarray:
    """The 2-D components of at least ``fraction`` of the largest one's area: a field of
    view that cuts the body through a lung leaves the body in more than one piece."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The body per slice, holes filled (bool, same shape as ``hu``).

    Where the field of view cuts the body, the image edge closes it: along the border, only
    pixels of outside air (locally below -950 HU: air or padding, darker than any lung
    parenchyma) leave it open, so lungs cut by the image edge are still inside.
    """
    body = np.zeros(hu.shape, dtype=bool)
    for index, image in enumerate(hu):
        tissue = image > BODY_HU
        # Detach the table and thin blankets from the body before keeping the largest part.
        tissue = ndimage.binary_opening(tissue, _disk(2))
        if not tissue.any():
            continue
        tissue = _large_parts(tissue, 0.1)
        smooth = ndimage.uniform_filter(np.maximum(image, -1100.0).astype(np.float32), 5)
        closed = np.pad(smooth >= AIRWAY_HU, 1, mode="edge")
        closed[1:-1, 1:-1] = tissue
        body[index] = ndimage.binary_fill_holes(closed)[1:-1, 1:-1]
    return body


def airway_mask(hu: np.ndarray, body: np.ndarray, pixel_spacing_mm: float) -> np.ndarray:
    """Trachea and main bronchi: dark air tracked from the topmost slice that shows a small
    central air tube, downwards while each part stays smaller than a bronchus can be and
    separate from the lungs (where they enter the lung they stop being tracked)."""
    pixel_cm2 = (pixel_spacing_mm / 10.0) ** 2
    max_area = 8.0 / pixel_cm2  # the trachea is 1.5-3 cm across
    min_area = 0.3 / pixel_cm2
    airway = np.zeros(hu.shape, dtype=bool)
    previous: np.ndarray | None = None
    for index in range(hu.shape[0] - 1, -1, -1):
        if not body[index].any():
            if previous is not None:
                break
            continue
        dark = (hu[index] < AIRWAY_HU) & ndimage.binary_erosion(body[index], _disk(2),
                                                                border_value=1)
        labels, count = ndimage.label(dark, _STRUCT_2D)
        if count == 0:
            if previous is not None:
                break
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        keep = np.zeros(count + 1, dtype=bool)
        if previous is None:
            columns = np.flatnonzero(body[index].any(0))
            centre, width = (columns[0] + columns[-1]) / 2.0, columns[-1] - columns[0] + 1
            centroids = ndimage.center_of_mass(dark, labels, range(1, count + 1))
            for label, (_, column) in enumerate(centroids, start=1):
                if min_area <= areas[label] <= max_area and abs(column - centre) < 0.12 * width:
                    keep[label] = True
            # Lung apices are lateral and larger; in the top slices only the trachea is central.
        else:
            touching = np.unique(labels[ndimage.binary_dilation(previous, _disk(2)) & dark])
            for label in touching[touching > 0]:
                if areas[label] <= max_area and _walled(labels == label, hu[index]):
                    keep[label] = True
        found = keep[labels]
        if previous is not None and not found.any():
            break
        if found.any():
            airway[index] = found
            previous = found
    return airway


def _walled(part: np.ndarray, image: np.ndarray) -> bool:
    """An airway outside the lung has a wall: most of the ring around it is tissue. Inside
    the lung the ring is parenchyma, and tracking stops there."""
    # The ring leaves out the lumen's partial-volume rim next to the part itself.
    rows, columns = np.nonzero(part)
    top, left = max(0, rows.min() - 6), max(0, columns.min() - 6)
    window = (slice(top, rows.max() + 7), slice(left, columns.max() + 7))
    part, image = part[window], image[window]
    ring = ndimage.binary_dilation(part, _disk(4)) & ~ndimage.binary_dilation(part, _disk(1))
    return bool((image[ring] > BODY_HU).mean() >= 0.5) if ring.any() else False


def _air_components(candidates: np.ndarray, hu: np.ndarray, voxel_ml: float,
                    min_ml: float, min_fraction: float) -> np.ndarray:
    """The large 3-D air-filled parts of ``candidates`` that are not gas."""
    labels, count = ndimage.label(candidates, _STRUCT_3D)
    if count == 0:
        return np.zeros(candidates.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(float)
    sizes[0] = 0
    keep = np.zeros(count + 1, dtype=bool)
    largest = sizes.max()
    sums = np.bincount(labels.ravel(), weights=np.maximum(hu, -1024.0).ravel(),
                       minlength=count + 1)
    for label in range(1, count + 1):
        big = sizes[label] * voxel_ml >= min_ml and sizes[label] >= min_fraction * largest
        if big and sums[label] / sizes[label] > GAS_MEAN_HU:
            keep[label] = True
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill holes that lung surrounds in 3-D: per slice, holes smaller than ``max_area_px``
    (dense lesions, nodules inside the lung), but only where the hole continues, on the
    slices above and below, into lung or another such hole. The dome of the diaphragm, an
    island of liver surrounded by lung on an axial slice, continues into the abdomen and
    stays out; so does the mediastinum between two lungs that touch (too large)."""
    holes = np.zeros(mask.shape, dtype=bool)
    for index, image in enumerate(mask):
        if not image.any():
            continue
        filled = ndimage.binary_fill_holes(image) & ~image
        if not filled.any():
            continue
        labels, count = ndimage.label(filled, _STRUCT_2D)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        small = areas <= max_area_px
        small[0] = False
        holes[index] = small[labels]
    if not holes.any():
        return mask.copy()
    labels, count = ndimage.label(holes, _STRUCT_3D)
    enclosed = mask | holes
    leaks = np.zeros(count + 1, dtype=bool)
    # A hole voxel whose neighbour above or below is neither lung nor hole leaks out.
    below = np.zeros(mask.shape, dtype=bool)
    below[1:] = holes[1:] & ~enclosed[:-1]
    above = np.zeros(mask.shape, dtype=bool)
    above[:-1] = holes[:-1] & ~enclosed[1:]
    leaks[np.unique(labels[below | above])] = True
    # Holes in the first or last slice cannot be shown to be closed: left open.
    leaks[np.unique(labels[[0, -1]])] = True
    keep = ~leaks
    keep[0] = False
    return mask | keep[labels]


@dataclass(frozen=True)
class Anatomy:
    """The model-free anatomy of one volume."""

    body: np.ndarray
    airway: np.ndarray
    #: The classical lung mask (reference).
    lung: np.ndarray


def classical_anatomy(hu: np.ndarray, pixel_spacing_mm: float, slice_spacing_mm: float
                      ) -> Anatomy:
    """Body, airways and the classical lung mask of a HU volume."""
    body = body_mask(hu)
    airway = airway_mask(hu, body, pixel_spacing_mm)
    voxel_ml = pixel_spacing_mm ** 2 * slice_spacing_mm / 1000.0
    inside = np.zeros(hu.shape, dtype=bool)
    margin = _disk(max(1, round(2.0 / pixel_spacing_mm)))
    for index, image in enumerate(body):
        if image.any():
            inside[index] = ndimage.binary_erosion(image, margin, border_value=1)
    candidates = (hu < AIR_HU) & inside & ~airway
    lung = _air_components(candidates, hu, voxel_ml, min_ml=5.0, min_fraction=0.05)
    lung = _fill_small_holes(lung, 30.0 / (pixel_spacing_mm / 10.0) ** 2)
    return Anatomy(body, airway, lung)


def classical_lung_mask(hu: np.ndarray, pixel_spacing_mm: float, slice_spacing_mm: float
                        ) -> np.ndarray:
    """The classical lung mask (see the module docstring)."""
    return classical_anatomy(hu, pixel_spacing_mm, slice_spacing_mm).lung


def constrain_lung(predicted: np.ndarray, hu: np.ndarray, anatomy: Anatomy,
                   pixel_spacing_mm: float, slice_spacing_mm: float, *,
                   reach_mm: float = 20.0, body_margin_mm: float = 3.0) -> np.ndarray:
    """The model's lung mask kept to what anatomy allows.

    A voxel stays lung only if it is at least ``body_margin_mm`` inside the body outline,
    not airway, and within ``reach_mm`` of the classical (air-filled) lung of its slice: dense
    lesions at the lung's edge are kept, soft tissue of the shoulders or the abdomen is not.
    Then 3-D components smaller than 5 ml or 5 % of the largest, or mostly not air, go, and
    holes up to 30 cm^2 per slice are filled.
    """
    px_cm2 = (pixel_spacing_mm / 10.0) ** 2
    voxel_ml = pixel_spacing_mm ** 2 * slice_spacing_mm / 1000.0
    reach_px = reach_mm / pixel_spacing_mm
    margin = _disk(max(1, round(body_margin_mm / pixel_spacing_mm)))
    allowed = np.zeros(hu.shape, dtype=bool)
    for index in range(hu.shape[0]):
        if not predicted[index].any() or not anatomy.lung[index].any():
            continue
        near = ndimage.distance_transform_edt(~anatomy.lung[index]) <= reach_px
        allowed[index] = near & ndimage.binary_erosion(anatomy.body[index], margin, border_value=1)
    lung = predicted & allowed & ~anatomy.airway
    labels, count = ndimage.label(lung, _STRUCT_3D)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(float)
        air = np.bincount(labels.ravel(), weights=(hu < AIR_HU).ravel(), minlength=count + 1)
        sizes[0] = 0
        keep = (sizes * voxel_ml >= 5.0) & (sizes >= 0.05 * sizes.max()) \
            & (air >= 0.5 * np.maximum(sizes, 1))
        keep[0] = False
        lung = keep[labels]
    return _fill_small_holes(lung, 30.0 / px_cm2) & ~anatomy.airway
