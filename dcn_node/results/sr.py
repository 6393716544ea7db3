"""The measurement report: a Comprehensive 3D SR with a TID 1500 Measurement Report.

The observer is the algorithm (a device observer context with the Device UID of the model
version). The report holds, in the order a reader needs them:

1. *COVID-19 assessment* (TID 1501): the patient-level probability (0-1, UCUM "1") and the
   finding at the configured threshold as a qualitative evaluation (COVID-19 = Present or
   Absent), with the algorithm and its threshold.
2. *COVID-19 lesions* (TID 1411): lesion volume (ml), percentage of the lung volume with
   lesions, number of slices with lesions, tied to SEG segment 1 and its source images.
3. *Lungs* (TID 1411): lung volume (ml), tied to SEG segment 2.

Without a SEG (or without its lung segment) the affected groups are TID 1501 groups with the
same measurements and no segment reference. Source images are named as the CT series
(``sr.source_references: series``, one line in a text viewer) or instance by instance.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DS

from dcn_node.config import ResultsSettings
from dcn_node.results import common
from dcn_node.results.seg import LESION_SEGMENT, LUNG_SEGMENT
from dcn_node.volume import Volume

if TYPE_CHECKING:
    from dcn_node.inference.engine import AnalysisResult

LOGGER = logging.getLogger(__name__)


def _algorithm(result: AnalysisResult, settings: ResultsSettings, *, full: bool = True
               ) -> hd.sr.AlgorithmIdentification:
    """TID 4019; ``full`` adds the threshold, family and manufacturer (said once)."""
    if not full:
        return hd.sr.AlgorithmIdentification(name=common.ALGORITHM_NAME,
                                              version=result.model_version)
    return hd.sr.AlgorithmIdentification(
        name=common.ALGORITHM_NAME,
        version=result.model_version,
        parameters=[f"finding threshold {common.decision_threshold(settings, result):g}"],
        family=common.ARTIFICIAL_INTELLIGENCE,
        manufacturer=settings.manufacturer,
    )


def _observation_context(settings: ResultsSettings, model_version: str
                         ) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=common.device_uid(settings, model_version),
        name=common.ALGORITHM_NAME,
        manufacturer_name=settings.manufacturer,
        model_name=settings.manufacturer_model_name,
        serial_number=settings.device_serial_number,
    )
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _source_images_for_segmentation(volume: Volume) -> list[hd.sr.SourceImageForSegmentation]:
    multiframe = len(set(volume.sop_instance_uids)) < len(volume.sop_instance_uids)
    return [
        hd.sr.SourceImageForSegmentation(
            ds.SOPClassUID, ds.SOPInstanceUID,
            referenced_frame_numbers=sorted(volume.frame_numbers) if multiframe else None)
        for ds in common.unique_sources(volume)
    ]


def _source_images_for_group(volume: Volume) -> list[hd.sr.SourceImageForMeasurementGroup]:
    multiframe = len(set(volume.sop_instance_uids)) < len(volume.sop_instance_uids)
    return [
        hd.sr.SourceImageForMeasurementGroup(
            ds.SOPClassUID, ds.SOPInstanceUID,
            referenced_frame_numbers=sorted(volume.frame_numbers) if multiframe else None)
        for ds in common.unique_sources(volume)
    ]


def _group(volume: Volume, settings: ResultsSettings, result: AnalysisResult,
           seg: Dataset | None, segment: int | None, name: str, tracking_kind: str,
           **content: object) -> (hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                                  | hd.sr.MeasurementsAndQualitativeEvaluations):
    """One measurement group: volumetric (tied to a SEG segment) when there is one."""
    tracking = hd.sr.TrackingIdentifier(
        uid=common.result_uid(settings, volume, result.model_version, "tracking",
                              tracking_kind),
        identifier=name)
    by_images = settings.sr.source_references == "images"
    if seg is not None and segment is not None:
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment,
            source_images=_source_images_for_segmentation(volume) if by_images else None,
            source_series=None if by_images else hd.sr.SourceSeriesForSegmentation(
                volume.series_instance_uid),
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_segment=referenced,
            algorithm_id=_algorithm(result, settings, full=False),
            **content)  # type: ignore[arg-type]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=_algorithm(result, settings, full=tracking_kind == "assessment"),
        source_images=_source_images_for_group(volume) if by_images else None,
        **content)  # type: ignore[arg-type]


def _count(name: hd.sr.CodedConcept, value: int, unit: hd.sr.CodedConcept
           ) -> hd.sr.Measurement:
    """A whole-number measurement written as ``16``, not pydicom's ``16.0``."""
    measurement = hd.sr.Measurement(name=name, value=value, unit=unit)
    measurement[0].MeasuredValueSequence[0].NumericValue = DS(str(value))
    return measurement


