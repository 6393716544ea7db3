"""A classical HU-threshold lung mask, written for the tests independently of the node's
own anatomy code (:mod:`dcn_node.inference.anatomy`), as the paper drew its lung truth
(section 3.1.3): air below -400 HU that is not outside air, large 3-D parts, gas pockets
and foam dropped, small holes (vessels) filled. Meant for lungs without large dense disease
(it would leave a consolidated lung out): the real CTs' checks use it on their own scans."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def reference_lung_mask(hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    lung = np.zeros(hu.shape, dtype=bool)
    for k, image in enumerate(hu.astype(np.float32)):
        # The body: tissue above -500 HU without thin lines (blankets, table edges), its
        # larger pieces, holes filled; where the field of view cuts the body, the image
        # edge closes it: edge pixels that are not outside air (not below -950 HU), and on
        # each edge the stretch between the body's first and last pixel on it (an aerated
        # lung cut by the edge can be that dark there).
        tissue = ndimage.binary_opening(image > -500, iterations=2)
        labels, count = ndimage.label(tissue)
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        tissue = (sizes >= 0.1 * sizes.max())[labels] & (labels > 0)
        padded = np.pad(tissue, 1)
        edge_open = np.pad(ndimage.uniform_filter(image, 3) < -950, 1, mode="edge")
        padded[[0, -1], :] = ~edge_open[[0, -1], :]
        padded[:, [0, -1]] = ~edge_open[:, [0, -1]]
        for row, line in ((0, tissue[0]), (-1, tissue[-1])):
            on = np.flatnonzero(line)
            if on.size:
                padded[row, on[0] + 1:on[-1] + 2] = True
        for col, line in ((0, tissue[:, 0]), (-1, tissue[:, -1])):
            on = np.flatnonzero(line)
            if on.size:
                padded[on[0] + 1:on[-1] + 2, col] = True
        body = ndimage.binary_fill_holes(padded)[1:-1, 1:-1]
        lung[k] = (ndimage.uniform_filter(image, 3) < -400) & body
    labels, count = ndimage.label(lung)
    if count == 0:
        return lung
    sizes = np.bincount(labels.ravel())
    means = np.bincount(labels.ravel(), weights=np.maximum(hu, -1024).ravel()) \
        / np.maximum(sizes, 1)
    # Not gas (bowel, stomach: below -960 on average), not foam or blankets outside the
    # body (around -700): normal lung parenchyma averages -750..-900 HU.
    keep = (sizes >= 0.02 * sizes[1:].sum()) & (means > -960) & (means < -720)
    keep[0] = False
    lung = keep[labels]
    max_hole = 20.0 / (pixel_mm / 10.0) ** 2  # cm^2 -> pixels
    for k, image in enumerate(lung):
        holes = ndimage.binary_fill_holes(image) & ~image
        labels, count = ndimage.label(holes)
        if count:
            small = np.bincount(labels.ravel()) <= max_hole
            small[0] = False
            lung[k] |= small[labels]
    return lung


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def dsc_outside(a: np.ndarray, b: np.ndarray, excluded: np.ndarray | None) -> float:
    """:func:`dsc` on the voxels outside ``excluded`` (a tumour contour the threshold
    reference cannot hold), or on all of them without one."""
    if excluded is None:
        return dsc(a, b)
    return dsc(a & ~excluded, b & ~excluded)
