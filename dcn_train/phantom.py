"""Synthetic chest CT phantoms with lung and lesion ground truth, as DICOM CT series.

A phantom is a seeded patient (:mod:`dcn_train.phantom_anatomy`): torso, fat, muscle, breasts,
arms, ribs, spine, sternum, scapulae, clavicles, heart, aorta, trachea and main bronchi,
diaphragm domes over liver and stomach, the table, two lungs with a gravity gradient and
branching vessels and bronchi; COVID-like lesions (ground glass, consolidation, crazy paving)
unless ``normal``; then blur and noise of a soft or sharp kernel and a circular field of view.

Arrays are ``(slices, rows, cols)`` with **slice 0 the most inferior** (ascending z, the order
of ImagePositionPatient z in the written files); rows run anterior to posterior and columns
from the patient's right to left, as a radiologist views an axial image. The same seed always
gives the same pixels, masks and UIDs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dcn_node import __version__
from dcn_train.phantom_anatomy import (
    F32,
    LUNG,
    MEDFAT,
    Grid,
    Layout,
    Patient,
    draw_patient,
    make_grid,
    render_slice,
    z_positions,
)

GENERATOR_VERSION = "2"
_NOT_OVERRIDABLE = {"SOPInstanceUID", "PixelData", "Rows", "Columns", "BitsAllocated"}


@dataclass(frozen=True)
class PhantomVolume:
    """A synthetic CT in memory; slice 0 is the most inferior, masks share the array order."""

    hu: np.ndarray  # int16 (slices, rows, cols), Hounsfield units, padding outside the FOV
    lung: np.ndarray  # bool: lung parenchyma incl. intrapulmonary vessels and lesions
    lesion: np.ndarray  # bool: lesion voxels, a subset of ``lung`` (empty when normal)
    pixel_spacing_mm: float
    slice_thickness_mm: float
    label: int  # 1 = COVID-like lesions present, 0 = normal
    padding_hu: int | None = None  # HU outside the reconstruction circle (None: air, -1024)
    convolution_kernel: str = "STANDARD"
    kvp: float = 120.0
    patient_sex: str = "O"
    contrast: bool = False

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or self.hu.dtype != np.int16:
            raise ValueError(f"hu must be a 3-D int16 array, got {self.hu.dtype} {self.hu.shape}")
        for name in ("lung", "lesion"):
            arr = getattr(self, name)
            if arr.shape != self.hu.shape or arr.dtype != bool:
                raise ValueError(f"{name} must be a bool array of shape {self.hu.shape}")
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {self.label}")
        if self.pixel_spacing_mm <= 0 or self.slice_thickness_mm <= 0:
            raise ValueError("pixel spacing and slice thickness must be positive")


@dataclass(frozen=True)
class PhantomCase:
    """A phantom written to disk: one DICOM file per slice plus ground truth."""

    series_dir: Path
    ground_truth_path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]  # ascending z = the array order of the ground truth
    label: int
    slices: int


def generate_volume(
    seed: int,
    *,
    slices: int | None = None,
    thickness_mm: float = 5.0,
    normal: bool = False,
    matrix: int = 512,
) -> PhantomVolume:
    """Generate a synthetic chest CT.

    Args:
        seed: non-negative; the patient, acquisition, lesions and noise all follow from it.
            The patient (anatomy, field of view, kernel) does not depend on ``matrix``,
            ``thickness_mm`` or ``normal``; where lesions and vessel branches fall does.
        slices: number of slices; ``None`` covers the lungs plus a margin (220-320 mm).
        thickness_mm: slice thickness = spacing between slices.
        normal: no lesions (label 0).
        matrix: rows = columns; the field of view (282-461 mm) is independent of it.

    Raises:
        ValueError: if an argument is out of range.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if slices is not None and not 1 <= slices <= 2000:
        raise ValueError(f"slices must be 1..2000 or None, got {slices}")
    if not 0.3 <= thickness_mm <= 20:
        raise ValueError(f"thickness_mm must be 0.3..20, got {thickness_mm}")
    if not 16 <= matrix <= 2048:
        raise ValueError(f"matrix must be 16..2048, got {matrix}")
    p = draw_patient(np.random.default_rng([seed, 1]))
    sp = round(p.fov / matrix, 6)
    z = z_positions(p, slices, thickness_mm)
    g = make_grid(matrix, sp, np.random.default_rng([seed, 3]))
    lay = Layout(p)
    shape = (len(z), matrix, matrix)
    hu = np.empty(shape, F32)
    lab = np.empty(shape, np.uint8)
    lung = np.empty(shape, bool)
    geoms = np.array([render_slice(lay, g, float(zk), thickness_mm, hu[k], lab[k], lung[k])
                      for k, zk in enumerate(z)])
    r = (matrix / 2) * sp
    fov = np.add.outer(g.ys**2, g.xs**2) < r * r
    lung &= fov
    lesion = np.zeros(shape, bool)
    if not normal:
        lesion = _add_lesions(np.random.default_rng([seed, 2]), p, g, z, thickness_mm, geoms,
                              hu, lung)
        lesion &= fov
    _add_vessels(np.random.default_rng([seed, 5]), lay, g, z, thickness_mm, hu, lab, lung)
    out = _finish(np.random.default_rng([seed, 4]), p, g, thickness_mm, hu, fov)
    return PhantomVolume(out, lung, lesion, sp, float(thickness_mm), int(lesion.any()),
                         p.padding_hu, p.kernel, p.kvp, "F" if p.female else "M", p.contrast)


