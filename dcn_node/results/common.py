"""What every result object shares: UIDs, the source header, equipment, algorithm, codes.

UIDs are derived, not random: ``generate_uid(entropy_srcs=[...])`` hashes the source series
UID, the model version, the object kind and an index, so analysing the same series with the
same model again gives the same Series and SOP Instance UIDs and a PACS replaces the earlier
objects instead of filing duplicates. A new model version gives new UIDs (a different result).

Codes come from pydicom's dictionaries (DCM, SCT, UCUM) where they exist. The SNOMED CT code
for COVID-19 (840539006, not in pydicom's dictionary) is written with its short synonym as the
meaning. Two concepts have no standard code and use the private scheme ``99DCN`` (declared in
each object's Coding Scheme Identification Sequence): the percentage of the lung volume
involved by lesions, and the number of slices with lesions.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dcn_node import __version__
from dcn_node.config import ResultsSettings
from dcn_node.volume import Volume

LOGGER = logging.getLogger(__name__)

#: Burned into every overlay and written into descriptions.
NOT_FOR_DIAGNOSIS = "AI result - not for diagnostic use"
#: The lung U-Net, the dual-branch DCN with lesion attention and the patient-level mapping.
ALGORITHM_NAME = "DCN COVID-19 CT"
PRIVATE_SCHEME = "99DCN"

# -- codes ---------------------------------------------------------------------------------
#: SNOMED CT 840539006 |Disease caused by severe acute respiratory syndrome coronavirus 2|;
#: the full name is longer than a Code Meaning (LO, 64) may be, so its synonym is used.
COVID19 = hd.sr.CodedConcept("840539006", "SCT", "COVID-19")
LESION = codes.SCT.Lesion  # 52988006
LUNG = codes.SCT.Lung  # 39607008
MORPHOLOGICALLY_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # 91723000
VOLUME = codes.SCT.Volume  # 118565006
#: The same concept, named for what it measures where a viewer lists it without context.
LESION_VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume of lesions")
LUNG_VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume of lungs")
AREA = codes.SCT.Area  # 42798000
#: CT attenuation, the mean over a region (TID 1419 with a derivation).
ATTENUATION = codes.DCM.AttenuationCoefficient  # 112031
MEAN = codes.SCT.Mean  # 373098007
LEFT_LUNG = hd.sr.CodedConcept("44029006", "SCT", "Left lung")
RIGHT_LUNG = hd.sr.CodedConcept("3341006", "SCT", "Right lung")
PROBABILITY = codes.DCM.Probability  # 122157
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
CHEST = codes.SCT.Chest  # 816094009
#: (LN 24627-2 "CT Chest"): the procedure reported.
CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence  # 123110
UNIT_ONE = codes.UCUM.NoUnits  # "1"
UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
UNIT_PERCENT = codes.UCUM.Percent  # "%"
UNIT_MM2 = codes.UCUM.SquareMillimeter  # "mm2"
UNIT_HU = codes.UCUM.HounsfieldUnit  # "[hnsf'U]"
UNIT_SLICES = hd.sr.CodedConcept("{slices}", "UCUM", "slices")
#: IHE AI Results: Contributing Equipment purpose of the algorithm.
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
#: Private codes where no standard one exists (see the module docstring).
LUNG_INVOLVEMENT = hd.sr.CodedConcept("DCN0001", PRIVATE_SCHEME,
                                      "Percentage of lung volume with lesions")
SLICES_WITH_LESIONS = hd.sr.CodedConcept("DCN0002", PRIVATE_SCHEME,
                                         "Number of slices with lesions")
#: SNOMED CT 373068000 |Undetermined|: the finding when the series is not assessable.
UNDETERMINED = hd.sr.CodedConcept("373068000", "SCT", "Undetermined")
#: Why the quality gate found the series not assessable (private: no standard codes exist).
NOT_ASSESSABLE_REASON = hd.sr.CodedConcept("DCN0003", PRIVATE_SCHEME,
                                           "Reason not assessable")
NOT_ASSESSABLE_REASONS = {
    "no_lungs": hd.sr.CodedConcept("DCN0101", PRIVATE_SCHEME, "No lungs in the scan"),
    "lungs_cut_by_field_of_view": hd.sr.CodedConcept(
        "DCN0102", PRIVATE_SCHEME, "Lungs cut by the field of view"),
    "lungs_cut_by_scan_range": hd.sr.CodedConcept(
        "DCN0103", PRIVATE_SCHEME, "Lungs cut by the scan range"),
    "slices_too_thick": hd.sr.CodedConcept("DCN0104", PRIVATE_SCHEME, "Slices too thick"),
}


def decision_threshold(settings: ResultsSettings, result: Any) -> float:
    """The configured finding threshold, else the one the model was shipped with."""
    if settings.finding_threshold is not None:
        return float(settings.finding_threshold)
    return float(getattr(result, "threshold", 0.5))

#: Patient and study attributes a malformed source may lack; written empty (type 2).
_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyID", "StudyDate", "StudyTime", "AccessionNumber",
                        "ReferringPhysicianName")


def result_uid(settings: ResultsSettings, volume: Volume, model_version: str, kind: str,
               index: object = 0) -> str:
    """A UID that depends only on (source series, model version, kind, index).

    Parameters
    ----------
    settings:
        Gives the UID root (``uid_prefix``; pydicom's root when unset).
    volume:
        The source series (its Series Instance UID).
    model_version:
        The model's version string.
    kind:
        What the UID names, e.g. ``"seg-series"``, ``"seg"``, ``"sc"``, ``"sr"``.
    index:
        Distinguishes objects of one kind (e.g. the source slice of an overlay).
    """
    return str(generate_uid(
        prefix=settings.uid_prefix or "1.2.826.0.1.3680043.8.498.",
        entropy_srcs=["dcn-node results", volume.series_instance_uid, model_version, kind,
                      str(index)],
    ))


def device_uid(settings: ResultsSettings, model_version: str) -> str:
    """The Device UID of the algorithm: one per model version (IHE AI Results)."""
    return str(generate_uid(
        prefix=settings.uid_prefix or "1.2.826.0.1.3680043.8.498.",
        entropy_srcs=["dcn-node device", settings.manufacturer,
                      settings.manufacturer_model_name, model_version],
    ))


def device_observer(settings: ResultsSettings, model_version: str) -> hd.sr.ObserverContext:
    """The algorithm as the device observer of an SR or KOS (TID 1004)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(settings, model_version),
            name=ALGORITHM_NAME,
            manufacturer_name=settings.manufacturer,
            model_name=settings.manufacturer_model_name,
            serial_number=settings.device_serial_number,
        ))


