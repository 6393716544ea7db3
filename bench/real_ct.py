"""The model on every real CT the project fetches (none is COVID-19), and on the same scans
with synthetic COVID-19 lesions inserted into their real parenchyma.

For each chest CT: the quality gate's verdict; lung DSC against a classical HU-threshold
reference (``tests/lung_reference.py``, independent of the node's own anatomy code), whole
and outside the RTSTRUCT's tumour (GTV) where the scan has one (the check); lesion
voxels outside the lung mask (must be 0); the probability against the decision threshold
(must be below: a lung cancer is not COVID-19); for the NSCLC cases, the share of the
tumour (RTSTRUCT GTV) outlined as COVID-19 lesion. Then ``--variants`` insertions per case
(involvement 0.5-30 %): lesion DSC against the inserted mask and the probability (above the
threshold where the series is assessable), and where the missed lesion is: the share of
the inserted ground glass (below -300 HU after insertion) and of the inserted dense part
(consolidation, -300 HU and up) that is outlined, and that the lung mask holds at all (a
lesion outside the lung mask cannot be outlined). The head CT: the gate's verdict only.
Which patients were used in training is printed with each row (``split``).

    .venv/bin/python bench/real_ct.py [--models DIR] [--variants 3] [--cache var/real-ct]
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine  # noqa: E402
from dcn_node.volume import Volume, load_dicom_folder  # noqa: E402
from dcn_train.findings import Geometry, insert_covid_lesions  # noqa: E402
from dcn_train.real_ct import real_cases, rtstruct_mask  # noqa: E402
from tests.lung_reference import dsc, dsc_outside, reference_lung_mask  # noqa: E402

#: Seeds of the insertions here: never the training corpus's (4242+).
INSERTION_SEED = 777_000
#: Inserted voxels at or above this (HU, after insertion) count as dense (consolidation).
DENSE_HU = -300.0


def _found(outlined: np.ndarray, lung: np.ndarray, part: np.ndarray) -> str:
    """``outlined/in lung`` shares of ``part`` ("-" when empty)."""
    if not part.any():
        return "-"
    total = float(part.sum())
    return f"{(outlined & part).sum() / total:.2f}/{(lung & part).sum() / total:.2f}"


def _with_hu(volume: Volume, hu: np.ndarray) -> Volume:
    return Volume(hu=hu, sop_instance_uids=volume.sop_instance_uids,
                  frame_numbers=volume.frame_numbers, pixel_spacing=volume.pixel_spacing,
                  slice_offsets=volume.slice_offsets,
                  study_instance_uid=volume.study_instance_uid,
                  series_instance_uid=volume.series_instance_uid,
                  source_datasets=volume.source_datasets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--cache", type=Path, default=ROOT / "var" / "real-ct")
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    engine = Engine(args.models, "lite", args.device)
    threshold = engine.decision_threshold
    print(f"model {engine.model_version}, decision threshold {threshold:.3f}")
    print(f"{'case':24}{'split':>8}{'gate':>28}{'lung DSC':>10}{'w/o GTV':>9}{'outside':>9}"
          f"{'p':>8}{'called':>8}{'lesion DSC':>12}{'tumour hit':>12}"
          f"{'GGO found/in lung':>19}{'dense found/in lung':>21}")
    failures = []
    for case in real_cases(args.cache):
        volume = load_dicom_folder(case.series_dir)
        result = engine.analyze(volume)
        gate = result.quality.reason.value if result.quality.reason else "assessable"
        if case.region != "chest":
            print(f"{case.name:24}{case.split:>8}{gate:>28}")
            if result.assessable:
                failures.append(f"{case.name}: a head came out assessable")
            continue
        reference = reference_lung_mask(volume.hu, float(volume.pixel_spacing[1]))
        lung_dsc = dsc(result.lung, reference)
        outside = int((result.lesion & ~result.lung).sum())
        tumour = ""
        # The check compares outside the RTSTRUCT's tumour (GTV), as tests/test_real_ct.py
        # does: the threshold reference cannot hold a dense mass, the node's mask keeps it.
        gtv = rtstruct_mask(case.rtstruct, volume) if case.rtstruct is not None else None
        if gtv is not None:
            tumour = f"{(result.lesion & gtv).sum() / max(gtv.sum(), 1):.1%}"
        checked_dsc = dsc_outside(result.lung, reference, gtv)
        called = "pos" if result.probability >= threshold else "neg"
        print(f"{case.name:24}{case.split:>8}{gate:>28}{lung_dsc:>10.3f}{checked_dsc:>9.3f}{outside:>9}"
              f"{result.probability:>8.3f}{called:>8}{'':>12}{tumour:>12}")
        if checked_dsc < 0.95:
            failures.append(f"{case.name}: lung DSC {checked_dsc:.3f} < 0.95 (outside the GTV)")
        if outside:
            failures.append(f"{case.name}: {outside} lesion voxels outside the lungs")
        if result.assessable and result.probability >= threshold:  # not assessable: negative
            failures.append(f"{case.name}: p {result.probability:.3f} >= threshold (not COVID)")
        spacing = float(volume.pixel_spacing[1])
        geo = Geometry(spacing, volume.slice_spacing_mm)
        for variant in range(args.variants):
            rng = np.random.default_rng([INSERTION_SEED, variant, zlib.crc32(case.name.encode())])
            involvement = float(np.exp(np.linspace(np.log(0.005), np.log(0.3),
                                                   max(args.variants, 2))[variant]))
            hu = volume.hu.astype(np.float32).copy()
            inserted = insert_covid_lesions(rng, hu, reference, geo, involvement=involvement)
            inserted_volume = _with_hu(volume, hu)
            out = engine.analyze(inserted_volume)
            lesion_dsc = dsc(out.lesion, inserted)
            called = "pos" if out.probability >= threshold else "neg"
            name = f"  +COVID {100 * involvement:.1f} %"
            dense = inserted & (hu >= DENSE_HU)
            print(f"{name:24}{case.split:>8}{'':>28}{'':>19}"
                  f"{int((out.lesion & ~out.lung).sum()):>9}{out.probability:>8.3f}"
                  f"{called:>8}{lesion_dsc:>12.3f}{'':>12}"
                  f"{_found(out.lesion, out.lung, inserted & ~dense):>19}"
                  f"{_found(out.lesion, out.lung, dense):>21}")
            if lesion_dsc < 0.70:
                failures.append(f"{case.name} +{100 * involvement:.1f} %: lesion DSC "
                                f"{lesion_dsc:.3f} < 0.70")
            if out.assessable and out.probability < threshold:
                failures.append(f"{case.name} +{100 * involvement:.1f} %: p "
                                f"{out.probability:.3f} below the threshold")
    print("\nissue 15 checks: " + ("all hold" if not failures else f"{len(failures)} fail"))
    for line in failures:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
