"""DICOM slices -> a HU volume ordered along the slice normal.

Slices are sorted by projecting ImagePositionPatient on the normal of
ImageOrientationPatient (never by InstanceNumber), pixel data are decoded with pydicom's
handlers (pylibjpeg for the lossless compressed syntaxes), the rescale is applied and
padding outside the reconstruction circle (PixelPaddingValue) becomes air (-1024 HU).

The volume is held once, as int16 HU (2 bytes a voxel: a 1,000-slice 512 x 512 series is
0.5 GB): CT values are integers from -1024 (-3024 with padding) to a few thousand, and a
fractional rescale loses less than half a HU to rounding.

Why not highdicom's ``get_volume_from_series`` (0.28): it refuses a series whose slices are
not regularly spaced (one missing or doubled slice, which a PACS does send, is analysed
here with the median spacing), and it decodes the whole series
into one float array before any cast (8 bytes a voxel by default).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from dcn_node.errors import InvalidInstanceError
from dcn_node.header import first_item, header_from_dataset
from dcn_node.ops.memory import trim

AIR_HU = -1024
_EMPTY = np.empty((0, 0), np.int16)
_INT16 = np.iinfo(np.int16)


@dataclass
class Volume:
    """A CT series as one array, slice 0 the lowest position along the slice normal."""

    #: HU values, int16, shape (slices, rows, columns).
    hu: np.ndarray
    #: SOP Instance UID of each slice (a multi-frame instance repeats its UID).
    sop_instance_uids: list[str]
    #: Frame number (1-based) of each slice within its instance; 1 for single-frame.
    frame_numbers: list[int]
    #: (row spacing, column spacing) in mm.
    pixel_spacing: tuple[float, float]
    #: Position of each slice along the normal, mm, ascending.
    slice_offsets: np.ndarray
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    #: One header dataset per slice (no pixel data), for the result objects.
    source_datasets: list[Dataset] = field(default_factory=list, repr=False)

    @property
    def slice_spacing_mm(self) -> float:
        if len(self.slice_offsets) < 2:
            return 1.0
        return float(np.median(np.diff(self.slice_offsets)))

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing_mm / 1000.0


def _to_hu(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored values -> HU with pydicom's modality LUT (Rescale Slope/Intercept or a
    Modality LUT Sequence); Enhanced CT keeps its rescale in the functional groups."""
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    transform = first_item(shared, "PixelValueTransformationSequence") if shared else None
    if transform is not None:
        hu = pixels * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    else:
        hu = apply_modality_lut(pixels, ds)
    hu = np.clip(np.rint(hu), _INT16.min, _INT16.max).astype(np.int16)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        hu[pixels == padding] = AIR_HU
    return hu


def load_series(files: Iterable[Path | str]) -> Volume:
    """Read, order and decode one series.

    Raises
    ------
    InvalidInstanceError
        If the files are not one series of images with positions, or cannot be decoded.
    """
    slices: list[tuple[float, str, int, np.ndarray, Dataset]] = []
    spacing: tuple[float, float] | None = None
    normal: np.ndarray | None = None
    series_uids = set()
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            header = header_from_dataset(ds)
            pixels = ds.pixel_array
        except InvalidInstanceError:
            raise
        except Exception as exc:
            raise InvalidInstanceError(
                f"{Path(path).name}: cannot decode: {type(exc).__name__}: {exc}",
                "undecodable",
            ) from exc
        if not header.positions or header.image_orientation is None:
            raise InvalidInstanceError(f"{header.sop_instance_uid}: no slice position",
                                       "missing_position")
        series_uids.add(header.series_instance_uid)
        orientation = np.asarray(header.image_orientation, dtype=float)
        if normal is None:
            normal = np.cross(orientation[:3], orientation[3:])
            spacing = header.pixel_spacing or (1.0, 1.0)
        frames = pixels if pixels.ndim == 3 else pixels[None]
        hu = _to_hu(ds, frames)
        del ds.PixelData  # keep headers only
        for frame_index, (position, frame) in enumerate(zip(header.positions, hu, strict=True)):
            offset = float(np.dot(position, normal))
            slices.append((offset, header.sop_instance_uid, frame_index + 1, frame, ds))
    if not slices:
        raise InvalidInstanceError("no image slices")
    if len(series_uids) > 1:
        raise InvalidInstanceError(f"{len(series_uids)} series mixed in one volume")
    slices.sort(key=lambda item: item[0])
    first = slices[0][4]
    # Copy slice by slice into one array, dropping each slice as it is copied: the
    # series is held whole once (plus one instance), not twice as np.stack would.
    hu = np.empty((len(slices), *slices[0][3].shape), np.int16)
    for index, item in enumerate(slices):
        if item[3].shape != hu.shape[1:]:
            raise InvalidInstanceError(f"{item[1]}: matrix {item[3].shape} differs from "
                                       f"{hu.shape[1:]}", "mixed_geometry")
        hu[index] = item[3]
        slices[index] = (item[0], item[1], item[2], _EMPTY, item[4])
    trim()  # the slices' pixels were freed between the headers kept: give the pages back
    return Volume(
        hu=hu,
        sop_instance_uids=[s[1] for s in slices],
        frame_numbers=[s[2] for s in slices],
        pixel_spacing=spacing or (1.0, 1.0),
        slice_offsets=np.asarray([s[0] for s in slices]),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        source_datasets=[s[4] for s in slices],
    )


def load_dicom_folder(folder: Path | str) -> Volume:
    """Load the one series in ``folder`` (files with any name, searched recursively)."""
    files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and _is_dicom(p)]
    if not files:
        raise InvalidInstanceError(f"no DICOM files in {folder}")
    return load_series(files)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"
