"""A node on a PostgreSQL store as operations see it, on servers of the test's own
(tests/postgres.py): completion, readiness and the outbox-age gauge timed by the
database's clock, which stamped the rows, whatever the host's clock says (the server runs
an hour behind the host through faketime)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dcn_node.node import Node
from dcn_node.store.outbox import ResultObject
from tests.conftest import send_datasets, wait_for
from tests.dicom_factory import ct_series
from tests.postgres import PostgresServer, own_postgres_server
from tests.test_metrics import get, value

#: How far the database's clock runs behind the host's.
SKEW_SECONDS = 3600.0


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
