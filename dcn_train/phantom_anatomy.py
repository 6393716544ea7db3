"""Anatomy of the synthetic chest CT behind :mod:`dcn_train.phantom`.

Coordinates are patient LPS in millimetres: ``x`` towards the patient's left (image columns),
``y`` posterior (image rows, so anterior is at the top of the image), ``z`` superior.
``z = 0`` is the deepest point of the lung bases, ``z = height`` the lung apex, and the anatomy
is laid out against the normalised height ``u = z / height``. Slices are rendered one at a time
in 2-D with numpy (1-D coordinate vectors and broadcasting, bounding boxes for small
structures); :mod:`dcn_train.phantom` then adds vessels, airways and lesions in 3-D.
Every draw comes from a generator the caller seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR, BODY, LUNG, MEDFAT = 0, 1, 2, 3  # tissue labels: vessels are drawn only in LUNG and MEDFAT
F32 = np.float32
Box = tuple[slice, slice]


def _ss(e0: float, e1: float, x: float) -> float:
    """Smoothstep from 0 at ``e0`` to 1 at ``e1`` (``e0 > e1`` gives a falling step)."""
    t = min(max((x - e0) / (e1 - e0), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class Patient:
    """Everything random about one patient and one acquisition (mm and HU)."""

    female: bool
    height: float  # lung height, deepest recess to apex
    margin_lo: float
    margin_hi: float
    a: float  # torso half-width
    b: float  # torso anterior half-depth; the back lies flat at by + b
    bx: float
    by: float
    fat: float
    muscle: float
    shoulder: float
    belly: float
    breast: tuple[float, float, float]  # rx, ry, rz (zeros: none)
    arms_down: bool
    arm_gap: float
    arm_r: float
    r_vb: float
    d_spine: float  # back (under the fat) to the vertebral body centre
    vert_pitch: float
    rib_h: float
    rib_t: float
    rib_drop: float
    cortex_hu: float
    marrow_hu: float
    dome_r: float
    dome_l: float
    tilt: float
    heart: tuple[float, float, float, float, float]  # semi-axes a, b, c; angle; x offset
    peri_fat: float
    r_ao: float
    u_carina: float
    u_arch: float
    r_tr: float
    eso_air: bool
    contrast: bool
    blood_hu: float
    lung_hu: float
    gravity: float
    dependent_band: float
    fat_hu: float
    muscle_hu: float
    liver_hu: float
    table: tuple[float, float, float]  # mattress, shell thickness, shell HU (zeros: none)
    fov: float
    sharp: bool
    noise_sd: float
    blur_mm: float
    padding_hu: int | None
    kvp: float
    kernel: str


def draw_patient(rng: np.random.Generator) -> Patient:
    """Draw a patient and an acquisition; the order of the draws is part of the seed contract."""
    u = rng.uniform
    female = bool(rng.random() < 0.5)
    size = float(np.clip(rng.normal(1.0, 0.09), 0.8, 1.22)) * (0.95 if female else 1.0)
    height = float(np.clip(rng.normal(245, 18) * size**0.5, 200, 285))
    m_lo, m_hi = u(8, 28), u(12, 35)
    excess = height + m_lo + m_hi - 320
    if excess > 0:
        m_lo, m_hi = m_lo - excess * m_lo / (m_lo + m_hi), m_hi - excess * m_hi / (m_lo + m_hi)
    cage = 136 * size * u(0.92, 1.08)  # half-width of the thoracic cavity
    depth = cage * u(1.15, 1.45)  # sternum to the posterior recesses
    fat = float(np.clip(rng.gamma(3.0, 5.0) * size**2, 4, 42))
    muscle = u(8, 15)
    d_spine = u(50, 62) * size
    r_vb = u(14, 19) * size
    # The torso follows from the cage plus its walls (see Layout: y_ant, y_post).
    a = cage + fat + muscle + 8
    b = (depth + 2 * fat + 0.8 * muscle + 18 + d_spine - r_vb) / 2
    sharp = bool(rng.random() < 0.45)
    low_dose = u(1.0, 2.2) if rng.random() < 0.4 else 1.0
    contrast = bool(rng.random() < 0.2)
    dome_r = u(0.22, 0.34)
    kernels = ["B70f", "LUNG", "YC", "FC51"] if sharp else ["B30f", "STANDARD", "FC08", "B"]
    return Patient(
        female=female,
        height=height,
        margin_lo=m_lo,
        margin_hi=m_hi,
        a=a,
        b=b,
        bx=u(-15, 15),
        by=u(-25, 10),
        fat=fat,
        muscle=muscle,
        shoulder=u(0.03, 0.12),
        belly=u(0.0, 0.12) + fat / 250,
        breast=(u(50, 80) * size, u(15, 40) * size, u(40, 60)) if female else (0.0, 0.0, 0.0),
        arms_down=bool(rng.random() < 0.3),
        arm_gap=u(-4, 14),
        arm_r=u(38, 52) * size,
        r_vb=r_vb,
        d_spine=d_spine,
        vert_pitch=u(24, 29),
        rib_h=u(8, 11),
        rib_t=u(5, 8),
        rib_drop=u(100, 150),
        cortex_hu=u(650, 1050),
        marrow_hu=u(150, 300),
        dome_r=dome_r,
        dome_l=dome_r - u(0.02, 0.08),
        tilt=u(0.06, 0.14),
        heart=(u(55, 68) * size, u(40, 50) * size, u(48, 60) * size, u(0.55, 0.85), u(12, 30)),
        peri_fat=u(2, 8),
        r_ao=u(10, 14),
        u_carina=u(0.6, 0.68),
        u_arch=u(0.7, 0.76),
        r_tr=u(7.5, 10.5),
        eso_air=bool(rng.random() < 0.4),
        contrast=contrast,
        blood_hu=u(180, 320) if contrast else u(35, 50),
        lung_hu=u(-925, -885),
        gravity=u(40, 90),
        dependent_band=u(2, 6) if rng.random() < 0.3 else 0.0,
        fat_hu=u(-115, -90),
        muscle_hu=u(38, 55),
        liver_hu=u(95, 120) if contrast else u(50, 68),
        table=(u(0, 35), u(35, 55), u(150, 450)) if rng.random() < 0.92 else (0.0, 0.0, 0.0),
        fov=float(np.clip(round(2 * a * u(0.95, 1.3)), 282, 461)),  # may cut the torso
        sharp=sharp,
        noise_sd=(u(25, 55) if sharp else u(7, 16)) * low_dose,
        blur_mm=u(0.3, 0.45) if sharp else u(0.55, 0.9),
        padding_hu=[-3024, -2000, None][int(rng.choice(3, p=[0.45, 0.15, 0.4]))],
        kvp=float(rng.choice([100.0, 120.0, 120.0, 140.0])),
        kernel=str(rng.choice(kernels)),
    )


@dataclass
class Grid:
    """The pixel grid of one slice and the smooth random textures shared by all slices."""

    xs: np.ndarray  # (cols,) mm, centre of each column
    ys: np.ndarray  # (rows,) mm
    sp: float
    tex: list[np.ndarray]  # four unit-variance smooth fields: two coarse, two fine

    def box(self, cx: float, cy: float, rx: float, ry: float) -> Box | None:
        """Rows and columns covering the rectangle ``cx +- rx``, ``cy +- ry`` (None if off)."""
        c0, c1 = np.searchsorted(self.xs, [cx - rx, cx + rx])
        r0, r1 = np.searchsorted(self.ys, [cy - ry, cy + ry])
        return None if c0 >= c1 or r0 >= r1 else (slice(int(r0), int(r1)), slice(int(c0), int(c1)))

    def ellipse(
        self, cx: float, cy: float, a: float, b: float, angle: float = 0.0
    ) -> tuple[Box, np.ndarray] | None:
        """Box and mask of an ellipse, rotated by ``angle`` (radians, x towards -y)."""
        if a <= 0 or b <= 0:
            return None
        r = max(a, b)
        box = self.box(cx, cy, r, r)
        if box is None:
            return None
        dx, dy = self.xs[box[1]] - cx, self.ys[box[0]] - cy
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            p = np.add.outer(-s * dy, c * dx) / a
            q = np.add.outer(c * dy, s * dx) / b
            return box, p * p + q * q <= 1.0
        return box, np.add.outer((dy / b) ** 2, (dx / a) ** 2) <= 1.0

    def capsule(
        self, z: float, half_t: float, p0: tuple[float, ...], p1: tuple[float, ...], r: float
    ) -> tuple[Box, np.ndarray] | None:
        """Box and mask of the part of a 3-D tube (segment p0-p1, radius r) in this slab."""
        (x0, y0, z0), (x1, y1, z1) = p0, p1
        reach = r + half_t
        if abs(z1 - z0) < 1e-6:
            if abs(z - z0) > reach:
                return None
            t0, t1 = 0.0, 1.0
        else:
            ta, tb = (z - reach - z0) / (z1 - z0), (z + reach - z0) / (z1 - z0)
            t0, t1 = max(min(ta, tb), 0.0), min(max(ta, tb), 1.0)
            if t0 > t1:
                return None
        ax, ay = x0 + t0 * (x1 - x0), y0 + t0 * (y1 - y0)
        bx, by = x0 + t1 * (x1 - x0), y0 + t1 * (y1 - y0)
        box = self.box((ax + bx) / 2, (ay + by) / 2, abs(bx - ax) / 2 + r, abs(by - ay) / 2 + r)
        if box is None:
            return None
        dx, dy = self.xs[box[1]] - ax, self.ys[box[0]] - ay
        vx, vy = bx - ax, by - ay
        n2 = vx * vx + vy * vy
        t = np.clip(np.add.outer(dy * vy, dx * vx) / n2, 0, 1) if n2 > 1e-9 else 0.0
        ex, ey = dx[None, :] - t * vx, dy[:, None] - t * vy
        return box, ex * ex + ey * ey <= r * r


def _paint(img: np.ndarray, shape: tuple[Box, np.ndarray] | None, value: float | np.ndarray,
           lab: np.ndarray | None = None, label: int = BODY) -> None:
    if shape is None:
        return
    box, mask = shape
    v = value[box] if isinstance(value, np.ndarray) else value
    np.copyto(img[box], v, where=mask)
    if lab is not None:
        np.copyto(lab[box], label, where=mask)


def _mark(target: np.ndarray, shape: tuple[Box, np.ndarray] | None) -> None:
    if shape is not None:
        target[shape[0]] |= shape[1]


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation by a diamond of radius ``k`` pixels (k 4-neighbour steps)."""
    out = mask.copy()
    for _ in range(k):
        prev = out.copy()
        out[1:] |= prev[:-1]
        out[:-1] |= prev[1:]
        out[:, 1:] |= prev[:, :-1]
        out[:, :-1] |= prev[:, 1:]
    return out