def _lung_points(rng: np.random.Generator, lung: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """About ``n`` random lung voxels as (k, r, c) index arrays."""
    idx = rng.integers(0, lung.size, size=n * 6)
    idx = idx[lung.ravel()[idx]]
    if len(idx) < n // 4:
        idx = np.flatnonzero(lung)
        idx = rng.choice(idx, min(n, len(idx)), replace=False) if len(idx) else idx
    return np.unravel_index(idx[:n], lung.shape)


def _add_vessels(rng: np.random.Generator, lay: Layout, g: Grid, z: np.ndarray, thick: float,
                 hu: np.ndarray, lab: np.ndarray, lung: np.ndarray) -> None:
    """Pulmonary arteries and veins (branching tubes from the hila) and bronchi beside them."""
    p, sp = lay.p, g.sp
    k, r, c = _lung_points(rng, lung, 30000)
    if len(k) < 20:
        return
    pts = np.stack([g.xs[c], g.ys[r], z[k]], 1) + rng.uniform(-0.5, 0.5, (len(k), 3)) * [
        sp, sp, thick]
    side_of = (pts[:, 0] > lay.xm).astype(int)  # 0: right lung, 1: left lung
    by_side = [pts[side_of == s] if np.any(side_of == s) else pts for s in (0, 1)]
    xh, yh, zh = lay.heart_c
    atrium = (xh - 10, yh + 0.7 * p.heart[1], zh)
    trunks, roots = [], []
    for s, (hx, hy, hz) in enumerate(lay.hila):
        lateral = 1.0 if s else -1.0
        art, vein = (hx, hy - 4, hz + 6), (hx, hy + 10, hz - 24)
        trunks += [(lay.pa_top, art, 9.0), (atrium, vein, 7.0)]
        # A fan of segmental branches up, down, forwards, sideways and backwards.
        for elev in (-65, -35, -5, 25, 55):
            for azim in (-60, 0, 60):
                e = math.radians(elev + rng.uniform(-10, 10))
                az = math.radians(azim + rng.uniform(-15, 15))
                d = (lateral * math.cos(e) * math.cos(az), math.cos(e) * math.sin(az), math.sin(e))
                for start, r0 in ((art, 2.9), (vein, 2.6)):
                    roots.append((start, d, r0 * rng.uniform(0.85, 1.1), s, start is art))
    segs = [(np.array([t[0] for t in trunks], float), np.array([t[1] for t in trunks], float),
             np.array([t[2] for t in trunks]), np.zeros(len(trunks), bool))]
    pos = np.array([t[0] for t in roots], float)
    dirs_arr = np.array([t[1] for t in roots], float)
    dirs_arr /= np.linalg.norm(dirs_arr, axis=1, keepdims=True)
    rad = np.array([t[2] for t in roots])
    side = np.array([t[3] for t in roots])
    artery = np.array([t[4] for t in roots])
    r_min = max(0.45, 0.3 * sp)
    hila = np.array(lay.hila)
    z0 = float(z[0])
    for gen in range(18):
        if not len(rad):
            break
        m = len(rad)
        want = rad * rng.uniform(5, 9, m)
        cand = np.empty((m, 24, 3))
        for s in (0, 1):
            sel = side == s
            cand[sel] = by_side[s][rng.integers(0, len(by_side[s]), (int(sel.sum()), 24))]
        v = cand - pos[:, None, :]
        dist = np.linalg.norm(v, axis=2) + 1e-6
        cos = np.einsum("mkd,md->mk", v, dirs_arr) / dist
        out = pos - hila[side]  # away from the hilum: vessels radiate to the periphery
        out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-6
        radial = np.einsum("mkd,md->mk", v, out) / dist
        score = 2.5 * cos + 1.0 * radial - 0.5 * np.abs(np.log(dist / (2 * want[:, None])))
        best = np.argmax(score + rng.normal(0, 0.2, score.shape), axis=1)
        rows = np.arange(m)
        unit = v[rows, best] / dist[rows, best, None]
        length = np.minimum(want, 0.9 * dist[rows, best])
        end = pos + unit * length[:, None]
        inside = _in_lung(lung, end, z0, thick, g)
        # A branch that would end outside the lung (a dome, the heart) is cut to half length.
        half = pos + unit * (0.5 * length)[:, None]
        retry = ~inside & _in_lung(lung, half, z0, thick, g)
        end[retry], inside = half[retry], inside | retry | (gen == 0)  # roots cross the heart
        segs.append((pos, end, rad, artery))
        # A main continuation and side branches (three-way near the hilum).
        ratios = [(0.75, 0.9), (0.45, 0.75)] + ([(0.45, 0.7)] if gen < 2 else [])
        child_r = [rad * rng.uniform(lo, hi, m) for lo, hi in ratios]
        keep = [inside & (cr >= r_min) for cr in child_r]
        # Side branches leave at an angle, on opposite sides of the parent.
        perp = rng.normal(0, 1, (m, 3))
        perp -= np.sum(perp * unit, axis=1, keepdims=True) * unit
        perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-9
        child_d = [unit, unit + 1.1 * perp, unit - 1.1 * perp][: len(ratios)]
        child_d = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in child_d]
        pos = np.concatenate([end[k] for k in keep])
        dirs_arr = np.concatenate([d[k] for d, k in zip(child_d, keep, strict=True)])
        rad = np.concatenate([cr[k] for cr, k in zip(child_r, keep, strict=True)])
        side = np.concatenate([side[k] for k in keep])
        artery = np.concatenate([artery[k] for k in keep])
    a = np.concatenate([s[0] for s in segs])
    b = np.concatenate([s[1] for s in segs])
    radius = np.concatenate([s[2] for s in segs])
    allowed = (lab == LUNG) | (lab == MEDFAT)
    _composite(hu, allowed, _splat(hu.shape, a, b, radius, z0, thick, g), p.blood_hu)
    # Bronchi run beside the arteries: a soft-tissue wall around an air lumen.
    br = np.concatenate([s[3] for s in segs]) & (radius >= max(1.5, 0.7 * sp))
    if br.any():
        a, b, radius = a[br], b[br], radius[br]
        d = b - a
        nrm = np.cross(d, [0.0, 0.0, 1.0])
        nrm[np.linalg.norm(nrm, axis=1) < 1e-6] = [1.0, 0.0, 0.0]
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        nrm *= np.where(rng.random(len(radius)) < 0.5, -1, 1)[:, None]
        rb = 0.8 * radius
        off = nrm * (radius + rb + 0.3)[:, None]
        is_lung = lab == LUNG
        _composite(hu, is_lung, _splat(hu.shape, a + off, b + off, rb, z0, thick, g), 10.0)
        _composite(hu, is_lung, _splat(hu.shape, a + off, b + off, 0.72 * rb, z0, thick, g),
                   -995.0)


