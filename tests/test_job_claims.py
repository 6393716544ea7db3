"""What a broker's task may do with a job (dcn_node/store/jobs.py), on both backends, and the
publisher that hands the store's claimable jobs to a real RabbitMQ (tests/rabbitmq.py):
each once per state, again when a claim's lease ran out, none lost while the broker is
down."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcn_node.config import parse_settings
from dcn_node.pipeline.broker import TASK_NAME, JobPublisher, celery_app, sanitized
from dcn_node.store.spool import Spool
from tests.conftest import test_config
from tests.postgres import PostgresServer
from tests.rabbitmq import RabbitMQ, own_rabbitmq
from tests.test_store import queued_jobs


@pytest.fixture
def spool(tmp_path: Path, store_url: str | None) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool", url=store_url)
    yield opened
    opened.close()


def test_a_job_is_claimed_by_id_only_while_queued_or_its_lease_ran_out(spool: Spool) -> None:
    queued_jobs(spool, 2)
    first, second = spool.list_jobs()
    job = spool.claim_job(second.job_id, "worker-a", lease_seconds=600.0)
    assert job is not None and (job.job_id, job.claim, job.state) == (second.job_id, 1,
                                                                      "processing")
    # A redelivered or duplicate task: the live claim holds, nothing is taken.
    assert spool.claim_job(second.job_id, "worker-b", lease_seconds=600.0) is None
    assert [j.job_id for j in spool.unclaimed_jobs()] == [first.job_id]
    # The lease runs out (the worker died): the job is claimable again, by id.
    lapsed = spool.claim_job(first.job_id, "worker-a", lease_seconds=-1.0)
    assert lapsed is not None
    assert [(j.job_id, j.claim) for j in spool.unclaimed_jobs()] == [(first.job_id, 1)]
    taken = spool.claim_job(first.job_id, "worker-b", lease_seconds=600.0)
    assert taken is not None and taken.claim == 2
    assert not spool.finish_job(lapsed, "done")  # the fence: the old claim records nothing
    assert spool.finish_job(taken, "done")
    assert spool.claim_job(first.job_id, "worker-c", lease_seconds=600.0) is None  # done
    assert spool.claim_job(10_000, "worker-c") is None  # unknown
    # A worker restarted under its id gives back what it held.
    assert spool.release_jobs("worker-a") == 1
    assert [(j.job_id, j.state) for j in spool.unclaimed_jobs()] == [(second.job_id, "queued")]


def test_broker_urls_are_shown_without_their_password() -> None:
    assert sanitized("amqp://dcn:s3cret@rabbit:5672/dcn") == "amqp://dcn:**@rabbit:5672/dcn"
    assert sanitized("amqp://dcn:p@ss@rabbit//") == "amqp://dcn:**@rabbit//"
    assert sanitized("amqps://rabbit.example/dcn") == "amqps://rabbit.example/dcn"


@pytest.mark.slow
def test_the_publisher_publishes_each_claimable_job_once_per_state(
        tmp_path: Path, postgres_server: PostgresServer,
        caplog: pytest.LogCaptureFixture) -> None:
    url = postgres_server.new_database()
    spool = Spool(tmp_path / "spool", url=url)
    try:
        with own_rabbitmq() as broker:
            settings = parse_settings(test_config(
                tmp_path / "spool", store={"url": url},
                broker={"url": broker.url, "queue": "claims", "connect_timeout_seconds": 1}))
            app = celery_app(settings.broker)
            publisher = JobPublisher(app, spool, settings.broker)
            queued_jobs(spool, 3)
            assert publisher.sync() == 3
            assert publisher.sync() == 0  # published in this state already
            assert received(broker) == sorted((j.job_id, 0) for j in spool.list_jobs())
            first = spool.list_jobs()[0]
            lapsed = spool.claim_job(first.job_id, "worker-a", lease_seconds=-1.0)
            assert lapsed is not None
            assert publisher.sync() == 1  # claimed, and its lease ran out: once more
            assert publisher.sync() == 0
            broker.stop()
            queued_jobs(spool, 1)
            with caplog.at_level(logging.ERROR, logger="dcn_node.pipeline.broker"):
                assert publisher.sync() == 0
                assert publisher.sync() == 0
            lost = [r for r in caplog.records if r.getMessage().startswith(
                "Broker unreachable")]
            assert len(lost) == 1 and "guest:guest" not in lost[0].getMessage()
            broker.start()
            assert publisher.sync() == 1  # the job recorded meanwhile
            assert [job_id for job_id, _ in received(broker)] == [
                first.job_id, spool.list_jobs()[-1].job_id]
    finally:
        spool.close()


def received(broker: RabbitMQ) -> list[tuple[int, int]]:
    """Take every task from the queue: (job id, generation), sorted."""
    from kombu import Connection, Queue

    found = []
    with Connection(broker.url) as connection:
        queue = Queue("claims", no_declare=True)(connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            assert message.headers["task"] == TASK_NAME
            job_id, generation = message.decode()[0]
            found.append((job_id, generation))
    return sorted(found)
