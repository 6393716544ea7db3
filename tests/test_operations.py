"""Operations end to end: a real Prometheus scrapes `dcn-node serve` while Orthanc pushes a
chest CT and takes the results back; the node's own logs, at DEBUG and in JSON, never hold
the patient's name, ID or birth date; systemd's readiness and watchdog protocol."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dcn_train.phantom import PhantomCase, generate_phantom
from tests.conftest import free_port, require_tool, wait_for
from tests.deploy_files import alert_rules, dashboard_expressions, metric_names
from tests.node_process import NodeProcess
from tests.orthanc import Orthanc, orthanc_workdir
from tests.prometheus import Prometheus
from tests.test_pipeline import node_config, push_to_node, result_instances, upload

#: Distinctive patient identifiers: any of these in a log line is a leak.
PATIENT_NAME = "Quaxleworth^Zenobia^Ottilie"
PATIENT_ID = "PID-73519046"
PATIENT_BIRTH_DATE = "19380214"


@dataclass
class Run:
    """One end-to-end run, shared by the tests of this module."""

    case: PhantomCase
    node: NodeProcess
    prometheus: Prometheus
    results: dict[str, int]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, untrained_models: Path) -> Iterator[Run]:
    require_tool("Orthanc")
    require_tool("prometheus")
    case = generate_phantom(tmp_path_factory.mktemp("phantom"), seed=47, slices=24,
                            matrix=128, PatientName=PATIENT_NAME, PatientID=PATIENT_ID,
                            PatientBirthDate=PATIENT_BIRTH_DATE)
    with orthanc_workdir() as pacs_dir:
        orthanc = Orthanc(pacs_dir, free_port(), free_port())
        orthanc.start()
        metrics_port = free_port()
        workdir = tmp_path_factory.mktemp("node")
        node = NodeProcess(
            workdir, **node_config(orthanc, untrained_models),
            metrics={"host": "127.0.0.1", "port": metrics_port},
            logging={"level": "DEBUG", "format": "json"},
        )
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), free_port(),
                                [f"127.0.0.1:{metrics_port}"])
        try:
            node.start()
            prometheus.start()
            wait_for(lambda: prometheus.value('up{job="dcn-node"}') == 1, timeout=60,
                     interval=0.5)
            orthanc.add_modality("node", "DCN_NODE", node.port)
            push_to_node(orthanc, upload(orthanc, case))
            # Results acknowledged by Orthanc, as Prometheus saw it.
            wait_for(lambda: prometheus.value(
                'sum(dcn_series_end_to_end_seconds_count{job="dcn-node"})') == 1,
                timeout=240, interval=0.5)
            found = result_instances(orthanc, case)
            assert set(found) == {"seg", "sc", "sr", "ko"}, sorted(found)
            yield Run(case, node, prometheus, {kind: len(v) for kind, v in found.items()})
        finally:
            exit_code = node.terminate() if node.process and node.process.poll() is None \
                else None
            prometheus.stop()
            orthanc.stop()
        assert exit_code in (0, None)


def test_prometheus_sees_the_run(run: Run) -> None:
    prom = run.prometheus
    sent = len(run.case.sop_instance_uids)
    assert prom.value('sum(dcn_series_end_to_end_seconds_count{job="dcn-node"})') == 1
    assert prom.value('sum(dcn_instances_received_total{job="dcn-node"})') == sent
    assert prom.value('sum(dcn_cstore_responses_total{status="0x0000"})') == sent
    assert prom.value('sum(dcn_cstore_responses_total{status!="0x0000"})') == 0
    assert prom.value('dcn_series_total{outcome="processed"}') == 1
    assert prom.value('dcn_series_total{outcome="completed"}') == 1
    assert prom.value('dcn_series_total{outcome="failed"}') == 0
    for kind, count in run.results.items():
        expr = f'sum(dcn_result_deliveries_total{{outcome="sent", kind="{kind}"}})'
        assert prom.value(expr) == count, kind
    assert prom.value('sum(dcn_result_deliveries_total{outcome=~"retry|dead"})') == 0
    assert prom.value("sum(dcn_outbox_pending)") == 0
    assert prom.value('dcn_received_bytes_total') > 0
    for stage in ("volume_load", "lung_segmentation", "dcn", "spm", "encoding"):
        assert prom.value(f'dcn_inference_stage_seconds_count{{stage="{stage}"}}') == 1, stage
    assert prom.value("dcn_ready") == 1
    (model,) = prom.query("dcn_model_info")
    assert model["metric"]["profile"] == "lite" and model["metric"]["device"] == "cpu"

    # The dashboard's and the alerts' queries all run on this Prometheus, over metrics it
    # has; the rules load and evaluate, and none fires on a healthy run.
    present = {r["metric"]["__name__"] for r in prom.query('{job="dcn-node"}')}
    present |= {"up"}
    for title, expr in dashboard_expressions() + [(r["alert"], r["expr"])
                                                  for r in alert_rules()]:
        prom.query(expr)  # raises with Prometheus' error message
        assert metric_names(expr) <= present, (title, metric_names(expr) - present)
    rules = [rule for group in prom.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == len(alert_rules())
    assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing


def test_logs_hold_no_patient_identifiers(run: Run) -> None:
    # The identifiers reached the node and went back out in the results...
    stored = next(run.node.workdir.glob("spool/instances/*/*/*.dcm")).read_bytes()
    assert PATIENT_ID.encode() in stored and PATIENT_BIRTH_DATE.encode() in stored
    # ...but no log line names them, in any of the forms a formatter might use.
    wait_for(lambda: "series_summary" in run.node.log_path.read_text(), timeout=30)
    log = run.node.log_path.read_text()
    name_parts = [part for part in PATIENT_NAME.split("^") if part]
    forbidden = [PATIENT_ID, PATIENT_BIRTH_DATE, "1938-02-14", "14.02.1938", "1938/02/14",
                 *name_parts]
    lines = log.splitlines()
    assert len(lines) > 10
    for line in lines:
        for value in forbidden:
            assert value.lower() not in line.lower(), f"{value!r} logged: {line[:300]}"
    # JSON lines throughout; exactly one summary line for the series, with its outcome.
    entries = [json.loads(line) for line in lines if line.strip()]
    summaries = [e for e in entries if e.get("event") == "series_summary"]
    assert len(summaries) == 1, summaries
    (summary,) = summaries
    assert summary["series_instance_uid"] == run.case.series_instance_uid
    assert summary["outcome"] == "delivered"
    assert summary["results"] == {"sent": sum(run.results.values()), "dead": 0}
    assert summary["instances"] == len(run.case.sop_instance_uids)
    # 24 slices of 5 mm cover 12 cm of lung: the quality gate answers "not assessable".
    assert summary["probability"] is None
    assert summary["not_assessable_reason"] == "lungs_cut_by_scan_range"
    assert "not assessable (lungs_cut_by_scan_range)" in summary["message"]
    assert any(e["level"] == "DEBUG" for e in entries)  # the strictest level was on


def test_systemd_readiness_watchdog_and_healthcheck(tmp_path: Path) -> None:
    """The node speaks sd_notify as `Type=notify` + `WatchdogSec=` expect, and the
    container's HEALTHCHECK command reads /readyz."""
    folder = Path(tempfile.mkdtemp(prefix="dcn-notify-"))  # short: AF_UNIX path limit
    address = str(folder / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    metrics_port = free_port()
    node = NodeProcess(tmp_path, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
                       metrics={"host": "127.0.0.1", "port": metrics_port})
    messages: list[str] = []

    def receive_until(wanted: str) -> None:
        while not any(wanted in m for m in messages):
            messages.append(sock.recv(4096).decode())

    try:
        node.start()
        receive_until("READY=1")
        assert "STATUS=listening as DCN_NODE" in next(m for m in messages if "READY=1" in m)
        started = time.monotonic()
        receive_until("WATCHDOG=1")
        receive_until("WATCHDOG=1")
        assert time.monotonic() - started < 5
        check = [sys.executable, "-m", "dcn_node", "healthcheck", "--config",
                 str(node.config_path)]
        ready = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert ready.returncode == 0, ready.stdout + ready.stderr
        assert '"status": "ready"' in ready.stdout
        live = subprocess.run([*check, "--live"], capture_output=True, text=True, timeout=60)
        assert live.returncode == 0 and "alive" in live.stdout
        assert node.terminate() == 0
        receive_until("STOPPING=1")
        down = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert down.returncode == 1
    finally:
        if node.process is not None and node.process.poll() is None:
            node.kill()
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)
