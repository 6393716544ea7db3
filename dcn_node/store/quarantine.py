"""The quarantine: instances the Storage SCP refused for what they hold, kept for a look.

A refused instance is not acknowledged, so its sender keeps it too; the copy here lets the
site see what arrived without asking the sender. Layout under ``storage.spool_dir``::

    quarantine/<YYYY-MM-DD>/<name>.dcm    the dataset as received, behind a File Meta header
    quarantine/<YYYY-MM-DD>/<name>.raw    ... or alone, when no File Meta header can be made
    quarantine/<YYYY-MM-DD>/<name>.json   why: reason, status answered, peer, syntax, time

The date is the UTC day of receipt. ``<name>`` is the SOP Instance UID of the C-STORE
request when it is a valid UID (a re-send of the same refused instance on the same day
replaces the earlier copy), else a random UUID. The sidecar holds no patient data: the
node never reads patient names, IDs or birth dates from a dataset.

Each file goes through a temporary file renamed into place (fsynced with
``storage.fsync``), data file first, sidecar last: a ``.json`` names a complete data file.
Temporary files carry their node's name: in a spool folder shared by the nodes of a
cluster, start-up removes only this node's and stale ones (store/shared_folder.py).
The whole quarantine is kept under ``storage.quarantine_max_bytes`` (0: off); an instance
that would go over it is logged and not written. Nothing here raises: a failed write is
logged and counted, and the refusal is answered as it would have been without it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dcn_node.header import is_valid_uid
from dcn_node.store.lease import default_node_id
from dcn_node.store.shared_folder import NodeFiles
from dcn_node.store.spool import fsync_folder, write_parts

LOGGER = logging.getLogger(__name__)

#: The quarantine folder's name inside ``storage.spool_dir``.
QUARANTINE_DIR = "quarantine"
#: ``reason`` of dcn_quarantine_skipped_total: why a refused instance was not kept.
SKIP_REASONS = ("full", "write_error")
#: When the quarantine is full, look at the disk again (files an operator removed) at
#: most this often.
RESCAN_SECONDS = 60.0


@dataclass(frozen=True)
class RefusedInstance:
    """What the Storage SCP knows about an instance it refused for its content."""

    #: The fixed reason code, as counted in ``dcn_bad_input_total{reason}``.
    reason_code: str
    #: The reason as logged and sent in the ErrorComment.
    reason: str
    #: The DICOM status answered (0xC000, 0xA900).
    status: int
    calling_ae_title: str
    peer_address: str
    peer_port: int
    transfer_syntax_uid: str
    #: From the C-STORE request (Affected SOP Class / Instance UID).
    sop_class_uid: str
    sop_instance_uid: str
    #: The dataset's own UIDs when it could be parsed and they differ from the request's.
    dataset_sop_class_uid: str | None = None
    dataset_sop_instance_uid: str | None = None
    #: Seconds since the epoch.
    received_at: float = 0.0


def quarantine_usage(spool_dir: Path | str) -> tuple[int, int]:
    """(instances, bytes) in the quarantine of ``spool_dir``: one instance per sidecar,
    bytes of every file. (0, 0) when there is none."""
    instances = size = 0
    root = Path(spool_dir) / QUARANTINE_DIR
    if not root.is_dir():
        return 0, 0
    for path in root.glob("*/*"):
        try:
            size += path.stat().st_size
        except OSError:
            continue  # removed while we looked
        if path.suffix == ".json" and not path.name.startswith("."):
            instances += 1
    return instances, size


class Quarantine:
    """Keeps the bytes of refused instances, with the reason, up to a size limit.

    Parameters
    ----------
    spool_dir:
        ``storage.spool_dir``; files go to its ``quarantine/`` folder.
    max_bytes:
        ``storage.quarantine_max_bytes``: the most the quarantine may hold; 0 = off.
    fsync:
        fsync each file and its folder (``storage.fsync``).
    on_quarantined:
        Told the reason code of each instance kept (metrics).
    on_skipped:
        Told why a refused instance was not kept: ``full`` or ``write_error`` (metrics).
    node_files:
        How this node names its temporary files and which leftovers it may remove (the
        spool's, :attr:`Spool.node_files <dcn_node.store.spool.Spool.node_files>`;
        default: a folder this node alone writes in).
    """

    def __init__(self, spool_dir: Path | str, max_bytes: int, *, fsync: bool = False,
                 on_quarantined: Callable[[str], None] | None = None,
                 on_skipped: Callable[[str], None] | None = None,
                 node_files: NodeFiles | None = None) -> None:
        self.root = Path(spool_dir) / QUARANTINE_DIR
        self.node_files = node_files or NodeFiles(default_node_id(), shared=False)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._on_quarantined = on_quarantined
        self._on_skipped = on_skipped
        self._lock = threading.Lock()
        self._used_bytes = 0
        self._scanned_at = 0.0
        if self.enabled:
            try:
                self._remove_temporary_files()
            except OSError as exc:  # the writes will fail and say why; the node starts
                LOGGER.warning("Cannot tidy the quarantine %s: %s", self.root, exc)
            self._rescan()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def used_bytes(self) -> int:
        """Bytes the quarantine holds, as last counted (files written since included)."""
        return self._used_bytes

    def _remove_temporary_files(self) -> None:
        for temp in self.node_files.temp_leftovers(self.root.glob("*/.*.tmp")):
            temp.unlink(missing_ok=True)

    def _rescan(self) -> None:
        self._used_bytes = quarantine_usage(self.root.parent)[1]
        self._scanned_at = time.monotonic()

    def keep(self, refused: RefusedInstance, body: bytes | memoryview,
             file_meta: bytes | None) -> Path | None:
        """Write ``body`` (the dataset as received; behind ``file_meta`` when given, as
        ``.dcm``, else as ``.raw``) and its sidecar. Returns the data file's path, or None
        when the quarantine is off, full, or the write failed (logged and counted)."""
        if not self.enabled:
            return None
        received = refused.received_at or time.time()
        name = (refused.sop_instance_uid if is_valid_uid(refused.sop_instance_uid)
                else str(uuid.uuid4()))
        folder = self.root / time.strftime("%Y-%m-%d", time.gmtime(received))
        data_path = folder / f"{name}{'.dcm' if file_meta is not None else '.raw'}"
        sidecar_path = folder / f"{name}.json"
        parts = (file_meta, body) if file_meta is not None else (body,)
        data_bytes = sum(len(part) if isinstance(part, bytes) else part.nbytes
                         for part in parts)
        sidecar = self._sidecar(refused, data_path.name, data_bytes, received)
        size = data_bytes + len(sidecar)
        if not self._reserve(size):
            LOGGER.warning(
                "Refused instance %s from %s not quarantined: %d bytes would take the "
                "quarantine over storage.quarantine_max_bytes (%d bytes held, limit %d)",
                refused.sop_instance_uid, refused.calling_ae_title, size, self._used_bytes,
                self.max_bytes)
            self._skipped("full")
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # A re-send of the same refused instance the same day replaces its earlier
            # copy (a .dcm may become a .raw, or the reverse).
            earlier = [folder / f"{name}{suffix}" for suffix in (".dcm", ".raw", ".json")
                       if (folder / f"{name}{suffix}").exists()]
            replaced_bytes = sum(p.stat().st_size for p in earlier)
            for stale in earlier:
                if stale != sidecar_path and stale != data_path:
                    stale.unlink()
            self._write(data_path, parts)
            try:
                self._write(sidecar_path, (sidecar,))
            except OSError:
                # No data file without its reason (nor an earlier reason without its data).
                data_path.unlink(missing_ok=True)
                sidecar_path.unlink(missing_ok=True)
                raise
            self._sync_folder(folder)
        except OSError as exc:
            with self._lock:
                self._used_bytes -= size
            LOGGER.error("Refused instance %s from %s not quarantined: cannot write %s: %s",
                         refused.sop_instance_uid, refused.calling_ae_title, data_path,
                         exc.strerror or exc)
            self._skipped("write_error")
            return None
        with self._lock:
            self._used_bytes -= replaced_bytes
        LOGGER.info("Refused instance %s from %s quarantined (%s) as %s",
                    refused.sop_instance_uid, refused.calling_ae_title, refused.reason_code,
                    data_path)
        if self._on_quarantined is not None:
            self._on_quarantined(refused.reason_code)
        return data_path

    def _reserve(self, size: int) -> bool:
        """Count ``size`` bytes in if they fit under the limit (looking at the disk again,
        now and then, when they do not)."""
        with self._lock:
            if (self._used_bytes + size > self.max_bytes
                    and time.monotonic() - self._scanned_at >= RESCAN_SECONDS):
                self._rescan()
            if self._used_bytes + size > self.max_bytes:
                return False
            self._used_bytes += size
            return True

    @staticmethod
    def _sidecar(refused: RefusedInstance, file_name: str, data_bytes: int,
                 received: float) -> bytes:
        record: dict[str, object] = {
            "file": file_name,
            "reason_code": refused.reason_code,
            "reason": refused.reason,
            "status": f"0x{refused.status:04X}",
            "calling_ae_title": refused.calling_ae_title,
            "peer_address": refused.peer_address,
            "peer_port": refused.peer_port,
            "transfer_syntax_uid": refused.transfer_syntax_uid,
            "sop_class_uid": refused.sop_class_uid,
            "sop_instance_uid": refused.sop_instance_uid,
            "received_at": datetime.fromtimestamp(received, UTC).isoformat(),
            "size_bytes": data_bytes,
        }
        if refused.dataset_sop_class_uid is not None:
            record["dataset_sop_class_uid"] = refused.dataset_sop_class_uid
        if refused.dataset_sop_instance_uid is not None:
            record["dataset_sop_instance_uid"] = refused.dataset_sop_instance_uid
        return (json.dumps(record, indent=2) + "\n").encode("utf-8")

    def _write(self, path: Path, parts: tuple[bytes | memoryview, ...]) -> None:
        temp = path.parent / self.node_files.temp_name(path.name, uuid.uuid4().hex,
                                                       hidden=True)
        write_parts(temp, parts, fsync=self.fsync)
        try:
            os.replace(temp, path)
        except OSError:
            temp.unlink(missing_ok=True)
            raise

    def _sync_folder(self, folder: Path) -> None:
        if self.fsync:
            fsync_folder(folder)

    def _skipped(self, reason: str) -> None:
        if self._on_skipped is not None:
            self._on_skipped(reason)