def _radial(dx: np.ndarray, dy: np.ndarray, a: float, b_ant: float, b_post: float) -> tuple:
    """Radial distance (mm, negative inside) to an ellipse with a flatter posterior half."""
    b = np.where(dy < 0, F32(b_ant), F32(b_post))
    rho = np.sqrt(np.add.outer((dy / b) ** 2, (dx / a) ** 2))
    r = np.sqrt(np.add.outer(dy * dy, dx * dx))
    d = r - r / np.maximum(rho, 1e-6)
    return d, rho, (dy / b)


def make_grid(matrix: int, sp: float, rng: np.random.Generator) -> Grid:
    """Pixel centres in mm (the FOV centred on 0) and the shared texture fields."""
    c = (np.arange(matrix, dtype=F32) - (matrix - 1) / 2) * F32(sp)
    tex = []
    for scale_mm in (6.0, 6.0, 1.6, 1.6):
        f = ndimage.gaussian_filter(rng.standard_normal((matrix, matrix), dtype=F32),
                                    max(scale_mm / sp, 0.5), mode="wrap")
        tex.append((f / max(float(f.std()), 1e-6)).astype(F32))
    return Grid(c, c.copy(), sp, tex)


@dataclass
class Layout:
    """Positions (mm) derived once from a patient: spine, airways, great vessels, heart."""

    p: Patient
    y_back: float = 0.0
    y_vb: float = 0.0
    y_post: float = 0.0
    y_ant: float = 0.0
    xm: float = 0.0
    xt: float = 0.0
    yt: float = 0.0
    x_es: float = 0.0
    y_es: float = 0.0
    x_da: float = 0.0
    y_da: float = 0.0
    x_aa: float = 0.0
    y_aa: float = 0.0
    heart_c: tuple[float, float, float] = (0.0, 0.0, 0.0)
    hila: tuple[tuple[float, float, float], ...] = ()
    pa_top: tuple[float, float, float] = (0.0, 0.0, 0.0)
    z_car: float = 0.0

    def __post_init__(self) -> None:
        p = self.p
        self.y_back = p.by + p.b
        self.y_vb = self.y_back - p.fat - p.d_spine
        self.y_post = self.y_vb + p.r_vb + 10
        self.y_ant = p.by - p.b + p.fat + 0.8 * p.muscle + 8
        self.xm = p.bx + 4
        dist = p.r_vb + p.r_ao + 3
        self.x_da, self.y_da = p.bx + 0.64 * dist, self.y_vb - 0.77 * dist
        self.x_es, self.y_es = p.bx - 6, self.y_vb - p.r_vb - 11
        self.xt, self.yt = p.bx - 3, self.y_es - 8 - p.r_tr - 3
        self.x_aa, self.y_aa = self.xm - 16, self.yt - 32
        ha, hb, hc, _, hdx = p.heart
        self.heart_c = (self.xm + hdx, self.y_ant + 0.9 * hb, p.dome_l * p.height + 0.75 * hc)
        self.z_car = p.u_carina * p.height
        w = p.r_vb + 6 + 12
        self.hila = ((self.xm - w - 14, self.yt + 12, self.z_car - 28),
                     (self.xm + w + 12, self.yt + 14, self.z_car - 32))
        self.pa_top = (self.x_aa + p.r_ao + 18, self.y_aa - 2, self.z_car - 12)


