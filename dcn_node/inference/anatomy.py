"""Classical, model-free anatomy of a chest CT, and the constraints it puts on the model.

* :func:`body_mask`: the patient inside the body outline (table and outside air excluded).
* :func:`airway_mask`: trachea and main bronchi, tracked slice by slice from the top down
  while they stay small, dark and separate from the lungs.
* :func:`classical_anatomy`: body, airways and the classical lung mask, the paper's way of
  drawing lung ground truth (section 3.1.3): air below -320 HU inside the body, not connected
  to the outside air, large 3-D parts only, airways removed, holes filled. The quality gate
  uses it as a reference that does not depend on the model.
* :func:`constrain_lung`: the model's lung mask kept to what anatomy allows: inside the body
  (a margin from its outline), near the large air-filled parts, airways out, small holes
  filled, small or soft-tissue components dropped, and aerated lung the model missed at
  the image edge (where the field of view cuts a lung) added. Lesions are then kept to this mask.

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
#: Lung parts smaller than this (ml) or than this share of the largest part are dropped.
MIN_PART_ML = 5.0
MIN_PART_FRACTION = 0.05
#: Holes up to this area (cm^2 per slice) inside the lung are filled when lung encloses them.
MAX_HOLE_CM2 = 30.0
#: Classical lung at the image edge this far from the model's lung, in parts of at least
#: this volume, was missed by the model and joins its mask (:func:`constrain_lung`).
MISSED_CORE_MM = 4.0
MISSED_CORE_ML = 1.0
#: Air-filled parts whose mean is below this are gas (bowel, stomach, trachea), not lung:
#: lung parenchyma, even emphysematous, has vessels and septa that lift its mean.
GAS_MEAN_HU = -960.0

#: Whole-volume sums are taken this many slices at a time.
_CHUNK_SLICES = 16

_STRUCT_2D = ndimage.generate_binary_structure(2, 1)
_STRUCT_3D = ndimage.generate_binary_structure(3, 1)


def label_3d(mask: np.ndarray, structure: np.ndarray = _STRUCT_3D) -> tuple[np.ndarray, int]:
    """``ndimage.label`` into 16-bit labels when there are few enough parts (the labels are
    the largest array of a whole-volume step: 2 bytes a voxel instead of 4), else 32-bit."""
    labels = np.empty(mask.shape, np.uint16)
    try:
        count = ndimage.label(mask, structure, output=labels)
    except RuntimeError:  # more than 65,535 parts: "insufficient bit-depth"
        labels, count = ndimage.label(mask, structure)
    return labels, int(count)


def label_sums(labels: np.ndarray, count: int, values: np.ndarray | None = None,
               floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, sum of ``values`` raised to ``floor``) per label 0..count, float64; the sums
    are zero without ``values``. Counted a few slices at a time: bincount works in 64 bits,
    8 bytes a voxel."""
    sizes, sums = np.zeros(count + 1), np.zeros(count + 1)
    for start in range(0, labels.shape[0], _CHUNK_SLICES):
        part = labels[start:start + _CHUNK_SLICES].ravel()
        sizes += np.bincount(part, minlength=count + 1)
        if values is not None:
            chunk = values[start:start + _CHUNK_SLICES]
            weights = chunk if floor is None else np.maximum(chunk, floor)
            sums += np.bincount(part, weights=weights.ravel(), minlength=count + 1)
    return sizes, sums


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
    pixels of outside air (locally below -950 HU: air or padding) leave it open, and only
    outside the stretch between the body's first and last contact with that edge, so lungs
    cut by the image edge are still inside, even where an aerated upper lobe reaches
    outside-air values at the edge (one such pixel used to open a whole lung to the outside).
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
        for side in range(4):  # rot90 views: each edge in turn as row 0
            contact = np.flatnonzero(np.rot90(tissue, side)[0])
            if contact.size:
                np.rot90(closed, side)[0, contact[0] + 1:contact[-1] + 2] = True
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


