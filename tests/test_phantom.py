"""Tests of the synthetic chest CT phantom: determinism, anatomy, lesions, DICOM files."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from dcn_train.phantom import (
    PhantomVolume,
    generate_phantom,
    generate_volume,
    write_series,
)

M = 128  # matrix used by most tests; anatomy and lesions do not depend on it


@pytest.fixture(scope="module")
def sick() -> PhantomVolume:
    return generate_volume(11, matrix=M)


@pytest.fixture(scope="module")
def healthy() -> PhantomVolume:
    return generate_volume(11, matrix=M, normal=True)


def _litres(v: PhantomVolume, mask: np.ndarray) -> float:
    return float(mask.sum()) * v.pixel_spacing_mm**2 * v.slice_thickness_mm / 1e6


# --- determinism -------------------------------------------------------------------------


def test_same_seed_gives_identical_volume() -> None:
    a = generate_volume(5, slices=16, matrix=64)
    b = generate_volume(5, slices=16, matrix=64)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.lung, b.lung)
    assert np.array_equal(a.lesion, b.lesion)
    assert a.pixel_spacing_mm == b.pixel_spacing_mm


def test_different_seeds_give_different_volumes() -> None:
    a = generate_volume(5, slices=16, matrix=64)
    b = generate_volume(6, slices=16, matrix=64)
    assert a.hu.shape == b.hu.shape
    assert not np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.lung, b.lung)


def test_same_seed_writes_identical_files(tmp_path: Path) -> None:
    c1 = generate_phantom(tmp_path / "a", 9, slices=6, matrix=64)
    c2 = generate_phantom(tmp_path / "b", 9, slices=6, matrix=64)
    assert c1.sop_instance_uids == c2.sop_instance_uids
    assert c1.series_instance_uid == c2.series_instance_uid
    assert c1.study_instance_uid == c2.study_instance_uid
    for f in sorted(c1.series_dir.iterdir()):
        other = c2.series_dir / f.name
        assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(
            other.read_bytes()).digest()
    c3 = generate_phantom(tmp_path / "c", 10, slices=6, matrix=64)
    assert not set(c3.sop_instance_uids) & set(c1.sop_instance_uids)
    assert c3.study_instance_uid != c1.study_instance_uid


# --- anatomy and lesions ---------------------------------------------------------------


def test_arrays_have_the_documented_types(sick: PhantomVolume) -> None:
    assert sick.hu.dtype == np.int16 and sick.hu.ndim == 3
    assert sick.lung.dtype == bool and sick.lesion.dtype == bool
    assert sick.lung.shape == sick.hu.shape == sick.lesion.shape
    assert sick.hu.shape[1:] == (M, M)
    assert sick.slice_thickness_mm == 5.0
    # Pixel spacing scales with the matrix: 0.55-0.9 mm at 512.
    assert 0.55 <= sick.pixel_spacing_mm * M / 512 <= 0.9


def test_lesions_lie_inside_the_lung(sick: PhantomVolume) -> None:
    assert sick.label == 1
    assert sick.lesion.any()
    assert not (sick.lesion & ~sick.lung).any()


def test_normal_has_no_lesion_and_the_same_lungs(sick: PhantomVolume,
                                                 healthy: PhantomVolume) -> None:
    assert healthy.label == 0
    assert not healthy.lesion.any()
    # Lesions are drawn into the lungs; they neither move nor reshape them.
    assert np.array_equal(healthy.lung, sick.lung)
    assert not np.array_equal(healthy.hu, sick.hu)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_normal_lung_density(seed: int) -> None:
    v = generate_volume(seed, matrix=M, normal=True)
    mean = float(v.hu[v.lung].mean())
    assert -900 <= mean <= -750, mean


def test_lesions_are_denser_than_lung_in_ggo_to_consolidation_range(
        sick: PhantomVolume, healthy: PhantomVolume) -> None:
    values = sick.hu[sick.lesion].astype(float)
    assert -750 <= values.mean() <= 50, values.mean()
    # Most lesion voxels lie between ground glass and consolidation (noise aside).
    assert np.mean((values > -850) & (values < 200)) > 0.8
    # Same voxels without the lesion (same seed, normal) are clearly less dense.
    assert values.mean() > healthy.hu[sick.lesion].mean() + 150


def test_lesion_types_cover_ground_glass_and_consolidation() -> None:
    means = []
    for seed in range(12):
        v = generate_volume(seed, matrix=64)
        labels, n = ndimage.label(v.lesion)
        sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
        big = [i + 1 for i in range(n) if sizes[i] >= 20]
        means += list(ndimage.mean(v.hu, labels, big))
    means = np.array(means)
    assert np.any((means > -750) & (means < -300)), means  # ground-glass opacities
    assert np.any(means > -250), means  # consolidation (and mixed) lesions


def test_dependent_lung_is_denser(healthy: PhantomVolume) -> None:
    v = healthy
    rows = np.arange(v.hu.shape[1])[:, None]
    front, back = [], []
    for k in np.flatnonzero(v.lung.sum((1, 2)) > 200):
        # Away from the pleura (partial volume with the chest wall); medians ignore vessels.
        lung = ndimage.binary_erosion(v.lung[k], iterations=2)
        r = np.flatnonzero(lung.any(1))
        if len(r) < 6:
            continue
        lo, hi = r[0] + (r[-1] - r[0]) / 3, r[-1] - (r[-1] - r[0]) / 3
        front += list(v.hu[k][lung & (rows < lo)])
        back += list(v.hu[k][lung & (rows > hi)])
    assert np.median(back) - np.median(front) > 15, (np.median(front), np.median(back))


def test_trachea_is_air_outside_the_lung_mask() -> None:
    v = generate_volume(11, matrix=256, normal=True)  # ~1.6 mm pixels: a trachea of >30 px
    with_lung = np.flatnonzero(v.lung.sum((1, 2)) > 30)
    top = with_lung[-max(2, len(with_lung) // 5):]  # the upper fifth of the lungs
    found = 0
    for k in top:
        smooth = ndimage.gaussian_filter(v.hu[k].astype(float), 0.7)
        air, n = ndimage.label(smooth < -900)
        border = set(np.unique(np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]])))
        lung_x = np.flatnonzero(v.lung[k].any(0))
        for i in range(1, n + 1):
            comp = air == i
            if i in border or comp.sum() < 20 or (comp & v.lung[k]).any():
                continue
            cx = np.flatnonzero(comp.any(0)).mean()
            if lung_x[0] < cx < lung_x[-1]:
                found += 1
                break
    # The trachea shows as an air column between the lungs that the lung mask leaves out.
    assert found >= len(top) - 1, (found, len(top))


@pytest.mark.parametrize("seed", [0, 4, 8, 12])
def test_lung_volume_is_adult(seed: int) -> None:
    v = generate_volume(seed, matrix=M, normal=True)
    assert 2.5 <= _litres(v, v.lung) <= 8.0


def test_lung_cross_section_changes_from_base_to_apex(healthy: PhantomVolume) -> None:
    area = healthy.lung.sum((1, 2))
    k = np.flatnonzero(area)
    assert len(k) >= 20
    peak = int(np.argmax(area))
    # Slice 0 is inferior: the apex (small) is at the end, the widest part below the middle.
    assert k[0] < peak < k[0] + 0.75 * (k[-1] - k[0])
    assert area[k[-1]] < 0.35 * area[peak]
    assert area[k[0]] < 0.35 * area[peak]
    # No lung in the margins above the apex and below the bases.
    assert k[0] > 0 and k[-1] < len(area) - 1


def test_default_extent_covers_the_chest() -> None:
    for seed, thick in ((0, 5.0), (1, 2.5), (2, 7.5)):
        v = generate_volume(seed, thickness_mm=thick, matrix=32)
        extent = v.hu.shape[0] * thick
        assert 220 - thick <= extent <= 320 + thick


def test_lesion_sizes_range_from_tiny_to_large() -> None:
    largest = []
    for seed in range(24):
        v = generate_volume(seed, matrix=64)
        largest.append(int(v.lesion.sum((1, 2)).max()) * (512 // 64) ** 2)
    assert min(largest) < 1000, largest  # only lesions under 1,000 pixels at 512
    assert max(largest) > 20000, largest  # lobar consolidation


def test_lesions_favour_the_dependent_lung() -> None:
    lesion_rows, lung_rows = [], []
    for seed in range(8):
        v = generate_volume(seed, matrix=64)
        lesion_rows.append(np.nonzero(v.lesion)[1].mean())
        lung_rows.append(np.nonzero(v.lung)[1].mean())
    assert np.mean(lesion_rows) > np.mean(lung_rows)


def test_outside_the_field_of_view_is_padding(sick: PhantomVolume) -> None:
    corner = sick.hu[:, 0, 0]
    expected = -1024 if sick.padding_hu is None else sick.padding_hu
    assert np.all(corner == expected)
    assert not sick.lung[:, 0, 0].any()
    inside = sick.hu[:, M // 2, :]
    assert inside.min() >= -1024 and inside.max() <= 3071


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        generate_volume(-1)
    with pytest.raises(ValueError):
        generate_volume(1, slices=0)
    with pytest.raises(ValueError):
        generate_volume(1, thickness_mm=0)
    with pytest.raises(ValueError):
        generate_volume(1, matrix=4)


# --- files ------------------------------------------------------------------------------


def _read_series(series_dir: Path) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(f) for f in series_dir.glob("*.dcm")]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _clipped(ds: pydicom.Dataset, hu: np.ndarray) -> np.ndarray:
    """``hu`` clipped to what the slice's storage can represent."""
    bits, signed = int(ds.BitsStored), ds.PixelRepresentation == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    m, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    return np.clip(hu.astype(float), lo * m + b, hi * m + b)


