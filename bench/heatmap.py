"""Does the heat map mark lesions? The LA attention maps against the lesion probability map.

On held-out phantoms with lesions (seeds never trained on), for each map: the pixel-level
AUC of lesion against lesion-free lung pixels (how well the map ranks lesion pixels first),
and, for the raw maps before the node masks them, the share of the map's mass that lies in
the true lungs (where a radiologist would look). The SC default (``sc.heatmap``) follows
from these figures (dcn_node/models/README.md).

    .venv/bin/python bench/heatmap.py [--models dcn_node/models] [--cases 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine  # noqa: E402
from dcn_node.volume import load_dicom_folder  # noqa: E402
from dcn_train.evaluation import auc  # noqa: E402
from dcn_train.phantom import generate_phantom  # noqa: E402

FIRST_SEED = 950_000  # held out: not training (10000+, 1000+), validation or evaluation


def _to_image(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(maps.astype(np.float32))[:, None], size=shape,
                         mode="bilinear", align_corners=False)[:, 0].numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    engine = Engine(args.models, "lite", "cpu")
    names = [f"attention LA{k}" for k in (1, 2, 3, 4)] + ["lesion probability"]
    scores: dict[str, list[np.ndarray]] = {n: [] for n in names}
    inside: dict[str, list[float]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.cases):
            case = generate_phantom(Path(folder) / str(index), FIRST_SEED + index,
                                    thickness_mm=5.0, matrix=256)
            volume = load_dicom_folder(case.series_dir)
            truth = np.load(case.ground_truth_path)
            result = engine.analyze(volume)
            shape = volume.hu.shape[1:]
            maps = [*result.attention, result.lesion_probability]
            lung = truth["lung"]
            for name, values in zip(names, maps, strict=True):
                image = _to_image(np.asarray(values), shape)
                scores[name].append(image[lung])
                total = float(np.abs(image).sum())
                inside[name].append(float(np.abs(image[lung]).sum()) / max(total, 1e-9))
            labels.append(truth["lesion"][lung])
    y = np.concatenate(labels)
    print(f"model {engine.model_version}; {args.cases} held-out phantoms with lesions, "
          f"{len(y)} lung pixels, {int(y.sum())} lesion pixels")
    print(f"{'map':22}{'pixel AUC':>10}{'mass in lungs (raw)':>22}")
    for name in names:
        print(f"{name:22}{auc(y, np.concatenate(scores[name])):>10.3f}"
              f"{np.mean(inside[name]):>22.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
