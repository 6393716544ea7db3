"""A node on a PostgreSQL store as operations see it, on servers of the test's own
(tests/postgres.py): completion, readiness and the outbox-age gauge timed by the
database's clock, which stamped the rows, whatever the host's clock says (the server runs
an hour behind the host through faketime); the store lost (the server stopped) and back."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dcn_node.node import Node
from dcn_node.store.outbox import ResultObject
from tests.conftest import send_datasets, wait_for
from tests.dicom_factory import ct_series
from tests.postgres import PostgresServer, own_postgres_server
from tests.test_bad_input import PATIENT_VALUES
from tests.test_metrics import get, value

#: How far the database's clock runs behind the host's.
SKEW_SECONDS = 3600.0
#: In the store's URL: never in a log line or a readiness answer.
PASSWORD = "s3cret-Pw"


@pytest.fixture(scope="module")
def skewed_server() -> Iterator[PostgresServer]:
    with own_postgres_server(clock_offset_seconds=-SKEW_SECONDS) as server:
        yield server


def test_the_database_clock_is_the_skewed_one(skewed_server: PostgresServer,
                                              start_node: Callable[..., Node]) -> None:
    node = start_node(store={"url": skewed_server.new_database()})
    assert node.spool.now() == pytest.approx(time.time() - SKEW_SECONDS, abs=30)


def test_a_series_completes_after_its_quiet_period_by_the_databases_clock(
        skewed_server: PostgresServer, start_node: Callable[..., Node]) -> None:
    """By the host's clock every arrival is an hour old: the series would complete at the
    first check, cutting off a PACS still sending."""
    node = start_node(store={"url": skewed_server.new_database()},
                      completion={"quiet_seconds": 3.0})
    series = ct_series(6)
    assert send_datasets(series, node.receiver.port) == [0] * 6
    time.sleep(1.5)
    (record,) = node.spool.list_series()
    assert record.state == "receiving"
    record = wait_for(lambda: next(iter(node.spool.list_series("queued")), None), timeout=15)
    assert record.completed_at is not None
    assert record.completed_at - record.last_received_at >= 3.0


def test_outbox_age_and_readiness_by_the_databases_clock(
        skewed_server: PostgresServer, start_node: Callable[..., Node], tmp_path: Path) -> None:
    """A result set recorded just now is seconds old, not an hour: the node stays ready
    (outbox_stuck_seconds 600) and the gauge says so."""
    node = start_node(store={"url": skewed_server.new_database()},
                      metrics={"port": 0, "outbox_stuck_seconds": 600})
    series = ct_series(6)
    assert send_datasets(series, node.receiver.port) == [0] * 6
    wait_for(lambda: node.spool.list_series("queued"), timeout=15)
    job = node.spool.claim_next_job()
    assert job is not None
    result = ResultObject("seg", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.9.1", tmp_path / "1.dcm")
    assert node.outbox.record_result_set(job, tmp_path, [result], {"pacs": ("seg",)},
                                         finish=True)
    assert get(node, "/readyz") == (200, b'{"status": "ready"}')
    assert value(node, "dcn_outbox_pending", destination="pacs") == 1
    age = value(node, "dcn_outbox_oldest_pending_age_seconds", destination="pacs")
    assert 0 <= age < 60


@pytest.fixture
def restartable_server() -> Iterator[PostgresServer]:
    """A server this test alone uses: it stops it and starts it again."""
    with own_postgres_server() as server:
        yield server


def test_store_loss_is_explicit_and_the_node_recovers_when_it_is_back(
        restartable_server: PostgresServer, start_node: Callable[..., Node],
        caplog: pytest.LogCaptureFixture) -> None:
    """The PostgreSQL server stops: /readyz fails with the reason (where, why, never the
    URL's password), the store's loss is logged once in words (no traceback, no patient
    data), C-STOREs are answered "out of resources" (the PACS keeps them and retries) and
    every thread of the node keeps running; the server starts again: the node is ready and
    takes the series in again, without a restart."""
    caplog.set_level(logging.INFO)
    url = restartable_server.new_database().replace("postgres@", f"postgres:{PASSWORD}@")
    node = start_node(store={"url": url}, inference={"enabled": True, "device": "cpu",
                                                    "models_dir": "/nonexistent"},
                      destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                     "port": 1}])
    series = ct_series(12)
    assert send_datasets(series[:6], node.receiver.port) == [0] * 6
    assert json.loads(get(node, "/readyz")[1])["reasons"].keys() == {"model"}

    restartable_server.halt()
    status, body = get(node, "/readyz")
    reasons = json.loads(body)["reasons"]
    assert status == 503 and reasons.keys() == {"model", "store", "outbox"}
    assert reasons["store"].startswith("postgresql database test_0 on ")
    assert "unreachable" in reasons["store"] and PASSWORD not in body.decode()
    assert send_datasets(series[6:7], node.receiver.port) == [0xA700]
    assert value(node, "dcn_ready_check", check="store") == 0  # the scrape still answers
    time.sleep(2)  # completion, the worker and the sender meet the loss too
    assert node.liveness().ok

    restartable_server.start()
    wait_for(lambda: json.loads(get(node, "/readyz")[1])["reasons"].keys() == {"model"},
             timeout=30)
    assert value(node, "dcn_ready_check", check="store") == 1
    assert send_datasets(series[6:], node.receiver.port) == [0] * 6
    # Generation 0 (6 slices) and 1 (all 12) both complete; no model here: both fail.
    wait_for(lambda: [j.state for j in node.spool.list_jobs()] == ["failed", "failed"],
             timeout=30)
    (record,) = node.spool.list_series()
    assert (record.instances, record.generation) == (12, 1)
    assert node.liveness().ok

    lost = [r for r in caplog.records if r.getMessage().startswith("Store unreachable")]
    assert len(lost) == 1 and lost[0].levelno == logging.ERROR
    assert "unreachable" in lost[0].getMessage()
    assert any(r.getMessage().startswith("Store reachable again") for r in caplog.records)
    store_records = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert not any(r.exc_info for r in store_records)
    assert PASSWORD not in caplog.text
    for patient_value in PATIENT_VALUES:
        assert patient_value not in caplog.text


def test_serve_without_its_database_says_so_and_exits(tmp_path: Path) -> None:
    """`dcn-node serve` whose PostgreSQL cannot be reached at start-up: one line saying
    where and why (no traceback, no password) and exit status 3, for systemd to restart it
    later; nothing listens meanwhile."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import free_port, test_config

    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/nowhere"
    config = test_config(tmp_path / "spool", store={"url": url})
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "dcn_node", "serve", "--config",
                          str(tmp_path / "node.yaml")], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 3, output
    assert "dcn-node serve: stopped, the store is unreachable" in run.stderr
    (reason,) = [line for line in run.stderr.splitlines() if "Store unreachable" in line]
    assert "ERROR" in reason and "127.0.0.1" in reason and "refused" in reason
    assert "Traceback" not in output and PASSWORD not in output
