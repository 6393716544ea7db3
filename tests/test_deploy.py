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
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dcn_node.config import Settings, parse_settings
from tests.deploy_files import (
    ALERTS,
    ALERTS_TEST,
    CLUSTER_UNITS,
    COMPOSE,
    DASHBOARD,
    DOCKERFILE,
    HAPROXY_CFG,
    OPERATIONS_DOC,
    PROMETHEUS_CLUSTER,
    ROOT,
    UNIT,
    alert_rules,
    compose_file,
    dashboard_expressions,
    exposed_series_names,
    interpolate,
    metric_names,
    subcommands,
)
from tests.haproxy import require_haproxy
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
    assert "dcn-node-receive.service dcn-node-worker@.service" in result.stdout
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


# -- cluster mode: deploy/compose.yaml, deploy/haproxy/haproxy.cfg, the role units --------

#: Passwords for interpolating the compose file in tests (it requires them).
COMPOSE_ENV = {"DCN_DB_PASSWORD": "db-secret", "DCN_BROKER_PASSWORD": "broker-secret"}


def dcn_node_services() -> dict[str, dict]:
    """The compose services that run the dcn-node image, by name."""
    return {name: service for name, service in compose_file()["services"].items()
            if service.get("image", "").startswith("dcn-node")}


def service_settings(service: dict) -> tuple[str, Settings]:
    """The config a dcn-node service mounts at its --config path: (name, Settings)."""
    command = service["command"]
    path = command[command.index("--config") + 1]
    (mount,) = [c for c in service["configs"] if c["target"] == path]
    content = compose_file()["configs"][mount["source"]]["content"]
    return mount["source"], parse_settings(yaml.safe_load(interpolate(content, COMPOSE_ENV)))


def test_compose_file_runs_every_role_on_real_commands_and_valid_configs() -> None:
    compose = compose_file()
    services = compose["services"]
    assert {"postgres", "rabbitmq", "haproxy", "prometheus"} <= set(services)
    nodes = dcn_node_services()
    roles = {name: service["command"][0] for name, service in nodes.items()}
    assert roles and set(roles.values()) <= subcommands(), roles
    receivers = sorted(name for name, role in roles.items() if role == "receive")
    assert len(receivers) == 2 and "worker" in roles.values(), roles
    spool_volumes = set()
    receiver_ids = set()
    for name, service in nodes.items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == \
            DOCKERFILE.resolve()
        _, settings = service_settings(service)
        assert settings.store.url and settings.store.url.startswith("postgresql://"), name
        assert settings.broker.url and settings.broker.url.startswith("amqp://"), name
        assert "@postgres:" in settings.store.url and "@rabbitmq:" in settings.broker.url
        assert settings.destinations, name
        assert settings.metrics.port == 9108 and settings.metrics.host == "0.0.0.0"
        # Every role on the one spool folder: the shared volume at storage.spool_dir.
        mounts = [v.split(":") for v in service["volumes"]]
        shared = [source for source, target, *_ in mounts
                  if Path(target) == settings.storage.spool_dir]
        assert len(shared) == 1, (name, mounts)
        spool_volumes.add(shared[0])
        if roles[name] == "receive":
            assert settings.node.port == 11112 and settings.node.id
            receiver_ids.add(settings.node.id)
        for dependency in ("postgres", "rabbitmq"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy"
    assert len(spool_volumes) == 1 and spool_volumes <= set(compose["volumes"])
    assert receiver_ids == set(receivers)  # claims under names unique to each receiver
    # The image has the cluster extra (psycopg, celery) these roles need.
    assert re.search(r'pip install .*"\.\[cluster\]"', DOCKERFILE.read_text())
    # No password in the file: the environment gives them, and they are required.
    text = COMPOSE.read_text()
    for variable, secret in COMPOSE_ENV.items():
        assert f"${{{variable}:?" in text and secret not in text
    with pytest.raises(KeyError):
        interpolate(text, {})
    # Files it mounts from deploy/ exist; every service names an image.
    for service in services.values():
        assert service.get("image"), service
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
    haproxy_mounts = [v.split(":") for v in services["haproxy"]["volumes"]]
    assert any((COMPOSE.parent / source).resolve() == HAPROXY_CFG.resolve()
               for source, *_ in haproxy_mounts)
    assert "11112:11112" in services["haproxy"]["ports"]
    prometheus = services["prometheus"]
    config_path = Path(prometheus["command"][0].split("=", 1)[1])
    (mount,) = [v.split(":") for v in prometheus["volumes"] if v.startswith("./prometheus")]
    mounted = COMPOSE.parent / mount[0] / config_path.relative_to(mount[1])
    assert mounted.resolve() == PROMETHEUS_CLUSTER.resolve()


def test_haproxy_config_passes_haproxy_check_and_balances_the_compose_receivers() -> None:
    haproxy = require_haproxy()
    check = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                           text=True, timeout=60)
    output = check.stdout + check.stderr
    assert check.returncode == 0, output
    assert "Configuration file is valid" in output
    # The only warnings: the receivers' names resolve only inside compose's network.
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address" in line for line in warnings), warnings
    text = HAPROXY_CFG.read_text()
    for line in ("mode tcp", "option httpchk GET /readyz", "http-check expect status 200",
                 "option redispatch", "bind :11112"):
        assert re.search(rf"^\s*{re.escape(line)}$", text, re.M), line
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", text, re.M)
    nodes = dcn_node_services()
    receivers = {name for name, s in nodes.items() if s["command"][0] == "receive"}
    assert {name for name, _, _ in servers} == receivers
    health = re.search(r"^\s*default-server check port (\d+)", text, re.M)
    for _, host, port in servers:
        _, settings = service_settings(nodes[host])
        assert int(port) == settings.node.port
        assert health and int(health.group(1)) == settings.metrics.port


