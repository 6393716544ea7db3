"""Load: N parallel senders x M series each to a `dcn-node serve` process, model on.

Reports series, instances, failed C-STOREs, refused associations, lost series, the node's
peak memory (VmHWM) and the time until every result set reached the PACS.

    .venv/bin/python bench/load.py [--senders 8] [--series 10] [--slices 60] [--matrix 256]
    .venv/bin/python bench/load.py --no-model     # receive and queue only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_untrained_models  # noqa: E402
from tests.load import run_load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--series", type=int, default=10, help="series per sender")
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--no-model", action="store_true", help="model off: queue only")
    parser.add_argument("--timeout", type=float, default=3000.0)
    parser.add_argument("--transport-tuning", choices=["on", "off"],
                        help="set node.transport_tuning (default: the config default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcn-bench-load-") as work_dir:
        work = Path(work_dir)
        models = None if args.no_model else make_untrained_models(work / "models")
        (work / "node").mkdir()
        report = run_load(work / "node", senders=args.senders,
                          series_per_sender=args.series, slices=args.slices,
                          matrix=args.matrix, models=models, settle_timeout=args.timeout,
                          node=None if args.transport_tuning is None else
                          {"transport_tuning": args.transport_tuning == "on"})
    for line in report.lines():
        print(line)
    return 0 if report.failed_cstores == 0 and report.series_lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
