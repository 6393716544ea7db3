"""The DICOM Segmentation: lesions (segment 1) and lungs (segment 2, optional), BINARY.

Every source CT instance is referenced and every slice has a frame for every segment
(``omit_empty_frames=False``: empty-frame omission is linked to misplaced overlays in some
viewers, and an empty lesion result is then still a complete, valid object).

Memory: highdicom takes the two masks as one (slices, rows, columns, segments) bool array
in source order: the engine's own (lesion and lung masks are views of one such array), or
a stacked copy where the order differs; highdicom then packs one frame at a time.
highdicom's own overlap check sums that array into a 64-bit integer volume (8 bytes per
voxel, ~2 GB for 1,000 slices of 512 x 512), so :class:`_LowMemorySegmentation` does the
same check slice by slice.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from highdicom.seg import SegmentationTypeValues, SegmentsOverlapValues

from dcn_node.config import ResultsSettings
from dcn_node.errors import DcnNodeError
from dcn_node.results import common
from dcn_node.volume import Volume

if TYPE_CHECKING:
    from dcn_node.inference.engine import AnalysisResult

LOGGER = logging.getLogger(__name__)

LESION_SEGMENT = 1
LUNG_SEGMENT = 2
#: Recommended display colours (sRGB): lesions orange-red, lungs light blue.
LESION_RGB = (255, 80, 40)
LUNG_RGB = (90, 170, 255)


class ResultEncodingError(DcnNodeError):
    """The analysis cannot be encoded as DICOM objects (inconsistent inputs)."""


#: The highdicom release :class:`_LowMemorySegmentation` was written against (pinned in
#: constraints.txt): it overrides a private classmethod, so on any other release the stock
#: Segmentation is used, with one WARNING (correct, but its overlap check needs 8 bytes a
#: voxel of memory).
HIGHDICOM_VERSION = "0.28.2"


class _LowMemorySegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a slice-by-slice overlap check for stacked bool masks."""

    @classmethod
    def _check_and_cast_pixel_array(
        cls, pixel_array: np.ndarray | hd.Volume, segment_numbers: np.ndarray,
        segmentation_type: SegmentationTypeValues, dtype: type,
    ) -> tuple[np.ndarray | hd.Volume, SegmentsOverlapValues]:
        if (isinstance(pixel_array, np.ndarray) and pixel_array.ndim == 4
                and pixel_array.dtype == np.bool_
                and segmentation_type == SegmentationTypeValues.BINARY
                and pixel_array.shape[-1] == len(segment_numbers)):
            overlap = pixel_array.shape[-1] > 1 and any(
                bool(np.any(np.count_nonzero(plane, axis=-1) > 1)) for plane in pixel_array
            )
            return pixel_array, (SegmentsOverlapValues.YES if overlap
                                 else SegmentsOverlapValues.NO)
        return super()._check_and_cast_pixel_array(pixel_array, segment_numbers,
                                                   segmentation_type, dtype)


@functools.cache
def _segmentation_class() -> type[hd.seg.Segmentation]:
    if hd.__version__ == HIGHDICOM_VERSION:
        return _LowMemorySegmentation
    LOGGER.warning("highdicom %s is not %s (constraints.txt): SEGs are built by highdicom's "
                   "own Segmentation, whose overlap check needs 8 bytes a voxel of memory",
                   hd.__version__, HIGHDICOM_VERSION)
    return hd.seg.Segmentation