def render_slice(lay: Layout, g: Grid, z: float, thick: float, hu: np.ndarray,
                 lab: np.ndarray, lung: np.ndarray) -> tuple[float, ...]:
    """Render one slice into ``hu``/``lab``/``lung``; returns the lung cavity geometry."""
    p, xs, ys, sp = lay.p, g.xs, g.ys, g.sp
    u, ht = z / p.height, thick / 2
    ca, sa = math.cos(2 * math.pi * z / 41), math.sin(2 * math.pi * z / 41)
    tc = ca * g.tex[0] + sa * g.tex[1]
    cf, sf = math.cos(2 * math.pi * z / 13), math.sin(2 * math.pi * z / 13)
    tfine = cf * g.tex[2] + sf * g.tex[3]
    hu.fill(-1000.0)
    hu += 3 * tfine
    lab.fill(AIR)
    lung.fill(False)
    # The table and its mattress under the patient.
    mattress, shell, shell_hu = p.table
    if shell:
        yt0 = lay.y_back + mattress
        dy = np.add.outer(ys - yt0, 0.0004 * (xs - p.bx) ** 2)
        on = (dy >= 0) & (dy < shell) & (np.abs(xs - p.bx) < 230)[None, :]
        np.copyto(hu, np.where((dy < 2.5) | (dy > shell - 2.5), F32(shell_hu), F32(-930)),
                  where=on)
        if mattress > 3:
            pad = (ys > lay.y_back - 6)[:, None] & (dy < 0) & (np.abs(xs - p.bx) < 200)[None, :]
            np.copyto(hu, -860.0 + 25 * tc, where=pad)
    # Torso outline: shoulders widen it near the apex, a neck above, the belly below.
    neck = _ss(1.12, 1.45, u)
    big_a = p.a * (1 + p.shoulder * _ss(0.72, 1.0, u) * (1 - neck)) * (1 - 0.5 * neck)
    b_ant = p.b * (1 + p.belly * _ss(-0.05, -0.6, u)) * (1 - 0.3 * neck)
    dxb, dyb = xs - p.bx, ys - p.by
    d_body, _, _ = _radial(dxb, dyb, big_a, b_ant, 1.08 * p.b)
    rx, ry, rz = p.breast
    zb = 0.45 * p.height
    breast = None
    if rx and abs(z - zb) < rz:  # supine breasts: smooth bumps of the anterior contour
        s = math.sqrt(1 - ((z - zb) / rz) ** 2)
        bump_x = sum(np.sqrt(np.clip(1 - ((xs - p.bx - side * 0.45 * big_a) / rx) ** 2, 0, 1))
                     for side in (-1, 1))
        front = np.clip((p.by - 0.2 * b_ant - ys) / (0.4 * b_ant), 0, 1)
        breast = np.multiply.outer(front, ry * s * bump_x).astype(F32)
        d_body = d_body - breast
    body = (d_body < 0) & (ys < lay.y_back)[:, None]
    np.copyto(hu, p.fat_hu + 10 * tc, where=body)
    inner = d_body < -p.fat if breast is None else d_body + breast < -p.fat
    np.copyto(hu, p.muscle_hu + 6 * tc, where=body & inner)
    if breast is not None:  # fibroglandular tissue in the middle of each breast
        gland = body & ~inner & (breast > 0.35 * ry * s) & (d_body < -0.35 * ry * s)
        np.copyto(hu, 20 + 30 * tc, where=gland)
    np.copyto(lab, BODY, where=body)
    bone = np.zeros(hu.shape, bool)
    marrow = np.full(hu.shape, p.marrow_hu, F32)
    if p.arms_down and u < 1.05:
        for side in (-1, 1):
            cx, cy, ar = p.bx + side * (big_a + p.arm_gap + p.arm_r), p.by + 0.1 * p.b, p.arm_r
            _paint(hu, g.ellipse(cx, cy, ar, 1.15 * ar), p.fat_hu + 10 * tc, lab)
            _paint(hu, g.ellipse(cx, cy, ar - 0.5 * p.fat - 2, 1.15 * ar - 0.5 * p.fat - 2),
                   p.muscle_hu + 6 * tc)
            _mark(bone, g.ellipse(cx + side * 6, cy, 11.5, 11.5))
            _paint(marrow, g.ellipse(cx + side * 6, cy, 11.5, 11.5), -40.0)
    outside = lab == AIR
    skin = _dilate(outside, max(1, round(1.5 / sp))) & ~outside
    np.copyto(hu, F32(25) + 8 * tc, where=skin & (lab == BODY))
    # Thoracic cavity: an ellipse with a flat back that shrinks to the apex.
    s_apex = math.sqrt(max(0.0, 1 - ((u - 0.42) / 0.6) ** 2)) if u > 0.42 else 1.0
    ac = (p.a - p.fat - p.muscle - 8) * s_apex**0.6
    ya = lay.y_post - (lay.y_post - lay.y_ant) * s_apex
    cy = (ya + lay.y_post) / 2
    bca, bcp = cy - ya, 1.04 * (lay.y_post - cy)
    geom: tuple[float, ...] = (math.nan,) * 6
    spine_x = np.abs(xs - p.bx)
    med = np.zeros(hu.shape, bool)
    struct = _mediastinum(lay, g, z, ht, hu, med)
    if s_apex > 0.08:
        d_cav, rho, yn_c = _radial(xs - p.bx, ys - cy, ac, bca, bcp)
        cav = (d_cav < 0) & (ys < lay.y_post)[:, None]
        geom = (p.bx, cy, ac, bca, ya, lay.y_post)
        np.copyto(hu, p.fat_hu + 10 * tc, where=cav)
        np.copyto(lab, MEDFAT, where=cav)
        above: np.ndarray | bool = True
        if u < max(p.dome_r, p.dome_l) + 0.02:
            yn = np.clip((ys - cy) / bca, -1, 1)
            floor = np.broadcast_to((p.tilt * (1 - yn) / 2)[:, None], hu.shape)
            for xc, h in ((p.bx - 0.45 * ac, p.dome_r), (p.bx + 0.45 * ac, p.dome_l)):
                q = np.add.outer(((ys - cy - 0.05 * bca) / (0.85 * bca)) ** 2,
                                 ((xs - xc) / (0.6 * ac)) ** 2)
                floor = np.maximum(floor, h * np.sqrt(np.clip(1 - q, 0, 1)))
            above = u > floor
            _abdomen(lay, g, z, cav & ~above, hu, lab, tc, ac, cy, bca)
        # Mediastinum: a band from sternum to spine, wider above the arch, plus its organs.
        t = np.clip((ys - lay.y_ant) / (lay.y_vb - p.r_vb - lay.y_ant), 0, 1)
        w = 3 + 10 * _ss(0.7, 0.85, u) * (1 - t) + (p.r_vb - 3) * t
        w = np.where(ys > lay.y_vb - p.r_vb, 1.15 * p.r_vb + 5, w)
        med |= np.abs(xs - lay.xm)[None, :] < w[:, None]
        if s_apex < 1:  # the mediastinum widens between the apices
            half_ap = (lay.y_vb - ya) / 2 + 8
            _mark(med, g.ellipse(lay.xm, ya + half_ap - 10, 8 + 42 * (1 - s_apex) ** 0.7, half_ap))
        lung_now = cav & above & ~med
        yfrac = np.clip((ys - ya) / (lay.y_post - ya), 0, 1)[:, None]
        np.copyto(hu, p.lung_hu + p.gravity * yfrac + 9 * tfine + 5 * tc, where=lung_now)
        if p.dependent_band:
            band = lung_now & (d_cav > -p.dependent_band) & (ys > cy + 0.3 * bcp)[:, None]
            np.copyto(hu, -620.0 + 40 * tfine, where=band)
        np.copyto(lab, LUNG, where=lung_now)
        lung |= lung_now
        # Ribs: a ring just outside the cavity; each rib falls towards its anterior end.
        if s_apex > 0.2:
            ring = (d_cav > 1.5) & (d_cav < 1.5 + p.rib_t) & ~(
                (ys > lay.y_vb)[:, None] & (spine_x < p.r_vb + 14)[None, :])
            rr, cc = np.nonzero(ring)
            cos_t = np.clip(yn_c[rr] / np.maximum(rho[rr, cc], 1e-6), -1, 1)
            # Ribs fall steeply at the side; the cartilage climbs again to the sternum.
            fall = p.rib_drop * (0.3 + 0.7 * _ss(p.height, p.height - 90, z))
            drop = fall * (1 - np.cos(1.25 * np.arccos(cos_t))) / 2
            q = (p.height + 8 + np.sign(xs[cc] - p.bx) * 2 - drop - z) / (p.height / 9.6)
            idx = np.rint(q)
            dz = np.abs(q - idx) * p.height / 9.6
            f = np.clip(((p.rib_h + thick) / 2 - dz) / min(p.rib_h, thick), 0, 1)
            keep = (f > 0.15) & (idx >= 0) & (idx <= 11) & ((idx < 10) | (cos_t > 0))
            keep &= np.abs(xs[cc] - p.bx) > 14
            rr, cc, f, cart = rr[keep], cc[keep], f[keep], cos_t[keep] < -0.8
            depth = d_cav[rr, cc] - 1.5
            core = (depth > 1.3) & (depth < p.rib_t - 1.3)
            hu_bone = np.where(cart, 120.0, np.where(core, p.marrow_hu + 80, p.cortex_hu))
            hu[rr, cc] += f * (hu_bone - hu[rr, cc])
            lab[rr, cc] = BODY
    for value, shapes in struct:
        for shape in shapes:
            _paint(hu, shape, value, lab, BODY)
    _bones(lay, g, z, ht, u, big_a, b_ant, d_body, bone, marrow, hu)
    k = max(1, round(1.2 / sp))
    inner = ~_dilate(~bone, k) if sp < 2.5 else bone & False
    np.copyto(hu, np.where(inner, marrow, p.cortex_hu), where=bone)
    np.copyto(lab, BODY, where=bone)
    return geom


