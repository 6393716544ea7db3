"""The shipped model on real chest CTs it never trained on (none is COVID-19).

The scans are fetched into a SHA-256-checked cache (docs/real-ct.md). Held out from
training: nsclc-3, nsclc-4 (cropped around a lung cancer) and chest-a0001 (a whole chest,
adenocarcinoma). ``bench/real_ct.py`` prints the same figures for every fetched scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dcn_node.inference.engine import Engine
from dcn_node.volume import Volume, load_dicom_folder
from dcn_train.findings import Geometry, insert_covid_lesions
from dcn_train.real_ct import real_cases, rtstruct_mask
from tests.lung_reference import dsc, dsc_outside, reference_lung_mask

#: The real CTs are fetched (network) by the first test that needs them, then analysed
#: at full size: the slow tests' limit.
pytestmark = pytest.mark.slow

HELD_OUT = ("nsclc-3", "nsclc-4", "chest-a0001")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu")  # no gate settings: the model's own lesions


def _analyze(real_ct: Path, engine: Engine, name: str):  # noqa: ANN202
    (case,) = real_cases(real_ct, names=(name,))
    assert case.split == "heldout"
    volume = load_dicom_folder(case.series_dir)
    return case, volume, engine.analyze(volume)


@pytest.mark.parametrize("name", HELD_OUT)
def test_real_ct_gate_no_covid_and_lesions_in_the_lungs(real_ct: Path, engine: Engine,
                                                         name: str) -> None:
    case, _, result = _analyze(real_ct, engine, name)
    assert not (result.lesion & ~result.lung).any()
    if case.cropped:  # the field of view cuts the lungs: not assessable, not positive
        assert not result.assessable
        assert result.quality.reason.value == "lungs_cut_by_field_of_view"
        assert not result.positive
    else:
        assert result.assessable
        assert result.probability < result.threshold, "a lung cancer called COVID-19"


@pytest.mark.parametrize("name", HELD_OUT)
def test_real_ct_lung_mask_matches_a_classical_reference(real_ct: Path, engine: Engine,
                                                         name: str) -> None:
    case, volume, result = _analyze(real_ct, engine, name)
    reference = reference_lung_mask(volume.hu, float(volume.pixel_spacing[1]))
    # Compared outside the tumour the scan's RTSTRUCT outlines (GTV): the threshold
    # reference cannot hold a dense mass by design, while the node's lung mask keeps
    # intrapulmonary disease in the lung (on nsclc-4 the mass is 27 k of the 50 k voxels
    # only the node's mask has: DSC 0.912 whole, 0.953 outside it).
    tumour = rtstruct_mask(case.rtstruct, volume) if case.rtstruct else None
    assert dsc_outside(result.lung, reference, tumour) >= 0.95


@pytest.fixture(scope="module")
def inserted(real_ct: Path, engine: Engine):  # noqa: ANN201
    """chest-a0001 with 8 % of its lungs given synthetic COVID-19 lesions, and the result."""
    (case,) = real_cases(real_ct, names=("chest-a0001",))
    volume = load_dicom_folder(case.series_dir)
    reference = reference_lung_mask(volume.hu, float(volume.pixel_spacing[1]))
    hu = volume.hu.astype(np.float32).copy()
    rng = np.random.default_rng([31337, 1])  # not a training seed (those are 4242+)
    lesion = insert_covid_lesions(
        rng, hu, reference, Geometry(float(volume.pixel_spacing[1]), volume.slice_spacing_mm),
        involvement=0.08)
    with_lesions = Volume(hu=hu, sop_instance_uids=volume.sop_instance_uids,
                          frame_numbers=volume.frame_numbers,
                          pixel_spacing=volume.pixel_spacing,
                          slice_offsets=volume.slice_offsets,
                          study_instance_uid=volume.study_instance_uid,
                          series_instance_uid=volume.series_instance_uid,
                          source_datasets=volume.source_datasets)
    return lesion, engine.analyze(with_lesions)


def test_real_ct_with_inserted_lesions_is_called_positive(inserted) -> None:  # noqa: ANN001
    _, result = inserted
    assert result.assessable
    assert result.probability >= result.threshold
    assert not (result.lesion & ~result.lung).any()


@pytest.mark.xfail(strict=True, reason="issue 15: lesion DSC < 0.70 with lite-20261203-b5386b14 "
                   "(large inserted lesions partly missed)")
def test_real_ct_inserted_lesions_are_outlined(inserted) -> None:  # noqa: ANN001
    lesion, result = inserted
    assert dsc(result.lesion, lesion) >= 0.70
