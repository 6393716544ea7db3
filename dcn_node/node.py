"""The Node: the one place where the parts are wired together.

    receive   StorageSCP, one thread per association   -> spool (files + SQLite);
                                                          refused instances -> quarantine
    complete  SeriesAssembler, apscheduler interval job   -> jobs queue in the spool
    infer     ModelWorker thread, one model run at a time -> summary.json, masks.npz
    encode    ResultEncoder thread                        -> SEG/SC/SR/KOS files + outbox rows
    send      one DestinationSender thread per PACS       -> C-STORE, retries, dead letters
    observe   NodeMetrics (callbacks of every stage), MetricsServer: /metrics /healthz /readyz

Roles (docs/workers.md): ``serve`` is all of it in one process (the embedded default).
With ``broker.url`` set, the node publishes each queued job to the broker
(:class:`~dcn_node.pipeline.broker.JobPublisher`) instead of running the model itself;
``receive`` is that node without the model, and :class:`WorkerNode` (``dcn-node worker``)
is the other half: a Celery worker that claims each job in the shared store, runs the
model and the encoder, and records the result set for the receivers' senders.

Receiving never waits on the later stages: they run on their own workers and talk to
each other through the spool (durable) or a small bounded queue (infer -> encode). When
too many series wait for the model, new associations are refused as transient so that
senders retry later instead of handing us data we cannot process in time.
"""

from __future__ import annotations

import collections
import datetime
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from apscheduler.schedulers.background import BackgroundScheduler

from dcn_node.config import Settings
from dcn_node.errors import ConfigError, FailureReason, StoreUnavailableError
from dcn_node.net.receiver import Refusal, StorageSCP
from dcn_node.net.sender import DestinationSender
from dcn_node.ops import systemd
from dcn_node.ops.health import Liveness, Readiness, outbox_problem, spool_free_bytes, spool_problem
from dcn_node.ops.metrics import MetricsServer, NodeMetrics, NodeState
from dcn_node.pipeline.broker import BrokerProbe, JobPublisher, celery_app, register_analysis
from dcn_node.pipeline.encoder import ResultEncoder
from dcn_node.pipeline.series import SeriesAssembler
from dcn_node.pipeline.summary import build_summary, log_summary
from dcn_node.pipeline.worker import ModelWorker
from dcn_node.store.lease import default_node_id
from dcn_node.store.outbox import Backlog, Delivery, Outbox
from dcn_node.store.quarantine import Quarantine
from dcn_node.store.spool import Job, Spool

if TYPE_CHECKING:  # torch is imported with the engine, when the worker first needs it
    from dcn_node.inference.engine import Engine

LOGGER = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., None])


