"""The Node: the one place where the parts are wired together.

    receive (StorageSCP, association threads) -> spool (files + SQLite)
    complete (SeriesAssembler, apscheduler job) -> jobs queue in the spool

Receiving never waits on the later stages: they run on their own workers and talk to
the receiver only through the spool.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from dcn_node.config import Settings
from dcn_node.receiver import StorageSCP
from dcn_node.series import SeriesAssembler
from dcn_node.spool import Spool
from dcn_node.worker import ModelWorker

LOGGER = logging.getLogger(__name__)


class Node:
    """A running dcn-node: listener, spool and background workers.

    Parameters
    ----------
    settings:
        The validated configuration.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync)
        self.assembler = SeriesAssembler(self.spool, settings.completion, settings.selection)
        self.receiver = StorageSCP(settings, self.spool)
        self.worker = ModelWorker(self.spool, self._make_engine)
        self.scheduler = BackgroundScheduler(daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        """Recover the spool, start listening and start the completion job."""
        self.spool.recover()
        self.receiver.start()
        self.scheduler.add_job(
            self._check_series,
            "interval",
            seconds=self.settings.completion.check_interval_seconds,
            id="series-completion",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.start()
        if self.settings.inference.enabled:
            self.worker.start()
        LOGGER.info("dcn-node started; spool at %s", self.spool.root)

    def _make_engine(self) -> object:
        from dcn_node.inference.engine import DEFAULT_MODELS_DIR, Engine

        inference = self.settings.inference
        return Engine(inference.models_dir or DEFAULT_MODELS_DIR, inference.profile,
                      inference.device)

    def _check_series(self) -> None:
        try:
            decided = self.assembler.check()
            if any(assessment.state == "queued" for _, assessment in decided):
                self.worker.wake()
        except Exception:  # the job must keep running; the reason goes to the log
            LOGGER.exception("Series completion check failed")

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new associations, let in-flight ones finish, stop the workers."""
        if self._stopped.is_set():
            return
        LOGGER.info("dcn-node stopping")
        self.receiver.stop(timeout=timeout)
        self.scheduler.shutdown(wait=True)
        if self.settings.inference.enabled:
            self.worker.stop()
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
        stop_requested.wait()
        self.stop()
