"""The anatomical constraint on the model's lung mask (:func:`constrain_lung`): a dense
consolidation that fills a lung base stays lung; soft tissue far from any lung goes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dcn_node.inference.anatomy import classical_anatomy, constrain_lung
from dcn_train.phantom import generate_volume


def test_consolidated_lung_base_is_kept_and_soft_tissue_is_not() -> None:
    chest = generate_volume(31, thickness_mm=5.0, normal=True, matrix=256)
    hu = chest.hu.astype(np.float32).copy()
    spacing, thickness = chest.pixel_spacing_mm, chest.slice_thickness_mm
    lung_slices = np.flatnonzero(chest.lung.any(axis=(1, 2)))
    # The lowest three lung slices: the right lung (image left, patient right) entirely
    # consolidated at soft-tissue density, as in a lobar pneumonia filling the base.
    base = lung_slices[:3]
    columns = np.arange(hu.shape[2])
    right = np.zeros(chest.lung.shape, dtype=bool)
    right[base] = chest.lung[base] & (columns < hu.shape[2] // 2)[None, None, :]
    hu[right] = 35.0
    anatomy = classical_anatomy(hu, spacing, thickness)
    assert not (anatomy.lung & right).any()  # no air left there: the classical mask drops it

    # The model's mask: the true lungs (consolidation included) and a blob of the chest wall
    # and arm far from any lung, as a U-Net may mark at the apex.
    predicted = chest.lung.copy()
    far = ndimage.distance_transform_edt(~chest.lung.any(axis=0)) * spacing > 40.0
    body_only = anatomy.body & far[None] & (hu > -200)
    blob = np.zeros_like(predicted)
    middle = lung_slices[len(lung_slices) // 2]
    rows, cols = np.nonzero(body_only[middle])
    r, c = rows[len(rows) // 2], cols[len(cols) // 2]
    blob[middle - 1:middle + 2, r - 12:r + 12, c - 12:c + 12] = True
    blob &= body_only
    assert blob.sum() * spacing ** 2 * thickness / 1000 > 5.0  # larger than a dropped speck
    predicted |= blob

    kept = constrain_lung(predicted, hu, anatomy, spacing, thickness)
    inner = right & ndimage.binary_erosion(anatomy.body, np.ones((1, 9, 9)))
    assert kept[inner].mean() >= 0.95
    assert not (kept & blob).any()
    # Without the neighbouring slices' lung (the rule before), most of the base is lost:
    # the consolidation is farther than 20 mm from any air-filled lung of its own slice.
    in_plane_only = constrain_lung(predicted, hu, anatomy, spacing, thickness, reach_z_mm=0)
    assert in_plane_only[inner].mean() < 0.5


def test_lung_cut_by_the_image_edge_stays_inside_the_body_where_it_is_dark() -> None:
    # A reconstruction whose top edge cuts the anterior lungs, and a few pixels of that lung
    # as dark as outside air right at the edge (an aerated upper lobe, emphysema): on a
    # real scan (nsclc-1) one such pixel opened the whole lung to the outside and the
    # lung mask lost it on every such slice.
    chest = generate_volume(31, thickness_mm=5.0, normal=True, matrix=256)
    rows = np.flatnonzero(chest.lung.any(axis=(0, 2)))
    top = int(rows[0] + 0.25 * (rows[-1] - rows[0]))
    hu = np.ascontiguousarray(chest.hu[:, top:, :]).astype(np.float32)
    truth = chest.lung[:, top:, :]
    cut = np.flatnonzero(truth[:, 0, :].any(axis=1))
    assert len(cut) >= 3  # slices where the lung meets the top edge
    for index in cut:
        columns = np.flatnonzero(truth[index, 0])
        hu[index, :3, columns[len(columns) // 2] - 2:columns[len(columns) // 2] + 3] = -1000.0
    anatomy = classical_anatomy(hu, chest.pixel_spacing_mm, chest.slice_thickness_mm)
    for index in cut:
        assert anatomy.body[index][truth[index]].mean() > 0.99, f"slice {index}"
        kept = anatomy.lung[index][truth[index]].mean()
        assert kept > 0.8, f"slice {index}: {kept:.2f} of the lung kept"