def test_files_and_ground_truth_agree(tmp_path: Path) -> None:
    case = generate_phantom(tmp_path, 7, slices=12, matrix=M)
    volume = generate_volume(7, slices=12, matrix=M)
    assert case.slices == 12 and case.label == volume.label == 1
    assert case.series_dir == tmp_path / "series"
    assert sorted(p.name for p in case.series_dir.iterdir()) == [
        f"CT{i:06d}.dcm" for i in range(1, 13)]
    datasets = _read_series(case.series_dir)
    assert tuple(ds.SOPInstanceUID for ds in datasets) == case.sop_instance_uids
    assert len(set(case.sop_instance_uids)) == 12
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == list(range(1, 13))
    for ds, hu in zip(datasets, volume.hu, strict=True):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.SeriesInstanceUID == case.series_instance_uid
        assert ds.StudyInstanceUID == case.study_instance_uid
        assert ds.ImagesInAcquisition == 12 and ds.AcquisitionNumber == 1
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
        assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
        assert ds.PatientName == "PHANTOM^7"
        assert np.array_equal(_hu(ds), _clipped(ds, hu))
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), 5.0)
    gt = np.load(case.ground_truth_path)
    assert case.ground_truth_path == tmp_path / "ground_truth.npz"
    assert np.array_equal(gt["lung"], volume.lung)
    assert np.array_equal(gt["lesion"], volume.lesion)
    assert int(gt["label"]) == 1
    assert tuple(gt["sop_instance_uids"]) == case.sop_instance_uids
    meta = json.loads((tmp_path / "ground_truth.json").read_text())
    assert meta["label"] == 1 and meta["seed"] == 7 and meta["slices"] == 12
    assert meta["lesion_voxels"] == int(volume.lesion.sum())
    assert tuple(meta["sop_instance_uids"]) == case.sop_instance_uids
    assert meta["series_instance_uid"] == case.series_instance_uid
    assert meta["generator_version"]


