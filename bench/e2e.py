"""End to end: 4 senders push 4 different 300-slice series at once; results go to Orthanc.

A node (in this process, lite model, CPU, shipped weights) receives from four dcmtk
``storescu`` processes at the same time, completes each series by its announced slice
count, runs the model, encodes SEG/SC/SR and sends them to a real Orthanc on loopback.
For each series it prints the end-to-end latency (last instance acknowledged by the node
-> every result object acknowledged by Orthanc), then p50, max and series per hour.

    .venv/bin/python bench/e2e.py [--series 4] [--slices 300] [--models dcn_node/models]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcn_node.config import parse_settings  # noqa: E402
from dcn_node.inference.engine import DEFAULT_MODELS_DIR  # noqa: E402
from dcn_node.node import Node  # noqa: E402
from dcn_node.store.outbox import Outbox  # noqa: E402
from dcn_train.phantom import generate_phantom  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.orthanc import ORTHANC_AET, Orthanc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS_DIR)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dcn-bench-e2e-") as work_dir:
        work = Path(work_dir)
        print(f"generating {args.series} phantoms of {args.slices} slices "
              f"{args.matrix}x{args.matrix} ...", flush=True)
        cases = [
            generate_phantom(work / f"case{i}", seed=7100 + i, slices=args.slices,
                             thickness_mm=1.0, matrix=args.matrix, normal=bool(i % 2))
            for i in range(args.series)
        ]
        pacs_dir = Path(tempfile.mkdtemp(prefix="dcn-orthanc-"))  # nobody can enter it
        pacs = Orthanc(pacs_dir, free_port(), free_port())
        pacs.start()
        settings = parse_settings({
            "node": {"host": "127.0.0.1", "port": 0},
            "storage": {"spool_dir": str(work / "spool"), "min_free_bytes": 0},
            "completion": {"quiet_seconds": 10, "check_interval_seconds": 0.2},
            "destinations": [{"name": "pacs", "ae_title": ORTHANC_AET,
                              "host": "127.0.0.1", "port": pacs.dicom_port}],
            "inference": {"device": "cpu", "models_dir": str(args.models)},
            "metrics": {"port": 0},
        })
        node = Node(settings)
        node.start()
        try:
            return run(args, cases, node, pacs)
        finally:
            node.stop()
            pacs.stop()
            shutil.rmtree(pacs_dir, ignore_errors=True)


def run(args: argparse.Namespace, cases: list, node: Node, pacs: Orthanc) -> int:
    last_sent: dict[str, float] = {}

    def send(index: int) -> None:
        case = cases[index]
        env = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
        subprocess.run(
            ["storescu", "-aet", f"SENDER{index}", "-aec", settings_aet(node),
             "127.0.0.1", str(node.receiver.port), "+sd", str(case.series_dir)],
            check=True, env=env, capture_output=True,
        )
        last_sent[case.series_instance_uid] = time.time()

    started = time.time()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"{len(cases)} series sent in {time.time() - started:.1f} s", flush=True)
    outbox = Outbox(node.spool)
    deadline = time.time() + 3600
    latencies: dict[str, float] = {}
    while len(latencies) < len(cases) and time.time() < deadline:
        for case in cases:
            uid = case.series_instance_uid
            if uid in latencies:
                continue
            rows = node.spool.query(
                "SELECT COUNT(*), SUM(d.state = 'sent'), MAX(d.sent_at) FROM deliveries d "
                "JOIN result_sets r ON r.result_set_id = d.result_set_id "
                "WHERE r.series_instance_uid = ?", (uid,))
            total, sent, last_ack = rows[0]
            if total and total == sent:
                latencies[uid] = last_ack - last_sent[uid]
                record = node.spool.get_series(case.study_instance_uid, uid)
                print(f"series {uid[-20:]} ({'positive phantom' if case.label else 'normal'}"
                      f"): {latencies[uid]:.1f} s from last instance to all {total} results "
                      f"acknowledged; state {record.state if record else '?'}", flush=True)
        failed = node.spool.list_series("failed")
        if failed:
            print(f"FAILED: {[(s.series_instance_uid, s.reason) for s in failed]}")
            return 1
        time.sleep(0.2)
    total_seconds = time.time() - started
    values = sorted(latencies.values())
    print(f"end-to-end latency: p50 {statistics.median(values):.1f} s, max {max(values):.1f} s "
          f"({len(values)} series of {args.slices} slices)")
    print(f"throughput: {len(values) / total_seconds * 3600:.0f} series per hour "
          f"({total_seconds:.1f} s from the first instance sent to the last result "
          f"acknowledged)")
    print(f"outbox: {outbox.counts()}")
    return 0 if len(values) == len(cases) else 1


def settings_aet(node: Node) -> str:
    return node.settings.node.ae_title


if __name__ == "__main__":
    sys.exit(main())
