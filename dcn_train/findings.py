"""Findings painted into any chest CT volume (a phantom or a real scan), in voxel space.

* :func:`insert_covid_lesions`: COVID-19 patterns (ground glass, consolidation, crazy paving,
  organising pneumonia) blended into the lung: HU mixed towards the lesion's value through a
  soft mask, vessels kept visible through ground glass, the scan's noise added back. The
  inserted mask is the ground truth.
* :func:`add_other_disease`: what is *not* COVID-19 but makes the lung denser or different:
  nodules, tumour masses, emphysema and bullae, fibrosis/reticulation, pleural effusion,
  dependent and lobar atelectasis, bacterial lobar consolidation, metal streaks. These are the
  hard negatives: the label stays 0 and the lesion mask empty.

Arrays are float32 HU (slices, rows, columns), slice 0 the most inferior, rows anterior to
posterior, columns patient right to left. Everything follows from the ``rng`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Kinds of other disease, drawn by :func:`add_other_disease`.
OTHER_DISEASES = ("nodules", "mass", "emphysema", "fibrosis", "effusion", "atelectasis",
                  "lobar_consolidation", "metal")


@dataclass(frozen=True)
class Geometry:
    """Voxel size in mm: in-plane pixel spacing and slice spacing."""

    pixel_mm: float
    slice_mm: float


def _noise_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float
                 ) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                    (0, sigma_px, sigma_px))
    return field / max(float(field.std()), 1e-6)


def _blob(rng: np.random.Generator, shape: tuple[int, int, int], centre: np.ndarray,
          radius_mm: float, geo: Geometry, *, wobble: float = 0.15, edge_mm: float = 2.0,
          elongation: float = 0.3) -> tuple[tuple[slice, ...], np.ndarray]:
    """A perturbed ellipsoid's soft weight (0..1) in its bounding box."""
    axes = radius_mm * rng.uniform(1 - elongation, 1 + elongation, 3)
    ext = 1.5 * float(axes.max())
    lo = np.maximum(0, np.floor(centre - [ext / geo.slice_mm, ext / geo.pixel_mm,
                                          ext / geo.pixel_mm]).astype(int))
    hi = np.minimum(shape, np.ceil(centre + [ext / geo.slice_mm, ext / geo.pixel_mm,
                                             ext / geo.pixel_mm]).astype(int) + 1)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    dz = ((np.arange(lo[0], hi[0]) - centre[0]) * geo.slice_mm)[:, None, None]
    dy = ((np.arange(lo[1], hi[1]) - centre[1]) * geo.pixel_mm)[None, :, None]
    dx = ((np.arange(lo[2], hi[2]) - centre[2]) * geo.pixel_mm)[None, None, :]
    angle = rng.uniform(0, math.pi)
    cs, sn = math.cos(angle), math.sin(angle)
    rho = np.sqrt(((cs * dx + sn * dy) / axes[0]) ** 2 + ((cs * dy - sn * dx) / axes[1]) ** 2
                  + (dz / axes[2]) ** 2)
    phi = rho - 1
    for _ in range(4):
        k = rng.normal(0, 1, 3)
        k *= rng.uniform(1.5, 4.5) / (radius_mm * np.linalg.norm(k))
        phi = phi + rng.uniform(0.3, 1.0) * wobble * np.sin(
            k[0] * dx + k[1] * dy + k[2] * dz + rng.uniform(0, 2 * math.pi))
    weight = np.clip(0.5 - phi * radius_mm / max(edge_mm, 0.3), 0, 1).astype(np.float32)
    return box, weight


def _lung_point(rng: np.random.Generator, lung: np.ndarray, weights: np.ndarray | None = None
                ) -> np.ndarray | None:
    index = np.flatnonzero(lung)
    if not len(index):
        return None
    if weights is not None:
        w = weights.ravel()[index].astype(np.float64) + 1e-9
        chosen = rng.choice(index, p=w / w.sum())
    else:
        chosen = rng.choice(index)
    return np.array(np.unravel_index(chosen, lung.shape), dtype=float)


