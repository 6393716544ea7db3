"""Load: parallel senders, each sending its series one after the other, to a node process.

Shared by tests/test_load.py (8 x 10 small series, model off) and bench/load.py (bigger,
model on). The node runs as ``dcn-node serve`` in a child process so that its own peak
memory (VmHWM) is measured, apart from the senders'.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import wait_for
from tests.dicom_factory import ct_series
from tests.faults import RetryingSender
from tests.node_process import NodeProcess
from tests.recording_pacs import RecordingPacs


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a process: its peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


@dataclass
class LoadReport:
    senders: int
    series: int
    instances: int
    bytes_sent: int
    failed_cstores: int
    refused_associations: int
    series_lost: int
    send_seconds: float
    settle_seconds: float
    peak_rss_bytes: int
    results_at_pacs: int | None = None
    failure_reasons: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        lines = [
            f"{self.senders} parallel senders: {self.series} series, {self.instances} "
            f"instances ({self.bytes_sent / 1e6:.0f} MB) sent in {self.send_seconds:.1f} s "
            f"({self.instances / max(self.send_seconds, 1e-9):.0f} instances/s)",
            f"failed C-STOREs: {self.failed_cstores}, associations refused (retried): "
            f"{self.refused_associations}, series lost: {self.series_lost}",
            f"node peak memory (VmHWM): {self.peak_rss_bytes / 2**20:.0f} MiB",
            f"all series {'queued' if self.results_at_pacs is None else 'delivered'} "
            f"{self.settle_seconds:.1f} s after the last instance",
        ]
        if self.results_at_pacs is not None:
            lines.append(f"result objects at the PACS: {self.results_at_pacs}")
        if self.failure_reasons:
            lines.append(f"failures: {'; '.join(self.failure_reasons)}")
        return lines


def run_load(workdir: Path, *, senders: int = 8, series_per_sender: int = 10,
             slices: int = 30, matrix: int = 64, models: Path | None = None,
             settle_timeout: float = 300.0, node: dict | None = None) -> LoadReport:
    """Send ``senders`` x ``series_per_sender`` series in parallel; wait until every
    series is queued (model off) or delivered (``models`` given); measure."""
    pacs = RecordingPacs() if models is not None else None
    sections: dict = {"node": {"max_associations": max(16, 2 * senders), **(node or {})},
                      "completion": {"quiet_seconds": 5.0, "check_interval_seconds": 0.5}}
    if models is not None and pacs is not None:
        pacs.start()
        sections |= {
            "destinations": [pacs.destination()],
            "inference": {"enabled": True, "device": "cpu", "models_dir": str(models),
                          "queue_high_water": 0},
            "sender": {"retry_initial_seconds": 0.5, "retry_max_interval_seconds": 2.0},
        }
    node_process = NodeProcess(workdir, **sections)
    all_series = [[ct_series(slices, announce=True, rows=matrix, columns=matrix)
                   for _ in range(series_per_sender)] for _ in range(senders)]
    bytes_sent = sum(len(ds.PixelData) for group in all_series for s in group for ds in s)
    results: list[list[RetryingSender]] = [[] for _ in range(senders)]

    def send_all(index: int) -> None:
        for series in all_series[index]:
            sender = RetryingSender(series, node_process.port, calling_aet=f"PACS{index}")
            results[index].append(sender)
            sender.run()  # in this thread: one series after the other

    try:
        node_process.start()
        assert node_process.process is not None
        threads = [threading.Thread(target=send_all, args=(i,)) for i in range(senders)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(settle_timeout)
        send_seconds = time.monotonic() - started
        uids = {s[0].SeriesInstanceUID for group in all_series for s in group}
        wanted = "done" if models is not None else "queued"

        def settled() -> bool:
            states = {s["series_instance_uid"]: s["state"] for s in node_process.status()["series"]}
            if pacs is not None:
                studies = {s[0].StudyInstanceUID for group in all_series for s in group}
                if not all(pacs.complete(study) for study in studies):
                    return False
            return all(states.get(uid) == wanted for uid in uids)

        wait_for(settled, timeout=settle_timeout, interval=1.0)
        settle_seconds = time.monotonic() - started - send_seconds
        states = {s["series_instance_uid"]: s for s in node_process.status()["series"]}
        lost = sum(1 for uid in uids if uid not in states
                   or states[uid]["instances"] != slices)
        senders_flat = [s for group in results for s in group]
        report = LoadReport(
            senders=senders, series=len(uids),
            instances=sum(len(s.acknowledged) for s in senders_flat),
            bytes_sent=bytes_sent,
            failed_cstores=sum(s.failures for s in senders_flat),
            refused_associations=sum(s.refusals for s in senders_flat),
            series_lost=lost, send_seconds=send_seconds, settle_seconds=settle_seconds,
            peak_rss_bytes=peak_rss_bytes(node_process.process.pid),
            results_at_pacs=len(pacs.stored) if pacs is not None else None,
            failure_reasons=tuple(r for s in senders_flat for r in s.failure_reasons),
        )
        assert node_process.terminate() == 0
        return report
    finally:
        if node_process.process is not None and node_process.process.poll() is None:
            node_process.process.kill()
            node_process.process.wait(10)
        if pacs is not None:
            pacs.stop()