def _observer(method: _F) -> _F:
    """For callbacks the stages call: counting and summarizing must never stop a stage,
    so a failure here is logged and swallowed."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            LOGGER.exception("%s failed", method.__name__)

    return wrapper  # type: ignore[return-value]


class _ModelStages:
    """What every process that runs the model shares: building the engine, and the
    observers of finished jobs and of the loaded model (metrics, the summary line)."""

    settings: Settings
    spool: Spool
    outbox: Outbox
    metrics: NodeMetrics
    _engine_factory: Callable[[], Engine] | None

    @_observer
    def _job_finished(self, job: Job, state: str, reason: str | None,
                      failure: FailureReason | None) -> None:
        study, series = job.study_instance_uid, job.series_instance_uid
        if state == "failed":
            self.metrics.record_series("failed")
            failure = failure or FailureReason.MODEL_ERROR
            self.metrics.record_failure(failure)
            if failure is FailureReason.UNDECODABLE:
                self.metrics.record_bad_input(failure.value)
            log_summary(build_summary(self.spool, study, series, job.generation, "failed",
                                      reason=reason))
            return
        self.metrics.record_series("processed")
        if not self.outbox.deliveries_of(study, series, job.generation):
            log_summary(build_summary(self.spool, study, series, job.generation, "processed",
                                      reason="no destination takes these results"))

    @_observer
    def _engine_loaded(self, engine: Engine) -> None:
        inference = self.settings.inference
        profile = getattr(engine, "profile", None)
        self.metrics.record_model(str(getattr(engine, "model_version", "unknown")),
                                  str(getattr(profile, "name", inference.profile)),
                                  str(getattr(engine, "device", inference.device)))

    def _make_engine(self) -> Engine:
        if self._engine_factory is not None:
            return self._engine_factory()
        return make_engine(self.settings)


class Node(_ModelStages):
    """A running dcn-node: listener, spool and background workers.

    Parameters
    ----------
    settings:
        The validated configuration.
    engine_factory:
        Builds the inference engine (default: :class:`~dcn_node.inference.engine.Engine`
        from ``inference.models_dir``); tests pass one that fails on purpose.
    role:
        ``serve`` (all in one) or ``receive`` (no model: the jobs are the broker's
        workers', or, without a broker, another node's sharing the store).
    """

    def __init__(self, settings: Settings,
                 engine_factory: Callable[[], Engine] | None = None,
                 role: str = "serve") -> None:
        if role not in ("serve", "receive"):
            raise ValueError(f"a Node serves or receives, not {role!r}")
        self.settings = settings
        self.role = role
        self._engine_factory = engine_factory
        #: Whether this process runs the model (on its worker thread): ``serve`` without
        #: a broker; with one, the broker's workers do.
        self.runs_model = (settings.inference.enabled and role == "serve"
                           and settings.broker.url is None)
        #: This node's name on its claims and temporary files; leases only in a store
        #: nodes share (SQLite's index is one node's: its claims hold until it finishes
        #: or restarts).
        self.node_id = settings.node.id or default_node_id()
        self.spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync,
                           url=settings.store.url, node_id=self.node_id)
        self.outbox = Outbox(self.spool)
        lease = settings.store.lease_seconds if settings.store.url else None
        self.metrics = NodeMetrics({d.name: d.kinds for d in settings.destinations},
                                   min_free_bytes=settings.storage.min_free_bytes,
                                   state=self.state, role=role)
        m = self.metrics
        self.publisher: JobPublisher | None = None
        self.broker_probe: BrokerProbe | None = None
        if settings.broker.url is not None:
            self.publisher = JobPublisher(celery_app(settings.broker), self.spool,
                                          settings.broker)
            self.broker_probe = BrokerProbe(settings.broker)
        self.assembler = SeriesAssembler(self.spool, settings.completion, settings.selection,
                                         owner=self.node_id, lease_seconds=lease)
        self.quarantine = Quarantine(settings.storage.spool_dir,
                                     settings.storage.quarantine_max_bytes,
                                     fsync=settings.storage.fsync,
                                     on_quarantined=m.record_quarantined,
                                     on_skipped=m.record_quarantine_skipped,
                                     node_files=self.spool.node_files)
        self.receiver = StorageSCP(settings, self.spool, admission_check=self._admission,
                                   on_association=m.record_association,
                                   on_store_status=m.record_store,
                                   on_bad_input=m.record_bad_input,
                                   on_context_refused=m.record_context_refused,
                                   quarantine=self.quarantine)
        self.encoder = ResultEncoder(settings, self.spool, self.outbox,
                                     on_recorded=self._wake_senders, on_timing=m.record_stage,
                                     on_finished=self._job_finished)
        self.worker = ModelWorker(self.spool, self._make_engine, on_result=self.encoder.submit,
                                  on_timing=m.record_stage, on_finished=self._job_finished,
                                  on_engine_loaded=self._engine_loaded,
                                  owner=self.node_id, lease_seconds=lease)
        calling_ae = settings.sender.calling_ae_title or settings.node.ae_title
        self.senders = [
            DestinationSender(self.outbox, destination, settings.sender, calling_ae,
                              on_delivered=self._delivered, on_outcome=self._delivery_outcome,
                              owner=self.node_id, lease_seconds=lease)
            for destination in settings.destinations
        ]
        self.metrics_server = (
            MetricsServer(settings.metrics.host, settings.metrics.port, m,
                          self.readiness, self.liveness)
            if settings.metrics.enabled else None
        )
        self.scheduler = BackgroundScheduler(daemon=True)
        self._stopped = threading.Event()
        # Result sets already summarized: two senders may both see a set finish.
        self._summarized: collections.deque[int] = collections.deque(maxlen=1000)
        self._summary_lock = threading.Lock()

    def start(self) -> None:
        """Recover the spool, start the HTTP endpoint (not ready yet), start listening and
        start every stage."""
        # Only this node's work and work whose lease ran out: other nodes' is theirs.
        self.spool.recover(self.node_id)
        self.outbox.release(self.node_id)
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.receiver.start()
        self.scheduler.add_job(
            self._check_series,
            "interval",
            seconds=self.settings.completion.check_interval_seconds,
            id="series-completion",
            max_instances=1,
            coalesce=True,
        )
        if self.publisher is not None:
            self.scheduler.add_job(
                self._publish_jobs, "interval",
                seconds=self.settings.broker.republish_interval_seconds,
                id="publish-jobs", max_instances=1, coalesce=True,
                next_run_time=datetime.datetime.now())
        self.scheduler.start()
        if self.runs_model:
            self.encoder.start()
            self.worker.start()
        for sender in self.senders:
            sender.start()
        watchdog = systemd.watchdog_seconds()
        if watchdog is not None:
            self.scheduler.add_job(self._feed_watchdog, "interval", seconds=watchdog / 2,
                                   id="systemd-watchdog", max_instances=1, coalesce=True)
        LOGGER.info("dcn-node started; spool at %s; %d destination(s)", self.spool.root,
                    len(self.senders))

    # -- health ------------------------------------------------------------------------

    def liveness(self) -> Liveness:
        """Which parts stopped running (feeds /healthz and the systemd watchdog)."""
        problems = []
        if not self.receiver.is_listening:
            problems.append("Storage SCP not listening")
        if not self.scheduler.running:
            problems.append("series completion scheduler stopped")
        if self.runs_model:
            if not self.worker.is_alive:
                problems.append("model worker thread stopped")
            if not self.encoder.is_alive:
                problems.append("result encoder thread stopped")
        problems += [f"sender {s.destination.name} stopped" for s in self.senders
                     if not s.is_alive]
        return Liveness(tuple(problems))

    def readiness(self, backlog: dict[str, Backlog] | None = None) -> Readiness:
        """SCP listening, model loaded, spool writable with space, store reachable, broker
        reachable (with one), outbox moving."""
        checks: dict[str, str | None] = {}
        checks["scp"] = None if self.receiver.is_listening else "Storage SCP not listening"
        if self.broker_probe is not None:
            checks["broker"] = self.broker_probe.problem()
        if not self.runs_model or self.worker.engine_loaded:
            checks["model"] = None
        else:
            checks["model"] = f"model not loaded: {self.worker.engine_error or 'loading'}"
        checks["spool"] = spool_problem(self.spool.root, self.settings.storage.min_free_bytes)
        try:
            now = self.spool.now()  # PostgreSQL: a round trip to the server
            checks["store"] = None
        except StoreUnavailableError as exc:
            checks["store"] = str(exc)
            checks["outbox"] = "unknown: the store is unreachable"
            return Readiness(checks)
        try:
            backlog = self.outbox.backlog() if backlog is None else backlog
            # Ages from the store's clock, which stamped the rows (hosts' clocks may differ).
            checks["outbox"] = outbox_problem(_pending_ages(backlog, now),
                                              self.settings.metrics.outbox_stuck_seconds)
        except Exception as exc:  # e.g. the index is closed while stopping
            checks["outbox"] = f"outbox unreadable: {type(exc).__name__}: {exc}"
        return Readiness(checks)

    def state(self) -> NodeState:
        """Queue depths, spool space and readiness, for the gauges read at each scrape."""
        try:
            queued = self.spool.count_jobs("queued")
            running = self.spool.count_jobs("processing")
            waiting = self.spool.query("SELECT COUNT(*) FROM series WHERE state='receiving'")
            backlog = self.outbox.backlog()
            ages = _pending_ages(backlog, self.spool.now())
        except StoreUnavailableError:  # the counts are unknown; readiness says why
            return NodeState(0, 0, 0, {}, {}, {}, spool_free_bytes(self.spool.root),
                             self.receiver.active_associations(), self.readiness(),
                             store_reachable=False)
        return NodeState(
            series_waiting=int(waiting[0][0]),
            inference_queued=queued,
            inference_running=running,
            outbox_pending={name: b.pending for name, b in backlog.items()},
            outbox_oldest_pending_age=ages,
            dead_letters={name: b.dead for name, b in backlog.items()},
            spool_free_bytes=spool_free_bytes(self.spool.root),
            associations_active=self.receiver.active_associations(),
            readiness=self.readiness(backlog),
        )

    def _feed_watchdog(self) -> None:
        live = self.liveness()
        if live.ok:
            systemd.notify("WATCHDOG=1")
        else:
            LOGGER.error("Not feeding the systemd watchdog: %s", "; ".join(live.problems))

    def _admission(self) -> Refusal | None:
        """Backpressure: refuse (transient) while too many series wait for the model."""
        high_water = self.settings.inference.queue_high_water
        if not high_water or not self.settings.inference.enabled:
            return None
        try:
            waiting = self.spool.count_jobs("queued")
        except StoreUnavailableError:
            return None  # each C-STORE is answered 0xA700 with the reason meanwhile
        if waiting < high_water:
            return None
        # rejected-transient, service-provider (presentation), local-limit-exceeded
        return Refusal(f"inference queue full ({waiting} series waiting, high-water "
                       f"mark {high_water})", 0x02, 0x03, 0x02, code="backpressure")

    def _wake_senders(self) -> None:
        for sender in self.senders:
            sender.wake()

    @_observer
    def _delivered(self, delivery: Delivery, destination_complete: bool) -> None:
        study, series = delivery.study_instance_uid, delivery.series_instance_uid
        self.spool.record_event(study, series, delivery.generation, "acknowledged",
                                f"{delivery.destination} {delivery.kind} "
                                f"{delivery.sop_instance_uid}")
        if destination_complete:
            self.spool.record_event(study, series, delivery.generation, "results_delivered",
                                    delivery.destination)

    @_observer
    def _delivery_outcome(self, delivery: Delivery, outcome: str) -> None:
        """Count it; when it was the set's last pending object, end the series' story:
        the end-to-end time (all acknowledged) and the summary line."""
        self.metrics.record_delivery(delivery.destination, delivery.kind, outcome)
        if outcome == "retry":
            return
        counts = self.outbox.result_set_counts(delivery.result_set_id)
        if counts.get("pending", 0):
            return
        with self._summary_lock:
            if delivery.result_set_id in self._summarized:
                return
            self._summarized.append(delivery.result_set_id)
        sent, dead = counts.get("sent", 0), counts.get("dead", 0)
        if sent == 0 and dead == 0:
            return  # superseded by a newer result set, which gets its own line
        study, series = delivery.study_instance_uid, delivery.series_instance_uid
        record = self.spool.get_series(study, series)
        if dead == 0 and record is not None and record.generation == delivery.generation:
            self.metrics.record_end_to_end(self.spool.now() - record.last_received_at)
        outcome = "delivered" if not dead else "partly_delivered" if sent else "undelivered"
        log_summary(build_summary(self.spool, study, series, delivery.generation, outcome,
                                  results={"sent": sent, "dead": dead}))

    def _publish_jobs(self) -> None:
        """Hand the store's claimable jobs to the broker (new ones, and those a lost
        publish or a lost worker left)."""
        assert self.publisher is not None
        try:
            self.publisher.sync()
        except StoreUnavailableError as exc:  # logged by the store once; next time
            LOGGER.debug("Publishing jobs waits for the store: %s", exc)
        except Exception:  # the job must keep running; the reason goes to the log
            LOGGER.exception("Publishing jobs failed")

    def _check_series(self) -> None:
        try:
            decided = self.assembler.check()
            if any(assessment.state == "queued" for _, assessment in decided):
                if self.publisher is not None:
                    self._publish_jobs()
                else:
                    self.worker.wake()
            for record, assessment in decided:
                self.metrics.record_series("completed")
                if assessment.state in ("ignored", "rejected"):
                    self.metrics.record_series(assessment.state)
                    self.metrics.record_bad_input(assessment.code)
                    log_summary(build_summary(
                        self.spool, record.study_instance_uid, record.series_instance_uid,
                        record.generation, assessment.state, reason=assessment.reason))
        except StoreUnavailableError as exc:  # logged by the store once; next time
            LOGGER.debug("Series completion check waits for the store: %s", exc)
        except Exception:  # the job must keep running; the reason goes to the log
            LOGGER.exception("Series completion check failed")

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new associations, let in-flight ones finish, stop every stage; all
        within ``node.shutdown_timeout_seconds``. Unfinished work stays in the spool."""
        if self._stopped.is_set():
            return
        timeout = self.settings.node.shutdown_timeout_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        LOGGER.info("dcn-node stopping")
        systemd.notify("STOPPING=1")

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        self.receiver.stop(timeout=left())
        self.scheduler.shutdown(wait=True)
        if self.runs_model:
            self.worker.stop(left())
            self.encoder.stop(left())
        for sender in self.senders:
            sender.stop(left())
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.spool.close()
        self._stopped.set()
        LOGGER.info("dcn-node stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = threading.Event()

        def _request_stop(signum: int, frame: FrameType | None) -> None:
            LOGGER.info("Received %s", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)
        self.start()
        systemd.notify(f"READY=1\nSTATUS=listening as {self.settings.node.ae_title} on port "
                       f"{self.receiver.port}")
        stop_requested.wait()
        self.stop()


class WorkerNode(_ModelStages):
    """``dcn-node worker``: one Celery worker (solo pool: one task at a time, one process
    per GPU) on the broker's queue, running the model and the encoder for each job.

    A task names a job; the job is claimed in the shared store under this worker's lease
    (renewed while it runs) and run only if it is queued or its last claim's lease ran
    out; otherwise (finished, or a live worker holds it) the task does nothing. Results
    are recorded, and the job finished, in one transaction fenced by the claim; the
    receivers' senders deliver them. Serves /metrics, /healthz and /readyz (model, spool,
    store, broker) on ``metrics.port``.
    """

    def __init__(self, settings: Settings, queue: str | None = None,
                 engine_factory: Callable[[], Engine] | None = None) -> None:
        if settings.broker.url is None or settings.store.url is None:
            raise ConfigError("broker.url", ["dcn-node worker needs broker.url and store.url "
                                             "(the queue it takes jobs from, the store it "
                                             "records results in)"])
        self.settings = settings
        self._engine_factory = engine_factory
        self.queue = queue or settings.broker.queue
        self.node_id = settings.node.id or default_node_id()
        self.spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync,
                           url=settings.store.url, node_id=self.node_id)
        self.outbox = Outbox(self.spool)
        self.metrics = m = NodeMetrics(min_free_bytes=settings.storage.min_free_bytes,
                                       state=self.state, role="worker")
        self.encoder = ResultEncoder(settings, self.spool, self.outbox,
                                     on_timing=m.record_stage, on_finished=self._job_finished)
        self.worker = ModelWorker(self.spool, self._make_engine, on_result=self.encoder.encode,
                                  on_timing=m.record_stage, on_finished=self._job_finished,
                                  on_engine_loaded=self._engine_loaded, owner=self.node_id,
                                  lease_seconds=settings.store.lease_seconds)
        self.app = celery_app(settings.broker, self.queue)
        register_analysis(self.app, self.run_job)
        self.broker_probe = BrokerProbe(settings.broker)
        self.metrics_server = (
            MetricsServer(settings.metrics.host, settings.metrics.port, m,
                          self.readiness, lambda: Liveness(()))
            if settings.metrics.enabled else None
        )

    def run_job(self, job_id: int, generation: int) -> None:
        """The task: claim job ``job_id`` and run it, or do nothing when it is not
        claimable (its store row, not the message, decides)."""
        while True:
            try:
                job = self.spool.claim_job(job_id, self.node_id,
                                           self.settings.store.lease_seconds)
                break
            except StoreUnavailableError as exc:  # hold the task until the store is back
                LOGGER.debug("Job %d waits for the store: %s", job_id, exc)
                time.sleep(1.0)
        if job is None:
            LOGGER.info("Job %d (generation %d): finished or claimed by a live worker; "
                        "nothing to do", job_id, generation)
            return
        self.worker.hold(job)
        try:
            self.worker.process(job)  # the encoder records the results inline
        except StoreUnavailableError as exc:  # its lease runs out; it is published again
            LOGGER.warning("Series %s: the store was lost while it was analysed; it runs "
                           "again when its lease runs out: %s", job.series_instance_uid, exc)

    def readiness(self) -> Readiness:
        """Model loaded, spool writable, store and broker reachable."""
        checks: dict[str, str | None] = {}
        checks["model"] = None if self.worker.engine_loaded else \
            f"model not loaded: {self.worker.engine_error or 'loading'}"
        checks["spool"] = spool_problem(self.spool.root, self.settings.storage.min_free_bytes)
        try:
            self.spool.now()
            checks["store"] = None
        except StoreUnavailableError as exc:
            checks["store"] = str(exc)
        checks["broker"] = self.broker_probe.problem()
        return Readiness(checks)

    def state(self) -> NodeState:
        """The cluster's queue depths (from the store) and this worker's readiness."""
        free = spool_free_bytes(self.spool.root)
        try:
            queued, running = self.spool.count_jobs("queued"), self.spool.count_jobs(
                "processing")
        except StoreUnavailableError:
            return NodeState(0, 0, 0, {}, {}, {}, free, 0, self.readiness(),
                             store_reachable=False)
        return NodeState(0, queued, running, {}, {}, {}, free, 0, self.readiness())

    def serve_forever(self) -> None:
        """Load the model, then consume the queue until SIGTERM or SIGINT (Celery's warm
        shutdown: the series being analysed is finished first)."""
        # A restart under the same node.id: this worker's own claims are its no longer.
        released = self.spool.release_jobs(self.node_id)
        if released:
            LOGGER.info("Took back %d job(s) this worker (%s) held before it stopped",
                        released, self.node_id)
        if self.metrics_server is not None:
            self.metrics_server.start()
        try:
            self.worker.load()
        except Exception:  # the worker still runs; each job fails with the reason
            LOGGER.exception("Model not loaded: %s", self.worker.engine_error)
        # What a job runs, imported now rather than on the first job's time.
        import dcn_node.inference.analysis
        import dcn_node.results
        import dcn_node.volume  # noqa: F401
        level = self.settings.logging.level
        LOGGER.info("dcn-node worker %s takes jobs from queue %s", self.node_id, self.queue)
        try:
            self.app.worker_main(argv=[
                "worker", "--pool=solo", "--concurrency=1", f"--queues={self.queue}",
                f"--hostname={self.node_id}@%h", "--without-gossip", "--without-mingle",
                f"--loglevel={'WARNING' if level == 'DEBUG' else level}"])
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.worker.stop(1.0)
            self.spool.close()
            LOGGER.info("dcn-node worker stopped")


def make_engine(settings: Settings) -> Engine:
    """The engine ``inference`` configures: the model from ``models_dir`` (the shipped
    weights by default), or the sleep stub of tests and benchmarks (``stub_seconds``)."""
    inference = settings.inference
    if inference.stub_seconds is not None:
        from dcn_node.pipeline.stub_engine import SleepStubEngine

        return SleepStubEngine(inference.stub_seconds)  # type: ignore[return-value]
    from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine

    return Engine(inference.models_dir or DEFAULT_MODELS_DIR, inference.profile,
                  inference.device, quality_gate=inference.quality_gate)


def _pending_ages(backlog: dict[str, Backlog], now: float) -> dict[str, float]:
    """Per destination: seconds since its oldest pending object was recorded."""
    return {name: max(0.0, now - b.oldest_pending_at) for name, b in backlog.items()
            if b.oldest_pending_at is not None}