def test_prometheus_cluster_config_passes_promtool(promtool: str) -> None:
    check = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CLUSTER)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(PROMETHEUS_CLUSTER.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"dcn-node", "haproxy", "rabbitmq"} <= set(jobs)  # alerts expect job dcn-node
    names = {n for sd in jobs["dcn-node"]["dns_sd_configs"] for n in sd["names"]}
    assert names == set(dcn_node_services())


@pytest.mark.parametrize("role", sorted(CLUSTER_UNITS))
def test_cluster_role_units_pass_systemd_analyze_verify(role: str, tmp_path: Path) -> None:
    text = CLUSTER_UNITS[role].read_text()
    command = re.search(r"^ExecStart=/opt/dcn-node/\.venv/bin/dcn-node (\S+) ", text, re.M)
    assert command and command.group(1) == role and role in subcommands()
    for setting in ("Restart=on-failure", "User=dcn-node", "ProtectSystem=strict",
                    "ReadWritePaths=/var/lib/dcn-node", "NoNewPrivileges=yes",
                    "RequiresMountsFor=/var/lib/dcn-node/spool"):
        assert re.search(rf"^{re.escape(setting)}", text, re.M), (role, setting)
    if role == "receive":  # readiness and watchdog, as dcn-node.service
        assert re.search(r"^Type=notify$", text, re.M) and "WatchdogSec=" in text
    else:  # one GPU each
        assert re.search(r"^Environment=CUDA_VISIBLE_DEVICES=%i$", text, re.M)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed here (no systemd): the unit is unchecked")
    entry = Path(sys.executable).parent / "dcn-node"
    name = CLUSTER_UNITS[role].name.replace("@.", "@0.")  # an instance of the template
    unit = tmp_path / name
    unit.write_text(text.replace("/opt/dcn-node/.venv/bin/dcn-node", str(entry)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert name not in result.stderr, result.stderr  # no warnings on it