def _abdomen(lay: Layout, g: Grid, z: float, below: np.ndarray, hu: np.ndarray,
             lab: np.ndarray, tc: np.ndarray, ac: float, cy: float, bca: float) -> None:
    """Liver, stomach (air anterior: the patient is supine) and spleen under the domes."""
    p, xs, ys = lay.p, g.xs, g.ys
    np.copyto(hu, 15 + 30 * tc, where=below)
    np.copyto(lab, BODY, where=below)
    xlim = lay.xm + 0.1 * ac + 0.5 * ac * np.clip((cy - ys) / bca, 0, 1)
    np.copyto(hu, p.liver_hu + 5 * tc, where=below & (xs[None, :] < xlim[:, None]))
    zs = p.dome_l * p.height - 40
    for (cx, cyy, a, b, c), value in (
        ((lay.xm + 0.5 * ac, cy - 0.1 * bca, 0.33 * ac, 0.42 * bca, 50.0), 12.0),
        ((lay.xm + 0.72 * ac, cy + 0.45 * bca, 0.2 * ac, 0.38 * bca, 50.0), p.liver_hu - 10),
    ):
        if abs(z - zs) < c:
            s = math.sqrt(1 - ((z - zs) / c) ** 2)
            shape = g.ellipse(cx, cyy, a * s, b * s)
            if shape is not None:
                box, m = shape
                m = m & below[box]
                _paint(hu, (box, m), value + 4 * tc)
                if value == 12.0:  # the stomach: gas above (anterior to) the fluid level
                    gas = m & (ys[box[0]] < cyy - 0.65 * b * s)[:, None]
                    hu[box][gas] = -990.0


