"""The quality gate and the anatomical constraints, end to end with the shipped model.

A cropped chest, an abdomen-only series (phantoms) and a real head CT each come out "not
assessable" with the right reason in summary.json, in the SR (dciodvfy-clean, coded reason,
no probability) and in the SC banner; a whole chest phantom comes out assessable. The
classical anatomy is checked against phantom truth, and the model's lesions never lie
outside its lung mask.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dcn_node.inference.anatomy import classical_anatomy
from dcn_node.inference.quality import NotAssessable, assess
from dcn_node.results.sc import OUTLINE_RGB, WARNING_RGB
from dcn_train.phantom import PhantomVolume, generate_volume, write_series
from tests.test_results import dciodvfy, dsrdump, sr_values


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def _write(volume: PhantomVolume, folder: Path, seed: int, **header: str) -> Path:
    write_series(volume, folder, seed, **header)
    return folder


def _analyze(series: Path, out: Path, config: Path | None = None) -> dict:
    extra = ["--config", str(config)] if config is not None else []
    done = subprocess.run([sys.executable, "-m", "dcn_node", "analyze", str(series),
                           "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "summary.json").read_text())


def _objects(out: Path) -> tuple[list[Path], list[Path], list[Path]]:
    return (sorted((out / "seg").glob("*.dcm")), sorted((out / "sc").glob("*.dcm")),
            sorted((out / "sr").glob("*.dcm")))


@pytest.fixture(scope="module")
def chest() -> PhantomVolume:
    """A whole chest phantom at 5 mm, 256x256 (small for the suite)."""
    return generate_volume(31, thickness_mm=5.0, normal=True, matrix=256)


def test_classical_anatomy_matches_phantom_truth(chest: PhantomVolume) -> None:
    anatomy = classical_anatomy(chest.hu, chest.pixel_spacing_mm, chest.slice_thickness_mm)
    assert _dsc(anatomy.lung, chest.lung) >= 0.95
    assert not (anatomy.lung & ~anatomy.body).any()
    assert not (anatomy.lung & anatomy.airway).any()
    # The trachea is found in the top slices and is not lung.
    top = anatomy.airway[-5:]
    assert top.any()
    verdict = assess(anatomy, chest.pixel_spacing_mm, chest.slice_thickness_mm)
    assert verdict.assessable and verdict.reason is None


def _assert_not_assessable(out: Path, summary: dict, reason: NotAssessable) -> None:
    assert summary["assessable"] is False
    assert summary["not_assessable_reason"] == reason.value
    assert summary["probability"] is None and summary["positive"] is None
    assert summary["quality_gate"]["reason"] == reason.value
    seg, sc, sr = _objects(out)
    assert seg and sc and len(sr) == 1
    for path in [*seg, *sc, *sr, *out.rglob('ko/*.dcm')]:
        dciodvfy(path)
    dsrdump(sr[0])
    values = sr_values(dcmread(sr[0]))
    assert "Probability" not in values
    assert values["COVID-19"] == ["Undetermined"]
    meanings = {"no_lungs": "No lungs in the scan",
                "lungs_cut_by_field_of_view": "Lungs cut by the field of view",
                "lungs_cut_by_scan_range": "Lungs cut by the scan range",
                "slices_too_thick": "Slices too thick"}
    assert values["Reason not assessable"] == [meanings[reason.value]]
    # The SC text panel: the headline "NOT ASSESSABLE" and the gate's detail in yellow above
    # the yellow "not for diagnostic use" line (an assessable overlay has only that one).
    image = dcmread(sc[0]).pixel_array.astype(int)
    yellow = (np.abs(image - np.array(WARNING_RGB)).sum(axis=2) < 60).sum(axis=1) > 5
    starts = np.flatnonzero(yellow[1:] & ~yellow[:-1])
    assert len(starts) >= 3, f"{len(starts)} yellow text lines"
    # No lesion is reported on a series that cannot be assessed (the default).
    _assert_lesions_withheld(out, summary, sc, sr[0])


def _outline_pixels(sc: list[Path]) -> int:
    """Pixels of the lesion outline's green in the image part of the overlays."""
    count = 0
    for path in sc:
        image = dcmread(path).pixel_array.astype(int)
        count += int((np.abs(image - np.array(OUTLINE_RGB)).sum(axis=2) < 30).sum())
    return count


def _assert_lesions_withheld(out: Path, summary: dict, sc: list[Path], sr: Path) -> None:
    assert summary["lesions_withheld"] is True
    assert summary["lesion_volume_ml"] is None and summary["involvement_percent"] is None
    assert not np.load(out / "masks.npz")["lesion"].any()
    values = sr_values(dcmread(sr))
    assert "Volume of lesions" not in values and "Volume of lungs" in values
    assert "Percentage of lung volume with lesions" not in values
    # The legend line says so in the text colour: the outline colour appears nowhere.
    assert _outline_pixels(sc) == 0


