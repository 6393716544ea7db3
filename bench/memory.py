"""Peak memory of ``dcn-node analyze`` on long series: 300 and 1,000 slices of 512 x 512.

Each run is a fresh process (``dcn-node analyze`` on the CPU, shipped weights, shipped
config: SEG, SC, SR and KOS written); its peak RSS comes from the kernel
(``getrusage(RUSAGE_CHILDREN)`` after it exits, as ``/usr/bin/time -v`` reports it). The
baseline, in the same session, is a process that imports the same modules and loads the
same weights, and analyses nothing: what is left is what the series costs.

    .venv/bin/python bench/memory.py [--slices 300 1000] [--keep]

The series are phantoms (generator v2, seed 3, COVID-19 pattern) written once into
``var/bench/memory-<slices>/`` (300 slices of 1 mm, 1,000 of 0.3 mm: the same chest).
Goal (issue 17): peak < 1 GB at 300 slices, < 2 GB at 1,000.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS_MB = {300: 1024, 1000: 2048}
THICKNESS_MM = {300: 1.0, 1000: 0.3}

BASELINE = """
import numpy, scipy.ndimage, pydicom, highdicom, torch, matplotlib
from dcn_node.cli import main
from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine
from dcn_node.results import build_results
from dcn_node.volume import load_dicom_folder
Engine(DEFAULT_MODELS_DIR, "lite", "cpu")
"""


ANALYZE = "import sys; from dcn_node.cli import main; sys.exit(main())"


def series_for(slices: int) -> Path:
    """The cached phantom series of ``slices`` slices (generated on first use)."""
    folder = ROOT / "var" / "bench" / f"memory-{slices}"
    if not (folder / "ground_truth.json").exists():
        from dcn_train.phantom import generate_phantom

        started = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        generate_phantom(folder, seed=3, slices=slices,
                         thickness_mm=THICKNESS_MM.get(slices, 1.0), matrix=512)
        print(f"  generated {slices} slices in {time.perf_counter() - started:.0f} s",
              flush=True)
    return folder / "series"


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``command`` run alone in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of the children is the largest of any child so far: run the largest last,
    # or compare with the previous value (a smaller child leaves it unchanged).
    if peak <= before:
        raise RuntimeError("run the series in increasing size (ru_maxrss is a maximum)")
    return peak / 1024.0, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--keep", action="store_true", help="keep the analyze outputs")
    args = parser.parse_args()
    python = sys.executable
    baseline, _ = peak_rss_mb([python, "-c", BASELINE])
    print(f"baseline (imports + weights, nothing analysed): {baseline:7.0f} MB")
    rows = []
    for slices in sorted(args.slices):
        series = series_for(slices)
        out = Path(tempfile.mkdtemp(prefix=f"memory-{slices}-"))
        peak, seconds = peak_rss_mb([python, "-c", ANALYZE, "analyze", str(series),
                                     "--out", str(out)])
        summary = json.loads((out / "summary.json").read_text())
        volume_mb = summary["slices"] * 512 * 512 * 2 / 2**20  # the int16 HU volume
        goal = GOALS_MB.get(slices)
        rows.append((slices, peak, seconds, volume_mb, goal))
        print(f"{slices:5d} slices: peak {peak:7.0f} MB  ({peak - baseline:6.0f} MB over the "
              f"baseline, {(peak - baseline) / volume_mb:4.2f}x the int16 volume of "
              f"{volume_mb:.0f} MB), {seconds:5.1f} s"
              + (f"  goal < {goal} MB: {'met' if peak < goal else 'NOT met'}" if goal else ""),
              flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0 if all(goal is None or peak < goal for _, peak, _, _, goal in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
