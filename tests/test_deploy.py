"""The deployment files: alert rules (promtool), the dashboard, the systemd unit
(systemd-analyze), the Dockerfile, the install target and the runbook."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy_files import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    DOCKERFILE,
    OPERATIONS_DOC,
    ROOT,
    UNIT,
    alert_rules,
    dashboard_expressions,
    exposed_series_names,
    metric_names,
)
from tests.test_metrics import get


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not on PATH: run `make test`, which installs Debian's prometheus")
    return path


def test_alert_rules_pass_promtool_check_and_their_unit_tests(promtool: str) -> None:
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS.parent,
                          capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    names = {rule["alert"] for rule in alert_rules()}
    assert {"DcnNodeDown", "DcnNodeNotReady", "DcnOutboxStuck", "DcnDeadLetters",
            "DcnSpoolDiskLow", "DcnInferenceFailures", "DcnLatencyHigh"} <= names
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    assert tested == names, f"alerts without a unit test: {names - tested}"


def test_every_alert_has_a_runbook_section() -> None:
    doc = OPERATIONS_DOC.read_text()
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
        assert re.search(rf"^### {rule['alert']}\s*$", doc, re.M), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_dashboard_and_alerts_name_only_real_metrics(start_node) -> None:
    dashboard = json.loads(DASHBOARD.read_text())  # valid JSON
    assert dashboard["uid"] == "dcn-node" and dashboard["panels"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "queues", "failures", "disk"):
        assert topic in titles, topic
    node = start_node(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                     "port": 4242}])
    status, body = get(node, "/metrics")
    families = list(text_string_to_metric_families(body.decode()))
    exposed = exposed_series_names(families) | {"up"}
    expressions = dashboard_expressions() + [(r["alert"], r["expr"]) for r in alert_rules()]
    assert len(expressions) > 30
    for title, expr in expressions:
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= exposed, (title, names - exposed)
    # Every metric of the node shows somewhere on the dashboard.
    on_dashboard = set().union(*(metric_names(e) for _, e in dashboard_expressions()))
    missing = [f.name for f in families
               if f.name.startswith("dcn_") and not exposed_series_names([f]) & on_dashboard]
    assert not missing, missing


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed here (no systemd): the unit is unchecked")
    text = UNIT.read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=dcn-node",
                    "ProtectSystem=strict", "ReadWritePaths=/var/lib/dcn-node",
                    "NoNewPrivileges=yes", "PrivateTmp=yes"):
        assert re.search(rf"^{re.escape(setting)}", text, re.M), setting
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M)  # empty: ports above 1024
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    entry = Path(sys.executable).parent / "dcn-node"
    unit = tmp_path / "dcn-node.service"
    unit.write_text(text.replace("/opt/dcn-node/.venv/bin/dcn-node", str(entry)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dcn-node.service" not in result.stderr, result.stderr  # no warnings on it


def test_install_systemd_target_is_well_formed() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    result = subprocess.run([make, "-n", "install-systemd", "INSTALL_DIR=/srv/dcn"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "sed 's#/opt/dcn-node#/srv/dcn#g' systemd/dcn-node.service" in result.stdout
    assert "systemctl daemon-reload" in result.stdout


def test_dockerfile_follows_the_platform_conventions() -> None:
    """Checked as text: no Docker daemon runs in CI (docs/operations.md#docker)."""
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.M | re.I)
    assert len(stages) >= 2, "multi-stage"
    assert re.search(r"^ARG BASE=python:3\.11-slim", text, re.M), "CPU base by default"
    assert stages[0][0] == "${BASE}", "the base is a build argument (CUDA images)"
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M)
    assert torch_pin and f"ARG TORCH_SPEC={torch_pin.group(1)}" in text, "same torch pin"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "non-root"
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck", text, re.M), "HEALTHCHECK"
    assert re.search(r'^VOLUME \[.*"/var/lib/dcn-node".*"/etc/dcn-node".*\]', text, re.M)
    assert re.search(r"^EXPOSE 11112 9108$", text, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY source {path} missing: docker build fails"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "var" in ignored