def _keep_components(mask: np.ndarray, voxel_ml: float, values: np.ndarray,
                     min_mean: float, floor: float | None = None) -> np.ndarray:
    """The 3-D components of ``mask`` of at least 5 ml and 5 % of the largest whose mean of
    ``values`` (raised to ``floor`` first, when given) is at least ``min_mean``."""
    labels, count = label_3d(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes, sums = label_sums(labels, count, values, floor)
    sizes[0] = 0
    keep = (sizes * voxel_ml >= MIN_PART_ML) & (sizes >= MIN_PART_FRACTION * sizes.max()) \
        & (sums >= min_mean * np.maximum(sizes, 1))
    keep[0] = False
    return keep[labels]


def _inside_body(body: np.ndarray, margin_mm: float, pixel_spacing_mm: float) -> np.ndarray:
    """The body shrunk by ``margin_mm`` per slice (the image edge does not shrink it)."""
    margin = _disk(max(1, round(margin_mm / pixel_spacing_mm)))
    inside = np.zeros(body.shape, dtype=bool)
    for index, image in enumerate(body):
        if image.any():
            inside[index] = ndimage.binary_erosion(image, margin, border_value=1)
    return inside


def _fill_small_holes(mask: np.ndarray, pixel_spacing_mm: float) -> np.ndarray:
    """Fill holes that lung surrounds in 3-D: per slice, holes up to :data:`MAX_HOLE_CM2`
    (dense lesions, nodules inside the lung), but only where the hole continues, on the
    slices above and below, into lung or another such hole. The dome of the diaphragm, an
    island of liver surrounded by lung on an axial slice, continues into the abdomen and
    stays out; so does the mediastinum between two lungs that touch (too large)."""
    max_area_px = MAX_HOLE_CM2 / (pixel_spacing_mm / 10.0) ** 2
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
    labels, count = label_3d(holes)
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
    candidates = (hu < AIR_HU) & _inside_body(body, 2.0, pixel_spacing_mm) & ~airway
    lung = _keep_components(candidates, voxel_ml, hu, GAS_MEAN_HU, floor=-1024.0)
    del candidates
    return Anatomy(body, airway, _fill_small_holes(lung, pixel_spacing_mm))


def constrain_lung(predicted: np.ndarray, hu: np.ndarray, anatomy: Anatomy,
                   pixel_spacing_mm: float, slice_spacing_mm: float, *,
                   reach_mm: float = 20.0, reach_z_mm: float = 30.0,
                   body_margin_mm: float = 3.0) -> np.ndarray:
    """The model's lung mask kept to what anatomy allows.

    A voxel stays lung only if it is at least ``body_margin_mm`` inside the body outline,
    not airway, and within ``reach_mm`` (in its slice) of the classical (air-filled) lung of
    its own slice or of the slices up to ``reach_z_mm`` above it: dense lesions at the
    lung's edge are kept, even a consolidation that fills the base of a lung on its own
    slice while the lung above it is still aerated; soft tissue of the shoulders, the back
    or the abdomen is not. Then 3-D components smaller than 5 ml or 5 % of the largest, or
    mostly not air, go, and holes that lung encloses are filled.
    """
    voxel_ml = pixel_spacing_mm ** 2 * slice_spacing_mm / 1000.0
    reach_px = reach_mm / pixel_spacing_mm
    # The air-filled lung of the slices up to reach_z_mm above (superior: higher index),
    # projected onto each slice. Only above: the lung narrows towards the apex, so upper
    # slices add nothing there (the shoulders, the paraspinal muscles stay out), while at
    # the bases the aerated lung above covers a base that consolidation has filled.
    footprint = anatomy.lung.copy()
    for step in range(1, int(reach_z_mm // max(slice_spacing_mm, 1e-3)) + 1):
        footprint[:-step] |= anatomy.lung[step:]
    near = np.zeros(hu.shape, dtype=bool)
    for index in range(hu.shape[0]):
        if predicted[index].any() and footprint[index].any():
            near[index] = ndimage.distance_transform_edt(~footprint[index]) <= reach_px
    allowed = near & _inside_body(anatomy.body, body_margin_mm, pixel_spacing_mm)
    del footprint, near
    lung = _keep_components(predicted & allowed & ~anatomy.airway, voxel_ml, hu < AIR_HU, 0.5)
    lung |= _missed_lung(lung, anatomy.lung, hu, voxel_ml, pixel_spacing_mm)
    return _fill_small_holes(lung, pixel_spacing_mm) & ~anatomy.airway


def _missed_lung(model: np.ndarray, classical: np.ndarray, hu: np.ndarray, voxel_ml: float,
                 pixel_spacing_mm: float) -> np.ndarray:
    """Aerated lung the model missed at the image edge, where the field of view cuts a lung:
    the U-Net marks nothing within about 10 pixels of the edge. The classical mask's parts
    farther than :data:`MISSED_CORE_MM` from the model's lung (at least
    :data:`MISSED_CORE_ML`) that reach the image edge, with their surroundings up to that
    distance. Only from the classical parts the model itself mostly calls lung, and only
    aerated parenchyma (mean between :data:`GAS_MEAN_HU` and :data:`AIR_HU`). Elsewhere the
    model's call stands: where the masks disagree by a pixel or two at the lung's rim, and
    where the classical mask takes in a stomach bubble under a lung base (as on phantoms)."""
    missed = classical & ~model
    if not missed.any():
        return missed
    labels, count = label_3d(classical)
    sizes, agreed = label_sums(labels, count, model)
    shared = agreed >= 0.5 * np.maximum(sizes, 1)
    shared[0] = False
    missed &= shared[labels]
    del labels
    reach = _disk(max(1, round(MISSED_CORE_MM / pixel_spacing_mm)))[None]
    core = missed & ~ndimage.binary_dilation(model, reach)
    labels, count = label_3d(core)
    if count == 0:
        return core
    sizes, sums = label_sums(labels, count, hu, -1024.0)
    means = sums / np.maximum(sizes, 1)
    at_edge = np.zeros(count + 1, dtype=bool)
    width = reach.shape[1] // 2 + 1
    for band in (labels[:, :width], labels[:, -width:], labels[:, :, :width],
                 labels[:, :, -width:]):
        at_edge[np.unique(band)] = True
    large = (sizes * voxel_ml >= MISSED_CORE_ML) & (means >= GAS_MEAN_HU) & (means < AIR_HU) \
        & at_edge
    large[0] = False
    return missed & ndimage.binary_dilation(large[labels], reach)
