"""Inference speed: the lite profile on one 300-slice 512x512 series, naive vs optimized.

Naive: float32 eager, contiguous tensors. Optimized: the engine's path (batch norms folded
into the convolutions, channels_last, bfloat16 autocast on CPUs with native bfloat16;
float16 autocast on CUDA); also that path without autocast ("opt-fp32"). Same weights, same
volume, same process; prints seconds for each, the ratio, and the accuracy delta between
the two paths (lesion/lung mask agreement as DSC, probability difference).

    .venv/bin/python bench/inference.py [--profile lite] [--device cpu] [--models dcn_node/models]

Goals (issue 3, 2-core CPU): optimized <= 20 s per series and >= 3x over naive.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine
from dcn_node.volume import load_dicom_folder
from dcn_train.phantom import generate_phantom


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="lite", choices=["lite", "paper"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dcn-bench-inference-") as work:
        case = generate_phantom(Path(work) / "case", seed=4243, slices=args.slices,
                                thickness_mm=1.0)
        volume = load_dicom_folder(case.series_dir)
    print(f"series: {volume.hu.shape[0]} slices {volume.hu.shape[1]}x{volume.hu.shape[2]}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    results = {}
    seconds: dict[str, list[float]] = {}
    variants = {"naive": (False, False), "optimized": (True, True),
                "opt-fp32": (True, False)}  # the optimized path without autocast
    for name, (optimized, reduced) in variants.items():
        engine = Engine(args.models, args.profile, args.device, optimized=optimized,
                        reduced_precision=reduced)
        engine.analyze(volume)  # warm-up: allocator, oneDNN primitive caches
        seconds[name] = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            results[name] = engine.analyze(volume)
            seconds[name].append(time.perf_counter() - started)
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in results[name].timings.items())
        print(f"{name:9}: {statistics.median(seconds[name]):.1f} s per series "
              f"({engine.autocast_dtype or 'float32'}; {timings})")
    naive, fast = statistics.median(seconds["naive"]), statistics.median(seconds["optimized"])
    print(f"ratio: optimized is {naive / fast:.1f}x naive (goal >= 3x; optimized goal <= 20 s); "
          f"without autocast {naive / statistics.median(seconds['opt-fp32']):.1f}x")
    a = results["naive"]
    for name in ("optimized", "opt-fp32"):
        b = results[name]
        print(f"accuracy delta: lesion mask DSC(naive, {name}) {dsc(a.lesion, b.lesion):.4f}, "
              f"lung {dsc(a.lung, b.lung):.4f}, probability {a.probability:.4f} vs "
              f"{b.probability:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
