"""The model worker: takes queued series from the spool and runs the engine on them.

One model run at a time by default, on its own thread: receiving never waits on it. A
failure marks the job and series ``failed`` with the reason, and the worker carries on.
Results of each run are kept in the spool (``results/<series>/<generation>/``) as
``summary.json`` and ``masks.npz``, as ``dcn-node analyze`` writes them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from dcn_node.spool import Job, Spool

LOGGER = logging.getLogger(__name__)

#: Takes over a job after a successful run (job, volume, result, results folder); it
#: is then responsible for finishing the job (the service passes the result encoder).
ResultHandler = Callable[[Job, object, object, Path], None]


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
    """

    def __init__(
        self,
        spool: Spool,
        engine_factory: Callable[[], object],
        *,
        poll_seconds: float = 0.5,
        on_result: ResultHandler | None = None,
    ) -> None:
        self.spool = spool
        self._engine_factory = engine_factory
        self._engine: object | None = None
        self._poll_seconds = poll_seconds
        self._on_result = on_result
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A job was queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.spool.claim_next_job()
            if job is None:
                self._wake.wait(self._poll_seconds)
                self._wake.clear()
                continue
            self.process(job)

    def process(self, job: Job) -> None:
        """Run one job: analysis, then either done or handed to the encode stage."""
        from dcn_node.inference.analysis import write_analysis
        from dcn_node.volume import load_series

        LOGGER.info("Analyzing series %s (generation %d)", job.series_instance_uid,
                    job.generation)
        study, series = job.study_instance_uid, job.series_instance_uid
        try:
            if self._engine is None:
                self._engine = self._engine_factory()
            self.spool.record_event(study, series, job.generation, "inference_start")
            instances = self.spool.series_instances(study, series)
            volume = load_series([i.path for i in instances])
            result = self._engine.analyze(volume)  # type: ignore[attr-defined]
            out_dir = self.spool.results_dir(job)
            summary = write_analysis(out_dir, volume, result)
            self.spool.record_event(study, series, job.generation, "inference_end",
                                    f"probability {summary['probability']:.3f}")
        except Exception as exc:  # any failure fails this job only; the reason is kept
            reason = f"{type(exc).__name__}: {exc}"[:500]
            LOGGER.exception("Series %s failed: %s", series, reason)
            self.spool.finish_job(job, "failed", reason)
            return
        LOGGER.info("Series %s analyzed: probability %.3f, %s in %.1f s", series,
                    summary["probability"], "positive" if summary["positive"] else "negative",
                    summary["seconds"])
        if self._on_result is None:
            self.spool.finish_job(job, "done")
        else:
            # The encode stage finishes the job once its results are recorded.
            self._on_result(job, volume, result, out_dir)