def _in_lung(lung: np.ndarray, pts: np.ndarray, z0: float, thick: float, g: Grid) -> np.ndarray:
    """Whether points (mm) lie in the lung; points above or below the volume count as in."""
    n, rows, cols = lung.shape
    kk = np.rint((pts[:, 2] - z0) / thick).astype(int)
    rr = np.rint((pts[:, 1] - g.ys[0]) / g.sp).astype(int)
    cc = np.rint((pts[:, 0] - g.xs[0]) / g.sp).astype(int)
    ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
    inz = ok & (kk >= 0) & (kk < n)
    inside = ok & ~inz
    inside[inz] = lung[kk[inz], rr[inz], cc[inz]]
    return inside


def _composite(hu: np.ndarray, allowed: np.ndarray, weight: np.ndarray, value: float) -> None:
    idx = np.flatnonzero(weight)
    idx = idx[allowed.ravel()[idx]]
    flat, w = hu.reshape(-1), weight.reshape(-1)[idx]
    flat[idx] += w * (value - flat[idx])


def _splat(shape: tuple[int, ...], a: np.ndarray, b: np.ndarray, radius: np.ndarray,
           z0: float, thick: float, g: Grid) -> np.ndarray:
    """Partial-volume weights (0..1) of tubes a-b with ``radius`` in the slab of each slice."""
    sp, n, rows, cols = g.sp, *shape
    seg = b - a
    length = np.linalg.norm(seg, axis=1) + 1e-9
    cos_z = np.abs(seg[:, 2]) / length
    npts = np.ceil(length / np.maximum(0.6 * radius, 0.5 * sp)).astype(int) + 1
    sid = np.repeat(np.arange(len(a)), npts)
    start = np.repeat(np.cumsum(npts) - npts, npts)
    t = (np.arange(len(sid)) - start) / np.repeat(npts - 1, npts)
    pts = a[sid] + t[:, None] * seg[sid]
    r = radius[sid]
    reach = r + thick / 2
    k_lo = np.clip(np.ceil((pts[:, 2] - reach - z0) / thick), 0, n)
    k_hi = np.clip(np.floor((pts[:, 2] + reach - z0) / thick), -1, n - 1)
    count = np.maximum(k_hi - k_lo + 1, 0).astype(int)
    pid = np.repeat(np.arange(len(pts)), count)
    k = (k_lo[pid] + np.arange(len(pid)) - np.repeat(np.cumsum(count) - count, count)).astype(int)
    rp = r[pid]
    dz = np.abs(z0 + k * thick - pts[pid, 2])
    sin_z = np.sqrt(np.maximum(1 - cos_z[sid[pid]] ** 2, 0.02))
    w = np.minimum(1.0, 2 * rp / (thick * sin_z))
    w *= np.clip((rp + thick / 2 - dz) / np.minimum(2 * rp, thick), 0, 1)
    row = np.rint((pts[pid, 1] - g.ys[0]) / sp).astype(int)
    col = np.rint((pts[pid, 0] - g.xs[0]) / sp).astype(int)
    rho = rp / sp
    w = np.where(rho < 0.6, w * np.minimum(1.0, math.pi * rho * rho), w).astype(F32)
    rq = np.where(rho < 0.6, 0.0, np.round(rho * 2) / 2)
    acc = np.zeros(n * rows * cols, F32)
    for q in np.unique(rq):
        sel = np.flatnonzero(rq == q)
        rad = int(math.ceil(q))
        oy, ox = np.mgrid[-rad : rad + 1, -rad : rad + 1]
        disc = oy * oy + ox * ox <= q * q + 0.25 * q
        oy, ox = oy[disc], ox[disc]
        rr = row[sel, None] + oy[None, :]
        cc = col[sel, None] + ox[None, :]
        ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        flat = (k[sel, None] * rows + rr) * cols + cc
        np.maximum.at(acc, flat[ok], np.broadcast_to(w[sel, None], ok.shape)[ok])
    return acc.reshape(shape)


