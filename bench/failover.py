"""kill -9 rounds across receivers and workers (cluster mode), N rounds.

Three ``dcn-node receive`` nodes behind a real haproxy and two ``dcn-node worker``
processes (untrained lite models, CPU) on a real RabbitMQ, one PostgreSQL store and one
spool folder, results to a real Orthanc (``--all-in-one``: three ``dcn-node serve`` nodes
behind haproxy instead, no broker). Each round sends a new series through haproxy (a few
instances per association), waits a random time, kills a node that is receiving (a
receiver), analysing (a worker) or sending (a receiver), in turn, with SIGKILL and
restarts it.
At the end it prints, per round and in total: lost instances (acknowledged but not in the
index, the spool folder or the analysed series), duplicate result sets at Orthanc, the
series' states, analyses per generation and re-sent objects. See tests/failover.py.

    .venv/bin/python bench/failover.py [--rounds 20] [--seed 1] [--receivers 3] [--workers 2]

Needs Debian's postgresql, rabbitmq-server, haproxy and orthanc (``make test`` installs
them as root).
Exit status 1 when anything was lost, duplicated or not done.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, make_untrained_models  # noqa: E402
from tests.failover import Cluster, failover_rounds  # noqa: E402
from tests.orthanc import Orthanc, orthanc_workdir  # noqa: E402
from tests.postgres import PostgresServer, postgres_bin  # noqa: E402
from tests.rabbitmq import RabbitMQ  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--all-in-one", action="store_true",
                        help="serve nodes (each also runs the model), no broker, no workers")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--matrix", type=int, default=64)
    parser.add_argument("--per-association", type=int, default=3,
                        help="instances the sender sends per association")
    parser.add_argument("--max-delay", type=float, default=8.0,
                        help="longest wait for a busy receiver before a kill, seconds")
    args = parser.parse_args()
    bin_dir = postgres_bin()
    if bin_dir is None:
        print("no PostgreSQL server installed (apt-get install postgresql)", file=sys.stderr)
        return 2
    postgres = PostgresServer(bin_dir)
    broker = None if args.all_in_one else RabbitMQ()
    try:
        with tempfile.TemporaryDirectory(prefix="dcn-bench-failover-") as work_dir, \
                orthanc_workdir() as pacs_dir:
            work = Path(work_dir)
            models = make_untrained_models(work / "models")
            pacs = Orthanc(pacs_dir, free_port(), free_port(), count_stores=True)
            pacs.start()
            try:
                cluster = Cluster(work / "cluster", postgres.new_database(), models, pacs,
                                  broker_url=broker.url if broker else None,
                                  receivers=args.receivers, workers=args.workers)
                try:
                    cluster.start()
                    report = failover_rounds(
                        cluster, pacs, args.rounds, seed=args.seed, slices=args.slices,
                        matrix=args.matrix, per_association=args.per_association,
                        max_delay_seconds=args.max_delay,
                        log=lambda line: print(line, flush=True))
                finally:
                    cluster.stop()
            finally:
                pacs.stop()
    finally:
        if broker is not None:
            broker.close()
        postgres.stop()
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
