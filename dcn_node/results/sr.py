"""The measurement report: a Comprehensive 3D SR with a TID 1500 Measurement Report.

The observer is the algorithm (a device observer context with the Device UID of the model
version). Every measurement group is a TID 1410 planar ROI group with an image region on a CT
slice: viewers show a measurement where its region lies, and OHIF shows no group without one
(see ``regions``). The report holds, in the order a reader needs them:

1. *COVID-19 assessment*: the patient-level probability (0-1, UCUM "1") and the finding at
   the configured threshold as a qualitative evaluation (COVID-19 = Present or Absent, or
   Undetermined with the reason when the quality gate finds the series not assessable), the
   lesion and lung volumes (ml), the percentage of the lung volume with lesions and the number
   of slices with lesions; its region is the rectangle around the lungs on the slice with the
   largest lesion area.
2. *Lesion 1..n* (the largest 3D connected lesions, ``sr.lesion_regions`` at most): the
   outline on the slice where the lesion is largest, its area and mean attenuation there
   (HU), its volume, and the lung it lies in (left or right).

The voxels themselves are in the SEG, named in the evidence.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dcn_node.config import ResultsSettings
from dcn_node.results import common
from dcn_node.results.regions import LesionRegion, assessment_slice, lesion_regions, lung_rectangle
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
    return hd.sr.ObservationContext(
        observer_device_context=common.device_observer(settings, model_version))


def _region(volume: Volume, index: int, points: np.ndarray) -> hd.sr.ImageRegion:
    """A closed polyline on CT slice ``index`` (its frame, for a multi-frame source)."""
    ds = volume.source_datasets[index]
    multiframe = len(set(volume.sop_instance_uids)) < len(volume.sop_instance_uids)
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            ds.SOPClassUID, volume.sop_instance_uids[index],
            referenced_frame_numbers=[volume.frame_numbers[index]] if multiframe else None))


def _tracking(settings: ResultsSettings, volume: Volume, result: AnalysisResult, name: str,
              kind: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=common.result_uid(settings, volume, result.model_version, "tracking", kind),
        identifier=name)


def _assessment_group(volume: Volume, result: AnalysisResult, settings: ResultsSettings,
                      values: dict[str, float | int]
                      ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    if result.assessable:
        present = values["probability"] >= common.decision_threshold(settings, result)
        numbers = [hd.sr.Measurement(name=common.PROBABILITY, value=values["probability"],
                                     unit=common.UNIT_ONE)]
        evaluations = [hd.sr.QualitativeEvaluation(
            name=common.COVID19, value=common.PRESENT if present else common.ABSENT)]
    else:  # the quality gate: no probability, the finding undetermined, and why
        reason = result.quality.reason.value  # type: ignore[union-attr]
        numbers = []
        evaluations = [
            hd.sr.QualitativeEvaluation(name=common.COVID19, value=common.UNDETERMINED),
            hd.sr.QualitativeEvaluation(name=common.NOT_ASSESSABLE_REASON,
                                        value=common.NOT_ASSESSABLE_REASONS[reason]),
        ]
    # (concept, value, unit, a lesion figure): withheld lesions give no figures, not zeros.
    figures = [
        (common.LUNG_INVOLVEMENT, values["involvement_percent"], common.UNIT_PERCENT, True),
        (common.LESION_VOLUME, values["lesion_ml"], common.UNIT_ML, True),
        (common.LUNG_VOLUME, values["lung_ml"], common.UNIT_ML, False),
        (common.SLICES_WITH_LESIONS, int(values["slices_with_lesions"]), common.UNIT_SLICES,
         True),
    ]
    numbers += [hd.sr.Measurement(name=name, value=value, unit=unit)
                for name, value, unit, of_lesions in figures
                if not (of_lesions and result.lesions_withheld)]
    index = assessment_slice(result.lesion, result.lung)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(settings, volume, result, "COVID-19 assessment",
                                      "assessment"),
        referenced_region=_region(volume, index, lung_rectangle(result.lung, index)),
        finding_type=common.COVID19, finding_sites=[hd.sr.FindingSite(common.LUNG)],
        algorithm_id=_algorithm(result, settings),
        measurements=numbers, qualitative_evaluations=evaluations,
    )


def _lesion_group(volume: Volume, result: AnalysisResult, settings: ResultsSettings,
                  number: int, region: LesionRegion
                  ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    site = common.LEFT_LUNG if region.side == "left" else common.RIGHT_LUNG
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(settings, volume, result, f"Lesion {number}",
                                      f"lesion-{number}"),
        referenced_region=_region(volume, region.slice_index, region.outline),
        finding_type=common.LESION, finding_category=common.MORPHOLOGICALLY_ABNORMAL,
        finding_sites=[hd.sr.FindingSite(site)],
        algorithm_id=_algorithm(result, settings, full=False),
        measurements=[
            hd.sr.Measurement(name=common.AREA, value=round(region.area_mm2, 1),
                              unit=common.UNIT_MM2),
            hd.sr.Measurement(name=common.ATTENUATION, value=round(region.mean_hu, 1),
                              unit=common.UNIT_HU, derivation=common.MEAN),
            hd.sr.Measurement(name=common.VOLUME,
                              value=round(region.voxels * volume.voxel_volume_ml, 2),
                              unit=common.UNIT_ML),
        ],
    )


def build_report(volume: Volume, result: AnalysisResult, settings: ResultsSettings,
                 seg: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``result``; ``seg``, the SEG of the same result, is named in
    the evidence."""
    version = result.model_version
    values = common.measurements(volume, result)
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
        _assessment_group(volume, result, settings, values)]
    regions = lesion_regions(volume, result.lesion, result.lung, settings.sr.lesion_regions)
    groups += [_lesion_group(volume, result, settings, number, region)
               for number, region in enumerate(regions, start=1)]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(settings, version),
        procedure_reported=common.CT_CHEST,
        imaging_measurements=groups,
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
    LOGGER.info("SR %s for series %s: %s, lesions %.1f ml, %d lesion region(s)",
                sr.SOPInstanceUID, volume.series_instance_uid,
                f"probability {values['probability']:.3f}" if result.assessable
                else "not assessable", values["lesion_ml"], len(regions))
    return sr
