"""Inference jobs through a message broker: Celery 5 on RabbitMQ (``broker.url``).

The store's job row stays the source of truth; the broker only says "look at job N". A
node that completes a series records the job (store) and then publishes one task naming
the job's id and generation (:class:`JobPublisher`). ``dcn-node worker`` processes consume
the queue one task at a time and claim the job in the store under a lease
(:meth:`~dcn_node.store.spool.Spool.claim_job`): a task whose job is finished, or held by a
live claim, does nothing, so a duplicate or redelivered task is harmless, and the result
set is recorded only by the job's latest claim (the store's fence).

Delivery guarantees come from the settings of :func:`celery_app`:

- a quorum queue (``x-queue-type: quorum``, replicated and durable on RabbitMQ), and
  publisher confirms: a publish returns once the broker has the message;
- ``task_acks_late`` with ``task_reject_on_worker_lost``: a task is acknowledged when it
  returns, so a worker killed mid-series (kill -9, lost connection) leaves its message
  to be delivered again;
- ``worker_prefetch_multiplier = 1`` and the solo pool: a worker holds one task, the one
  it runs (one worker process per GPU).

What the broker cannot see, the store makes good: the job a killed worker held stays
claimed until its lease runs out, and a publish can be lost (the node killed between
recording the job and publishing it, the broker down meanwhile). So the publishing node
looks at the store every ``broker.republish_interval_seconds`` and publishes again every
claimable job it has not published in that state (queued, or a lease run out since).

celery (the ``cluster`` extra) is imported only when a broker is configured.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dcn_node.config import BrokerSettings
from dcn_node.errors import ConfigError
from dcn_node.store.spool import Spool

if TYPE_CHECKING:
    from celery import Celery

LOGGER = logging.getLogger(__name__)

#: The one task: analyse job ``job_id`` (generation ``generation``), encode its results.
TASK_NAME = "dcn_node.analyse_job"
_ONE_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def _celery() -> Any:
    try:
        import celery
    except ImportError:
        raise ConfigError("broker.url", [
            "a broker needs celery: pip install 'dcn-node[cluster]'"]) from None
    return celery


def sanitized(url: str) -> str:
    """The broker URL with its password blanked out (for logs and /readyz)."""
    scheme, found, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not found or "@" not in netloc:
        return url
    userinfo, host = netloc.rsplit("@", 1)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":**"
    return f"{scheme}://{userinfo}@{host}{slash}{path}"


def celery_app(broker: BrokerSettings, queue: str | None = None) -> Celery:
    """The Celery application of a node or worker: one quorum queue, late acks, prefetch 1.

    ``queue`` overrides ``broker.queue`` (``dcn-node worker --queue``).
    """
    if broker.url is None:
        raise ConfigError("broker.url", ["not set: no broker to use"])
    celery = _celery()
    from kombu import Exchange, Queue

    name = queue or broker.queue
    # A topic exchange: Celery binds quorum queues to its native delayed delivery
    # exchanges, which needs one (no task here is delayed).
    exchange = Exchange(name, type="topic", durable=True)
    app = celery.Celery("dcn_node", broker=broker.url, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(name, exchange, routing_key=name, durable=True,
                           queue_arguments={"x-queue-type": "quorum"})],
        task_default_queue=name,
        task_default_exchange=name,
        task_default_exchange_type="topic",
        task_default_routing_key=name,
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="solo",
        worker_concurrency=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=broker.connect_timeout_seconds,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for the broker, forever
        broker_transport_options={"confirm_publish": True},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        # Celery 6's default: a task whose connection was lost is not acknowledged later
        # (its message goes to another worker; the store's claim fences the two).
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


def register_analysis(app: Celery, run_job: Callable[[int, int], None]) -> Any:
    """Make ``run_job(job_id, generation)`` the worker's task (late ack, rejected on a
    lost worker, so that its message goes to another worker)."""

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def analyse_job(job_id: int, generation: int) -> None:
        run_job(int(job_id), int(generation))

    return analyse_job


class _Reachability:
    """Logs once when the broker is lost and once when it is back (not every attempt)."""

    def __init__(self, url: str) -> None:
        self.where = sanitized(url)
        self._lock = threading.Lock()
        self._down: str | None = None

    def failed(self, exc: BaseException) -> str:
        reason = f"broker unreachable at {self.where}: {type(exc).__name__}: {exc}"[:500]
        with self._lock:
            first = self._down is None
            self._down = reason
        if first:
            LOGGER.error("Broker unreachable: %s", reason)
        return reason

    def ok(self) -> None:
        with self._lock:
            was_down, self._down = self._down is not None, None
        if was_down:
            LOGGER.info("Broker reachable again: %s", self.where)


class BrokerProbe:
    """Whether the broker answers: an AMQP connection opened and closed (for /readyz),
    the answer kept for ``cache_seconds`` so that scrapes do not flood the broker."""

    def __init__(self, broker: BrokerSettings, cache_seconds: float = 1.0) -> None:
        if broker.url is None:
            raise ConfigError("broker.url", ["not set: no broker to probe"])
        _celery()
        self._url = broker.url
        self._timeout = broker.connect_timeout_seconds
        self._cache_seconds = cache_seconds
        self._state = _Reachability(broker.url)
        self._lock = threading.Lock()
        self._checked: tuple[float, str | None] | None = None

    def problem(self) -> str | None:
        """None when the broker accepted a connection; else why not."""
        with self._lock:
            if self._checked is not None and \
                    time.monotonic() - self._checked[0] < self._cache_seconds:
                return self._checked[1]
            from kombu import Connection

            reason: str | None = None
            try:
                with Connection(self._url, connect_timeout=self._timeout,
                                transport_options={"max_retries": 0}) as connection:
                    connection.connect()
                self._state.ok()
            except Exception as exc:  # refused, reset, timed out, refused login ...
                reason = self._state.failed(exc)
            self._checked = (time.monotonic(), reason)
            return reason


class JobPublisher:
    """Publishes the store's claimable jobs to the broker, each once per state.

    :meth:`sync` publishes every job that is queued, or processing under a lease that ran
    out, unless this publisher already published it while the job had the same claim
    count (less than ``broker.republish_after_seconds`` ago). The node calls it when
    the assembler queued jobs and every ``broker.republish_interval_seconds``; a restarted
    node publishes every claimable job once (what it published before is forgotten),
    which covers a publish lost when the node died.
    """

    def __init__(self, app: Celery, spool: Spool, broker: BrokerSettings) -> None:
        self.app = app
        self.spool = spool
        self.queue = broker.queue
        self.republish_after = broker.republish_after_seconds
        self._state = _Reachability(broker.url or "")
        self._lock = threading.Lock()
        #: job id -> (the job's claim count when published, monotonic time)
        self._published: dict[int, tuple[int, float]] = {}
        #: Tasks published since start (tests, the summary of a bench run).
        self.published_total = 0

    def sync(self) -> int:
        """Publish what is due; returns how many tasks were published.

        Raises
        ------
        StoreUnavailableError
            The store cannot be read (nothing is published; the next call tries again).
        """
        with self._lock:
            jobs = self.spool.unclaimed_jobs()
            now = time.monotonic()
            claimable = {job.job_id for job in jobs}
            # A job claimed since is forgotten: if its lease runs out, it is published again.
            self._published = {k: v for k, v in self._published.items() if k in claimable}
            count = 0
            for job in jobs:
                last = self._published.get(job.job_id)
                if last is not None and last[0] == job.claim and (
                        not self.republish_after or now - last[1] < self.republish_after):
                    continue
                try:
                    # One retry at once: a pooled connection the broker dropped (it
                    # restarted) fails the first try and reconnects for the second.
                    self.app.send_task(TASK_NAME, args=[job.job_id, job.generation],
                                       queue=self.queue, routing_key=self.queue,
                                       retry=True, retry_policy=_ONE_RETRY)
                except Exception as exc:  # broker down: the jobs wait in the store
                    self._state.failed(exc)
                    break
                self._state.ok()
                self._published[job.job_id] = (job.claim, now)
                count += 1
                LOGGER.debug("Published job %d (series %s, generation %d, claim %d)",
                             job.job_id, job.series_instance_uid, job.generation, job.claim)
            self.published_total += count
            return count