def _mediastinum(lay: Layout, g: Grid, z: float, ht: float, hu: np.ndarray,
                 med: np.ndarray) -> list[tuple[float, list]]:
    """Mark the mediastinum (organs and their fat) in ``med``; return (HU, shapes) to paint."""
    p = lay.p
    blood, halo = p.blood_hu, p.peri_fat

    def circle(cx: float, cy: float, r: float, pad: float = halo) -> tuple | None:
        _mark(med, g.ellipse(cx, cy, r + pad, r + pad))
        return g.ellipse(cx, cy, r, r)

    ha, hb, hc, hang, _ = p.heart
    xh, yh, zh = lay.heart_c
    out: list[tuple[float, list]] = []
    if abs(z - zh) < hc:
        s = math.sqrt(1 - ((z - zh) / hc) ** 2)
        _mark(med, g.ellipse(xh, yh, ha * s + halo, hb * s + halo, hang))
        out.append((blood if not p.contrast else 90.0, [g.ellipse(xh, yh, ha * s, hb * s, hang)]))
        if p.contrast:
            out.append((blood, [g.ellipse(xh, yh, 0.7 * ha * s, 0.65 * hb * s, hang)]))
    z_arch, r_aa = p.u_arch * p.height, p.r_ao + 3
    up = _ss(z_arch - 25, z_arch + 10, z)
    if up:  # thymic fat and great vessels fill the upper anterior mediastinum
        _mark(med, g.ellipse(lay.xm, lay.y_aa - 6, 12 + 18 * up, 10 + 14 * up))
    vessels: list = []
    if z < z_arch:
        vessels.append(circle(lay.x_da, lay.y_da, p.r_ao))
    if zh + 0.4 * hc < z < z_arch:
        vessels.append(circle(lay.x_aa, lay.y_aa, r_aa))
    if zh + 0.4 * hc < z < lay.pa_top[2]:
        vessels.append(circle(lay.pa_top[0], lay.pa_top[1], p.r_ao + 2))
    if zh + 0.3 * hc < z:
        vessels.append(circle(lay.x_aa - r_aa - 10, lay.y_aa + 6, 9))  # superior vena cava
    arch = ((lay.x_aa, lay.y_aa, z_arch), (lay.x_da, lay.y_da, z_arch))
    _mark(med, g.capsule(z, ht, *arch, p.r_ao + halo))
    vessels.append(g.capsule(z, ht, *arch, p.r_ao))
    if z > z_arch + p.r_ao:
        for dx, dy, r in ((-12, -14, 6.0), (8, -16, 4.5), (18, -6, 5.0)):
            vessels.append(circle(lay.xt + dx, lay.yt + dy, r, 4))
    out.append((blood, vessels))
    if z > p.dome_l * p.height - 20:
        out.append((35.0, [circle(lay.x_es, lay.y_es, 8, 4)]))
        if p.eso_air:
            out.append((-950.0, [g.ellipse(lay.x_es, lay.y_es, 2.5, 2)]))
    # Trachea and main bronchi: air in the mediastinum, never lung.
    walls, lumens = [], []
    car = (lay.xt, lay.yt, lay.z_car)
    for end, r in (((lay.xt, lay.yt, lay.z_car + 400.0), p.r_tr), (lay.hila[0], 7.0),
                   (lay.hila[1], 6.5)):
        _mark(med, g.capsule(z, ht, car, end, r + 4))
        walls.append(g.capsule(z, ht, car, end, r + 2))
        lumens.append(g.capsule(z, ht, car, end, r))
    for (hx, hy, hz), side in zip(lay.hila, (-1, 1), strict=True):
        if abs(z - hz) < 32:
            s = math.sqrt(1 - ((z - hz) / 32) ** 2)
            _mark(med, g.ellipse(hx + side * 2, hy, 15 * s, 22 * s))
    out += [(30.0, walls), (-1000.0, lumens)]
    return out


