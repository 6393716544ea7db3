"""The model worker: takes queued series from the spool and runs the engine on them.

One model run at a time by default, on its own thread: receiving never waits on it. A
failure marks the job and series ``failed`` with the reason, and the worker carries on.
Jobs are claimed in the node's name; in a shared store under a lease that a
:class:`~dcn_node.store.lease.LeaseKeeper` renews until the job is finished (here or by
the encode stage), so that no other node takes it meanwhile, and an outcome is recorded
only by the job's latest claim.
Results of each run are kept in the spool (``results/<series>/<generation>/``) as
``summary.json`` and ``masks.npz``, as ``dcn-node analyze`` writes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dcn_node.errors import FailureReason, StoreUnavailableError
from dcn_node.store.lease import LeaseKeeper, default_node_id
from dcn_node.store.spool import Job, Spool

if TYPE_CHECKING:  # torch is imported when the engine is, not with the worker
    from dcn_node.inference.engine import AnalysisResult, Engine
    from dcn_node.volume import Volume

LOGGER = logging.getLogger(__name__)

#: Takes over a job after a successful run (job, volume, result, results folder); it
#: is then responsible for finishing the job (the service passes the result encoder).
ResultHandler = Callable[[Job, "Volume", "AnalysisResult", Path], None]
#: Told the seconds each stage took on a series: (stage, seconds).
TimingCallback = Callable[[str, float], None]
#: Told how a job finished when this stage finished it: (job, "done" or "failed", the
#: recorded reason, the failure's fixed reason).
FinishedCallback = Callable[[Job, str, str | None, FailureReason | None], None]

#: Engine timing keys -> stage names of the metrics (dcn_node.ops.metrics.STAGES).
_ENGINE_STAGES = ("preprocessing", "lung_segmentation", "dcn", "spm", "postprocessing")


class ModelWorker:
    """Consumes the job queue until stopped.

    Parameters
    ----------
    spool:
        Where jobs, instances and results live.
    engine_factory:
        Builds the inference engine on first use (so a node without weights still
        receives, and its jobs fail with the reason).
    on_result:
        Optional next stage after a successful analysis; it finishes the job. Without
        one, the job is done once ``summary.json`` and ``masks.npz`` are written.
    on_timing, on_finished, on_engine_loaded:
        Optional observers (metrics, the per-series summary): stage timings, jobs this
        worker finished, the engine once loaded.
    owner, lease_seconds:
        The node's name on its claims (default: :func:`default_node_id`), and how long a
        claim holds unless renewed (None: until the job finishes or the node restarts;
        one node, SQLite).

    The engine is loaded when the thread starts, so readiness can report the model; if
    that fails, each job tries again and fails with the reason.
    """

    def __init__(
        self,
        spool: Spool,
        engine_factory: Callable[[], Engine],
        *,
        poll_seconds: float = 0.5,
        on_result: ResultHandler | None = None,
        on_timing: TimingCallback | None = None,
        on_finished: FinishedCallback | None = None,
        on_engine_loaded: Callable[[Engine], None] | None = None,
        owner: str | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        self.spool = spool
        self.owner = owner or default_node_id()
        self.lease_seconds = lease_seconds
        self._leases = None if lease_seconds is None else LeaseKeeper(lease_seconds / 3)
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        #: Why the engine could not be loaded (None: loaded, or not tried yet).
        self.engine_error: str | None = None
        self._poll_seconds = poll_seconds
        self._on_result = on_result
        self._on_timing = on_timing
        self._on_finished = on_finished
        self._on_engine_loaded = on_engine_loaded
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _load_engine(self) -> Engine:
        if self._engine is None:
            try:
                self._engine = self._engine_factory()
            except Exception as exc:
                self.engine_error = f"{type(exc).__name__}: {exc}"[:500]
                raise
            self.engine_error = None
            if self._on_engine_loaded is not None:
                self._on_engine_loaded(self._engine)
        return self._engine

    def load(self) -> Engine:
        """Load the engine now (a worker process loads it before it takes jobs).

        Raises
        ------
        Exception
            Whatever building the engine raised; ``engine_error`` keeps the reason.
        """
        return self._load_engine()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():  # not started: process() was called by a broker task
            self._thread.join(timeout)
        if self._leases is not None:
            self._leases.stop()

    def _run(self) -> None:
        try:
            self._load_engine()
        except Exception:  # the node still receives; jobs fail with the reason
            LOGGER.exception("Model not loaded: %s", self.engine_error)
        while not self._stop.is_set():
            try:
                job = self.spool.claim_next_job(self.owner, self.lease_seconds)
                if job is not None:
                    self.hold(job)
                    self.process(job)
                    continue
            except StoreUnavailableError as exc:
                # Logged by the store once; a job cut short runs again once its lease
                # runs out (here or on another node).
                LOGGER.debug("Model worker waits for the store: %s", exc)
            self._wake.wait(self._poll_seconds)
            self._wake.clear()

    def hold(self, job: Job) -> None:
        """Keep renewing the lease of ``job`` (a claim of this worker's) until it is
        finished, here or by the encode stage (no lease: nothing to renew)."""
        lease, leases = self.lease_seconds, self._leases
        if leases is not None and lease is not None:
            leases.hold((job.job_id, job.claim),
                        lambda: self.spool.renew_lease(job, lease))

    def process(self, job: Job) -> None:
        """Run one job: analysis, then either done or handed to the encode stage."""
        from dcn_node.inference.analysis import write_analysis
        from dcn_node.volume import load_series

        LOGGER.info("Analyzing series %s (generation %d)", job.series_instance_uid,
                    job.generation)
        study, series = job.study_instance_uid, job.series_instance_uid
        try:
            engine = self._load_engine()
            self.spool.record_event(study, series, job.generation, "inference_start")
            instances = self.spool.series_instances(study, series)
            started = time.perf_counter()
            volume = load_series([i.path for i in instances])
            self._timing("volume_load", time.perf_counter() - started)
            result = engine.analyze(volume)
            for stage in _ENGINE_STAGES:
                if stage in result.timings:
                    self._timing(stage, result.timings[stage])
            out_dir = self.spool.results_dir(job)
            summary = write_analysis(out_dir, volume, result)
            self.spool.record_event(study, series, job.generation, "inference_end",
                                    _outcome(summary))
        except StoreUnavailableError:
            raise  # not the series' failure: the job runs again when the store is back
        except Exception as exc:  # any failure fails this job only; the reason is kept
            reason = f"{type(exc).__name__}: {exc}"[:500]
            LOGGER.exception("Series %s failed: %s", series, reason)
            _release_memory()
            if self.spool.finish_job(job, "failed", reason) and \
                    self._on_finished is not None:
                self._on_finished(job, "failed", reason, FailureReason.of_analysis(exc))
            return
        LOGGER.info("Series %s analyzed: %s in %.1f s", series, _outcome(summary),
                    summary["seconds"])
        if self._on_result is None:
            if self.spool.finish_job(job, "done") and self._on_finished is not None:
                self._on_finished(job, "done", None, None)
        else:
            # The encode stage finishes the job once its results are recorded.
            self._on_result(job, volume, result, out_dir)

    def _timing(self, stage: str, seconds: float) -> None:
        if self._on_timing is not None:
            self._on_timing(stage, seconds)


def _outcome(summary: dict) -> str:
    """``probability 0.123, negative`` or ``not assessable: <reason>``."""
    if not summary.get("assessable", True):
        return f"not assessable: {summary['quality_gate']['detail']}"
    verdict = "positive" if summary["positive"] else "negative"
    return f"probability {summary['probability']:.3f}, {verdict}"


def _release_memory() -> None:
    """After a failed run (out of memory above all): drop what the run left cached, so
    the next series starts from a clean allocator."""
    import gc
    import sys

    from dcn_node.ops.memory import trim

    gc.collect()
    trim()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
