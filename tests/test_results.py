"""Result objects (SEG, overlay SCs, TID 1500 SR): valid by dciodvfy, readable by dsrdump,
round-tripped by highdicom, in the source study, with deterministic UIDs.

No model weights are needed: the analysis result is built from the phantom's ground truth
(masks in the volume's slice order via SOP Instance UIDs, attention = blurred lesions), which
also makes the round trip exact.
"""

from __future__ import annotations

import random
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from scipy import ndimage

from dcn_node.config import ResultsSettings, load_config
from dcn_node.inference.engine import AnalysisResult
from dcn_node.results import ResultEncodingError, ResultSet, build_results
from dcn_node.results.sc import OUTLINE_RGB, WARNING_RGB, heat_map, key_slices
from dcn_node.results.seg import build_segmentation
from dcn_node.volume import Volume, load_dicom_folder, load_series
from dcn_train.phantom import generate_phantom
from tests.conftest import require_tool

MATRIX = 64


def analysis_from_truth(volume: Volume, ground_truth: Path, *, probability: float | None = None,
                        model_version: str = "test-1") -> AnalysisResult:
    """An engine-shaped result from the phantom's ground truth, in the volume's order."""
    truth = np.load(ground_truth)
    index = {str(uid): i for i, uid in enumerate(truth["sop_instance_uids"])}
    order = [index[uid] for uid in volume.sop_instance_uids]
    lung, lesion = truth["lung"][order], truth["lesion"][order]
    slices, rows, _ = lesion.shape
    blurred = ndimage.gaussian_filter(lesion.astype(np.float32), (0, 2, 2))
    blurred /= max(float(blurred.max()), 1e-6)
    attention = [np.ascontiguousarray(ndimage.zoom(blurred, (1, side / rows, side / rows),
                                                   order=1)).clip(0, 1)
                 for side in (rows // 2, rows // 2, rows // 4, rows // 8)]
    if probability is None:
        probability = 0.93 if lesion.any() else 0.04
    return AnalysisResult(
        lung=lung, lesion=lesion,
        slice_probabilities=np.where(lesion.any(axis=(1, 2)), 0.9, 0.05).astype(np.float32),
        attention=attention, probability=probability, positive=probability >= 0.5,
        model_version=model_version, seconds=1.0,
        lesion_probability=blurred.astype(np.float16))


def phantom_case(folder: Path, seed: int = 4, *, slices: int = 24, thickness: float = 5.0,
                 normal: bool = False, **overrides: Any) -> tuple[Volume, AnalysisResult, Path]:
    case = generate_phantom(folder, seed, slices=slices, thickness_mm=thickness, normal=normal,
                            matrix=MATRIX, **overrides)
    volume = load_dicom_folder(case.series_dir)
    return volume, analysis_from_truth(volume, case.ground_truth_path), case.ground_truth_path


def dciodvfy(path: Path) -> str:
    """dciodvfy -new output for ``path``; fails the test on any "Error" line."""
    out = subprocess.run([require_tool("dciodvfy"), "-new", str(path)], capture_output=True,
                         text=True, timeout=120)
    report = out.stdout + out.stderr
    errors = [line for line in report.splitlines() if "Error" in line]
    assert not errors, f"{path.name}:\n" + "\n".join(errors)
    return report


def dsrdump(path: Path) -> str:
    out = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rror" not in out.stderr, out.stderr
    return out.stdout


def sr_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from sr_items(item)


def sr_values(ds: Dataset) -> dict[str, list[Any]]:
    """Concept name meaning -> values of NUM (value, unit) and CODE items in the tree."""
    values: dict[str, list[Any]] = {}
    for item in sr_items(ds):
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            measured = item.MeasuredValueSequence[0]
            values.setdefault(name, []).append(
                (float(measured.NumericValue),
                 measured.MeasurementUnitsCodeSequence[0].CodeValue))
        elif item.ValueType == "CODE":
            values.setdefault(name, []).append(item.ConceptCodeSequence[0].CodeMeaning)
        elif item.ValueType == "IMAGE":
            reference = item.ReferencedSOPSequence[0]
            if "ReferencedSegmentNumber" in reference:
                values.setdefault(name, []).append(int(reference.ReferencedSegmentNumber))
    return values


@pytest.mark.parametrize(("thickness", "normal"), [(1.0, False), (1.0, True), (5.0, False),
                                                   (5.0, True)])
def test_every_object_is_valid_for_1_and_5_mm_with_and_without_lesions(
        tmp_path: Path, thickness: float, normal: bool) -> None:
    volume, result, _ = phantom_case(tmp_path / "case", seed=4, slices=30 if thickness < 2
                                     else 24, thickness=thickness, normal=normal)
    assert result.lesion.any() != normal
    paths = build_results(volume, result, ResultsSettings()).write(tmp_path / "out")
    kinds = sorted({p.parent.name for p in paths})
    assert kinds == ["ko", "sc", "seg", "sr"]
    for path in paths:
        report = dciodvfy(path)
        ds = pydicom.dcmread(path)
        assert path.stem == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == volume.study_instance_uid
        assert ds.SeriesInstanceUID != volume.series_instance_uid
        if path.parent.name == "sr":
            tree = dsrdump(path)
            assert "Probability" in tree and "Percentage of lung volume with lesions" in tree
            assert report
        if path.parent.name == "ko":
            assert "Best In Set" in dsrdump(path)
    seg = pydicom.dcmread(next(p for p in paths if p.parent.name == "seg"))
    assert int(seg.NumberOfFrames) == 2 * len(volume.sop_instance_uids)  # no frame omitted
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["COVID-19 lesions", "Lungs"]
    referenced = {r.ReferencedSOPInstanceUID
                  for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert referenced == set(volume.sop_instance_uids)
    sr = pydicom.dcmread(next(p for p in paths if p.parent.name == "sr"))
    values = sr_values(sr)
    assert values["COVID-19"] == ["Absent" if normal else "Present"]
    assert values["Number of slices with lesions"][0][0] == int(
        result.lesion.any(axis=(1, 2)).sum())
    if normal:
        assert values["Volume of lesions"] == [(0.0, "ml")]
        assert "Lesion" not in values.get("Finding", [])  # no lesion groups
        assert len([p for p in paths if p.parent.name == "sc"]) == 1


def test_empty_lesion_result_is_encoded_with_empty_frames(tmp_path: Path) -> None:
    """The documented choice: no lesion still gives a SEG (segment 1 all empty), one
    overlay (the slice with the most lung) and an SR reporting 0 ml and Absent."""
    volume, result, _ = phantom_case(tmp_path / "case", seed=4, normal=True)
    result.attention = [np.zeros_like(a) for a in result.attention]
    results = build_results(volume, result, ResultsSettings())
    seg = hd.seg.Segmentation.from_dataset(results.seg[0])
    masks = seg.get_pixels_by_source_instance(volume.sop_instance_uids, segment_numbers=[1, 2])
    assert not masks[..., 0].any()
    np.testing.assert_array_equal(masks[..., 1].astype(bool), result.lung)
    assert len(results.sc) == 1
    lung_areas = result.lung.sum(axis=(1, 2))
    shown = results.sc[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    assert shown == volume.sop_instance_uids[int(np.argmax(lung_areas))]
    for path in results.write(tmp_path / "out"):
        dciodvfy(path)


def _relabel(series_dir: Path, how: str) -> None:
    """Rewrite the phantom so that z runs the other way: negated positions, or a flipped
    column direction (slice normal -z)."""
    for path in series_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        if how == "negated-z":
            ds.ImagePositionPatient = [x, y, -z]
            ds.SliceLocation = -z
        else:
            ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
            ds.ImagePositionPatient = [x, -y, z]
        ds.save_as(path)


@pytest.mark.parametrize("variant", ["random-order", "negated-z", "flipped-normal",
                                     "slope-2"])
def test_seg_round_trip_equals_the_masks_voxel_for_voxel(tmp_path: Path, variant: str) -> None:
    overrides: dict[str, Any] = {}
    if variant == "slope-2":
        overrides = {"RescaleSlope": 2.0, "RescaleIntercept": -2048.0,
                     "PixelRepresentation": 1}
    case = generate_phantom(tmp_path / "case", 6, slices=20, thickness_mm=2.5, matrix=MATRIX,
                            **overrides)
    if variant in ("negated-z", "flipped-normal"):
        _relabel(case.series_dir, variant)
    files = sorted(case.series_dir.glob("*.dcm"))
    random.Random(7).shuffle(files)
    volume = load_series(files)
    truth = np.load(case.ground_truth_path)
    truth_uids = [str(u) for u in truth["sop_instance_uids"]]
    if variant in ("negated-z", "flipped-normal"):
        assert volume.sop_instance_uids == truth_uids[::-1]  # the z axis really is reversed
    else:
        assert volume.sop_instance_uids == truth_uids
    if variant == "slope-2":
        ds = pydicom.dcmread(files[0])
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (2.0, -2048.0)
        assert -1100 < float(volume.hu.min()) and float(volume.hu.max()) < 3100
    result = analysis_from_truth(volume, case.ground_truth_path)
    seg_path = build_results(volume, result, ResultsSettings(sc={"enabled": False},
                                                             sr={"enabled": False})
                             ).write(tmp_path / "out")[0]
    dciodvfy(seg_path)
    seg = hd.seg.segread(seg_path)
    # Read back by the ground truth's own UIDs: independent of the volume's ordering.
    masks = seg.get_pixels_by_source_instance(truth_uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(masks[..., 0].astype(bool), truth["lesion"])
    np.testing.assert_array_equal(masks[..., 1].astype(bool), truth["lung"])
    # Each frame sits where its source slice is.
    positions = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient]
                 for ds in volume.source_datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position],
                                   positions[source.ReferencedSOPInstanceUID], atol=1e-3)


@pytest.mark.parametrize(("charset", "name"), [
    ("ISO_IR 192", "Müller^Zoë=王^小明"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
])
def test_patient_names_survive_in_every_character_set(tmp_path: Path, charset: Any,
                                                      name: str) -> None:
    volume, result, _ = phantom_case(tmp_path / "case", SpecificCharacterSet=charset,
                                     PatientName=name, ReferringPhysicianName=name)
    source = pydicom.dcmread(next((tmp_path / "case" / "series").glob("*.dcm")))
    assert str(source.PatientName) == name
    paths = build_results(volume, result, ResultsSettings()).write(tmp_path / "out")
    for path in paths:
        dciodvfy(path)
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == name, path.parent.name
        assert str(ds.ReferringPhysicianName) == name
        assert ds.SpecificCharacterSet == source.SpecificCharacterSet
        for keyword in ("PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                        "StudyTime", "AccessionNumber", "StudyInstanceUID"):
            assert ds.get(keyword) == source.get(keyword), keyword
    for path in paths:
        if path.parent.name == "sr":
            assert "Yamada" in dsrdump(path) or "Müller" in dsrdump(path)


def test_uids_are_deterministic_and_a_rerun_replaces_the_files(tmp_path: Path) -> None:
    volume, result, _ = phantom_case(tmp_path / "case")
    settings = ResultsSettings(uid_prefix="1.2.826.0.1.3680043.10.999.")
    first, second = (build_results(volume, result, settings) for _ in range(2))

    def uids(results: ResultSet) -> list[tuple[str, str]]:
        return [(ds.SeriesInstanceUID, ds.SOPInstanceUID)
                for kind in ("seg", "sc", "sr", "ko") for ds in getattr(results, kind)]

    def tracking(results: ResultSet) -> list[str]:
        return [i.UID for i in sr_items(results.sr[0]) if i.ValueType == "UIDREF"
                and i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Unique Identifier"]

    assert uids(first) == uids(second)
    assert all(sop.startswith("1.2.826.0.1.3680043.10.999.") for _, sop in uids(first))
    assert len({series for series, _ in uids(first)}) == 4
    out = tmp_path / "out"
    written = first.write(out)
    assert second.write(out) == written
    assert sorted(out.rglob("*")) == sorted([*written, *(out / k for k in ("seg", "sc", "sr",
                                                                            "ko"))])
    # Each measurement group tracks its own finding, under the same UID in a re-run.
    assert tracking(first) == tracking(second) and len(set(tracking(first))) > 1
    assert len(set(tracking(first))) == len(tracking(first))
    result.model_version = "test-2"
    rerun = build_results(volume, result, settings)
    assert not set(uids(rerun)) & set(uids(first))
    assert not set(tracking(rerun)) & set(tracking(first))


def groups(sr: Dataset) -> list[Dataset]:
    """The measurement groups of a TID 1500 report."""
    (measurements,) = [i for i in sr.ContentSequence
                       if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"]
    return list(measurements.ContentSequence)


def test_sr_reports_the_measurements_of_the_result(tmp_path: Path) -> None:
    volume, result, _ = phantom_case(tmp_path / "case")
    results = build_results(volume, result, ResultsSettings(finding_threshold=0.95))
    sr = results.sr[0]
    values = sr_values(sr)
    voxel_ml = volume.voxel_volume_ml
    lesion_ml = result.lesion.sum() * voxel_ml
    lung_ml = result.lung.sum() * voxel_ml
    assert values["Probability"] == [(0.93, "1")]
    assert values["COVID-19"] == ["Absent"]  # 0.93 is below the configured 0.95
    assert values["Volume of lesions"] == [(round(lesion_ml, 2), "ml")]
    assert values["Volume of lungs"] == [(round(lung_ml, 2), "ml")]
    assert values["Percentage of lung volume with lesions"] == [
        (round(100 * lesion_ml / lung_ml, 3), "%")]
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert "PerformedProcedureCodeSequence" in sr
    assert "ReferencedPerformedProcedureStepSequence" in sr
    observer = [i for i in sr_items(sr)
                if i.ConceptNameCodeSequence[0].CodeMeaning == "Observer Type"]
    assert observer[0].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    evidence = {r.ReferencedSOPInstanceUID
                for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == {*volume.sop_instance_uids, results.seg[0].SOPInstanceUID}

    # Every group has an image region on a CT slice (what OHIF needs to show a group).
    labels, components = ndimage.label(result.lesion, structure=np.ones((3, 3, 3), bool))
    sizes = sorted(np.bincount(labels.ravel())[1:], reverse=True)
    found = groups(sr)
    assert len(found) == 1 + min(5, components)
    for group in found:
        (region,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        assert region.ConceptNameCodeSequence[0].CodeValue == "111030"  # Image Region
        assert region.GraphicType == "POLYLINE"
        points = np.asarray(region.GraphicData, float).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1])  # closed
        assert (points >= 0).all() and (points <= MATRIX).all()
        (source,) = region.ContentSequence
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in \
            volume.sop_instance_uids

    # The lesions, largest first: volume, area and mean HU on the key slice, the side.
    lesion_groups = found[1:]
    for group, voxels in zip(lesion_groups, sizes, strict=False):
        numbers = sr_values(group)
        assert numbers["Volume"] == [(round(voxels * voxel_ml, 2), "ml")]
        (region,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        index = volume.sop_instance_uids.index(uid)
        ((area, unit),) = numbers["Area"]
        assert unit == "mm2" and area > 0
        pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
        assert area <= result.lesion[index].sum() * pixel_mm2 + 0.1
        ((hu, unit),) = numbers["Attenuation Coefficient"]
        assert unit == "[hnsf'U]" and -1000 < hu < 200
        # The outline encloses the lesion's pixels on that slice (its area within a
        # marching-squares pixel edge).
        (region,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        points = np.asarray(region.GraphicData, float).reshape(-1, 2)
        x, y = points[:, 0], points[:, 1]
        polygon_area = abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2 * pixel_mm2
        assert 0.6 * area <= polygon_area <= 1.2 * area
        assert numbers["Finding Site"][0] in ("Left lung", "Right lung")
    assert [sr_values(g)["Volume"][0][0] for g in lesion_groups] == sorted(
        [sr_values(g)["Volume"][0][0] for g in lesion_groups], reverse=True)

    # Fewer lesion groups when configured; none at all with 0.
    results = build_results(volume, result, ResultsSettings(sr={"lesion_regions": 0}))
    assert len(groups(results.sr[0])) == 1
    for path in results.write(tmp_path / "out"):
        dciodvfy(path)


def test_key_object_selection_names_the_overlay_slices_and_images(tmp_path: Path) -> None:
    volume, result, _ = phantom_case(tmp_path / "case")
    results = build_results(volume, result, ResultsSettings())
    (ko,) = results.ko
    assert ko.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113013"  # Best In Set
    assert ko.StudyInstanceUID == volume.study_instance_uid
    named = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
             for i in ko.ContentSequence if i.ValueType == "IMAGE"}
    shown_ct = {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in results.sc}
    overlays = {ds.SOPInstanceUID for ds in results.sc}
    assert named == shown_ct | overlays
    path = results.write(tmp_path / "out")[-1]
    assert path.parent.name == "ko"
    dciodvfy(path)
    assert dsrdump(path).count("IMAGE") == len(named)
    # Without overlays, the key CT slices still.
    results = build_results(volume, result, ResultsSettings(sc={"enabled": False}))
    named = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
             for i in results.ko[0].ContentSequence if i.ValueType == "IMAGE"}
    assert named == shown_ct


def test_algorithm_identification_and_contributing_equipment(tmp_path: Path) -> None:
    volume, result, _ = phantom_case(tmp_path / "case")
    results = build_results(volume, result, ResultsSettings(station_name="AI01"))
    seg = results.seg[0]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == "test-1"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    for ds in (*results.seg, *results.sc, *results.sr, *results.ko):
        ours = [e for e in ds.ContributingEquipmentSequence
                if e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"]
        assert len(ours) == 1, ds.Modality
        assert ours[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        assert ours[0].ManufacturerModelName == "DCN COVID-19 CT"
        assert "model test-1" in list(ours[0].SoftwareVersions)
        assert ours[0].DeviceUID
        assert ds.StationName == "AI01"
        assert "not for diagnostic use" in ds.SeriesDescription
    assert {ds.SeriesNumber for ds in (*results.seg, *results.sc, *results.sr, *results.ko)
            } == {901, 902, 903, 904}


def test_overlays_show_outline_heat_map_and_warning(tmp_path: Path) -> None:
    volume, result, _ = phantom_case(tmp_path / "case")
    results = build_results(volume, result, ResultsSettings())
    areas = result.lesion.sum(axis=(1, 2))
    shown = [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in results.sc]
    assert volume.sop_instance_uids[int(np.argmax(areas))] in shown and len(shown) <= 4
    attention = heat_map(result, ResultsSettings().sc).reshape(len(areas), -1).max(axis=1)
    lesion_slices = [volume.sop_instance_uids.index(uid) for uid in shown]
    lesion_slices.remove(int(np.argmax(attention)))  # the strongest attention: any distance
    positions = sorted(float(volume.slice_offsets[k]) for k in lesion_slices)
    assert min(np.diff(positions)) >= 10.0  # neighbours of one lesion do not fill the set
    assert [int(ds.InstanceNumber) for ds in results.sc] == list(range(1, len(shown) + 1))
    for ds in results.sc:
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BurnedInAnnotation == "YES"
        assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
        pixels = ds.pixel_array
        assert pixels.shape[1] >= 512  # the 64-pixel matrix is enlarged for reading
        colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
        assert WARNING_RGB in {tuple(c) for c in pixels.reshape(-1, 3)}
        assert OUTLINE_RGB in colours or OUTLINE_RGB in {tuple(c)
                                                        for c in pixels.reshape(-1, 3)}
    # The heat map follows the configuration: the attention of a module, another module.
    third = build_results(volume, result, ResultsSettings(sc={"heatmap": "attention"}))
    second = build_results(volume, result, ResultsSettings(
        sc={"heatmap": "attention", "attention_module": 2}))
    assert not np.array_equal(third.sc[0].pixel_array, results.sc[0].pixel_array)
    assert not np.array_equal(second.sc[0].pixel_array, third.sc[0].pixel_array)


def test_a_withheld_overlay_prints_no_slice_probability_or_lesion_area(tmp_path: Path) -> None:
    # A not-assessable series with its lesions withheld: the text says where the slice is,
    # not "lesion 0.0 cm2, slice prob. 1.00" (seen on a cropped lung-cancer scan), so the
    # picture does not change with the slice probabilities; an assessable one does.
    import dataclasses

    from dcn_node.inference.quality import GateResult, NotAssessable
    from dcn_node.results.sc import render_overlay

    volume, result, _ = phantom_case(tmp_path / "case")
    cut = GateResult(False, NotAssessable.LUNGS_CUT_BY_FIELD_OF_VIEW, "the field of view "
                     "cuts the lungs on 88 % of the slices with lung", 900.0)
    withheld = dataclasses.replace(result, lesion=np.zeros_like(result.lesion), attention=[],
                                   lesion_probability=None, quality=cut, lesions_withheld=True)
    index = int(np.argmax(result.lung.sum(axis=(1, 2))))
    settings = ResultsSettings()

    def rendered(base: AnalysisResult, slice_probability: float) -> np.ndarray:
        probabilities = np.full_like(base.slice_probabilities, slice_probability)
        return render_overlay(volume, dataclasses.replace(
            base, slice_probabilities=probabilities), index, settings)

    assert np.array_equal(rendered(withheld, 0.05), rendered(withheld, 1.0))
    assert not np.array_equal(rendered(result, 0.05), rendered(result, 1.0))


def test_key_slices_reserve_a_place_for_the_strongest_attention() -> None:
    lesion = np.zeros((10, 8, 8), bool)
    for k, area in ((2, 5), (5, 9), (7, 3), (8, 1)):
        lesion[k].flat[:area] = True
    attention = [np.zeros((10, 4, 4), np.float32) for _ in range(4)]
    attention[2][9, 1, 1] = 0.8
    result = AnalysisResult(lung=np.ones_like(lesion), lesion=lesion,
                            slice_probabilities=np.zeros(10), attention=attention,
                            probability=0.7, positive=True, model_version="m", seconds=0.0)
    settings = ResultsSettings(sc={"heatmap": "attention"}).sc
    offsets = np.arange(10) * 10.0  # 10 mm slices
    assert key_slices(result, settings, offsets) == [5, 2, 7, 9]
    assert key_slices(result, settings.model_copy(update={"max_images": 2}), offsets) == [5, 9]
    assert key_slices(result, settings.model_copy(
        update={"strongest_attention_slice": False}), offsets) == [5, 2, 7]
    # 5 mm slices: slice 7 is 10 mm from slice 5 and stays; 1 mm slices: only the largest.
    assert key_slices(result, settings, offsets / 2) == [5, 2, 7, 9]
    assert key_slices(result, settings, offsets / 10) == [5, 9]


def test_mismatched_masks_are_refused(tmp_path: Path) -> None:
    volume, result, _ = phantom_case(tmp_path / "case")
    result.lesion = result.lesion[:-1]
    with pytest.raises(ResultEncodingError, match="differ from the volume"):
        build_results(volume, result, ResultsSettings())


def _synthetic_volume(slices: int, size: int) -> tuple[Volume, AnalysisResult]:
    """Headers only (no pixels): enough for the SEG encoder."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    headers = []
    for i in range(slices):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.Modality, ds.Manufacturer = frame, "CT", "test"
        ds.PatientName, ds.PatientID, ds.PatientSex = "MEMORY^TEST", "1", "O"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180, -180, float(i)]
        headers.append(ds)
    lung = np.zeros((slices, size, size), bool)
    lung[:, size // 4:3 * size // 4, size // 8:7 * size // 8] = True
    lesion = np.zeros_like(lung)
    lesion[slices // 3:slices // 2, size // 3:size // 2, size // 4:size // 3] = True
    volume = Volume(hu=np.broadcast_to(np.float32(0), lung.shape),
                    sop_instance_uids=[d.SOPInstanceUID for d in headers],
                    frame_numbers=[1] * slices, pixel_spacing=(0.7, 0.7),
                    slice_offsets=np.arange(slices, dtype=float), study_instance_uid=study,
                    series_instance_uid=series, source_datasets=headers)
    result = AnalysisResult(lung=lung, lesion=lesion, slice_probabilities=np.zeros(slices),
                            attention=[], probability=0.9, positive=True, model_version="m",
                            seconds=0.0)
    return volume, result


def test_seg_encoding_holds_one_extra_copy_of_the_masks_at_most() -> None:
    """Peak traced memory of the SEG encoder stays near one copy of the masks (highdicom's
    own overlap check alone would take 8 bytes per voxel). 1,000 slices of 512 x 512:
    see docs/results.md."""
    settings = ResultsSettings()
    build_segmentation(*_synthetic_volume(4, 32), settings)  # load highdicom's tables first
    volume, result = _synthetic_volume(120, 256)
    masks_bytes = result.lung.nbytes + result.lesion.nbytes
    tracemalloc.start()
    try:
        seg = build_segmentation(volume, result, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert int(seg.NumberOfFrames) == 240 and seg.SegmentsOverlap == "YES"
    assert peak < 1.5 * masks_bytes, f"peak {peak / 2**20:.0f} MiB"


def test_shipped_config_documents_the_defaults() -> None:
    assert load_config().results == ResultsSettings()
    docs = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for section in ("", "seg.", "sc.", "sr."):
        model = ResultsSettings() if not section else getattr(ResultsSettings(), section[:-1])
        for key in type(model).model_fields:
            if key in ("seg", "sc", "sr"):
                continue
            assert f"`{section}{key}`" in docs, f"results.{section}{key} undocumented"


def test_analyze_cli_writes_the_objects(tmp_path: Path, untrained_models: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``dcn-node analyze`` (untrained lite weights) also writes seg/, sc/ and sr/."""
    import json

    from dcn_node.cli import main

    case = generate_phantom(tmp_path / "case", 4, slices=12, matrix=MATRIX)
    out = tmp_path / "out"
    assert main(["analyze", str(case.series_dir), "--out", str(out), "--models",
                 str(untrained_models)]) == 0
    summary = json.loads(capsys.readouterr().out)
    written = [out / p for p in summary["dicom_objects"]]
    assert {p.parent.name for p in written} == {"seg", "sc", "sr", "ko"}
    assert sorted(written) == sorted(p for p in out.rglob("*.dcm"))
    for path in written:
        dciodvfy(path)
        assert pydicom.dcmread(path).StudyInstanceUID == case.study_instance_uid


def test_multi_frame_source_round_trip(tmp_path: Path) -> None:
    """An Enhanced (here Legacy Converted Enhanced) CT: one instance, frames in the file's
    order (head first); the SEG pairs frame by frame and reads back by source frame."""
    case = generate_phantom(tmp_path / "case", 4, slices=12, matrix=MATRIX)
    slices = [pydicom.dcmread(p) for p in sorted(case.series_dir.glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=slices[0].SeriesInstanceUID, series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    volume = load_series([tmp_path / "enhanced.dcm"])
    assert len(set(volume.sop_instance_uids)) == 1 and volume.frame_numbers != sorted(
        volume.frame_numbers)
    truth = np.load(case.ground_truth_path)  # ascending z, as the volume
    result = AnalysisResult(
        lung=truth["lung"], lesion=truth["lesion"], slice_probabilities=np.zeros(12),
        attention=[np.zeros((12, 8, 8), np.float32)] * 4, probability=0.8, positive=True,
        model_version="test-1", seconds=0.0)
    results = build_results(volume, result, ResultsSettings())
    for path in results.write(tmp_path / "out"):
        dciodvfy(path)
    # The SR's image regions name the frame of the multi-frame CT they lie on.
    regions = [i for i in sr_items(results.sr[0]) if i.ValueType == "SCOORD"]
    assert regions and all(
        "ReferencedFrameNumber" in r.ContentSequence[0].ReferencedSOPSequence[0]
        for r in regions)
    seg = hd.seg.Segmentation.from_dataset(results.seg[0])
    masks = seg.get_pixels_by_source_frame(volume.sop_instance_uids[0],
                                           source_frame_numbers=volume.frame_numbers,
                                           segment_numbers=[1, 2])
    np.testing.assert_array_equal(masks[..., 0].astype(bool), truth["lesion"])
    np.testing.assert_array_equal(masks[..., 1].astype(bool), truth["lung"])
    assert "ReferencedFrameNumber" in results.sc[0].SourceImageSequence[0]


def test_source_without_type2_study_attributes_still_encodes(tmp_path: Path) -> None:
    """Tolerant when reading: a CT without Study ID, Accession Number or Referring
    Physician gives objects with those attributes empty; the volume is not modified."""
    volume, result, _ = phantom_case(tmp_path / "case", StudyID=None, AccessionNumber=None,
                                     ReferringPhysicianName=None)
    assert "StudyID" not in volume.source_datasets[0]
    for path in build_results(volume, result, ResultsSettings()).write(tmp_path / "out"):
        dciodvfy(path)
        ds = pydicom.dcmread(path)
        assert "StudyID" in ds and not ds.StudyID
    assert "StudyID" not in volume.source_datasets[0]
