"""Every Prometheus metric of the node, in one place, and the HTTP endpoint that serves them.

Conventions (STYLE habit 9): the ``dcn_`` prefix, base units (``_seconds``, ``_bytes``),
``_total`` on counters, small fixed label sets whose values are listed below and created
at start (so ``rate()`` sees the first event), never a UID as a label. Destination names
come from the configuration, so their number is fixed too.

Events are counted as they happen through the ``record_*`` methods, which the service
passes to each stage as its callbacks. Queue depths, spool space and readiness are read
when Prometheus scrapes (:class:`NodeState`), so they are always current.

HTTP on ``metrics.host:metrics.port``: ``/metrics`` (text or OpenMetrics by ``Accept``,
gzip, ``name[]`` filters: prometheus_client's), ``/healthz`` (liveness) and ``/readyz``
(readiness), the last two with a short JSON body and 503 plus the reasons when not OK.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from dcn_node import __version__
from dcn_node.errors import FailureReason
from dcn_node.ops.health import READINESS_CHECKS, Liveness, Readiness
from dcn_node.store.quarantine import SKIP_REASONS

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

LOGGER = logging.getLogger(__name__)

# The ``*_created`` series double the output and no dashboard or alert here uses them.
disable_created_metrics()

#: ``reason`` of dcn_associations_refused_total.
REFUSAL_REASONS = ("called_ae", "calling_ae", "host", "shutting_down", "backpressure",
                   "max_associations", "no_context", "other")
#: ``reason`` of dcn_contexts_refused_total: the presentation context results of PS3.8.
CONTEXT_REFUSAL_REASONS = ("sop_class", "transfer_syntax", "user", "other")
#: ``status`` of dcn_cstore_responses_total: every status the Storage SCP answers.
CSTORE_STATUSES = {0x0000: "0x0000", 0xA700: "0xA700", 0xA900: "0xA900", 0xC000: "0xC000"}
#: ``outcome`` of dcn_series_total.
SERIES_OUTCOMES = ("completed", "ignored", "rejected", "processed", "failed")
#: ``reason`` of dcn_bad_input_total: instances refused at the C-STORE or cut off while
#: arriving, and series rejected or ignored at completion or failed while being read.
BAD_INPUT_REASONS = (
    # instances (C-STORE answered 0xC000 / 0xA900, or the association aborted)
    "unparsable", "missing_uid", "uid_mismatch", "no_pixel_data", "truncated",
    "dataset_too_large", "pdu_too_large",
    # series (completion: rejected or ignored; model worker: failed while reading)
    "localizer", "not_ct", "mixed_geometry", "missing_geometry", "not_axial",
    "missing_position", "too_few_slices", "two_acquisitions", "duplicate_positions", "gap",
    "not_selected", "undecodable",
)
#: ``reason`` of dcn_quarantined_instances_total: the instance reasons of
#: BAD_INPUT_REASONS whose bytes were received whole (the others cannot be kept).
QUARANTINE_REASONS = ("unparsable", "missing_uid", "uid_mismatch", "no_pixel_data",
                      "truncated", "dataset_too_large")
#: ``reason`` of dcn_series_failed_total.
FAILURE_REASONS = tuple(reason.value for reason in FailureReason)
#: ``stage`` of dcn_inference_stage_seconds.
STAGES = ("volume_load", "preprocessing", "lung_segmentation", "dcn", "spm", "postprocessing",
          "encoding")
#: ``kind`` and ``outcome`` of dcn_result_deliveries_total.
RESULT_KINDS = ("seg", "sc", "sr", "ko")
DELIVERY_OUTCOMES = ("sent", "retry", "dead")
#: ``role`` of dcn_role_info: the process's part in a cluster (docs/workers.md).
ROLES = ("serve", "receive", "worker")
#: The model this node runs (``name`` of dcn_model_info).
MODEL_NAME = "dcn-covid19-ct"

STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
                 300.0, 600.0)
END_TO_END_BUCKETS = (5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
                      7200.0, 14400.0)


@dataclass(frozen=True)
class NodeState:
    """What the node looks like now; read at every scrape."""

    series_waiting: int
    inference_queued: int
    inference_running: int
    #: Per destination: objects not yet acknowledged, the age of the oldest, dead letters.
    outbox_pending: dict[str, int]
    outbox_oldest_pending_age: dict[str, float]
    dead_letters: dict[str, int]
    spool_free_bytes: int
    associations_active: int
    readiness: Readiness = field(default_factory=lambda: Readiness({}))
    #: False while the store cannot be read: the counts above are unknown (not exported)
    #: and readiness says why.
    store_reachable: bool = True


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


class _StateCollector(Collector):
    """Gauges computed from a :class:`NodeState` at scrape time."""

    def __init__(self, source: Callable[[], NodeState], destinations: Sequence[str],
                 min_free_bytes: int) -> None:
        self._source = source
        self._destinations = list(destinations)
        self._min_free_bytes = min_free_bytes

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        try:
            state = self._source()
        except Exception:  # a scrape must not fail because one query did
            LOGGER.exception("Reading the node state for /metrics failed")
            return []
        return self._families(state)

    def _families(self, state: NodeState | None) -> list[Metric]:
        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)

        waiting = gauge("dcn_series_waiting",
                        "Series being received, waiting for completion.")
        queued = gauge("dcn_inference_queue",
                       "Series queued for the model, not yet started.")
        running = gauge("dcn_inference_running",
                        "Series in the model or having their results encoded.")
        pending = gauge("dcn_outbox_pending",
                        "Result objects waiting to be acknowledged, per destination.",
                        ["destination"])
        oldest = gauge("dcn_outbox_oldest_pending_age_seconds",
                       "Age of the oldest result object not yet acknowledged (0: none).",
                       ["destination"])
        dead = gauge("dcn_dead_letters",
                     "Result objects given up on, in the outbox now (dcn-node retry).",
                     ["destination"])
        free = gauge("dcn_spool_free_bytes", "Free bytes on the spool's file system.")
        limit = gauge("dcn_spool_min_free_bytes",
                      "storage.min_free_bytes: below it C-STOREs are refused (0xA700).")
        active = gauge("dcn_associations_active", "DICOM associations open now.")
        ready = gauge("dcn_ready", "1 when /readyz answers ready, else 0.")
        checks = gauge("dcn_ready_check", "Each readiness check: 1 passes, 0 fails.",
                       ["check"])
        families: list[Metric] = [waiting, queued, running, pending, oldest, dead, free, limit,
                                  active, ready, checks]
        if state is None:
            return families
        if state.store_reachable:
            waiting.add_metric([], state.series_waiting)
            queued.add_metric([], state.inference_queued)
            running.add_metric([], state.inference_running)
            names = self._destinations + sorted(
                (set(state.outbox_pending) | set(state.dead_letters)) - set(self._destinations))
            for name in names:
                pending.add_metric([name], state.outbox_pending.get(name, 0))
                oldest.add_metric([name], state.outbox_oldest_pending_age.get(name, 0.0))
                dead.add_metric([name], state.dead_letters.get(name, 0))
        free.add_metric([], state.spool_free_bytes)
        limit.add_metric([], self._min_free_bytes)
        active.add_metric([], state.associations_active)
        ready.add_metric([], 1 if state.readiness.ok else 0)
        for check in READINESS_CHECKS:
            if check in state.readiness.checks:
                checks.add_metric([check], 0 if state.readiness.checks[check] else 1)
        return families


class NodeMetrics:
    """The node's metrics in their own registry (several nodes may share a process).

    Parameters
    ----------
    destinations:
        Destination names with the result kinds each takes (label values created at start).
    min_free_bytes:
        ``storage.min_free_bytes``, exported beside the free space for the disk alerts.
    state:
        Called at each scrape for the gauges of :class:`NodeState`; None: no such gauges.
    role:
        What this process does (:data:`ROLES`): ``dcn_role_info{role=...}`` is 1.
    """

    def __init__(self, destinations: dict[str, Sequence[str]] | None = None, *,
                 min_free_bytes: int = 0,
                 state: Callable[[], NodeState] | None = None,
                 role: str = "serve") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        destinations = destinations or {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "dcn_instances_received_total", "Instances stored (C-STORE answered Success).",
            registry=r)
        self.received_bytes = Counter(
            "dcn_received_bytes_total", "Bytes of instances stored, as written to the spool.",
            registry=r)
        self.associations_accepted = Counter(
            "dcn_associations_accepted_total", "DICOM associations accepted.", registry=r)
        self.associations_refused = Counter(
            "dcn_associations_refused_total", "DICOM associations refused, by reason.",
            ["reason"], registry=r)
        self.contexts_refused = Counter(
            "dcn_contexts_refused_total",
            "Presentation contexts refused at association negotiation, by reason.",
            ["reason"], registry=r)
        self.cstore_responses = Counter(
            "dcn_cstore_responses_total", "C-STORE responses sent, by status (hex).",
            ["status"], registry=r)
        self.series = Counter(
            "dcn_series_total",
            "Series by outcome: completed (assessed), ignored, rejected, processed "
            "(results recorded), failed (model or encoding).", ["outcome"], registry=r)
        self.bad_input = Counter(
            "dcn_bad_input_total",
            "Input refused, rejected or ignored for what it holds, by reason: instances "
            "(C-STORE failure status or association cut off) and series (at completion or "
            "while read for the model).", ["reason"], registry=r)
        self.quarantined = Counter(
            "dcn_quarantined_instances_total",
            "Instances refused for their content and kept in the quarantine, by reason.",
            ["reason"], registry=r)
        self.quarantine_skipped = Counter(
            "dcn_quarantine_skipped_total",
            "Refused instances not kept in the quarantine: full (storage."
            "quarantine_max_bytes) or write_error.", ["reason"], registry=r)
        self.series_failed = Counter(
            "dcn_series_failed_total", "Series failed in the model worker or encoder, by "
            "reason.", ["reason"], registry=r)
        self.stage_seconds = Histogram(
            "dcn_inference_stage_seconds", "Seconds per series spent in each stage.",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(
            "dcn_series_end_to_end_seconds",
            "Seconds from a series' last instance received to its results acknowledged by "
            "every destination.", buckets=END_TO_END_BUCKETS, registry=r)
        self.deliveries = Counter(
            "dcn_result_deliveries_total",
            "Result objects per delivery outcome: sent (acknowledged), retry (transient "
            "failure, tried again later), dead (dead letter).",
            ["destination", "kind", "outcome"], registry=r)
        self.model_info = Gauge(
            "dcn_model_info", "The model loaded (1 once loaded).",
            ["name", "version", "profile", "device"], registry=r)
        self.build_info = Gauge(
            "dcn_build_info", "This build of dcn-node and its main libraries.",
            ["version", "python", "pynetdicom", "pydicom", "torch"], registry=r)
        self.role_info = Gauge(
            "dcn_role_info", "What this process does: serve (all in one), receive (Storage "
            "SCP, completion, sending) or worker (the model, from the broker's queue).",
            ["role"], registry=r)
        self.role_info.labels(role).set(1)
        self.build_info.labels(__version__, platform.python_version(),
                               _package_version("pynetdicom"), _package_version("pydicom"),
                               _package_version("torch")).set(1)
        for reason in REFUSAL_REASONS:
            self.associations_refused.labels(reason)
        for reason in CONTEXT_REFUSAL_REASONS:
            self.contexts_refused.labels(reason)
        for status in CSTORE_STATUSES.values():
            self.cstore_responses.labels(status)
        for outcome in SERIES_OUTCOMES:
            self.series.labels(outcome)
        for reason in BAD_INPUT_REASONS:
            self.bad_input.labels(reason)
        for reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason)
        for reason in SKIP_REASONS:
            self.quarantine_skipped.labels(reason)
        for reason in FAILURE_REASONS:
            self.series_failed.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for name, kinds in destinations.items():
            for kind in kinds:
                for outcome in DELIVERY_OUTCOMES:
                    self.deliveries.labels(name, kind, outcome)
        ProcessCollector(registry=r)
        if state is not None:
            r.register(_StateCollector(state, list(destinations), min_free_bytes))
        self._model_lock = threading.Lock()

    # -- events, passed to the stages as callbacks -------------------------------------

    def record_association(self, refusal_reason: str | None) -> None:
        """An association was accepted (None) or refused for ``refusal_reason``."""
        if refusal_reason is None:
            self.associations_accepted.inc()
        else:
            reason = refusal_reason if refusal_reason in REFUSAL_REASONS else "other"
            self.associations_refused.labels(reason).inc()

    def record_context_refused(self, reason: str) -> None:
        """A presentation context was refused at negotiation for ``reason``."""
        self.contexts_refused.labels(
            reason if reason in CONTEXT_REFUSAL_REASONS else "other").inc()

    def record_store(self, status: int, size_bytes: int) -> None:
        """A C-STORE was answered ``status``; ``size_bytes`` stored on Success."""
        self.cstore_responses.labels(CSTORE_STATUSES.get(status, "other")).inc()
        if status == 0x0000:
            self.instances_received.inc()
            self.received_bytes.inc(size_bytes)

    def record_series(self, outcome: str) -> None:
        if outcome not in SERIES_OUTCOMES:
            raise ValueError(f"unknown series outcome {outcome!r}")
        self.series.labels(outcome).inc()

    def record_bad_input(self, reason: str | None) -> None:
        """An instance or series was refused, rejected or ignored for ``reason`` (a code
        of :data:`BAD_INPUT_REASONS`; others are dropped so the label set stays fixed)."""
        if reason in BAD_INPUT_REASONS:
            self.bad_input.labels(reason).inc()
        else:
            LOGGER.debug("Bad input reason %r not exported", reason)

    def record_quarantined(self, reason: str) -> None:
        """A refused instance was kept in the quarantine (reasons outside
        :data:`QUARANTINE_REASONS` are dropped, so the label set stays fixed)."""
        if reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason).inc()
        else:
            LOGGER.debug("Quarantine reason %r not exported", reason)

    def record_quarantine_skipped(self, reason: str) -> None:
        """A refused instance was not kept: ``full`` or ``write_error``."""
        if reason in SKIP_REASONS:
            self.quarantine_skipped.labels(reason).inc()

    def record_failure(self, reason: FailureReason) -> None:
        """A series failed for ``reason``."""
        self.series_failed.labels(reason.value).inc()

    def record_stage(self, stage: str, seconds: float) -> None:
        """Time spent in one stage on one series (stages not in :data:`STAGES` are
        dropped, so the label set stays fixed)."""
        if stage in STAGES:
            self.stage_seconds.labels(stage).observe(seconds)
        else:
            LOGGER.debug("Timing of unknown stage %r not exported", stage)

    def record_end_to_end(self, seconds: float) -> None:
        self.end_to_end_seconds.observe(max(0.0, seconds))

    def record_delivery(self, destination: str, kind: str, outcome: str) -> None:
        self.deliveries.labels(destination, kind, outcome).inc()

    def record_model(self, version: str, profile: str, device: str) -> None:
        """The model was loaded: one ``dcn_model_info`` series, replacing any earlier."""
        with self._model_lock:
            self.model_info.clear()
            self.model_info.labels(MODEL_NAME, version, profile, device).set(1)


class _QuietHandler(WSGIRequestHandler):
    """The access log at DEBUG (prometheus_client's ``_SilentHandler`` is private)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        LOGGER.debug("%s %s", self.address_string(), format % args)


def _json(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json"),
                            ("Cache-Control", "no-store")])
    return [body]


