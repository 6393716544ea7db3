"""The encode stage: model output -> SEG, SC, SR and KOS files -> the outbox.

Runs on its own thread behind a small bounded queue, so the model worker goes on with the
next series while the objects of the last one are encoded (and waits when encoding falls
behind). A job is marked ``done`` in the transaction that records its result set in the
outbox; if the node stops before, the job is still ``processing`` and runs again after the
restart (the model is deterministic and the object UIDs are too, so nothing duplicates).
That transaction is fenced by the job's claim: a worker whose lease ran out, and whose
job another node claimed, records nothing (the other node's result set is the one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dcn_node.config import Settings
from dcn_node.errors import FailureReason, StoreUnavailableError
from dcn_node.pipeline.worker import FinishedCallback, TimingCallback
from dcn_node.store.outbox import Outbox, ResultObject
from dcn_node.store.spool import Job, Spool

if TYPE_CHECKING:  # heavy imports (torch, highdicom) stay with the code that runs them
    from pydicom.dataset import Dataset

    from dcn_node.inference.engine import AnalysisResult
    from dcn_node.results import ResultSet
    from dcn_node.volume import Volume

LOGGER = logging.getLogger(__name__)


@dataclass
class _Work:
    job: Job
    volume: Volume
    result: AnalysisResult
    out_dir: Path


class ResultEncoder:
    """Encodes result objects and records them for delivery.

    Parameters
    ----------
    settings:
        The node configuration (``results`` and ``destinations`` are used).
    spool, outbox:
        Durable state.
    on_recorded:
        Called after a result set was recorded (the service wakes the senders).
    on_timing, on_finished:
        Optional observers: the ``encoding`` stage's seconds, and how each job finished.
    """

    def __init__(self, settings: Settings, spool: Spool, outbox: Outbox, *,
                 on_recorded: Callable[[], None] | None = None, queue_size: int = 2,
                 on_timing: TimingCallback | None = None,
                 on_finished: FinishedCallback | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.outbox = outbox
        self._on_recorded = on_recorded
        self._on_timing = on_timing
        self._on_finished = on_finished
        self._queue: queue.Queue[_Work | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="result-encoder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Model outputs waiting to be encoded."""
        return self._queue.qsize()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued (within ``timeout``) and stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            LOGGER.warning("Result encoder still busy at shutdown; its jobs run again later")
            return
        self._thread.join(timeout)

    def submit(self, job: Job, volume: Volume, result: AnalysisResult, out_dir: Path
               ) -> None:
        """Queue one model output (blocks while the encoder is behind)."""
        self._queue.put(_Work(job, volume, result, out_dir))

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            self.encode(work.job, work.volume, work.result, work.out_dir)

    def encode(self, job: Job, volume: Volume, result: AnalysisResult, out_dir: Path
               ) -> None:
        """Build, write and record one result set; mark the job done or failed."""
        from dcn_node.results import build_results

        started = time.perf_counter()
        try:
            result_set = build_results(volume, result, self.settings.results)
            paths = result_set.write(out_dir / "dicom")
            objects = [
                ResultObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), path)
                for kind, ds, path in _objects_with_paths(result_set, paths)
            ]
            destinations = {d.name: d.kinds for d in self.settings.destinations}
            if self.outbox.record_result_set(job, out_dir / "dicom", objects, destinations,
                                             finish=True) is None:
                return  # the job is another claim's now: its outcome is that one's
            self.spool.record_event(job.study_instance_uid, job.series_instance_uid,
                                    job.generation, "results_recorded",
                                    f"{len(objects)} objects")
        except StoreUnavailableError as exc:  # not the series' failure: it runs again
            LOGGER.warning("Series %s: results not recorded, the job runs again when its "
                           "lease runs out: %s", job.series_instance_uid, exc)
            return
        except Exception as exc:  # this job fails with its reason; the node carries on
            reason = f"encoding results: {type(exc).__name__}: {exc}"[:500]
            LOGGER.exception("Series %s failed: %s", job.series_instance_uid, reason)
            if self.spool.finish_job(job, "failed", reason) and \
                    self._on_finished is not None:
                self._on_finished(job, "failed", reason, FailureReason.ENCODING_ERROR)
            return
        if self._on_timing is not None:
            self._on_timing("encoding", time.perf_counter() - started)
        LOGGER.info("Series %s: %d result objects recorded for %d destination(s)",
                    job.series_instance_uid, len(objects), len(destinations))
        if self._on_finished is not None:
            self._on_finished(job, "done", None, None)
        if self._on_recorded is not None:
            self._on_recorded()


def _objects_with_paths(result_set: ResultSet, paths: list[Path]
                        ) -> list[tuple[str, Dataset, Path]]:
    """Pair each dataset of the set with its written file (``write`` keeps kind order)."""
    by_uid = {p.stem: p for p in paths}
    out = []
    for kind, datasets in result_set.by_kind().items():
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            path = by_uid.get(uid)
            if path is None:
                raise RuntimeError(f"{kind} object {uid} was not written")
            out.append((kind, ds, path))
    return out