def segment_descriptions(settings: ResultsSettings, model_version: str, volume: Volume
                         ) -> list[hd.seg.SegmentDescription]:
    """Segment 1 lesions (Morphologically Abnormal Structure / Lesion, in the lung),
    segment 2 lungs (Anatomical Structure / Lung) when ``seg.include_lung``."""
    algorithm = common.algorithm_identification(model_version)
    described = [hd.seg.SegmentDescription(
        segment_number=LESION_SEGMENT,
        segment_label="COVID-19 lesions",
        segmented_property_category=common.MORPHOLOGICALLY_ABNORMAL,
        segmented_property_type=common.LESION,
        anatomic_regions=[common.LUNG],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=common.result_uid(settings, volume, model_version, "tracking", "lesion"),
        tracking_id="COVID-19 lesions",
        display_color=hd.color.CIELabColor.from_rgb(*LESION_RGB),
    )]
    if settings.seg.include_lung:
        described.append(hd.seg.SegmentDescription(
            segment_number=LUNG_SEGMENT,
            segment_label="Lungs",
            segmented_property_category=common.ANATOMICAL_STRUCTURE,
            segmented_property_type=common.LUNG,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=common.result_uid(settings, volume, model_version, "tracking",
                                           "lung"),
            tracking_id="Lungs",
            display_color=hd.color.CIELabColor.from_rgb(*LUNG_RGB),
        ))
    return described


def _stack_in_source_order(volume: Volume, masks: list[np.ndarray],
                           combined: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """The masks as one (frames, rows, columns, segments) bool array in the order highdicom
    pairs with the source images, and those source images. ``combined``: the masks already
    stacked in volume order (:meth:`AnalysisResult.segment_stack`), used as it is when the
    source order is the volume's."""
    slices, rows, columns = masks[0].shape
    sources = common.unique_sources(volume)
    if len(sources) == slices:
        order = np.arange(slices)  # one instance per slice, already in volume order
    elif len(sources) == 1:
        # One multi-frame instance: frame f of the SEG pairs with source frame f.
        order = np.argsort(np.asarray(volume.frame_numbers))
        if sorted(volume.frame_numbers) != list(range(1, slices + 1)):
            raise ResultEncodingError("multi-frame source: frames are not 1..N")
    else:
        raise ResultEncodingError(
            f"{len(sources)} multi-frame instances in one series are not supported")
    if combined is not None and np.array_equal(order, np.arange(slices)):
        return combined[..., :len(masks)], sources  # the engine's own array, not copied
    stacked = np.empty((slices, rows, columns, len(masks)), dtype=bool)
    for position, index in enumerate(order):
        for segment, mask in enumerate(masks):
            stacked[position, :, :, segment] = mask[index]
    return stacked, sources


def build_segmentation(volume: Volume, result: AnalysisResult, settings: ResultsSettings
                       ) -> hd.seg.Segmentation:
    """Encode the lesion (and lung) masks of ``result`` as a BINARY SEG in the source study.

    Raises
    ------
    ResultEncodingError
        If the masks do not match the volume or the source layout is unsupported.
    """
    expected = volume.hu.shape
    if result.lesion.shape != expected or result.lung.shape != expected:
        raise ResultEncodingError(
            f"mask shapes {result.lesion.shape}/{result.lung.shape} differ from the volume "
            f"{expected}")
    version = result.model_version
    masks = [result.lesion.astype(bool, copy=False)]
    if settings.seg.include_lung:
        masks.append(result.lung.astype(bool, copy=False))
    stacked, sources = _stack_in_source_order(volume, masks, result.segment_stack())
    header = common.source_header(volume)
    sources = [header, *sources[1:]] if len(sources) > 1 else [header]
    seg = _segmentation_class()(
        source_images=sources,
        pixel_array=stacked,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(settings, version, volume),
        series_instance_uid=common.result_uid(settings, volume, version, "seg-series"),
        series_number=settings.seg.series_number,
        sop_instance_uid=common.result_uid(settings, volume, version, "seg"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        content_description=common.NOT_FOR_DIAGNOSIS,
        content_label="DCN_LESIONS",
        omit_empty_frames=False,
        contributing_equipment=common.contributing_equipment(settings, version),
        series_description=settings.seg.series_description,
        coding_schemes=common.coding_schemes(),
        **common.equipment_kwargs(settings, version, volume),  # type: ignore[arg-type]
    )
    del stacked
    common.finish(seg, settings, volume)
    LOGGER.info("SEG %s for series %s: %d frames, %d lesion voxels",
                seg.SOPInstanceUID, volume.series_instance_uid, int(seg.NumberOfFrames),
                int(np.count_nonzero(result.lesion)))
    return seg