STORAGE = {
    "unsigned-12": {"PixelRepresentation": 0, "BitsStored": 12},
    "unsigned-16": {"PixelRepresentation": 0, "BitsStored": 16},
    "signed-1024": {"PixelRepresentation": 1, "RescaleIntercept": -1024},
    "signed-0": {"PixelRepresentation": 1, "RescaleIntercept": 0},
}


@pytest.mark.parametrize("storage", list(STORAGE.values()), ids=list(STORAGE))
def test_storage_round_trips_hounsfield_units(tmp_path: Path, storage: dict) -> None:
    volume = generate_volume(3, slices=3, matrix=64)
    assert volume.padding_hu is not None and volume.padding_hu < -1024  # padding exercised
    uids = write_series(volume, tmp_path, 3, **storage)
    datasets = _read_series(tmp_path)
    assert [ds.SOPInstanceUID for ds in datasets] == uids
    signed = storage["PixelRepresentation"] == 1
    for ds, hu in zip(datasets, volume.hu, strict=True):
        assert ds.PixelRepresentation == storage["PixelRepresentation"]
        assert ds.BitsStored == storage.get("BitsStored", 16) and ds.BitsAllocated == 16
        assert ds.HighBit == ds.BitsStored - 1
        arr = ds.pixel_array
        assert arr.dtype == (np.int16 if signed else np.uint16)
        assert int(arr.max()) < 2 ** (ds.BitsStored - (1 if signed else 0))
        assert float(ds.RescaleIntercept) == storage.get("RescaleIntercept", -1024)
        assert np.array_equal(_hu(ds), _clipped(ds, hu))
        if not signed:  # unsigned with intercept -1024 cannot hold the -3024 padding
            assert _hu(ds).min() == -1024
        assert ds.RescaleType == "HU"
        # Everything outside the reconstruction circle is the padding value.
        assert int(arr[0, 0]) == int(ds.PixelPaddingValue)