def _bones(lay: Layout, g: Grid, z: float, ht: float, u: float, big_a: float, b_ant: float,
           d_body: np.ndarray, bone: np.ndarray, marrow: np.ndarray, hu: np.ndarray) -> None:
    """Vertebra (with discs), sternum, scapulae and clavicles into ``bone``/``marrow``."""
    p, xs, ys = lay.p, g.xs, g.ys
    bx, yv, rv = p.bx, lay.y_vb, p.r_vb
    phase = (z / p.vert_pitch) % 1.0
    body = g.ellipse(bx, yv, 1.15 * rv, rv)
    if phase < 0.2:
        _paint(hu, body, 90.0)
    else:
        _mark(bone, body)
    rc = 0.45 * rv
    yc = yv + rv + rc + 1.5
    _mark(bone, g.ellipse(bx, yc, rc + 5, rc + 5))
    if phase > 0.35:
        _mark(bone, g.ellipse(bx, yc + rc + 14, 4.5, 15))
        for side in (-1, 1):
            _mark(bone, g.ellipse(bx + side * 24, yc - 1, 13, 5.5, side * 0.35))
    canal = g.ellipse(bx, yc, rc, rc)
    if canal is not None:
        bone[canal[0]] &= ~canal[1]
        _paint(hu, canal, 20.0)
    top_sternum = (p.height + 15) / p.height
    if p.dome_l + 0.08 < u < top_sternum:
        wide = _ss(0.78, 0.97, u)
        th = 9 + 4 * wide
        _mark(bone, g.ellipse(bx, lay.y_ant - 4 - th / 2, 11 + 10 * wide, th / 2))
    if 0.45 < u < 1.08:
        width = 95 * _ss(0.45, 0.7, u)
        ring = (d_body < -p.fat - 14) & (d_body > -p.fat - 18.5)
        sx = np.abs(xs - bx)
        band = (sx > rv + 28)[None, :] & (sx < rv + 28 + width)[None, :]
        bone |= ring & band & (ys > p.by + 0.15 * p.b)[:, None]
    for side in (-1, 1):
        y_cl = p.by - b_ant + p.fat + 8
        p0 = (bx + side * 14.0, y_cl, p.height + 6)
        p1 = (bx + side * 0.85 * big_a, y_cl + 22, p.height + 30)
        _mark(bone, g.capsule(z, ht, p0, p1, 7.0))


def z_positions(p: Patient, slices: int | None, thick: float) -> np.ndarray:
    """Slice centres (mm, ascending): the lung plus margins, or ``slices`` centred on that."""
    extent = p.height + p.margin_lo + p.margin_hi
    n = max(1, round(extent / thick)) if slices is None else slices
    centre = (p.height + p.margin_hi - p.margin_lo) / 2
    return centre + (np.arange(n) - (n - 1) / 2) * thick