def _periphery_weights(lung: np.ndarray, geo: Geometry, posterior: float = 1.0) -> np.ndarray:
    """Higher near the pleura and towards the back (COVID-19's favourite places)."""
    depth = np.zeros(lung.shape, np.float32)
    for k in range(lung.shape[0]):
        if lung[k].any():
            depth[k] = ndimage.distance_transform_edt(lung[k]) * geo.pixel_mm
    rows = np.linspace(0, 1, lung.shape[1], dtype=np.float32)[None, :, None]
    return np.exp(-depth / 15.0) * (0.4 + posterior * rows) * lung


def insert_covid_lesions(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray,
                         geo: Geometry, *, involvement: float | None = None,
                         noise_sd: float | None = None) -> np.ndarray:
    """Blend COVID-19 lesions into ``hu`` (changed in place) inside ``lung``; returns the
    lesion mask. ``involvement``: the share of the lung to cover (0.001-0.6; drawn from a
    log-uniform range when None)."""
    lesion = np.zeros(lung.shape, bool)
    if not lung.any():
        return lesion
    if involvement is None:
        involvement = float(math.exp(rng.uniform(math.log(0.001), math.log(0.6))))
    lung_ml = float(lung.sum()) * geo.pixel_mm ** 2 * geo.slice_mm / 1000.0
    target_ml = involvement * lung_ml
    if noise_sd is None:  # the scan's own noise: spread of the lung's high-pass part
        sample = hu[lung.any((1, 2))][:3]
        high = sample - ndimage.uniform_filter(sample, (1, 3, 3))
        noise_sd = float(np.clip(np.std(high[lung[lung.any((1, 2))][:3]]) * 1.2, 5, 80))
    weights = _periphery_weights(lung, geo, posterior=rng.uniform(0.5, 2.0))
    bilateral = rng.random() < 0.8
    if not bilateral:  # one lung only: columns left or right of the lung's centre
        columns = np.flatnonzero(lung.any((0, 1)))
        middle = (columns[0] + columns[-1]) / 2
        side = np.arange(lung.shape[2]) < middle if rng.random() < 0.5 else \
            np.arange(lung.shape[2]) >= middle
        weights = weights * side[None, None, :]
    texture = _noise_field(rng, lung.shape, 1.2 / geo.pixel_mm)
    done_ml, attempts = 0.0, 0
    while done_ml < target_ml and attempts < 60:
        attempts += 1
        remaining = target_ml - done_ml
        radius = float(np.clip((remaining * 1000 / 4.19) ** (1 / 3) * rng.uniform(0.5, 1.0),
                               2.5, 70.0))
        centre = _lung_point(rng, lung, weights)
        if centre is None:
            break
        box, weight = _blob(rng, lung.shape, centre, radius, geo, wobble=0.2,
                            edge_mm=rng.uniform(1.5, 5.0), elongation=0.35)
        inside = lung[box]
        weight = weight * inside
        region = hu[box]
        kind = rng.choice(4, p=[0.45, 0.2, 0.2, 0.15])
        ggo = rng.uniform(-720, -420)
        tex = texture[box]
        if kind == 0:  # ground glass: vessels stay visible (never darker than before)
            target = ggo + 30 * tex
            blended = np.maximum(region, region + weight * (target - region))
        elif kind == 1:  # consolidation, with air bronchograms left as they were
            target = rng.uniform(-60, 40) + 15 * tex
            blended = region + weight * (target - region)
            blended = np.where(region < -950, region, blended)
        elif kind == 2:  # organising pneumonia: dense rim or core in ground glass
            core = np.clip((weight - 0.6) / 0.3, 0, 1)
            if rng.random() < 0.5:  # reversed halo: ring of consolidation
                core = np.clip(1 - np.abs(weight - 0.55) / 0.15, 0, 1)
            target = ggo + (rng.uniform(-80, 20) - ggo) * core + 20 * tex
            blended = np.maximum(region, region + weight * (target - region))
        else:  # crazy paving: ground glass with thickened septa
            spacing_px = rng.uniform(5, 9) / geo.pixel_mm
            septa = _septa(rng, weight.shape, spacing_px)
            target = rng.uniform(-620, -480) + 260 * septa + 20 * tex
            blended = np.maximum(region, region + weight * (target - region))
        noise = rng.standard_normal(region.shape).astype(np.float32) * noise_sd * weight
        np.copyto(region, blended + noise * 0.5, where=inside)
        new = (weight >= 0.5) & inside & ~lesion[box]
        lesion[box] |= (weight >= 0.5) & inside
        done_ml += float(new.sum()) * geo.pixel_mm ** 2 * geo.slice_mm / 1000.0
    return lesion