def measurements(volume: Volume, result: AnalysisResult) -> dict[str, float | int]:
    """The reported numbers: volumes in ml, involvement in percent, slice count."""
    voxel_ml = volume.voxel_volume_ml
    lesion_ml = float(np.count_nonzero(result.lesion)) * voxel_ml
    lung_ml = float(np.count_nonzero(result.lung)) * voxel_ml
    slices = int(np.count_nonzero(result.lesion.reshape(result.lesion.shape[0], -1).any(1)))
    return {
        "probability": round(float(result.probability), 4),
        "lesion_ml": round(lesion_ml, 2),
        "lung_ml": round(lung_ml, 2),
        "involvement_percent": round(100.0 * lesion_ml / lung_ml, 3) if lung_ml else 0.0,
        "slices_with_lesions": slices,
    }


def build_report(volume: Volume, result: AnalysisResult, settings: ResultsSettings,
                 seg: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``result``; ``seg`` is the SEG its volumes are tied to."""
    version = result.model_version
    values = measurements(volume, result)
    lung_site = [hd.sr.FindingSite(common.LUNG)]
    if result.assessable:
        present = values["probability"] >= common.decision_threshold(settings, result)
        probability = [hd.sr.Measurement(name=common.PROBABILITY, value=values["probability"],
                                         unit=common.UNIT_ONE)]
        evaluations = [hd.sr.QualitativeEvaluation(
            name=common.COVID19, value=common.PRESENT if present else common.ABSENT)]
    else:  # the quality gate: no probability, the finding undetermined, and why
        reason = result.quality.reason.value  # type: ignore[union-attr]
        probability = []
        evaluations = [
            hd.sr.QualitativeEvaluation(name=common.COVID19, value=common.UNDETERMINED),
            hd.sr.QualitativeEvaluation(name=common.NOT_ASSESSABLE_REASON,
                                        value=common.NOT_ASSESSABLE_REASONS[reason]),
        ]
    assessment = _group(
        volume, settings, result, None, None, "COVID-19 assessment", "assessment",
        finding_type=common.COVID19, finding_sites=lung_site,
        measurements=probability or None, qualitative_evaluations=evaluations,
    )
    lesions = _group(
        volume, settings, result, seg, LESION_SEGMENT, "COVID-19 lesions", "lesion",
        finding_type=common.LESION, finding_category=common.MORPHOLOGICALLY_ABNORMAL,
        finding_sites=lung_site,
        measurements=[
            hd.sr.Measurement(name=common.VOLUME, value=values["lesion_ml"],
                              unit=common.UNIT_ML),
            hd.sr.Measurement(name=common.LUNG_INVOLVEMENT,
                              value=values["involvement_percent"], unit=common.UNIT_PERCENT),
            _count(common.SLICES_WITH_LESIONS, int(values["slices_with_lesions"]),
                   common.UNIT_SLICES),
        ],
    )
    lung_in_seg = seg is not None and settings.seg.include_lung
    lungs = _group(
        volume, settings, result, seg if lung_in_seg else None,
        LUNG_SEGMENT if lung_in_seg else None, "Lungs", "lung",
        finding_type=common.LUNG, finding_category=common.ANATOMICAL_STRUCTURE,
        measurements=[hd.sr.Measurement(name=common.VOLUME, value=values["lung_ml"],
                                        unit=common.UNIT_ML)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(settings, version),
        procedure_reported=common.CT_CHEST,
        imaging_measurements=[assessment, lesions, lungs],
    )
    header = common.source_header(volume)
    evidence = [header, *common.unique_sources(volume)]
    if seg is not None:
        evidence.append(seg)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=common.result_uid(settings, volume, version, "sr-series"),
        series_number=settings.sr.series_number,
        sop_instance_uid=common.result_uid(settings, volume, version, "sr"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        performed_procedure_codes=[common.CT_CHEST],
        contributing_equipment=common.contributing_equipment(settings, version),
        series_description=settings.sr.series_description,
        coding_schemes=common.coding_schemes(),
        **common.equipment_kwargs(settings, version, volume),  # type: ignore[arg-type]
    )
    common.finish(sr, settings, volume)
    LOGGER.info("SR %s for series %s: %s, lesions %.1f ml", sr.SOPInstanceUID,
                volume.series_instance_uid,
                f"probability {values['probability']:.3f}" if result.assessable
                else "not assessable", values["lesion_ml"])
    return sr