def _cropped(chest: PhantomVolume) -> PhantomVolume:
    """A targeted reconstruction centred on one lung: the field of view cuts both lungs."""
    columns = np.flatnonzero(chest.lung.any(axis=(0, 1)))
    width = columns[-1] - columns[0]
    cut = (slice(None), slice(None),
           slice(int(columns[0] + 0.2 * width), int(columns[0] + 0.75 * width)))
    return PhantomVolume(np.ascontiguousarray(chest.hu[cut]), chest.lung[cut].copy(),
                         chest.lesion[cut].copy(), chest.pixel_spacing_mm,
                         chest.slice_thickness_mm, 0)


def test_cropped_chest_is_not_assessable(chest: PhantomVolume, tmp_path: Path) -> None:
    series = _write(_cropped(chest), tmp_path / "series", 31)
    out = tmp_path / "out"
    summary = _analyze(series, out)
    _assert_not_assessable(out, summary, NotAssessable.LUNGS_CUT_BY_FIELD_OF_VIEW)


def test_abdomen_only_series_is_not_assessable(tmp_path: Path) -> None:
    # 100 slices of 5 mm centred on the lungs reach well into the abdomen: keep those below.
    tall = generate_volume(32, slices=100, thickness_mm=5.0, normal=True, matrix=256)
    first_lung = int(np.flatnonzero(tall.lung.any(axis=(1, 2)))[0])
    assert first_lung >= 12, "the phantom covers the abdomen below the lungs"
    part = slice(0, first_lung - 2)
    abdomen = PhantomVolume(np.ascontiguousarray(tall.hu[part]), tall.lung[part].copy(),
                            tall.lesion[part].copy(), tall.pixel_spacing_mm,
                            tall.slice_thickness_mm, 0)
    series = _write(abdomen, tmp_path / "series", 32, BodyPartExamined="ABDOMEN")
    out = tmp_path / "out"
    summary = _analyze(series, out)
    _assert_not_assessable(out, summary, NotAssessable.NO_LUNGS)
    assert "abdomen" in summary["quality_gate"]["detail"]
    assert summary["lung_volume_ml"] == 0


def test_lesions_on_a_not_assessable_series_only_when_configured(tmp_path: Path) -> None:
    # A cropped chest with COVID-19 lesions: the model outlines them, but the series is
    # cut by the field of view. By default nothing of that is shown; the setting (read
    # from the node's config file) shows the outlines and figures beside the banner.
    cropped = _cropped(generate_volume(34, thickness_mm=5.0, normal=False, matrix=256))
    assert cropped.lesion.any()
    series = _write(cropped, tmp_path / "series", 34)
    hidden = _analyze(series, tmp_path / "hidden")
    _assert_not_assessable(tmp_path / "hidden", hidden, NotAssessable.LUNGS_CUT_BY_FIELD_OF_VIEW)
    config = tmp_path / "shown.yaml"
    config.write_text("inference:\n  quality_gate:\n"
                      "    report_lesions_when_not_assessable: true\n")
    shown = _analyze(series, tmp_path / "shown", config)
    assert shown["assessable"] is False and shown["lesions_withheld"] is False
    assert shown["probability"] is None
    assert shown["lesion_volume_ml"] > 0
    _, sc, sr = _objects(tmp_path / "shown")
    assert _outline_pixels(sc) > 0
    values = sr_values(dcmread(sr[0]))
    assert values["COVID-19"] == ["Undetermined"] and values["Volume of lesions"][0][0] > 0
    for path in [*sc, *sr]:
        dciodvfy(path)


@pytest.mark.slow
def test_real_head_ct_is_not_assessable(real_ct: Path, tmp_path: Path) -> None:
    from dcn_train.real_ct import real_cases

    (head,) = real_cases(real_ct, names=("head",))
    out = tmp_path / "out"
    summary = _analyze(head.series_dir, out)
    _assert_not_assessable(out, summary, NotAssessable.NO_LUNGS)
    assert "head" in summary["quality_gate"]["detail"]


def test_whole_chest_is_assessable_and_lesions_stay_in_the_lungs(tmp_path: Path) -> None:
    volume = generate_volume(33, thickness_mm=5.0, normal=False, matrix=256)
    series = _write(volume, tmp_path / "series", 33)
    out = tmp_path / "out"
    summary = _analyze(series, out)
    assert summary["assessable"] is True and summary["not_assessable_reason"] is None
    assert 0.0 <= summary["probability"] <= 1.0
    masks = np.load(out / "masks.npz")
    assert masks["lung"].any()
    assert not (masks["lesion"] & ~masks["lung"]).any()
    # The lung mask stays inside the body (a margin from the outline) and off the airways.
    from dcn_node.volume import load_dicom_folder

    loaded = load_dicom_folder(series)
    anatomy = classical_anatomy(loaded.hu, float(loaded.pixel_spacing[1]),
                                loaded.slice_spacing_mm)
    assert not (masks["lung"] & ~anatomy.body).any()
    assert not (masks["lung"] & anatomy.airway).any()