def _septa(rng: np.random.Generator, shape: tuple[int, ...], spacing_px: float) -> np.ndarray:
    """A polygonal network of thin lines (interlobular septa) per slice, 0..1."""
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]].astype(np.float32)
    total = np.zeros(shape[1:], np.float32)
    for _ in range(3):
        angle = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin((math.cos(angle) * xx + math.sin(angle) * yy) * 2 * math.pi / spacing_px
                      + phase)
        total = np.maximum(total, np.exp(-((wave - 1) / 0.15) ** 2))
    return np.broadcast_to(total, shape)


def add_other_disease(rng: np.random.Generator, hu: np.ndarray, lung: np.ndarray,
                      body: np.ndarray | None, geo: Geometry, kinds: tuple[str, ...] | None = None
                      ) -> tuple[np.ndarray, list[str]]:
    """Add one to three non-COVID findings to ``hu`` (in place). Returns the lung mask as it
    is afterwards (an effusion displaces lung) and the kinds added."""
    if kinds is None:
        count = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        kinds = tuple(rng.choice(OTHER_DISEASES, count, replace=False))
    lung = lung.copy()
    for kind in kinds:
        if not lung.any():
            break
        lung = _DISEASES[kind](rng, hu, lung, body, geo)
    return lung, list(kinds)