def _add_lesions(rng: np.random.Generator, p: Patient, g: Grid, z: np.ndarray, thick: float,
                 geoms: np.ndarray, hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Blend COVID-like lesions into the lungs; returns the lesion mask (inside the lung)."""
    lesion = np.zeros(lung.shape, bool)
    severity = int(rng.choice(4, p=[0.2, 0.3, 0.3, 0.2]))
    n = int(rng.integers(*[(1, 4), (1, 7), (3, 13), (6, 21)][severity]))
    lo, hi = [(2.5, 6.0), (4.0, 20.0), (6.0, 35.0), (10.0, 60.0)][severity]
    radii = np.sort(np.exp(rng.uniform(math.log(lo), math.log(hi), n)))[::-1]
    kinds = rng.choice(4, n, p=[[0.8, 0.05, 0.1, 0.05], [0.6, 0.1, 0.15, 0.15],
                                [0.45, 0.2, 0.2, 0.15], [0.3, 0.3, 0.2, 0.2]][severity])
    k, r, c = _lung_points(rng, lung, 6000)
    if not len(k):
        return lesion
    x, y = g.xs[c], g.ys[r]
    cx, cy, ac, bca, ya, yp = geoms[k].T
    dy = y - cy
    bb = np.where(dy < 0, bca, 1.04 * (yp - cy))
    rho = np.sqrt(((x - cx) / ac) ** 2 + (dy / bb) ** 2)
    dist = np.hypot(x - cx, dy)
    depth = np.minimum(dist / np.maximum(rho, 1e-6) - dist, yp - y)
    weight = np.exp(-depth / 15) * (0.35 + np.clip((y - ya) / (yp - ya), 0, 1))
    weight *= 1.6 - np.clip(z[k] / p.height, 0, 1)
    weight = np.nan_to_num(weight) + 1e-9
    bilateral = rng.random() < 0.75
    one_side = rng.random() < 0.5
    if not bilateral:
        weight *= np.where((x > p.bx) == one_side, 1.0, 1e-6)
    centres = rng.choice(len(k), n, p=weight / weight.sum())
    for j in range(n):
        i = centres[j]
        _one_lesion(rng, g, z, thick, float(radii[j]), int(kinds[j]),
                    (int(k[i]), int(r[i]), int(c[i])), hu, lung, lesion)
    return lesion


def _one_lesion(rng: np.random.Generator, g: Grid, z: np.ndarray, thick: float, rad: float,
                kind: int, centre: tuple[int, int, int], hu: np.ndarray, lung: np.ndarray,
                lesion: np.ndarray) -> None:
    """One lesion: a perturbed ellipsoid with a soft edge, blended into the lung."""
    kc, rc, cc = centre
    x0, y0, z0 = float(g.xs[cc]), float(g.ys[rc]), float(z[kc])
    axes = rad * rng.uniform(0.7, 1.3, 3)
    ang = rng.uniform(0, math.pi)
    ext = 1.45 * float(axes.max())
    box = g.box(x0, y0, ext, ext)
    ks = np.flatnonzero(np.abs(z - z0) < ext * axes[2] / axes.max() + thick / 2)
    if box is None or not len(ks):
        return
    sl = (slice(int(ks[0]), int(ks[-1]) + 1), *box)
    dz = (z[sl[0]] - z0)[:, None, None]
    dy = (g.ys[box[0]] - y0)[None, :, None]
    dx = (g.xs[box[1]] - x0)[None, None, :]
    cs, sn = math.cos(ang), math.sin(ang)
    rho = np.sqrt(((cs * dx + sn * dy) / axes[0]) ** 2 + ((cs * dy - sn * dx) / axes[1]) ** 2
                  + (dz / axes[2]) ** 2)
    phi = rho - 1
    for _ in range(4):
        kv = rng.normal(0, 1, 3)
        kv *= rng.uniform(1.5, 4.0) / (rad * np.linalg.norm(kv))
        phi = phi + rng.uniform(0.03, 0.1) * np.sin(kv[0] * dx + kv[1] * dy + kv[2] * dz
                                                     + rng.uniform(0, 2 * math.pi))
    edge = rng.uniform(1.5, 4.0)
    s = np.clip(0.5 - phi * rad / edge, 0, 1).astype(F32)
    tex = g.tex[2][box][None]
    ggo = rng.uniform(-720, -420)
    cons = rng.uniform(-60, 40)
    if kind == 0:
        target = ggo + 30 * tex
    elif kind == 1:
        target = cons + 15 * tex
    elif kind == 2:
        target = ggo + (cons - ggo) * np.clip((-phi - 0.2) / 0.25, 0, 1) + 20 * tex
    else:
        qf = 0.0
        for _ in range(3):
            kv = rng.normal(0, 1, 2)
            kv *= 2 * math.pi / (rng.uniform(5, 9) * np.linalg.norm(kv))
            qf = qf + np.sin(kv[0] * dx + kv[1] * dy + rng.uniform(0, 2 * math.pi))
        target = rng.uniform(-620, -480) + 260 * np.exp(-((qf / 0.35) ** 2)) + 20 * tex
    region, inside = hu[sl], lung[sl]
    np.copyto(region, region + s * (target - region), where=inside)
    lesion[sl] |= (s >= 0.5) & inside


def _finish(rng: np.random.Generator, p: Patient, g: Grid, thick: float, hu: np.ndarray,
            fov: np.ndarray) -> np.ndarray:
    """Kernel blur (and edge enhancement when sharp), correlated noise, FOV padding -> int16."""
    sp, (n, rows, cols) = g.sp, hu.shape
    s_noise = (0.45 if p.sharp else 0.9) / sp
    fields = [ndimage.gaussian_filter(rng.standard_normal((rows, cols), dtype=F32), s_noise,
                                      mode="wrap") for _ in range(3)]
    fields = [f / F32(f.std()) for f in fields]
    sd = p.noise_sd * (p.a / 160) ** 1.5 * float(np.clip(math.sqrt(5 / thick) * 0.7 / sp, 0.3, 3))
    out = np.empty(hu.shape, np.int16)
    pad = -1024 if p.padding_hu is None else p.padding_hu
    for k in range(n):
        img = ndimage.gaussian_filter(hu[k], p.blur_mm / sp, truncate=3.0)
        if p.sharp:
            img += 0.6 * (img - ndimage.gaussian_filter(img, 1.2 / sp, truncate=3.0))
        i, j = rng.choice(3, 2, replace=False)
        a = rng.uniform(0, 2 * math.pi)
        shift = tuple(int(v) for v in rng.integers(0, rows, 2))
        noise = math.cos(a) * np.roll(fields[i], shift, (0, 1)) + math.sin(a) * fields[j]
        img += noise * F32(sd)
        np.clip(img, -1024, 3071, out=img)
        out[k] = np.where(fov, np.rint(img), pad)
    return out


def _storage(rng: np.random.Generator, overrides: dict[str, Any]) -> tuple[int, int, float, float]:
    """(PixelRepresentation, BitsStored, RescaleIntercept, RescaleSlope) for a series."""
    rep, intercept = [(1, 0.0), (1, -1024.0), (0, -1024.0)][int(rng.integers(3))]
    twelve = rng.random() < 0.4
    if "PixelRepresentation" in overrides:
        rep = int(overrides["PixelRepresentation"])
        intercept = -1024.0 if rep == 0 else intercept
    bits = int(overrides.get("BitsStored", 12 if rep == 0 and twelve else 16))
    intercept = float(overrides.get("RescaleIntercept", intercept))
    slope = float(overrides.get("RescaleSlope", 1.0))
    if rep not in (0, 1) or not 8 <= bits <= 16 or slope <= 0:
        raise ValueError(f"unsupported storage: PixelRepresentation {rep}, BitsStored {bits}, "
                         f"RescaleSlope {slope}")
    lo, hi = _stored_range(rep, bits)
    if lo * slope + intercept > -1000 or hi * slope + intercept < 1500:
        raise ValueError(f"storage cannot hold -1000..1500 HU: PixelRepresentation {rep}, "
                         f"BitsStored {bits}, RescaleIntercept {intercept}, slope {slope}")
    return rep, bits, intercept, slope


def _stored_range(rep: int, bits: int) -> tuple[int, int]:
    return (0, 2**bits - 1) if rep == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["dcn-node phantom", *map(str, parts)])


def write_series(volume: PhantomVolume, series_dir: Path, seed: int,
                 **header_overrides: Any) -> list[str]:
    """Write ``volume`` as a CT Image Storage series, one file per slice; return SOP UIDs.

    UIDs, dates, storage (signed or unsigned, intercept 0 or -1024, 12 or 16 bits) and the
    instance numbering direction follow from ``seed``. ``header_overrides`` set or replace
    DICOM keywords on every slice (a value of None removes the element); PixelRepresentation,
    BitsStored, RescaleIntercept and RescaleSlope choose the pixel storage itself.

    Returns:
        SOP Instance UIDs in array order (ascending z).

    Raises:
        ValueError: unknown or per-slice keyword, or a storage that cannot hold the image.
    """
    return _write(volume, Path(series_dir), seed, header_overrides)[2]


def _write(volume: PhantomVolume, series_dir: Path, seed: int,
           header_overrides: dict[str, Any]) -> tuple[str, str, list[str]]:
    """Write the series; returns (StudyInstanceUID, SeriesInstanceUID, SOP UIDs)."""
    for kw in header_overrides:
        if tag_for_keyword(kw) is None or kw in _NOT_OVERRIDABLE:
            raise ValueError(f"{kw!r} is not a DICOM keyword that can be set on every slice")
    rng = np.random.default_rng([seed, 9])
    rep, bits, intercept, slope = _storage(rng, header_overrides)
    lo, hi = _stored_range(rep, bits)
    stored = np.clip(np.rint((volume.hu.astype(np.float64) - intercept) / slope), lo, hi)
    stored = stored.astype(np.uint16 if rep == 0 else np.int16)
    n, rows, cols = volume.hu.shape
    digest = hashlib.blake2b(volume.hu.tobytes(), digest_size=16).hexdigest()
    study_uid = str(header_overrides.get("StudyInstanceUID") or _uid(seed, "study"))
    series_uid = str(header_overrides.get("SeriesInstanceUID")
                     or _uid(seed, "series", digest, volume.slice_thickness_mm,
                             sorted(header_overrides.items(), key=str)))
    sop_uids = [_uid(series_uid, i) for i in range(n)]
    when = dt.datetime(2020, 3, 1, 7, 0) + dt.timedelta(days=int(rng.integers(0, 900)),
                                                        seconds=int(rng.integers(0, 43200)))
    age = int(rng.integers(25, 90))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for prefix in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{prefix}Date", when.strftime("%Y%m%d"))
        setattr(ds, f"{prefix}Time", when.strftime("%H%M%S"))
    ds.AccessionNumber = f"PH{seed}"[:16]
    ds.Modality = "CT"
    ds.Manufacturer = "dcn-node phantom"
    ds.ReferringPhysicianName = "REFERRER^PHANTOM"
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = f"CHEST {volume.slice_thickness_mm:g}mm"
    ds.ManufacturerModelName = "synthetic chest CT"
    ds.PatientName = f"PHANTOM^{seed}"
    ds.PatientID = f"PHANTOM{seed}"[:64]
    ds.PatientBirthDate = (when.date() - dt.timedelta(days=age * 365 + 100)).strftime("%Y%m%d")
    ds.PatientSex = volume.patient_sex
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = volume.slice_thickness_mm
    ds.KVP = volume.kvp
    ds.SpacingBetweenSlices = volume.slice_thickness_mm
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = [__version__, GENERATOR_VERSION]
    ds.ReconstructionDiameter = round(volume.pixel_spacing_mm * cols, 3)
    ds.GantryDetectorTilt = 0
    ds.TableHeight = round(float(rng.uniform(120, 200)), 1)
    ds.XRayTubeCurrent = int(rng.integers(40, 350))
    ds.ConvolutionKernel = volume.convolution_kernel
    ds.PatientPosition = "HFS"
    if volume.contrast:
        ds.ContrastBolusAgent = "IODINATED CONTRAST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(rng.integers(2, 10))
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(seed, "frame")
    ds.PositionReferenceIndicator = ""
    ds.ImagesInAcquisition = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [volume.pixel_spacing_mm, volume.pixel_spacing_mm]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = rep
    if volume.padding_hu is not None:
        pad = int(np.clip(round((volume.padding_hu - intercept) / slope), lo, hi))
        ds.add_new("PixelPaddingValue", "US" if rep == 0 else "SS", pad)
    ds.WindowCenter, ds.WindowWidth = [-600, 40], [1500, 400]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
    for kw, value in header_overrides.items():
        if value is None:
            if kw in ds:
                delattr(ds, kw)
        elif kw not in ("PixelRepresentation", "BitsStored", "RescaleIntercept", "RescaleSlope"):
            setattr(ds, kw, value)
    series_dir.mkdir(parents=True, exist_ok=True)
    x0 = -(cols - 1) / 2 * volume.pixel_spacing_mm
    y0 = -(rows - 1) / 2 * volume.pixel_spacing_mm
    z_start = round(float(rng.uniform(-450, -80)), 1)
    head_first = rng.random() < 0.7  # scanners number head to feet, or feet to head
    for i in range(n):
        z = round(z_start + i * volume.slice_thickness_mm, 4)
        number = n - i if head_first else i + 1
        ds.SOPInstanceUID = sop_uids[i]
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), z]
        ds.SliceLocation = z
        ds.PixelData = stored[i].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = UID(sop_uids[i])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        dcmwrite(series_dir / f"CT{number:06d}.dcm", ds, enforce_file_format=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop_uids


def generate_phantom(out_dir: Path | str, seed: int, *, slices: int | None = None,
                     thickness_mm: float = 5.0, normal: bool = False, matrix: int = 512,
                     **header_overrides: Any) -> PhantomCase:
    """Generate a phantom and write ``out_dir/series/CT*.dcm`` and ``out_dir/ground_truth.*``.

    ``ground_truth.npz`` holds ``lung`` and ``lesion`` (bool, slices x rows x cols, slice 0
    most inferior), ``label`` and ``sop_instance_uids`` in the same order;
    ``ground_truth.json`` holds the label, UIDs, counts, seed and generator version.
    """
    out_dir = Path(out_dir)
    volume = generate_volume(seed, slices=slices, thickness_mm=thickness_mm, normal=normal,
                             matrix=matrix)
    series_dir = out_dir / "series"
    study_uid, series_uid, uids = _write(volume, series_dir, seed, header_overrides)
    gt = out_dir / "ground_truth.npz"
    np.savez_compressed(gt, lung=volume.lung, lesion=volume.lesion,
                        label=np.array(volume.label), sop_instance_uids=np.array(uids))
    meta = {
        "generator": "dcn-node phantom", "generator_version": GENERATOR_VERSION,
        "seed": seed, "label": volume.label, "slices": len(uids),
        "slice_order": "ascending z (slice 0 most inferior)",
        "lesion_voxels": int(volume.lesion.sum()), "lung_voxels": int(volume.lung.sum()),
        "pixel_spacing_mm": volume.pixel_spacing_mm,
        "slice_thickness_mm": volume.slice_thickness_mm,
        "study_instance_uid": study_uid, "series_instance_uid": series_uid,
        "sop_instance_uids": uids,
    }
    (out_dir / "ground_truth.json").write_text(json.dumps(meta, indent=1))
    return PhantomCase(series_dir, gt, study_uid, series_uid, tuple(uids), volume.label,
                       len(uids))
