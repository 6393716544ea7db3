"""How much does the verdict move with the edge of the DCN's lung mask?

At inference the DCN sees the CT only through the lung mask, whose edge moves by a pixel or
two with the lung U-Net, the work grid or the anatomical constraint. A model that learned
lungs should hardly care; one that learned the mask's edge does (model card: a 0.1 % mask
change moved a real scan's probability from 0.29 to 0.54). On phantoms never trained on,
this grows and shrinks the U-Net's lung mask by 1 and 2 pixels on the network grid and
prints, per models folder, the mean and largest change of the slice probabilities, the share
of slices whose slice call (0.5) flips, the change of the calibrated patient probability and
the lesion pixels drawn on the added rim (chest wall, mediastinum) when the mask grows.

    .venv/bin/python bench/mask_stability.py [--models dcn_node/models var/models-x] [--cases 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcn_node.inference.engine import (  # noqa: E402
    DEFAULT_MODELS_DIR,
    Engine,
    calibrated,
    run_dcn,
    run_lung,
)
from dcn_train.cases import make_case  # noqa: E402
from dcn_train.corpus import phantom_case, phantom_seeds  # noqa: E402

FIRST_SEED = 960_000  # held out: not training, mapping, validation, evaluation or heatmap
EDITS = (1, -1, 2, -2)  # pixels grown (+) or shrunk (-) on the network grid


def _edited(lung: torch.Tensor, pixels: int) -> torch.Tensor:
    mask = lung.numpy()
    structure = ndimage.generate_binary_structure(3, 1)
    structure[0] = structure[2] = False  # in-plane only: slices stay independent
    if pixels > 0:
        out = ndimage.binary_dilation(mask, structure, iterations=pixels)
    else:
        out = ndimage.binary_erosion(mask, structure, iterations=-pixels)
    return torch.from_numpy(out)


@torch.inference_mode()
def measure(engine: Engine, image: torch.Tensor) -> dict[str, list[float]]:
    lung = run_lung(engine.lung_model, image, batch_size=16) >= 0.5
    keep, base, base_lesion, _ = run_dcn(engine.dcn, image, lung, batch_size=16)

    def patient(slice_prob: torch.Tensor, kept: torch.Tensor) -> float:
        logit = engine.spm(slice_prob[kept] if len(kept) else torch.zeros(1))
        return float(calibrated(float(torch.sigmoid(logit.float()).item()), engine.calibration))

    p0 = patient(base, keep)
    rows: dict[str, list[float]] = {}
    for pixels in EDITS:
        mask = _edited(lung, pixels)
        kept, prob, lesion, _ = run_dcn(engine.dcn, image, mask, batch_size=16)
        both = np.intersect1d(keep.numpy(), kept.numpy())
        change = (prob[both] - base[both]).abs().numpy()
        flips = ((prob[both] >= 0.5) != (base[both] >= 0.5)).numpy()
        row = rows.setdefault(f"{pixels:+d} px", [])
        rim = mask & ~lung
        row.extend([float(change.mean()), float(change.max()), float(flips.mean()),
                    abs(patient(prob, kept) - p0),
                    float(((lesion >= 0.5) & rim).sum()) if pixels > 0 else 0.0,
                    float(((base_lesion >= 0.5) & lung).sum())])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", default=[DEFAULT_MODELS_DIR])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engines = [Engine(folder, device="cpu", optimized=False) for folder in args.models]
    size = engines[0].profile.input_size
    totals: list[dict[str, list[list[float]]]] = [{} for _ in engines]
    for seed, kind, thickness in phantom_seeds(FIRST_SEED, args.cases):
        volume = phantom_case(seed, kind, thickness)
        case = make_case(volume.name, volume.hu, volume.lung, volume.lesion, volume.label,
                         size, pixel_spacing_mm=volume.pixel_spacing_mm)
        image = torch.from_numpy(case.image.astype(np.float32))
        del volume
        for engine, total in zip(engines, totals, strict=True):
            for edit, row in measure(engine, image).items():
                total.setdefault(edit, []).append(row)
        print(f"{case.name}: {len(case.image)} slices, label {case.label}", flush=True)
    print(f"\n{args.cases} phantoms from seed {FIRST_SEED}; lung mask edited on the "
          f"{size} x {size} network grid (U-Net mask, no constraint)")
    print(f"{'models':<28}{'edit':>7}{'mean |dp|':>11}{'max |dp|':>10}{'flips':>8}"
          f"{'|dP| pat.':>11}{'rim lesion px':>15}")
    means: list[float] = []
    for folder, engine, total in zip(args.models, engines, totals, strict=True):
        name = f"{folder.name or folder} ({engine.model_version[-8:]})"
        for edit in (f"{pixels:+d} px" for pixels in EDITS):
            values = np.array(total[edit])
            rim = values[:, 4].sum()
            drawn = values[:, 5].sum()
            print(f"{name:<28}{edit:>7}{values[:, 0].mean():>11.4f}{values[:, 1].max():>10.3f}"
                  f"{values[:, 2].mean():>8.1%}{values[:, 3].mean():>11.4f}"
                  f"{int(rim):>8} ({rim / max(drawn, 1):.1%})")
        means.append(float(np.mean([np.array(total[e])[:, 0].mean() for e in total])))
    for folder, mean in zip(args.models[1:], means[1:], strict=True):
        print(f"mean |dp| over all edits, {folder} / {args.models[0]}: "
              f"{mean / max(means[0], 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