def _nodules(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202 - see add_other_disease
    for _ in range(int(rng.integers(1, 6))):
        centre = _lung_point(rng, lung)
        if centre is None:
            break
        radius = float(rng.uniform(2.5, 12.0))
        box, weight = _blob(rng, lung.shape, centre, radius, geo, wobble=rng.uniform(0, 0.3),
                            edge_mm=0.8, elongation=0.15)
        value = rng.uniform(-20, 80) if rng.random() < 0.8 else rng.uniform(-650, -450)
        region = hu[box]
        region += weight * (value - region)
    return lung


def _mass(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202
    rows = np.linspace(0, 1, lung.shape[2])
    columns = np.flatnonzero(lung.any((0, 1)))
    middle = (columns[0] + columns[-1]) / 2 if len(columns) else lung.shape[2] / 2
    central = np.exp(-((np.arange(lung.shape[2]) - middle) / (0.25 * lung.shape[2])) ** 2)
    centre = _lung_point(rng, lung, lung * (0.3 + central[None, None, :]) * (rows.max() > 0))
    if centre is None:
        return lung
    radius = float(rng.uniform(10, 25))
    box, weight = _blob(rng, lung.shape, centre, radius, geo, wobble=0.3, edge_mm=1.5,
                        elongation=0.25)
    value = rng.uniform(15, 55)
    texture = _noise_field(rng, weight.shape, 2.0 / geo.pixel_mm)
    necrosis = np.clip((weight - 0.95) / 0.05, 0, 1) * (rng.random() < 0.4)
    region = hu[box]
    region += weight * (value + 15 * texture - 30 * necrosis - region)
    return lung


def _emphysema(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202
    upper = np.linspace(0.3, 1.0, lung.shape[0])[:, None, None]  # upper zones more
    weights = lung * upper
    for _ in range(int(rng.integers(20, 120))):
        centre = _lung_point(rng, lung, weights)
        if centre is None:
            break
        radius = float(rng.uniform(1.5, 6.0))
        box, weight = _blob(rng, lung.shape, centre, radius, geo, edge_mm=0.8, wobble=0.1)
        region = hu[box]
        # Destroyed parenchyma: darker, vessels gone too.
        np.copyto(region, region + weight * (rng.uniform(-1010, -970) - region),
                  where=lung[box])
    for _ in range(int(rng.integers(0, 3))):  # bullae, with a thin wall
        centre = _lung_point(rng, lung, _periphery_weights(lung, geo, 0.0) * upper)
        if centre is None:
            break
        radius = float(rng.uniform(10, 30))
        box, weight = _blob(rng, lung.shape, centre, radius, geo, edge_mm=0.6, wobble=0.05)
        wall = np.clip(1 - np.abs(weight - 0.5) / 0.12, 0, 1)
        region = hu[box]
        np.copyto(region, region + weight * (-1000 - region) + wall * 350, where=lung[box])
    return lung


def _fibrosis(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202
    # Basal, subpleural reticulation with traction and honeycomb cysts.
    basal = np.linspace(1.0, 0.2, lung.shape[0])[:, None, None]
    depth = np.zeros(lung.shape, np.float32)
    for k in range(lung.shape[0]):
        if lung[k].any():
            depth[k] = ndimage.distance_transform_edt(lung[k]) * geo.pixel_mm
    reach = rng.uniform(10, 30)
    zone = np.clip(1 - depth / reach, 0, 1) * basal * lung
    septa = _septa(rng, lung.shape, rng.uniform(3, 6) / geo.pixel_mm)
    value = rng.uniform(-450, -150)
    hu += zone * septa * (value - hu) * rng.uniform(0.6, 1.0)
    cysts = (zone > 0.6) & (rng.random(lung.shape) < 0.02)
    cysts = ndimage.binary_dilation(cysts, iterations=1)
    hu[cysts & lung] = np.minimum(hu[cysts & lung], -950)
    return lung


def _effusion(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202
    # Fluid in the pleural space, dependent (posterior), bases first: lung gives way to it.
    slices = np.flatnonzero(lung.any((1, 2)))
    if not len(slices):
        return lung
    height = int(len(slices) * rng.uniform(0.2, 0.6))
    thickness_mm = rng.uniform(8, 45)
    sides = [rng.random() < 0.5, True] if rng.random() < 0.4 else [rng.random() < 0.5]
    columns = np.flatnonzero(lung.any((0, 1)))
    middle = (columns[0] + columns[-1]) / 2
    for left in sides:
        side = (np.arange(lung.shape[2]) >= middle) == left
        for offset, k in enumerate(slices[:height]):
            this = lung[k] & side[None, :]
            if not this.any():
                continue
            fade = 1 - offset / max(height, 1)
            back = np.flatnonzero(this.any(1))[-1]
            top = back - (thickness_mm * fade) / geo.pixel_mm
            fluid = this & (np.arange(lung.shape[1])[:, None] > top)
            hu[k][fluid] = rng.uniform(0, 20) + rng.normal(0, 8, int(fluid.sum()))
            lung[k] &= ~fluid
            # Compressed lung next to it: a band of passive atelectasis.
            band = this & ~fluid & ndimage.binary_dilation(fluid, iterations=max(
                1, round(4 / geo.pixel_mm)))
            hu[k][band] = np.maximum(hu[k][band], rng.uniform(-300, 0))
    return lung


def _atelectasis(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202
    # Dependent (posterior) subpleural band, thickest at the bases.
    for k in np.flatnonzero(lung.any((1, 2))):
        depth = ndimage.distance_transform_edt(lung[k]) * geo.pixel_mm
        rows = np.linspace(0, 1, lung.shape[1])[:, None]
        base = 1.0 - k / max(lung.shape[0], 1)
        band = (depth < rng.uniform(2, 10) * (0.5 + base)) & (rows > 0.6) & lung[k]
        hu[k][band] += (rng.uniform(-500, -100) - hu[k][band]) * rng.uniform(0.5, 1.0)
    if rng.random() < 0.3:  # plate (discoid) atelectasis: a thin dense line at a base
        centre = _lung_point(rng, lung, lung * np.linspace(1, 0, lung.shape[0])[:, None, None])
        if centre is not None:
            box, weight = _blob(rng, lung.shape, centre, rng.uniform(15, 30), geo,
                                elongation=0.0, edge_mm=1.0)
            flat = np.abs(np.arange(box[1].start, box[1].stop) - centre[1])[None, :, None] \
                * geo.pixel_mm < 1.5
            hu[box] += weight * flat * (rng.uniform(-100, 20) - hu[box])
    return lung


def _lobar_consolidation(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202
    # Bacterial lobar pneumonia: one lobe-like part of one lung, dense, with air bronchograms,
    # bounded by a fissure-like oblique plane.
    columns = np.flatnonzero(lung.any((0, 1)))
    middle = (columns[0] + columns[-1]) / 2
    left = rng.random() < 0.5
    side = (np.arange(lung.shape[2]) >= middle) == left
    kk, rr = np.mgrid[0:lung.shape[0], 0:lung.shape[1]]
    slices = np.flatnonzero(lung.any((1, 2)))
    cut = slices[0] + (slices[-1] - slices[0]) * rng.uniform(0.3, 0.6)
    rise = (rr - lung.shape[1] / 2) * geo.pixel_mm / geo.slice_mm * rng.uniform(0.3, 1.0)
    lobe = kk < cut + rise if rng.random() < 0.6 else kk > cut + rise  # lower / upper lobe
    region = lobe[:, :, None] & side[None, None, :] & lung
    texture = _noise_field(rng, lung.shape, 1.5 / geo.pixel_mm)
    bronchogram = texture > 2.0
    dense = rng.uniform(0, 50)
    hu[region & ~bronchogram] = dense + 12 * texture[region & ~bronchogram]
    hu[region & bronchogram] = rng.uniform(-1000, -900)
    return lung


def _metal(rng, hu, lung, body, geo):  # noqa: ANN001, ANN202
    # A bright object (port, pacemaker lead, clip) with streaks across a few slices.
    k0 = int(rng.integers(0, hu.shape[0]))
    where = body[k0] if body is not None and body[k0].any() else np.ones(hu.shape[1:], bool)
    points = np.argwhere(where)
    r0, c0 = points[rng.integers(len(points))]
    yy, xx = np.mgrid[0:hu.shape[1], 0:hu.shape[2]].astype(np.float32)
    theta = np.arctan2(yy - r0, xx - c0)
    dist = np.hypot(yy - r0, xx - c0)
    for k in range(max(0, k0 - 2), min(hu.shape[0], k0 + 3)):
        streaks = np.zeros_like(dist)
        for _ in range(int(rng.integers(3, 9))):
            angle = rng.uniform(0, math.pi)
            width = rng.uniform(0.01, 0.05)
            line = np.exp(-((np.sin(theta - angle)) / width) ** 2)
            streaks += line * rng.choice([-1, 1]) * rng.uniform(150, 600)
        hu[k] += streaks * np.exp(-dist * geo.pixel_mm / rng.uniform(60, 200))
        hu[k][dist * geo.pixel_mm < rng.uniform(1.5, 4)] = 3000
    return lung


_DISEASES = {
    "nodules": _nodules, "mass": _mass, "emphysema": _emphysema, "fibrosis": _fibrosis,
    "effusion": _effusion, "atelectasis": _atelectasis,
    "lobar_consolidation": _lobar_consolidation, "metal": _metal,
}
