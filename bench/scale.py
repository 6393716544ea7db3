"""Throughput of the cluster with 1, 2 and 4 workers: series per minute, and the ratio to one.

Real servers on loopback, as in tests/test_workers.py: a private PostgreSQL and RabbitMQ,
one ``dcn-node receive`` and N ``dcn-node worker`` processes sharing a spool folder,
results to an in-process recording PACS. For each N the workers are started and ready
(model loaded) first; then ``--series`` CT series (announced size, so each is complete
on its last instance) are sent at once by 4 senders that send again what was not
answered Success, as a PACS does. Throughput is measured from
the store's own timeline: from the first ``inference_start`` to the last
``results_recorded``, i.e. the workers' part (analysis and encoding), not the start-up.

Engines:
  stub  ``inference.stub_seconds``: each series sleeps ``--stub-seconds`` instead of the
        model, then goes through the real encoder: how the system around the model scales
        (the goal of issue 18: 4 workers >= 3.6 x one worker);
  lite  the lite networks (untrained weights: the same cost as trained ones), on the CPU:
        bound by the machine's cores.

    .venv/bin/python bench/scale.py [--engine stub|lite|both] [--workers 1 2 4]
                                    [--series 16] [--stub-seconds 5] [--slices 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dcn_node.store.spool import Spool  # noqa: E402
from tests.conftest import make_untrained_models  # noqa: E402
from tests.dicom_factory import ct_series  # noqa: E402
from tests.faults import RetryingSender  # noqa: E402
from tests.node_process import NodeProcess  # noqa: E402
from tests.postgres import PostgresServer, postgres_bin  # noqa: E402
from tests.rabbitmq import RabbitMQ  # noqa: E402
from tests.recording_pacs import RecordingPacs  # noqa: E402


def run(work: Path, store_url: str, broker: RabbitMQ, pacs: RecordingPacs, models: Path,
        workers: int, engine: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement: ``workers`` workers, ``args.series`` series."""
    queue = f"scale-{engine}-{workers}"
    spool_dir = work / "spool"
    common: dict[str, Any] = {
        "storage": {"spool_dir": str(spool_dir)},
        "store": {"url": store_url, "lease_seconds": 30.0},
        "broker": {"url": broker.url, "queue": queue, "republish_interval_seconds": 2.0},
        "destinations": [pacs.destination()],
        "logging": {"level": "WARNING"},
    }
    (work / "receiver").mkdir(parents=True)
    receiver = NodeProcess(work / "receiver", command="receive", spool_dir=spool_dir,
                           node={"id": "receiver"},
                           completion={"quiet_seconds": 5.0, "check_interval_seconds": 0.2,
                                       "min_slices": 5},
                           inference={"queue_high_water": 0}, **common)
    inference = {"enabled": True, "device": "cpu", "models_dir": str(models),
                 "stub_seconds": args.stub_seconds if engine == "stub" else None}
    for n in range(1, workers + 1):
        (work / f"worker-{n}").mkdir()
    nodes = [NodeProcess(work / f"worker-{n}", command="worker", spool_dir=spool_dir,
                         node={"id": f"worker-{n}"}, inference=inference, **common)
             for n in range(1, workers + 1)]
    store = Spool(spool_dir, url=store_url, node_id="bench")
    try:
        receiver.start()
        for node in nodes:
            node.start()
        batches = [ct_series(args.slices, announce=True, rows=args.matrix,
                             columns=args.matrix) for _ in range(args.series)]
        sent_at = time.monotonic()
        # Four senders, a PACS's way: what is not answered Success is sent again.
        senders = [RetryingSender([ds for b in batches[i::4] for ds in b], receiver.port)
                   for i in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(args.timeout)
        assert all(s.done for s in senders), [s.failure_reasons for s in senders]
        resent = sum(s.failures for s in senders)
        deadline = time.monotonic() + args.timeout
        while store.count_jobs("done") + store.count_jobs("failed") < args.series:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{engine}, {workers} worker(s): not done within "
                                   f"{args.timeout} s: {store.list_jobs()}")
            time.sleep(0.5)
        failed = store.count_jobs("failed")
        events = store.query("SELECT event, MIN(at), MAX(at) FROM timeline WHERE event IN "
                             "('inference_start', 'results_recorded') GROUP BY event")
        span = {event: (float(first), float(last)) for event, first, last in events}
        seconds = span["results_recorded"][1] - span["inference_start"][0]
        runs = store.query("SELECT COUNT(*) FROM timeline WHERE event='inference_start'")
        # Per series, from its analysis' start to its results recorded: the worker's time
        # on it (grows when the workers compete for the CPU); and how long jobs waited
        # between two series of one worker (dispatch), estimated from the total.
        busy = store.query(
            "SELECT s.series_instance_uid, MIN(s.at), MAX(r.at) FROM timeline s JOIN "
            "timeline r ON r.series_instance_uid = s.series_instance_uid AND "
            "r.event = 'results_recorded' WHERE s.event = 'inference_start' "
            "GROUP BY s.series_instance_uid")
        service = sum(float(end) - float(start) for _, start, end in busy) / len(busy)
        return {"engine": engine, "workers": workers, "series": args.series,
                "failed": failed, "seconds": seconds, "resent": resent,
                "per_minute": args.series / seconds * 60.0,
                "inference_runs": int(runs[0][0]), "service": service,
                "idle": 1.0 - service * args.series / (seconds * workers),
                "wall": time.monotonic() - sent_at}
    finally:
        for node in [receiver, *nodes]:
            if node.process is not None and node.process.poll() is None:
                node.terminate()
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("stub", "lite", "both"), default="stub")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--series", type=int, default=16)
    parser.add_argument("--stub-seconds", type=float, default=5.0)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--matrix", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args()
    bin_dir = postgres_bin()
    if bin_dir is None:
        print("no PostgreSQL server installed (make test installs it)")
        return 1
    engines = ("stub", "lite") if args.engine == "both" else (args.engine,)
    print(f"machine: {os.cpu_count()} CPU(s); {args.series} series of {args.slices} slices "
          f"{args.matrix}x{args.matrix} per measurement; stub {args.stub_seconds:.1f} s/series",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dcn-bench-scale-") as folder:
        work = Path(folder)
        models = make_untrained_models(work / "models")
        postgres = PostgresServer(bin_dir)
        broker = RabbitMQ()
        pacs = RecordingPacs()
        pacs.start()
        try:
            for engine in engines:
                for workers in args.workers:
                    result = run(work / f"{engine}-{workers}", postgres.new_database(),
                                 broker, pacs, models, workers, engine, args)
                    results.append(result)
                    print(f"  {engine} {workers} worker(s): {result['seconds']:.1f} s, "
                          f"{result['per_minute']:.1f} series/min "
                          f"({result['failed']} failed, {result['inference_runs']} runs, "
                          f"{result['resent']} C-STOREs sent again, "
                          f"{result['service']:.2f} s per series in a worker, workers idle "
                          f"{result['idle']:.0%} of the time)",
                          flush=True)
        finally:
            pacs.stop()
            broker.close()
            postgres.stop()
    print(f"\n{'engine':<6} {'workers':>7} {'series':>6} {'seconds':>8} {'series/min':>10} "
          f"{'x one':>6} {'s/series':>8}")
    for result in results:
        one = next(r for r in results if r["engine"] == result["engine"])
        ratio = result["per_minute"] / one["per_minute"]
        print(f"{result['engine']:<6} {result['workers']:>7} {result['series']:>6} "
              f"{result['seconds']:>8.1f} {result['per_minute']:>10.1f} {ratio:>6.2f} "
              f"{result['service']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
