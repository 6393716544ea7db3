"""The Node: the one place where the parts are wired together.

    receive   StorageSCP, one thread per association   -> spool (files + SQLite)
    complete  SeriesAssembler, apscheduler interval job   -> jobs queue in the spool
    infer     ModelWorker thread, one model run at a time -> summary.json, masks.npz
    encode    ResultEncoder thread                        -> SEG/SC/SR files + outbox rows
    send      one DestinationSender thread per PACS       -> C-STORE, retries, dead letters

Receiving never waits on the later stages: they run on their own workers and talk to
each other through the spool (durable) or a small bounded queue (infer -> encode). When
too many series wait for the model, new associations are refused as transient so that
senders retry later instead of handing us data we cannot process in time.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from dcn_node.config import Settings
from dcn_node.encoder import ResultEncoder
from dcn_node.outbox import Delivery, Outbox
from dcn_node.receiver import Refusal, StorageSCP
from dcn_node.sender import DestinationSender
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
        self.outbox = Outbox(self.spool)
        self.assembler = SeriesAssembler(self.spool, settings.completion, settings.selection)
        self.receiver = StorageSCP(settings, self.spool, admission_check=self._admission)
        self.encoder = ResultEncoder(settings, self.spool, self.outbox,
                                     on_recorded=self._wake_senders)
        self.worker = ModelWorker(self.spool, self._make_engine, on_result=self.encoder.submit)
        calling_ae = settings.sender.calling_ae_title or settings.node.ae_title
        self.senders = [
            DestinationSender(self.outbox, destination, settings.sender, calling_ae,
                              on_delivered=self._delivered)
            for destination in settings.destinations
        ]
        self.scheduler = BackgroundScheduler(daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        """Recover the spool, start listening and start every stage."""
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
            self.encoder.start()
            self.worker.start()
        for sender in self.senders:
            sender.start()
        LOGGER.info("dcn-node started; spool at %s; %d destination(s)", self.spool.root,
                    len(self.senders))

    def _admission(self) -> Refusal | None:
        """Backpressure: refuse (transient) while too many series wait for the model."""
        high_water = self.settings.inference.queue_high_water
        if not high_water or not self.settings.inference.enabled:
            return None
        waiting = len(self.spool.list_jobs("queued"))
        if waiting < high_water:
            return None
        # rejected-transient, service-provider (presentation), local-limit-exceeded
        return Refusal(f"inference queue full ({waiting} series waiting, high-water "
                       f"mark {high_water})", 0x02, 0x03, 0x02)

    def _wake_senders(self) -> None:
        for sender in self.senders:
            sender.wake()

    def _delivered(self, delivery: Delivery, destination_complete: bool) -> None:
        study, series = delivery.study_instance_uid, delivery.series_instance_uid
        self.spool.record_event(study, series, delivery.generation, "acknowledged",
                                f"{delivery.destination} {delivery.kind} "
                                f"{delivery.sop_instance_uid}")
        if not destination_complete:
            return
        self.spool.record_event(study, series, delivery.generation, "results_delivered",
                                delivery.destination)
        if self.outbox.result_set_done(delivery.result_set_id):
            self.log_timeline(study, series)

    def log_timeline(self, study: str, series: str) -> None:
        """One structured line per delivered series: its events as seconds since the
        first instance arrived (UIDs only, no patient data)."""
        events = self.spool.timeline(study, series)
        if not events:
            return
        start = events[0][2]
        line = {
            "event": "series_timeline",
            "series_instance_uid": series,
            "generation": max(e[0] for e in events),
            "steps": [
                {"event": e, "seconds": round(at - start, 3), **({"detail": d} if d and
                                                                  e != "acknowledged" else {})}
                for _, e, at, d in events
            ],
        }
        LOGGER.info("%s", json.dumps(line, separators=(",", ":")))

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

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new associations, let in-flight ones finish, stop every stage; all
        within ``node.shutdown_timeout_seconds``. Unfinished work stays in the spool."""
        if self._stopped.is_set():
            return
        timeout = self.settings.node.shutdown_timeout_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        LOGGER.info("dcn-node stopping")

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        self.receiver.stop(timeout=left())
        self.scheduler.shutdown(wait=True)
        if self.settings.inference.enabled:
            self.worker.stop(left())
            self.encoder.stop(left())
        for sender in self.senders:
            sender.stop(left())
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
