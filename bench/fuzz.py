"""Fuzz the Storage SCP on loopback for as long as asked: mutated A-ASSOCIATE-RQ and P-DATA
PDUs over raw sockets, mutated CT datasets over real associations (seeded random
mutations; the suite runs the same with hypothesis for about two minutes).

Prints the exchanges tried, the answers, the node's threads and peak memory, and fails
when the node stops answering C-ECHO or a C-STORE gets a status it should never send.

    .venv/bin/python bench/fuzz.py [--seconds 600] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcn_node.config import parse_settings  # noqa: E402
from dcn_node.node import Node  # noqa: E402
from tests.conftest import send_datasets, test_config  # noqa: E402
from tests.dicom_factory import ct_series  # noqa: E402
from tests.fuzzing import OPERATION_KINDS, DatasetFuzzer, Seeds, send_pdus  # noqa: E402
from tests.load import peak_rss_bytes  # noqa: E402


def operations(rng: random.Random) -> list[tuple[str, int, int]]:
    return [(rng.choice(OPERATION_KINDS), rng.randrange(1 << 20), rng.randrange(1 << 16))
            for _ in range(rng.randint(1, 6))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="dcn-bench-fuzz-") as work:
        settings = parse_settings(test_config(
            Path(work) / "spool", node={"acse_timeout_seconds": 3, "dimse_timeout_seconds": 5,
                                        "network_timeout_seconds": 5}))
        node = Node(settings)
        node.start()
        seeds = Seeds()
        fuzzer = DatasetFuzzer(node.receiver.port, seeds)
        threads = threading.active_count()
        counts = {"associate": 0, "p_data": 0, "dataset": 0}
        unexpected = 0
        deadline = time.monotonic() + args.seconds
        try:
            while time.monotonic() < deadline:
                target = rng.choice(["associate", "p_data", "dataset"])
                if target == "dataset":
                    if fuzzer.send(operations(rng)) not in (None, 0x0000, 0xA900, 0xC000):
                        unexpected += 1
                else:
                    send_pdus(node.receiver.port, seeds, operations(rng), target=target)
                counts[target] += 1
            fuzzer.close()
            time.sleep(6)  # the node's network timeout closes what the fuzzer left open
            echo_ok = send_datasets(ct_series(1), node.receiver.port) == [0]
            print(f"fuzz iterations: {sum(counts.values())} in {args.seconds:.0f} s "
                  f"({counts})")
            print(f"C-STORE answers: {fuzzer.statuses}; unexpected statuses: {unexpected}")
            print(f"threads before {threads}, after {threading.active_count()}; "
                  f"open associations {node.receiver.active_associations()}; "
                  f"peak RSS {peak_rss_bytes(os.getpid()) / 2**20:.0f} MiB; "
                  f"node healthy: {node.liveness().ok}; stores after fuzzing: {echo_ok}")
        finally:
            node.stop(timeout=5)
    return 0 if echo_ok and unexpected == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
