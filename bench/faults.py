"""kill -9 the node at random moments of receive, inference and send, N rounds.

Every acknowledged instance must be processed and every result delivered exactly once as
the PACS sees it (a re-send of the same SOP Instance UID supersedes). See tests/faults.py.

    .venv/bin/python bench/faults.py [--rounds 20] [--seed 1] [--max-delay 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_untrained_models  # noqa: E402
from tests.faults import kill_rounds  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-delay", type=float, default=6.0,
                        help="longest wait before a kill, seconds")
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--matrix", type=int, default=64)
    parser.add_argument("--pacs-delay", type=float, default=0.7,
                        help="seconds the PACS takes per C-STORE (kills land in sends)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcn-bench-faults-") as work_dir:
        work = Path(work_dir)
        models = make_untrained_models(work / "models")
        (work / "node").mkdir()
        report = kill_rounds(work / "node", models, args.rounds, seed=args.seed,
                             max_delay_seconds=args.max_delay, slices=args.slices,
                             matrix=args.matrix, pacs_delay_seconds=args.pacs_delay,
                             log=lambda line: print(line, flush=True))
    for line in report.lines():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
