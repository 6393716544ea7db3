"""Fuzzing the Storage SCP on loopback with hypothesis: mutated A-ASSOCIATE-RQ and P-DATA
PDUs over raw sockets, mutated CT datasets over a real association. No crash, no hang
(every exchange ends within its timeout), threads and memory bounded, C-ECHO answered
afterwards. About two minutes; longer runs: bench/fuzz.py --seconds 600."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import send_datasets, wait_for
from tests.dicom_factory import ct_series
from tests.fuzzing import OPERATION_KINDS, DatasetFuzzer, Seeds, send_pdus
from tests.load import peak_rss_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on fuzzed values

operations = st.lists(
    st.tuples(st.sampled_from(OPERATION_KINDS), st.integers(0, 1 << 20),
              st.integers(0, 1 << 16)),
    min_size=1, max_size=6,
)
def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
#: The node's timeouts in these tests: a stalled exchange ends within seconds.
TIMEOUTS = {"acse_timeout_seconds": 3, "dimse_timeout_seconds": 5,
            "network_timeout_seconds": 5}


def rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(autouse=True)
def thread_crashes():
    """Exceptions that escape any thread (a dead pynetdicom DUL thread hangs its
    association): none are allowed."""
    crashes: list[str] = []
    previous = threading.excepthook

    def record(args: threading.ExceptHookArgs) -> None:
        crashes.append(f"{args.thread.name if args.thread else '?'}: "
                       f"{args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = record
    yield crashes
    threading.excepthook = previous
    assert not crashes, crashes[:5]


def still_healthy(node, threads_before: int, rss_before: int) -> None:
    wait_for(lambda: node.receiver.active_associations() == 0, timeout=15)
    wait_for(lambda: threading.active_count() <= threads_before + 2, timeout=15)
    assert rss(os.getpid()) - rss_before < 300 * 2**20
    assert node.liveness().ok
    assert send_datasets(ct_series(1), node.receiver.port) == [0]


@pytest.mark.slow
def test_fuzzed_pdus_do_not_crash_or_hang_the_scp(start_node) -> None:
    node = start_node(node=TIMEOUTS)
    seeds = Seeds()
    threads, memory = threading.active_count(), rss(os.getpid())
    count = {"n": 0}
    started = time.monotonic()

    @fuzz_settings(300)
    @given(ops=operations, target=st.sampled_from(["associate", "p_data"]))
    def exchange(ops, target) -> None:
        begun = time.monotonic()
        send_pdus(node.receiver.port, seeds, ops, target=target)
        assert time.monotonic() - begun < 10  # no hang
        count["n"] += 1

    exchange()
    print(f"\n{count['n']} fuzzed PDU exchanges in {time.monotonic() - started:.0f} s; "
          f"peak RSS {peak_rss_bytes(os.getpid()) / 2**20:.0f} MiB")
    still_healthy(node, threads, memory)


@pytest.mark.slow
def test_fuzzed_datasets_get_a_status_and_leave_the_node_healthy(start_node) -> None:
    node = start_node(node=TIMEOUTS)
    seeds = Seeds()
    fuzzer = DatasetFuzzer(node.receiver.port, seeds)
    threads, memory = threading.active_count(), rss(os.getpid())
    started = time.monotonic()

    @fuzz_settings(500)
    @given(ops=operations)
    def store(ops) -> None:
        status = fuzzer.send(ops)
        # Success, or a failure status the node chose: never a handler crash (0xC211).
        assert status in (None, 0x0000, 0xA900, 0xC000), hex(status or 0)

    try:
        store()
    finally:
        fuzzer.close()
    print(f"\n{sum(fuzzer.statuses.values())} fuzzed C-STOREs in "
          f"{time.monotonic() - started:.0f} s: {fuzzer.statuses}")
    assert fuzzer.statuses.get("0x0000", 0) < sum(fuzzer.statuses.values())
    still_healthy(node, threads, memory)
