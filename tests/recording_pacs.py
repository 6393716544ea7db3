"""A PACS stand-in that records every C-STORE it answers: what arrived how often, by study.

Orthanc (tests/orthanc.py) is the real PACS of the end-to-end tests, but it keeps one copy
of an instance whatever arrives twice. Fault tests must see *every* C-STORE to prove that
each result reaches the PACS exactly once (or is re-sent with the same UID, superseding),
and need a peer that misbehaves on purpose: slow, or answering failure statuses.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom.transport import ThreadedAssociationServer

from tests.conftest import free_port

RESULT_KINDS = {
    str(SegmentationStorage): "seg",
    str(SecondaryCaptureImageStorage): "sc",
    str(MultiFrameTrueColorSecondaryCaptureImageStorage): "sc",
    str(Comprehensive3DSRStorage): "sr",
    str(KeyObjectSelectionDocumentStorage): "ko",
}


class RecordingPacs:
    """A Storage SCP on loopback for SEG, SC, SR and KOS.

    Parameters
    ----------
    ae_title:
        Its AE title.
    delay_seconds:
        Sleep this long in a C-STORE before answering (a slow PACS).
    slow_attempts:
        Only the first this many C-STOREs of each SOP Instance UID are slow (None: all).
    status_for:
        Optional ``(kind, attempt number of this SOP Instance UID) -> status``; default
        Success. A failure status is recorded as an attempt, not as stored.
    """

    def __init__(self, ae_title: str = "RECORDER", *, delay_seconds: float = 0.0,
                 slow_attempts: int | None = None,
                 status_for: Callable[[str, int], int] | None = None,
                 ssl_context: object | None = None) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.delay_seconds = delay_seconds
        self.slow_attempts = slow_attempts
        self.status_for = status_for
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        #: (study, kind, sop_instance_uid) -> times stored (answered Success).
        self.stored: collections.Counter[tuple[str, str, str]] = collections.Counter()
        #: sop_instance_uid -> C-STOREs received (any answer).
        self.attempts: collections.Counter[str] = collections.Counter()
        #: sop_instance_uid -> the dataset last stored under it.
        self.datasets: dict[str, object] = {}
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 16
        for sop_class in RESULT_KINDS:
            ae.add_supported_context(sop_class)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
                                       ssl_context=self.ssl_context)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def destination(self, name: str = "pacs") -> dict:
        """The node's ``destinations`` entry for this peer."""
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1",
                "port": self.port}

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        kind = RESULT_KINDS.get(str(ds.SOPClassUID), "other")
        uid = str(ds.SOPInstanceUID)
        with self._lock:
            self.attempts[uid] += 1
            attempt = self.attempts[uid]
        if self.delay_seconds and (self.slow_attempts is None or attempt <= self.slow_attempts):
            time.sleep(self.delay_seconds)
        status = self.status_for(kind, attempt) if self.status_for else 0x0000
        if status == 0x0000:
            with self._lock:
                self.stored[(str(ds.StudyInstanceUID), kind, uid)] += 1
                self.datasets[uid] = ds
        return status

    # -- what arrived ------------------------------------------------------------------

    def kinds_of(self, study_instance_uid: str) -> dict[str, int]:
        """Distinct result objects stored for a study, by kind."""
        with self._lock:
            keys = [k for k in self.stored if k[0] == study_instance_uid]
        counts: collections.Counter[str] = collections.Counter(kind for _, kind, _ in keys)
        return dict(counts)

    def uids_of(self, study_instance_uid: str) -> set[str]:
        """SOP Instance UIDs of the result objects stored for a study."""
        with self._lock:
            return {uid for study, _, uid in self.stored if study == study_instance_uid}

    def complete(self, study_instance_uid: str) -> bool:
        """A whole result set (SEG, SC, SR, KOS) is stored for the study."""
        kinds = self.kinds_of(study_instance_uid)
        return all(kinds.get(k, 0) >= 1 for k in ("seg", "sc", "sr", "ko"))

    def resends(self) -> int:
        """C-STOREs stored again under a SOP Instance UID already stored (superseding)."""
        with self._lock:
            return sum(count - 1 for count in self.stored.values())

    def total_stored(self) -> int:
        with self._lock:
            return sum(self.stored.values())
