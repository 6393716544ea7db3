"""How an analysis holds its data (issue 17's memory goal; the peak RSS itself is measured
by bench/memory.py): the volume once as int16 HU, the two masks in one array the SEG takes
as it is, 16-bit labels where they suffice, the whole-volume mask work on the work grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from dcn_node.config import ResultsSettings
from dcn_node.inference.anatomy import label_3d
from dcn_node.inference.engine import Engine
from dcn_node.inference.transforms import GridGeometry
from dcn_node.results.seg import _stack_in_source_order
from dcn_node.volume import load_dicom_folder, load_series
from dcn_train.phantom import generate_phantom
from tests.dicom_factory import ct_series


def test_volume_is_int16_hu_rounded_from_the_rescale(tmp_path: Path) -> None:
    series = ct_series(3)
    for ds in series:
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024.25
    paths = []
    for index, ds in enumerate(series):
        paths.append(tmp_path / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    volume = load_series(paths)
    assert volume.hu.dtype == np.int16
    stored = np.stack([pydicom.dcmread(p).pixel_array for p in paths]).astype(np.float64)
    expected = np.rint(stored * 0.5 - 1024.25)  # ordered by z like the factory's series
    np.testing.assert_array_equal(volume.hu, expected)


def test_labels_are_16_bit_until_there_are_too_many_parts() -> None:
    few = np.zeros((2, 40, 40), bool)
    few[:, ::4, ::4] = True
    labels, count = label_3d(few)
    assert labels.dtype == np.uint16 and count == 100
    many = np.zeros((1, 600, 600), bool)
    many[:, ::2, ::2] = True  # 90,000 single-pixel parts: more than 16 bits can number
    labels, count = label_3d(many)
    assert labels.dtype == np.int32 and count == 90_000 and labels.max() == 90_000


def test_work_grid_is_the_field_of_view_at_network_resolution() -> None:
    # 512 pixels of 0.7 mm (358 mm) on a 256 grid: the mask work runs on 256 x 256.
    assert GridGeometry.of((512, 512), 0.7, 256).work_shape == (256, 256)
    # A small image is never enlarged for it, a cropped one never shrunk.
    assert GridGeometry.of((128, 128), 2.8, 256).work_shape == (128, 128)
    assert GridGeometry.of((201, 204), 0.977, 256).work_shape == (201, 204)
    assert GridGeometry.of((512, 400), 0.5, 256).work_shape == (256, 200)


def test_masks_are_one_array_and_the_seg_takes_it_without_a_copy(
        untrained_models: Path, tmp_path: Path) -> None:
    case = generate_phantom(tmp_path / "case", seed=12, slices=16, matrix=128)
    volume = load_dicom_folder(case.series_dir)
    result = Engine(untrained_models, "lite", "cpu").analyze(volume)
    stack = result.segment_stack()
    assert stack is not None and stack.shape == (*volume.hu.shape, 2)
    assert np.shares_memory(stack, result.lesion) and np.shares_memory(stack, result.lung)
    masks = [result.lesion, result.lung]
    stacked, _ = _stack_in_source_order(volume, masks, stack)
    assert np.shares_memory(stacked, stack)
    # Masks made elsewhere (two arrays) are stacked, in the same layout.
    copied, _ = _stack_in_source_order(volume, [m.copy() for m in masks], None)
    assert not np.shares_memory(copied, stack)
    np.testing.assert_array_equal(copied, stacked)
    assert ResultsSettings().seg.include_lung


def test_segment_stack_is_none_for_separate_masks() -> None:
    from dcn_node.inference.engine import AnalysisResult

    lesion = np.zeros((2, 4, 4), bool)
    result = AnalysisResult(lung=lesion.copy(), lesion=lesion, slice_probabilities=np.zeros(2),
                            attention=[], probability=0.1, positive=False,
                            model_version="test-model", seconds=0.0)
    assert result.segment_stack() is None


def test_low_memory_overlap_check_agrees_with_highdicom() -> None:
    import highdicom as hd
    from highdicom.seg import SegmentationTypeValues

    from dcn_node.results.seg import _LowMemorySegmentation

    numbers = np.array([1, 2])
    apart = np.zeros((3, 8, 8, 2), bool)
    apart[0, :2, :, 0] = True
    apart[1, 4:, :, 1] = True
    overlapping = apart.copy()
    overlapping[2, 3, 3, :] = True
    for masks in (apart, overlapping, np.zeros((3, 8, 8, 2), bool)):
        ours = _LowMemorySegmentation._check_and_cast_pixel_array(
            masks, numbers, SegmentationTypeValues.BINARY, np.uint8)
        stock = hd.seg.Segmentation._check_and_cast_pixel_array(
            masks, numbers, SegmentationTypeValues.BINARY, np.uint8)
        assert ours[1] == stock[1]
        np.testing.assert_array_equal(ours[0], stock[0])


def test_another_highdicom_release_falls_back_to_its_own_class(monkeypatch, caplog) -> None:
    import highdicom as hd

    from dcn_node.results import seg

    seg._segmentation_class.cache_clear()
    monkeypatch.setattr(hd, "__version__", "9.9.9")
    try:
        with caplog.at_level("WARNING", logger="dcn_node.results.seg"):
            assert seg._segmentation_class() is hd.seg.Segmentation
            assert seg._segmentation_class() is hd.seg.Segmentation
        assert len([r for r in caplog.records if "9.9.9" in r.getMessage()]) == 1
    finally:
        seg._segmentation_class.cache_clear()
    monkeypatch.undo()
    assert seg._segmentation_class() is seg._LowMemorySegmentation


def test_lesion_regions_are_the_largest_count_of_many(tmp_path: Path) -> None:
    """Labelling inside the lesions' bounding box still returns only the ``count`` largest."""
    from dcn_node.results.regions import lesion_regions
    from tests.dicom_factory import write_files

    volume = load_series(write_files(ct_series(4), tmp_path / "ct"))  # 4 x 32 x 32
    lesion = np.zeros(volume.hu.shape, bool)
    for k in range(7):  # seven separate lesions, 2 pixels apart, k + 1 rows high
        lesion[1, 4 * k:4 * k + 2, 2:3 + k] = True
    regions = lesion_regions(volume, lesion, np.ones_like(lesion), 5)
    assert len(regions) == 5
    assert [r.voxels for r in regions] == [14, 12, 10, 8, 6]