def measurements(volume: Volume, result: Any) -> dict[str, float | int]:
    """The reported numbers (SR and overlays): volumes in ml, involvement in percent, slice
    count, the probability."""
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


def source_header(volume: Volume, index: int = 0) -> Dataset:
    """Slice ``index``'s header, with any missing type-2 patient/study attribute added empty.

    highdicom reads these from the source; a slightly malformed CT (no StudyID, say) is
    still accepted, as the receiver accepted it.
    """
    header = copy.deepcopy(volume.source_datasets[index])
    missing = [k for k in _TYPE2_PATIENT_STUDY if k not in header]
    for keyword in missing:
        setattr(header, keyword, None)
    if missing:
        LOGGER.warning("Series %s: source lacks %s; written empty", volume.series_instance_uid,
                       ", ".join(missing))
    return header


def character_sets(volume: Volume) -> tuple[Any, Any]:
    """(value to write, value highdicom accepts) for Specific Character Set.

    The source's value is kept. highdicom refuses an empty first value (``\\ISO 2022 IR 87``,
    the usual Japanese form, where empty means ISO 2022 IR 6), so it is given the explicit
    equivalent and the source's spelling is restored afterwards (:func:`finish`). A value
    highdicom does not know at all becomes ISO_IR 192: names were decoded on reading, so UTF-8
    re-encodes them without loss.
    """
    source = volume.source_datasets[0].get("SpecificCharacterSet")
    if source is None:
        return None, None
    values = [source] if isinstance(source, str) else list(source)
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    candidate = values[0] if len(values) == 1 else values
    known = {member.value for member in hd.SpecificCharacterSetValues}
    unknown = [value for value in values if value not in known]
    if unknown:
        LOGGER.warning("Series %s: Specific Character Set %r not usable (%s unknown to "
                       "highdicom); writing UTF-8", volume.series_instance_uid, source,
                       ", ".join(map(repr, unknown)))
        return "ISO_IR 192", "ISO_IR 192"
    return source, candidate