class MetricsServer:
    """``/metrics`` (prometheus_client's WSGI app), ``/healthz`` and ``/readyz`` on a
    threaded wsgiref server of its own thread, as ``prometheus_client.start_wsgi_server``.

    Parameters
    ----------
    host, port:
        Where to listen (port 0: a free port, see :attr:`port`).
    metrics:
        The registry served at ``/metrics``.
    readiness, liveness:
        Asked at each ``/readyz`` and ``/healthz`` request.
    """

    def __init__(self, host: str, port: int, metrics: NodeMetrics,
                 readiness: Callable[[], Readiness], liveness: Callable[[], Liveness]) -> None:
        self._address = (host, port)
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._probes: dict[str, Callable[[], Readiness | Liveness]] = {
            "/healthz": liveness, "/readyz": readiness}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application: ``/metrics``, the two probes, 404 elsewhere."""
        path = environ.get("PATH_INFO", "")
        try:
            if path == "/metrics":
                return self._metrics_app(environ, start_response)
            probe = self._probes.get(path)
            if probe is None:
                return _json(start_response, "404 Not Found", b'{"status": "not found", '
                             b'"paths": ["/metrics", "/healthz", "/readyz"]}')
            if environ["REQUEST_METHOD"] != "GET":
                return _json(start_response, "405 Method Not Allowed",
                             b'{"status": "method not allowed", "allow": ["GET"]}')
            answer = probe()
            return _json(start_response, "200 OK" if answer.ok else "503 Service Unavailable",
                         answer.to_json())
        except Exception as exc:  # answer 500 with the reason; the server goes on
            LOGGER.exception("%s %s failed", environ.get("REQUEST_METHOD"), path)
            return _json(start_response, "500 Internal Server Error",
                         f'{{"status": "error", "reason": "{type(exc).__name__}"}}'.encode())

    def start(self) -> None:
        host, port = self._address
        # IPv4 or IPv6 by the host, as prometheus_client's start_wsgi_server does.
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        # ThreadingWSGIServer: public name, not in exposition.__all__ (0.20 to 0.26 have it).
        server_class = type("_Server", (ThreadingWSGIServer,), {"address_family": family})
        self._server = make_server(host, port, self.app, server_class, _QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()
        LOGGER.info("Metrics and health on http://%s:%d (/metrics /healthz /readyz)",
                    host, self.port)

    @property
    def port(self) -> int:
        """The port listened on (the configured one until started)."""
        if self._server is None:
            return self._address[1]
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
