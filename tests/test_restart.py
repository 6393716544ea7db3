"""`dcn-node serve` as a real process: kill -9 mid-series, restart, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import NODE_AET, send_datasets, wait_for
from tests.dicom_factory import ct_series
from tests.node_process import NodeProcess


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path)
    yield node
    if node.process is not None and node.process.poll() is None:
        node.process.kill()
        node.process.wait(10)


def test_kill_9_mid_series_then_restart_loses_nothing(node_process: NodeProcess) -> None:
    node_process.start()
    finished = ct_series(25)  # complete and queued before the crash
    assert send_datasets(finished, node_process.port) == [0] * 25
    wait_for(lambda: (node_process.series_state(finished[0].SeriesInstanceUID) or {}).get(
        "state") == "queued")

    series = ct_series(120)
    acknowledged: list[str] = []
    enough = threading.Event()

    def send_until_killed() -> None:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node_process.port, ae_title=NODE_AET)
        for ds in series:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                break  # the node died under us: no Success, the PACS would retry
            acknowledged.append(ds.SOPInstanceUID)
            if len(acknowledged) >= 50:
                enough.set()
        enough.set()
        if assoc.is_established:
            assoc.release()

    sender = threading.Thread(target=send_until_killed)
    sender.start()
    assert enough.wait(60)
    node_process.kill()  # kill -9 while the association is still sending
    sender.join(30)
    assert 50 <= len(acknowledged) < 120

    node_process.start()
    state = node_process.series_state(series[0].SeriesInstanceUID)
    assert state is not None and state["instances"] >= len(acknowledged)
    assert state["state"] == "receiving"
    # The queued series stays queued (and is not queued twice).
    assert node_process.series_state(finished[0].SeriesInstanceUID)["state"] == "queued"

    # The PACS sends what it did not get a Success for.
    rest = [ds for ds in series if ds.SOPInstanceUID not in set(acknowledged)]
    assert send_datasets(rest, node_process.port) == [0] * len(rest)
    wait_for(lambda: (node_process.series_state(series[0].SeriesInstanceUID) or {}).get(
        "state") == "queued", timeout=20)
    final = node_process.series_state(series[0].SeriesInstanceUID)
    assert final["instances"] == 120 and final["reason"] is None
    spool = node_process.workdir / "spool"
    files = list((spool / "instances").rglob(f"{series[0].SeriesInstanceUID}/*.dcm"))
    assert sorted(p.stem for p in files) == sorted(ds.SOPInstanceUID for ds in series)
    assert list((spool / "incoming").iterdir()) == []  # crash leftovers cleaned
    assert node_process.terminate() == 0


def test_incomplete_series_resumes_quiet_timer_after_restart(node_process: NodeProcess) -> None:
    node_process.start()
    series = ct_series(30)
    assert send_datasets(series, node_process.port) == [0] * 30
    node_process.kill()
    time.sleep(2.5)
    # Down for longer than the quiet period: on restart the timer starts again rather than
    # completing at once on a stale timestamp, so a PACS still sending is not cut off.
    node_process.start()
    assert node_process.series_state(series[0].SeriesInstanceUID)["state"] == "receiving"
    wait_for(lambda: node_process.series_state(series[0].SeriesInstanceUID)["state"] == "queued",
             timeout=15)


def test_sigterm_stops_gracefully(node_process: NodeProcess) -> None:
    node_process.start()
    assert node_process.terminate() == 0
    log = node_process.log_path.read_text()
    assert "dcn-node stopped" in log


def test_status_table_and_check_config(node_process: NodeProcess) -> None:
    node_process.start()
    series = ct_series(20, SeriesDescription="Chest MIP")
    assert send_datasets(series, node_process.port) == [0] * 20
    wait_for(lambda: (node_process.series_state(series[0].SeriesInstanceUID) or {}).get(
        "state") == "ignored")
    table = subprocess.run(
        [sys.executable, "-m", "dcn_node", "status", "--config", str(node_process.config_path)],
        cwd=node_process.workdir, capture_output=True, text=True, check=True,
    ).stdout
    assert series[0].SeriesInstanceUID in table and "ignored" in table
    assert "selection.series_description_exclude" in table
    checked = subprocess.run(
        [sys.executable, "-m", "dcn_node", "check-config", "--config",
         str(node_process.config_path)],
        capture_output=True, text=True, check=False,
    )
    assert checked.returncode == 0 and "OK" in checked.stdout
    echo = subprocess.run(
        [sys.executable, "-m", "dcn_node", "echo", "127.0.0.1", str(node_process.port),
         "--aec", NODE_AET],
        capture_output=True, text=True, check=False, env={**os.environ},
    )
    assert echo.returncode == 0 and "0x0000" in echo.stdout
    assert node_process.terminate() == 0