def unique_sources(volume: Volume) -> list[Dataset]:
    """One header per source instance, in the volume's slice order (multi-frame: one)."""
    seen: dict[str, Dataset] = {}
    for uid, ds in zip(volume.sop_instance_uids, volume.source_datasets, strict=True):
        seen.setdefault(uid, ds)
    return list(seen.values())


def software_versions(model_version: str) -> list[str]:
    return [f"dcn-node {__version__}", f"model {model_version}"]


def algorithm_identification(model_version: str, threshold: float | None = None
                             ) -> hd.AlgorithmIdentificationSequence:
    """Algorithm name, version and family (DCM 123110 Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=ARTIFICIAL_INTELLIGENCE,
        version=model_version,
        source="dcn-node",
        parameters=None if threshold is None else {"threshold": f"{threshold:g}"},
    )


def contributing_equipment(settings: ResultsSettings, model_version: str
                           ) -> list[hd.ContributingEquipment]:
    """The algorithm as Contributing Equipment, as the IHE AI Results profile asks:
    purpose (Newcode1, 99IHE, "Processing Algorithm"), manufacturer, model name, software
    versions and a Device UID per model version."""
    item = hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # replaced below
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=software_versions(model_version),
        device_serial_number=settings.device_serial_number,
        institution_name=settings.institution_name,
        station_name=settings.station_name,
        contribution_description=f"AI algorithm that produced this result: {ALGORITHM_NAME}",
        contribution_datetime=datetime.datetime.now(),
    )
    # highdicom only accepts DCM purposes; the profile's code is set on the finished item.
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = device_uid(settings, model_version)
    return [item]


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    """Declare the private and IHE coding schemes used."""
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name="dcn-node private codes",
            responsible_organization="dcn-node"),
        CodingSchemeIdentificationItem(
            designator="99IHE", name="IHE private codes",
            responsible_organization="IHE"),
    ]


def equipment_kwargs(settings: ResultsSettings, model_version: str, volume: Volume
                     ) -> dict[str, object]:
    """General Equipment attributes and the character set, for every result object."""
    kwargs: dict[str, object] = {
        "specific_character_set": character_sets(volume)[1],
        "manufacturer_model_name": settings.manufacturer_model_name,
        "software_versions": software_versions(model_version),
        "device_serial_number": settings.device_serial_number,
    }
    if settings.institution_name:
        kwargs["institution_name"] = settings.institution_name
    return kwargs


def finish(ds: Dataset, settings: ResultsSettings, volume: Volume) -> None:
    """Attributes set after construction on every object: the source's own spelling of
    Specific Character Set, the station name."""
    written, _ = character_sets(volume)
    if written is not None:
        ds.SpecificCharacterSet = written
    if settings.station_name:
        ds.StationName = settings.station_name


def patient_orientation(volume: Volume) -> tuple[str, str]:
    """The Patient Orientation letters of the rows and columns of an axial slice."""
    iop = volume.source_datasets[0].get("ImageOrientationPatient")
    if iop is None:
        shared = volume.source_datasets[0].get("SharedFunctionalGroupsSequence")
        try:
            iop = shared[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, TypeError):
            iop = [1, 0, 0, 0, 1, 0]
    return _direction_letters(list(iop)[:3]), _direction_letters(list(iop)[3:])


def _direction_letters(vector: Sequence[float]) -> str:
    letters = ""
    for axis in sorted(range(3), key=lambda i: -abs(float(vector[i]))):
        value = float(vector[axis])
        if abs(value) < 0.3 or len(letters) == 2:
            break
        letters += ("L", "P", "H")[axis] if value > 0 else ("R", "A", "F")[axis]
    return letters or "L"
