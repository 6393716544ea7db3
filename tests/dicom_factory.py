"""Small hand-made CT series for receiver and assembly tests.

The phantom generator (dcn_train.phantom) makes realistic chest CTs; these are tiny
(32x32 by default) so that geometry edge cases (gaps, localizers, two acquisitions) are
cheap to build and obvious to read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(
    study_instance_uid: str,
    series_instance_uid: str,
    z: float,
    *,
    index: int = 0,
    rows: int = 32,
    columns: int = 32,
    pixel_spacing: float = 0.7,
    slice_thickness: float = 5.0,
    frame_of_reference_uid: str = "1.2.826.0.1.3680043.10.1.1",
    images_in_acquisition: int | None = None,
    **overrides: object,
) -> Dataset:
    """One axial CT slice at ``z`` mm (head-first supine, identity orientation)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PatientName = "TEST^RECEIVER"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20261129"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.Manufacturer = "dcn-node tests"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "CHEST 5mm"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.ImagePositionPatient = [-0.5 * columns * pixel_spacing, -0.5 * rows * pixel_spacing, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SliceThickness = slice_thickness
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    # A deterministic ramp per slice, so decoded pixels can be compared exactly.
    pixels = (np.arange(rows * columns, dtype=np.int32).reshape(rows, columns) % 2000) - 1000
    ds.PixelData = (pixels + index).astype(np.int16).tobytes()
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    # pynetdicom picks the presentation context from the file meta transfer syntax.
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def ct_series(
    count: int,
    *,
    spacing_mm: float = 5.0,
    z0: float = -150.0,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    skip: Iterable[int] = (),
    announce: bool = False,
    **overrides: object,
) -> list[Dataset]:
    """``count`` contiguous axial slices; indices in ``skip`` are left out (a gap)."""
    study = study_instance_uid or generate_uid()
    series = series_instance_uid or generate_uid()
    skipped = set(skip)
    return [
        ct_slice(
            study,
            series,
            z0 + i * spacing_mm,
            index=i,
            slice_thickness=spacing_mm,
            images_in_acquisition=count if announce else None,
            **overrides,
        )
        for i in range(count)
        if i not in skipped
    ]


def write_files(datasets: Iterable[Dataset], folder: Path) -> list[Path]:
    """Write datasets as DICOM files (explicit VR little endian) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(datasets, start=1):
        path = folder / f"IM{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
