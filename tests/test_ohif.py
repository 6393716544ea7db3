"""The radiologist's viewer: OHIF v3 shows the node's SEG, SR and SC from a real PACS.

Orthanc with its DICOMweb plugin is the PACS; OHIF (the prebuilt ``@ohif/app`` from npm,
pinned) is served on loopback with a same-origin proxy to Orthanc and driven in Debian's
headless Chromium by ``ohif_check.mjs``. Each test opens the study as a reader would: the
study list, the SR (its probability and volumes drawn on the CT), the SEG (hydrated, with
its segments) and the overlay SC, and fails on any uncaught error in the page. Screenshots
stay in the test's tmp folder.

``make ohif-deps`` (part of ``make test``) installs what this needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcn_node.config import ResultsSettings
from dcn_node.inference.engine import DEFAULT_MODELS_DIR
from dcn_node.results import build_results
from dcn_node.results.common import measurements
from dcn_node.results.sc import WARNING_RGB
from dcn_train.phantom import generate_phantom
from tests.conftest import NODE_AET, free_port, require_tool, wait_for
from tests.ohif import check_study, missing_parts, serve_ohif
from tests.orthanc import Orthanc, orthanc_workdir
from tests.test_pipeline import delivered_sets, node_config, push_to_node, result_instances
from tests.test_pipeline import upload as upload_series
from tests.test_results import phantom_case, sr_values

SETTINGS = ResultsSettings()
#: The OHIF run is slow on 2 cores (software WebGL): 35-55 s a study.
pytestmark = pytest.mark.slow


@pytest.fixture
def pacs() -> Orthanc:
    require_tool("Orthanc")
    missing = missing_parts()
    if missing:
        pytest.fail(f"OHIF test needs {', '.join(missing)}: run `make ohif-deps` "
                    "(part of `make test`)")
    with orthanc_workdir() as workdir:
        orthanc = Orthanc(workdir, free_port(), free_port())
        orthanc.start(dicomweb=True)
        yield orthanc
        orthanc.stop()


def sr_labels(values: dict[str, float | int]) -> list[str]:
    """What OHIF writes next to the assessment region (its format: 2 decimals, unit)."""
    return [f"Probability: {values['probability']:.2f}",
            f"Volume of lesions: {values['lesion_ml']:.2f} ml",
            f"Percentage of lung volume with lesions: {values['involvement_percent']:.2f} %"]


def expectations(accession: str, labels: list[str]) -> dict[str, object]:
    return {"accession": accession, "sr": SETTINGS.sr.series_description,
            "seg": SETTINGS.seg.series_description, "sc": SETTINGS.sc.series_description,
            "srLabels": labels, "segSegments": ["COVID-19 lesions", "Lungs"]}


def warning_pixels(screenshot: Path, box: dict[str, float]) -> int:
    """Pixels of the overlay's warning colour inside the viewport of a screenshot: the SC's
    burned-in "not for diagnostic use" line is shown, not hidden or left black."""
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    x0, y0 = int(box["x"]), int(box["y"])
    view = image[y0:y0 + int(box["height"]), x0:x0 + int(box["width"])]
    return int((np.abs(view - np.array(WARNING_RGB)).sum(axis=2) < 40).sum())


def assert_viewer_shows_everything(report: dict, out: Path, labels: list[str]) -> None:
    assert report["listed"], "the study is not in OHIF's study list"
    series = " ".join(report["series"])
    for description in (SETTINGS.sr.series_description, SETTINGS.seg.series_description,
                        SETTINGS.sc.series_description):
        assert description[:20] in series, (description, report["series"])
    assert report["sr"]["opened"]
    shown = report["sr"]["labels"]
    for label in labels:
        assert any(label in text for text in shown), (label, shown)
    assert report["seg"]["opened"] and report["seg"]["hydrated"], report["seg"]
    assert "COVID-19 lesions" in report["seg"]["text"] and "Lungs" in report["seg"]["text"]
    assert report["sc"]["opened"]
    assert warning_pixels(out / "3-sc.png", report["sc"]["box"]) > 200
    assert not report["errors"], "\n".join(report["errors"])


def test_ohif_shows_the_seg_sr_and_sc_of_a_study(tmp_path: Path, pacs: Orthanc) -> None:
    volume, result, _ = phantom_case(tmp_path / "case", slices=24, thickness=5.0)
    results = build_results(volume, result, SETTINGS)
    for path in [*sorted((tmp_path / "case").rglob("*.dcm")),
                 *results.write(tmp_path / "results")]:
        pacs.upload(path)
    labels = sr_labels(measurements(volume, result))
    accession = str(volume.source_datasets[0].AccessionNumber)
    out = tmp_path / "ohif"
    with serve_ohif(pacs.url) as url:
        report = check_study(url, volume.study_instance_uid, out,
                             expectations(accession, labels))
    assert_viewer_shows_everything(report, out, labels)


def test_results_reach_ohif_through_the_nodes_return_path(
    tmp_path: Path, pacs: Orthanc, start_node
) -> None:
    """The CT goes from the PACS to the node by C-STORE, the shipped model analyses it, the
    results come back by C-STORE, and OHIF shows them from the PACS."""
    case = generate_phantom(tmp_path / "case", seed=6, matrix=256,
                            thickness_mm=5.0)
    node = start_node(**node_config(pacs, DEFAULT_MODELS_DIR))
    pacs.add_modality("node", NODE_AET, node.receiver.port)
    push_to_node(pacs, upload_series(pacs, case))
    wait_for(lambda: delivered_sets(node.spool) == 1, timeout=300, interval=0.5)
    found = result_instances(pacs, case)
    assert set(found) == {"seg", "sc", "sr", "ko"}, sorted(found)
    values = sr_values(found["sr"][0])
    (probability, _), = values["Probability"]
    labels = [f"Probability: {probability:.2f}", "Volume of lesions:"]
    out = tmp_path / "ohif"
    with serve_ohif(pacs.url) as url:
        report = check_study(url, case.study_instance_uid, out,
                             expectations("PH6", labels))
    assert_viewer_shows_everything(report, out, labels)
