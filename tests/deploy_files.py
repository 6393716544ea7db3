"""Reading the deployment files the tests check: the dashboard, the alert rules."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dcn-node.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
UNIT = ROOT / "systemd" / "dcn-node.service"
DOCKERFILE = ROOT / "Dockerfile"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
#: Cluster mode: the compose file, the haproxy config it mounts, Prometheus' config for
#: it, and the systemd units of the cluster roles.
COMPOSE = ROOT / "deploy" / "compose.yaml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
PROMETHEUS_CLUSTER = ROOT / "deploy" / "prometheus" / "cluster.yml"
CLUSTER_UNITS = {"receive": ROOT / "systemd" / "dcn-node-receive.service",
                 "worker": ROOT / "systemd" / "dcn-node-worker@.service"}

#: Grafana's variables, replaced by what they stand for in a plain PromQL query.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}
#: Metric names in PromQL: dcn_*, process_* and Prometheus' own ``up``.
_METRIC_NAME = re.compile(r"\b(dcn_[a-z0-9_]+|process_[a-z0-9_]+|up(?=\{))")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) for every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, replacement in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, replacement)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (label values and functions excluded)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(_METRIC_NAME.findall(without_strings))


def exposed_series_names(families: list[Any]) -> set[str]:
    """Names a query may use for the families of an exposition (histogram suffixes)."""
    names = set()
    for family in families:
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


#: Compose's variable forms: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}.
_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with compose's variables replaced from ``env`` (KeyError: a required
    variable, ``${VAR:?...}`` or ``${VAR}``, is not in ``env``)."""

    def value(match: re.Match[str]) -> str:
        name, form, default = match.group(1), match.group(2), match.group(3)
        if name in env and (env[name] or not (form or "").startswith(":")):
            return env[name]
        if form and form.endswith("-"):
            return default
        raise KeyError(f"compose variable {name} is required ({default or 'no default'})")

    return _COMPOSE_VARIABLE.sub(value, text)


def compose_file() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def subcommands() -> set[str]:
    """The dcn-node command line's subcommands (serve, receive, worker, status, ...)."""
    import argparse

    from dcn_node.cli import build_parser

    (action,) = [a for a in build_parser()._actions
                 if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)