def test_header_overrides_apply_to_every_slice(tmp_path: Path) -> None:
    volume = generate_volume(4, slices=3, matrix=32)
    uids = write_series(volume, tmp_path, 4, StudyInstanceUID="1.2.3.4",
                        SeriesDescription="LUNG 1mm", BodyPartExamined="LUNG",
                        ImageType=["DERIVED", "SECONDARY", "AXIAL"], ImagesInAcquisition=None)
    datasets = _read_series(tmp_path)
    assert [ds.SOPInstanceUID for ds in datasets] == uids
    for ds in datasets:
        assert ds.StudyInstanceUID == "1.2.3.4"
        assert ds.SeriesDescription == "LUNG 1mm" and ds.BodyPartExamined == "LUNG"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert "ImagesInAcquisition" not in ds
    with pytest.raises(ValueError):
        write_series(volume, tmp_path / "x", 4, NotAKeyword=1)
    with pytest.raises(ValueError):
        write_series(volume, tmp_path / "y", 4, SOPInstanceUID="1.2.3")
    with pytest.raises(ValueError):  # unsigned storage without an offset cannot hold air
        write_series(volume, tmp_path / "z", 4, PixelRepresentation=0, RescaleIntercept=0)


def test_generate_phantom_passes_overrides(tmp_path: Path) -> None:
    case = generate_phantom(tmp_path, 2, slices=2, matrix=32, normal=True,
                            SeriesInstanceUID="1.2.3.4.5")
    assert case.series_instance_uid == "1.2.3.4.5" and case.label == 0
    assert all(ds.SeriesInstanceUID == "1.2.3.4.5" for ds in _read_series(case.series_dir))
    assert json.loads((tmp_path / "ground_truth.json").read_text())["lesion_voxels"] == 0


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (dicom3tools) is not on PATH; install the Debian package")
@pytest.mark.parametrize("seed,storage", [(3, "unsigned-12"), (8, "signed-1024"), (13, None)])
def test_dciodvfy_accepts_the_slices(tmp_path: Path, seed: int, storage: str | None) -> None:
    volume = generate_volume(seed, slices=5, matrix=64)
    write_series(volume, tmp_path, seed, **STORAGE.get(storage or "", {}))
    for name in ("CT000001.dcm", "CT000004.dcm"):
        run = subprocess.run(["dciodvfy", "-new", str(tmp_path / name)], capture_output=True,
                             text=True, check=False)
        report = run.stdout + run.stderr
        assert not [line for line in report.splitlines() if "Error" in line], report
        assert run.returncode == 0, report
