"""Training: losses, under-sampling, checkpoints and resume, manifest CSV input, metrics."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcn_train.evaluation import Classification, PixelCounts, auc
from dcn_train.losses import dcn_loss, dense_dice_loss, dice_loss_per_slice


def test_dice_loss_is_zero_for_a_perfect_mask_and_one_for_disjoint() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert dice_loss_per_slice(perfect, target).item() == pytest.approx(0.0, abs=0.03)
    disjoint = torch.where(target > 0, -50.0, 50.0)
    assert dice_loss_per_slice(disjoint, target).item() == pytest.approx(1.0, abs=0.03)


def test_dense_dice_weighs_the_dense_pixels_the_whole_slice_dice_drowns() -> None:
    # A slice of aerated lung (0.2 windowed) with a dense consolidation (0.9) inside the lung
    # and dense chest wall (0.9) outside it. Leaving the consolidation out costs little on
    # the whole slice and everything on the dense pixels; taking chest wall in costs there too.
    image = torch.full((1, 1, 16, 16), 0.2)
    image[..., :, :2] = 0.9  # chest wall
    image[..., 6:12, 6:12] = 0.9  # consolidation
    lung = torch.zeros(1, 1, 16, 16)
    lung[..., :, 2:] = 1
    aerated_only = torch.where((lung > 0) & (image < 0.58), 50.0, -50.0)
    assert dice_loss_per_slice(aerated_only, lung).item() < 0.1
    assert dense_dice_loss(aerated_only, lung, image, 0.58).item() > 0.95
    right = torch.where(lung > 0, 50.0, -50.0)
    assert dense_dice_loss(right, lung, image, 0.58).item() < 0.05
    wall_too = torch.full((1, 1, 16, 16), 50.0)
    assert dense_dice_loss(wall_too, lung, image, 0.58).item() > 0.25
    # A slice without dense lung adds nothing (its dense pixels are all not lung).
    no_dense = torch.zeros(1, 1, 16, 16)
    assert dense_dice_loss(wall_too, no_dense, image, 0.58).item() == 0.0


def test_weighted_dice_ignores_slices_without_lesions() -> None:
    lesion = torch.zeros(2, 1, 8, 8)
    lesion[0, :, 2:6, 2:6] = 1
    logits = torch.where(lesion > 0, 50.0, -50.0)
    logits[1] = 50.0  # a lesion-free slice predicted all lesion: weight 0, no seg loss
    _, seg, cls = dcn_loss(logits, lesion, torch.tensor([10.0, -10.0]), torch.tensor([1.0, 0.0]),
                           weight=torch.tensor([1.0, 0.0]))
    assert seg.item() == pytest.approx(0.0, abs=0.03)
    assert cls.item() < 1e-3


def test_lesion_drawn_on_a_lesion_free_slice_costs_when_weighted() -> None:
    # Equation 7 with a weight on lesion-free slices (negative_slice_dice_weight): lesion
    # predicted where the mask says there is none (a tumour slice) now has a cost, and a
    # clean prediction there has none.
    lesion = torch.zeros(1, 1, 8, 8)
    drawn = torch.full((1, 1, 8, 8), -50.0)
    drawn[..., 2:6, 2:6] = 50.0
    clean = torch.full((1, 1, 8, 8), -50.0)
    label = torch.tensor([0.0])
    _, seg_drawn, _ = dcn_loss(drawn, lesion, torch.tensor([-10.0]), label,
                               weight=torch.tensor([0.5]))
    _, seg_clean, _ = dcn_loss(clean, lesion, torch.tensor([-10.0]), label,
                               weight=torch.tensor([0.5]))
    assert seg_drawn.item() == pytest.approx(0.5 * (1 - 1 / 17), abs=0.01)  # w x Dice
    assert seg_clean.item() < 0.01


def test_lung_mask_jitter_moves_the_edge_by_at_most_the_setting() -> None:
    import random

    from dcn_train.trainer import _jitter_lung

    lung = np.zeros((64, 64), bool)
    lung[16:48, 12:30] = True
    random.seed(5)
    seen = set()
    for _ in range(200):
        jittered = _jitter_lung(lung, 3)
        grown, kept = int(jittered.sum()), int(lung.sum())
        seen.add("grown" if grown > kept else "shrunk" if grown < kept else "same")
        if grown >= kept:  # grown masks contain the truth, by at most 3 pixels all round
            assert jittered[lung].all()
            assert not jittered[:12, :].any() and not jittered[:, :8].any()
        else:
            assert not jittered[~lung].any()
            assert jittered[20:44, 16:26].all()
    assert seen == {"grown", "shrunk", "same"}
    assert (_jitter_lung(lung, 0) == lung).all()


def test_hard_negatives_are_drawn_by_their_loss() -> None:
    # --hard-negative-share: that share of the negatives comes mostly from the slices the
    # classifier gets wrong (here 10 of 1000 with a loss of 3, the rest 0.01); the rest is
    # uniform. Without the share, the 10 hard ones would be 1 % of the draw.
    from dcn_train.trainer import draw_negatives

    losses = np.full(1000, 0.01)
    losses[:10] = 3.0
    rng = np.random.RandomState(0)
    picked = draw_negatives(losses, 40, 0.5, rng)
    assert len(picked) == len(set(picked.tolist())) == 40
    assert (picked < 10).sum() >= 8  # ~ 20 x 30 / (30 + 9.9): most of the hard 10
    uniform = draw_negatives(losses, 40, 0.0, rng)
    assert (uniform < 10).sum() <= 3
    assert len(draw_negatives(losses[:5], 40, 0.5, rng)) == 5  # never more than there are


def test_lung_epochs_draw_the_real_share_from_real_cases() -> None:
    # --lung-real-share: real CTs are 6 % of corpus v3's slices; with the share they fill
    # it, each part keeping the lesion fraction; 0 (or a corpus of real cases only) draws
    # from all slices alike.
    from dcn_train.trainer import draw_lung_slices

    pool = [(c, s) for c in range(20) for s in range(50)]  # cases 18, 19 are real
    real = {18, 19}
    with_lesion = {(c, s) for c, s in pool if s < 10}
    random.seed(0)
    chosen = draw_lung_slices(pool, with_lesion, real, 200, 0.5, 0.25)
    assert len(chosen) == len(set(chosen)) == 200
    from_real = [ref for ref in chosen if ref[0] in real]
    assert len(from_real) == 50
    assert sum(ref in with_lesion for ref in from_real) == 20  # all 20 real lesion slices
    assert sum(ref in with_lesion for ref in chosen if ref[0] not in real) >= 75
    proportional = draw_lung_slices(pool, with_lesion, real, 200, 0.0, 0.0)
    assert sum(ref[0] in real for ref in proportional) < 40
    only_real = draw_lung_slices(pool, with_lesion, set(range(20)), 200, 0.0, 0.25)
    assert len(only_real) == 200


def test_covid_lesions_are_grown_to_the_minimum_involvement() -> None:
    # Corpus v5: a COVID-19 phantom whose lesions cover less than 0.1 % of the lungs gets
    # more (a few voxels are no COVID-19 a reader could call); one above it is left as is.
    from dcn_train.corpus import MIN_INVOLVEMENT, _at_least_minimum_involvement
    from dcn_train.findings import Geometry

    zz, yy, xx = np.mgrid[0:24, 0:96, 0:96]
    lung = ((xx - 48) ** 2 + (yy - 48) ** 2 < 40 ** 2) & (zz > 1) & (zz < 22)
    rng = np.random.default_rng(5)
    hu = np.where(lung, -850.0, 40.0).astype(np.float32) + rng.normal(0, 15, lung.shape)
    hu = hu.astype(np.float32)
    before = hu.copy()
    few = np.zeros_like(lung)
    few[10, 48, 48:51] = True
    grown = _at_least_minimum_involvement(rng, hu, lung, few, Geometry(1.5, 2.0), 15.0)
    share = grown.sum() / lung.sum()
    assert MIN_INVOLVEMENT <= share <= 12 * MIN_INVOLVEMENT, share
    assert grown[few].all() and not (grown & ~lung).any()
    assert (hu[grown & ~few] > before[grown & ~few]).mean() > 0.9  # painted denser
    assert np.array_equal(hu[~lung], before[~lung])

    enough = np.zeros_like(lung)
    enough[10:12, 40:56, 40:56] = True  # 512 voxels, 0.6 % of this lung
    state = rng.bit_generator.state
    kept = _at_least_minimum_involvement(rng, hu, lung, enough, Geometry(1.5, 2.0), 15.0)
    assert kept is enough and rng.bit_generator.state == state  # no draw: cases unchanged


def test_a_covid_phantom_the_generator_left_almost_clear_is_grown() -> None:
    # Held-out seed 900000: the generator's own lesions are 35 voxels, 0.002 % of its lungs.
    from dcn_train.corpus import MIN_INVOLVEMENT, phantom_case
    from dcn_train.phantom import generate_volume

    own = generate_volume(900000, thickness_mm=5.0, normal=False)
    assert 0 < own.lesion.sum() < MIN_INVOLVEMENT * own.lung.sum()
    volume = phantom_case(900000, "covid", 5.0)
    assert volume.label == 1
    assert volume.lesion.sum() >= MIN_INVOLVEMENT * volume.lung.sum()


def test_metrics_match_hand_counts() -> None:
    counts = PixelCounts()
    counts.add(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    assert (counts.dsc, counts.precision, counts.recall) == (0.5, 0.5, 0.5)
    assert auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1])) == 0.75
    result = Classification()
    for label, score in ((1, 0.9), (1, 0.4), (0, 0.6), (0, 0.1)):
        result.add(label, score)
    metrics = result.metrics()
    assert (metrics["Acc"], metrics["Sen"], metrics["Spc"], metrics["AA"]) == (0.5, 0.5, 0.5, 0.5)


def _train(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcn_node", "train", "--out", str(out), "--cache", str(cache),
         "--lung-slices-per-epoch", "16", "--dcn-positives-per-epoch", "8", "--spm-epochs", "1",
         "--threads", "2", *extra],
        capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_train_from_a_manifest_checkpoints_and_resumes(tmp_path: Path) -> None:
    import nibabel
    import nrrd

    from dcn_train.phantom import generate_phantom

    rows = ["image,lung_mask,lesion_mask,label"]
    for seed, normal in ((1, False), (2, True)):
        case = generate_phantom(tmp_path / f"case{seed}", seed, slices=24, matrix=128,
                                normal=normal)
        truth = np.load(case.ground_truth_path)
        # Masks as real users have them: NRRD lung, NIfTI lesion, both stored (x, y, z).
        # NRRD without a space is read as LPS; the NIfTI affine (RAS) says that x runs to
        # the patient's left and y to the back, as the DICOM columns and rows do.
        lung_path, lesion_path = tmp_path / f"lung{seed}.nrrd", tmp_path / f"lesion{seed}.nii.gz"
        nrrd.write(str(lung_path), truth["lung"].transpose(2, 1, 0).astype(np.uint8))
        nibabel.save(nibabel.Nifti1Image(truth["lesion"].transpose(2, 1, 0).astype(np.uint8),
                                         np.diag([-1.0, -1.0, 1.0, 1.0])), str(lesion_path))
        rows.append(f"{case.series_dir.relative_to(tmp_path)},{lung_path.name},"
                    f"{lesion_path.name},{case.label}")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out, cache = tmp_path / "models", tmp_path / "cache"
    first = _train(out, cache, "--manifest", str(manifest), "--lung-epochs", "1",
                   "--dcn-epochs", "1", "--hard-negative-share", "0.5")
    assert first.returncode == 0, first.stderr
    first_log = (out / "train-lite.log").read_text()
    assert "dcn: scored" in first_log and "dcn: 8 negatives" in first_log
    assert (out / "checkpoints" / "lung.pt").exists()
    from dcn_train.cases import Case

    cached = sorted(cache.glob("*.npz"))
    assert len(cached) == 2
    case = Case.load(cached[0])
    assert case.image.shape == case.lung.shape == case.lesion.shape == (24, 256, 256)
    assert case.lung.any() and case.lesion.any() and case.label == 1
    # Longer run: resumes after the finished epoch instead of starting again.
    second = _train(out, cache, "--manifest", str(manifest), "--lung-epochs", "2",
                    "--dcn-epochs", "1")
    assert second.returncode == 0, second.stderr
    log = (out / "train-lite.log").read_text()
    assert "lung: resuming after epoch 1" in log and "lung epoch 2/2" in log
    assert "lung epoch 1/2" not in log
    # Other networks: the slice probabilities the mapping learns from are computed again.
    assert log.count("spm: slice probabilities of 2/2 training cases") == 2
    assert "cases from" not in log
    manifest_json = json.loads((out / "lite-manifest.json").read_text())
    assert set(manifest_json["files"]) == {"lung", "dcn", "spm"}
    for entry in manifest_json["files"].values():
        state = torch.load(out / entry["file"], weights_only=True)
        assert isinstance(state, dict) and state
    # Fine-tuning: --init-from starts each stage from those (SHA-256-checked) weights;
    # with no epochs to run, the same networks come out.
    tuned = tmp_path / "tuned"
    third = _train(tuned, cache, "--manifest", str(manifest), "--init-from", str(out),
                   "--lung-epochs", "0", "--dcn-epochs", "0", "--spm-epochs", "0")
    assert third.returncode == 0, third.stderr
    assert "dcn: starting from" in (tuned / "train-lite.log").read_text()
    for name in ("lung", "dcn", "spm"):
        before = torch.load(out / f"lite-{name}.pt", weights_only=True)
        after = torch.load(tuned / f"lite-{name}.pt", weights_only=True)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # With no mapping epochs, no slice probabilities were computed for it.
    assert "spm: slice probabilities" not in (tuned / "train-lite.log").read_text()
    # Mapping epochs on the same networks and cases: their slice probabilities are computed
    # once, then read back for more epochs, not computed again.
    fourth = _train(tuned, cache, "--manifest", str(manifest), "--init-from", str(out),
                    "--lung-epochs", "0", "--dcn-epochs", "0", "--spm-epochs", "2")
    assert fourth.returncode == 0, fourth.stderr
    fifth = _train(tuned, cache, "--manifest", str(manifest), "--init-from", str(out),
                   "--lung-epochs", "0", "--dcn-epochs", "0", "--spm-epochs", "3")
    assert fifth.returncode == 0, fifth.stderr
    tuned_log = (tuned / "train-lite.log").read_text()
    assert "spm: slice probabilities of 2 cases from" in tuned_log
    assert tuned_log.count("spm: slice probabilities of 2/2 training cases") == 1
    assert "spm epoch 2/2" in tuned_log and "spm epoch 3/3" in tuned_log


def test_nifti_and_nrrd_are_read_in_the_dicom_orientation(tmp_path: Path) -> None:
    """A volume stored with its x axis running to the patient's right (RAS affine, as many
    tools write NIfTI) or its y axis flipped (NRRD space directions) comes back in the
    orientation DICOM inference uses: slices inferior to superior, rows anterior to
    posterior, columns right to left."""
    import nibabel
    import nrrd

    from dcn_train.cases import read_volume

    rng = np.random.default_rng(5)
    volume = rng.integers(-1000, 400, size=(6, 7, 8)).astype(np.int16)  # (z, y, x) in LPS
    volume[0, 0, 0] = 3000  # inferior, anterior, patient's right corner
    # NIfTI, x stored towards the patient's right and y towards anterior: both flipped.
    flipped = volume[:, ::-1, ::-1].transpose(2, 1, 0)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])  # RAS: +x right, +y anterior
    nibabel.save(nibabel.Nifti1Image(flipped, affine), str(tmp_path / "ras.nii.gz"))
    array, spacing, slice_spacing = read_volume(tmp_path / "ras.nii.gz")
    assert np.array_equal(array, volume)
    assert (spacing, slice_spacing) == pytest.approx((0.8, 2.5))
    # The same without honouring the affine would be the flipped array.
    assert not np.array_equal(np.asarray(flipped).transpose(2, 1, 0), volume)
    # NRRD with y stored towards anterior (LPS space, negative y direction).
    header = {"space": "left-posterior-superior",
              "space directions": np.diag([0.8, -0.8, 2.5]), "space origin": [0, 0, 0]}
    nrrd.write(str(tmp_path / "flip.nrrd"), volume[:, ::-1, :].transpose(2, 1, 0).copy(),
               header)
    array, _, _ = read_volume(tmp_path / "flip.nrrd")
    assert np.array_equal(array, volume)
