"""Training cases: a CT volume with lung mask, lesion mask and label, cached at the model's
input size.

Sources: generated phantoms (:func:`phantom_cases`), or a manifest CSV of real cases
(:func:`manifest_cases`) with columns ``image,lung_mask,lesion_mask,label``: image is a DICOM
folder, a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) file; the masks are optional files of the
same kinds (NIfTI/NRRD) or empty; label is 1 (COVID-19) or 0. Without a lung mask the case
trains only the DCN (the lung comes from the trained U-Net); without a lesion mask the
case's slices count as lesion-free when label is 0 and are skipped by the segmentation loss
when label is 1.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcn_node.errors import DcnNodeError
from dcn_node.inference.transforms import to_network_grid, window

LOGGER = logging.getLogger(__name__)


@dataclass
class Case:
    """One cached case at the model input size (arrays are (slices, size, size))."""

    name: str
    image: np.ndarray  # float16, windowed to [0, 1]
    lung: np.ndarray | None  # bool
    lesion: np.ndarray | None  # bool
    label: int

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {"image": self.image, "label": np.array(self.label)}
        if self.lung is not None:
            arrays["lung"] = self.lung
        if self.lesion is not None:
            arrays["lesion"] = self.lesion
        np.savez(path, allow_pickle=False, **arrays)  # numbers and bools only: no pickles

    @classmethod
    def load(cls, path: Path) -> Case:
        with np.load(path) as data:
            return cls(
                name=path.stem,
                image=data["image"],
                lung=data["lung"] if "lung" in data else None,
                lesion=data["lesion"] if "lesion" in data else None,
                label=int(data["label"]),
            )


def make_case(
    name: str, hu: np.ndarray, lung: np.ndarray | None, lesion: np.ndarray | None, label: int,
    size: int, *, pixel_spacing_mm: float | None = None,
) -> Case:
    """Window a HU volume (slices, rows, columns) and bring it and its masks onto the
    network grid (:func:`~dcn_node.inference.transforms.to_network_grid`; without a pixel
    spacing, a plain resize to ``size``)."""
    grid = to_network_grid(torch.from_numpy(window(hu)), pixel_spacing_mm, size).images
    image = grid.numpy().astype(np.float16)

    def _mask(mask: np.ndarray | None) -> np.ndarray | None:
        if mask is None:
            return None
        if mask.shape != hu.shape:
            raise DcnNodeError(f"{name}: mask shape {mask.shape} differs from image {hu.shape}")
        return to_network_grid(torch.from_numpy(mask.astype(bool)), pixel_spacing_mm, size,
                               masks=True).images.numpy()

    return Case(name, image, _mask(lung), _mask(lesion), int(label))


def phantom_cases(
    cache_dir: Path, seeds: list[int], size: int, thicknesses: tuple[float, ...] = (5.0, 1.0),
    normal_every: int = 2,
) -> list[Path]:
    """Generate (or reuse) phantom cases: every ``normal_every``-th seed is normal, slice
    thickness cycles through ``thicknesses``. Returns the cached case files."""
    from dcn_train.phantom import GENERATOR_VERSION, generate_volume

    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, seed in enumerate(seeds):
        normal = index % normal_every == 1
        thickness = thicknesses[(index // normal_every) % len(thicknesses)]
        kind = "n" if normal else "p"
        # The generator version is in the name: a changed generator never reuses old cases.
        path = cache_dir / f"phantom-v{GENERATOR_VERSION}-{seed}-{kind}-{thickness:g}mm-{size}.npz"
        if not path.exists():
            volume = generate_volume(seed, thickness_mm=thickness, normal=normal)
            case = make_case(path.stem, volume.hu, volume.lung, volume.lesion, volume.label,
                             size, pixel_spacing_mm=volume.pixel_spacing_mm)
            case.save(path)
            LOGGER.info("phantom seed %d: %d slices, label %d", seed, len(case.image),
                        case.label)
        paths.append(path)
    return paths


def read_volume(path: Path) -> tuple[np.ndarray, float, float]:
    """A NIfTI or NRRD volume in the orientation DICOM inference uses, with its spacing.

    The file's affine (NIfTI sform/qform, NRRD space directions) is honoured: the volume is
    reoriented to LPS (SimpleITK's ``DICOMOrient``), so the array (slices, rows, columns)
    runs inferior to superior, anterior to posterior and patient right to left, as a DICOM
    series is read. Returns (array, in-plane pixel spacing mm, slice spacing mm).
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz", ".nrrd")):
        raise DcnNodeError(f"{path}: not a NIfTI or NRRD file")
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise DcnNodeError("reading NIfTI/NRRD needs SimpleITK: pip install -e .[train]"
                           ) from exc
    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    spacing_x, spacing_y, spacing_z = image.GetSpacing()
    if abs(spacing_x - spacing_y) > 0.01 * spacing_x:
        LOGGER.warning("%s: non-square pixels %.3f x %.3f mm; using the column spacing",
                       path, spacing_x, spacing_y)
    return np.ascontiguousarray(sitk.GetArrayFromImage(image)), float(spacing_x), \
        float(spacing_z)


def manifest_cases(manifest: Path, cache_dir: Path, size: int) -> list[Path]:
    """Cache the cases listed in a manifest CSV (paths relative to the manifest)."""
    from dcn_node.volume import load_dicom_folder

    cache_dir.mkdir(parents=True, exist_ok=True)
    base = manifest.parent
    paths = []
    with open(manifest, newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                image_path = base / row["image"]
                label = int(row["label"])
            except (KeyError, ValueError) as exc:
                raise DcnNodeError(
                    f"{manifest}:{row_number}: needs image and label ({exc})"
                ) from None
            path = cache_dir / f"case-{row_number:05d}-{size}.npz"
            if not path.exists():
                if image_path.is_dir():
                    volume = load_dicom_folder(image_path)
                    hu, spacing = volume.hu, float(volume.pixel_spacing[1])
                else:
                    array, spacing, _ = read_volume(image_path)
                    hu = array.astype(np.float32)
                lung = read_volume(base / row["lung_mask"])[0] if row.get("lung_mask") \
                    else None
                lesion = (read_volume(base / row["lesion_mask"])[0] > 0
                          if row.get("lesion_mask") else None)
                if lesion is None and label == 0:
                    lesion = np.zeros(hu.shape, dtype=bool)
                make_case(path.stem, hu, lung > 0 if lung is not None else None, lesion,
                          label, size, pixel_spacing_mm=spacing).save(path)
            paths.append(path)
    return paths
