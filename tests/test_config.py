"""Configuration: the shipped default loads; every problem is reported with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dcn_node.config import DEFAULT_CONFIG_PATH, load_config, parse_settings
from dcn_node.errors import ConfigError

REQUIRED_KEYS = {
    "node": {"ae_title", "host", "port", "allowed_calling_aets", "allowed_hosts"},
    "storage": {"spool_dir"},
    "completion": {"quiet_seconds"},
    "inference": {"device"},
    "metrics": {"port"},
}


def test_shipped_default_has_the_keys_outside_scripts_rely_on() -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for section, keys in REQUIRED_KEYS.items():
        assert keys <= set(raw[section]), section
    assert raw["destinations"][0] == {
        "name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242
    }
    settings = load_config()
    assert settings.node.ae_title == "DCN_NODE" and settings.node.port == 11112
    assert settings.completion.quiet_seconds == 10
    assert settings.inference.device == "auto"
    assert settings.metrics.port == 9108


def test_every_problem_is_reported_at_once_with_its_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            {
                "node": {"ae_title": "THIS_AE_TITLE_IS_TOO_LONG", "port": 70000, "colour": "red"},
                "completion": {"quiet_seconds": -1},
                "selection": {"series_description_include": "([", "slice_thickness_mm":
                              {"min": 5, "max": 1}},
                "destinations": [{"name": "a", "ae_title": "X", "host": "h", "port": 1},
                                 {"name": "a", "ae_title": "Y", "host": "h", "port": 2}],
                "inference": {"device": "tpu"},
            }
        )
    text = str(caught.value)
    for expected in (
        "node.ae_title",
        "node.port",
        "node.colour",
        "completion.quiet_seconds",
        "selection.series_description_include",
        "selection.slice_thickness_mm",
        "destinations",
        "inference.device",
    ):
        assert expected in text, expected
    assert len(caught.value.problems) >= 8


def test_a_broker_is_an_amqp_url_and_needs_the_shared_store() -> None:
    settings = parse_settings({"store": {"url": "postgresql://db/dcn"},
                               "broker": {"url": "amqp://dcn@rabbit:5672/dcn"}})
    assert settings.broker.queue == "dcn-inference" and settings.inference.stub_seconds is None
    assert parse_settings({}).broker.url is None  # the embedded default: no broker
    with pytest.raises(ConfigError, match=r"broker.url: .*amqp"):
        parse_settings({"store": {"url": "postgresql://db/dcn"},
                        "broker": {"url": "redis://cache:6379/0"}})
    with pytest.raises(ConfigError, match="broker.url needs store.url"):
        parse_settings({"broker": {"url": "amqp://rabbit//"}})
    with pytest.raises(ConfigError, match="broker.queue"):
        parse_settings({"store": {"url": "postgresql://db/dcn"},
                        "broker": {"url": "amqp://rabbit//", "queue": "no spaces"}})


def test_missing_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_settings_are_frozen() -> None:
    settings = load_config()
    with pytest.raises(Exception, match="frozen"):
        settings.node.port = 1  # type: ignore[misc]


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "dcn_node", "check-config"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: 0.5, ae_title: ''}\nstorage: {fsync: maybe}\n")
    failed = subprocess.run(
        [sys.executable, "-m", "dcn_node", "check-config", "--config", str(bad)],
        capture_output=True, text=True,
    )
    assert failed.returncode == 2
    assert "node.port" in failed.stderr and "node.ae_title" in failed.stderr
    assert "storage.fsync" in failed.stderr
