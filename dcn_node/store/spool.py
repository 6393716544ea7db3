"""Durable on-disk state: received files plus their index.

Layout under ``storage.spool_dir``::

    incoming/                 temp files being written, named after their node (a node's
                              own are removed at its start-up: store/shared_folder.py)
    instances/<study>/<series>/<sop>.dcm
    index.sqlite3             instances, series, jobs (WAL journal); or, with ``store.url``,
                              the same tables in PostgreSQL (dcn_node/store/database.py)

An instance is written to ``incoming/``, optionally fsynced, renamed into ``instances/``
and recorded in SQLite, all before the C-STORE is answered Success. Rename and commit are
atomic, so after a crash an instance is either fully there or was never acknowledged.
A file renamed in but not yet recorded (crash between the two) is indexed at start-up.
With a PostgreSQL store, several nodes may share the spool folder: start-up then leaves
alone what another node may be writing (:class:`~dcn_node.store.shared_folder.NodeFiles`).

On SQLite all writes go through one connection behind a lock: SQLite serialises writers
anyway and one connection keeps the commit cost to a single WAL append. On PostgreSQL the
nodes of a cluster share the index: jobs are claimed with ``FOR UPDATE SKIP LOCKED``, under
an optional lease, and a claim's count fences its finish (:meth:`Spool.finish_job`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dcn_node.errors import InvalidInstanceError, SpoolWriteError
from dcn_node.header import InstanceHeader, read_header_from_file
from dcn_node.store.database import Transaction, open_index
from dcn_node.store.jobs import Job, JobQueue
from dcn_node.store.lease import default_node_id
from dcn_node.store.shared_folder import NodeFiles

LOGGER = logging.getLogger(__name__)

#: Series states, in the order a series normally goes through them.
SERIES_STATES = (
    "receiving",
    "complete",
    "ignored",
    "rejected",
    "queued",
    "processing",
    "done",
    "failed",
)
#: States in which a newly arrived instance reopens the series.
_CLOSED_STATES = ("complete", "ignored", "rejected", "queued", "processing", "done", "failed")


@dataclass(frozen=True)
class StoredInstance:
    """An instance as recorded in the index."""

    header: InstanceHeader
    path: Path
    transfer_syntax_uid: str
    received_at: float


@dataclass(frozen=True)
class SeriesRecord:
    study_instance_uid: str
    series_instance_uid: str
    state: str
    reason: str | None
    instances: int
    first_received_at: float
    last_received_at: float
    quiet_since: float
    completed_at: float | None
    generation: int
    #: Frames received (one per single-frame instance).
    frames: int = 0
    #: The largest frame count announced by the data, if any.
    announced_frames: int | None = None


def _header_to_json(header: InstanceHeader) -> str:
    return json.dumps(header.__dict__, separators=(",", ":"))


def _header_from_json(text: str) -> InstanceHeader:
    data = json.loads(text)
    for key in ("image_type", "pixel_spacing", "image_orientation"):
        if data[key] is not None:
            data[key] = tuple(data[key])
    data["positions"] = tuple(tuple(p) for p in data["positions"])
    return InstanceHeader(**data)


def write_parts(temp: Path, parts: tuple[bytes | memoryview, ...], *, fsync: bool) -> int:
    """Write ``parts`` to the temporary file ``temp`` (flushed to disk when ``fsync``) and
    return its size; on failure remove it and raise. The caller renames it into place."""
    size = 0
    try:
        with open(temp, "wb") as handle:
            for part in parts:
                size += handle.write(part)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
    except OSError:
        temp.unlink(missing_ok=True)
        raise
    return size


def fsync_folder(folder: Path) -> None:
    """fsync a folder: its entries (a file renamed in, a folder made) survive a power loss."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_UNSAFE_IN_PATH = re.compile(r"[^0-9A-Za-z.]")


def _safe_component(uid: str) -> str:
    # UIDs are digits and dots; anything else (a malformed UID) must not escape the spool.
    safe = _UNSAFE_IN_PATH.sub("_", uid)[:64]
    return safe if safe.strip(".") else "_"  # never "", "." or ".."


class Spool(JobQueue):
    """Files and index of everything the node has received and decided.

    Parameters
    ----------
    spool_dir:
        Folder holding the files and ``index.sqlite3``; created when missing.
    fsync:
        fsync each file, its folder and every commit before returning (power-loss safe).
    url:
        A PostgreSQL URL (``store.url``) holding the index instead of ``index.sqlite3``;
        the spool folder may then be shared by the nodes using that database.
    node_id:
        This node's id, in the names of its temporary files (default: a new
        :func:`~dcn_node.store.lease.default_node_id`).

    Jobs (queue, claims, leases, outcomes) are :class:`~dcn_node.store.jobs.JobQueue`'s.
    """

    def __init__(self, spool_dir: Path | str, *, fsync: bool = False,
                 url: str | None = None, node_id: str | None = None) -> None:
        self.root = Path(spool_dir)
        #: This node's temporary files, and which leftovers in the folder it may take.
        self.node_files = NodeFiles(node_id or default_node_id(), shared=url is not None)
        self.fsync = fsync
        self.incoming_dir = self.root / "incoming"
        self.instances_dir = self.root / "instances"
        self._instances_root = str(self.instances_dir)
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self._index = open_index(self.root, fsync=fsync, url=url)
        self.dialect = self._index.dialect

    def close(self) -> None:
        self._index.close()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction on the index (SQLite: BEGIN IMMEDIATE ... COMMIT, serialised
        with every other writer); used by the outbox, which keeps its tables here too."""
        with self._index.transaction() as db:
            yield db

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run a read-only query on the index (``?`` placeholders)."""
        return self._index.query(sql, args)

    def now(self) -> float:
        """The index's time: the database's clock on PostgreSQL, the host's on SQLite."""
        return self._index.now()

    _transaction = transaction

    # -- receiving ---------------------------------------------------------------------

    def instance_path(self, header: InstanceHeader) -> Path:
        # One Path from a joined string: pathlib's "/" costs ~20 us a step, per instance.
        return Path(os.path.join(
            self._instances_root,
            _safe_component(header.study_instance_uid),
            _safe_component(header.series_instance_uid),
            f"{_safe_component(header.sop_instance_uid)}.dcm",
        ))

    def _write_file(self, path: Path, parts: tuple[bytes | memoryview, ...]) -> int:
        """Write ``parts`` to ``path`` atomically; return the size. Leaves nothing behind
        on failure."""
        folder = path.parent
        temp = self.incoming_dir / self.node_files.temp_name(path.name, threading.get_ident())
        try:
            size = write_parts(temp, parts, fsync=self.fsync)
            try:
                os.replace(temp, path)
            except FileNotFoundError:
                # The series' first instance, or its folder was cleaned up since: make it
                # now rather than asking the file system on every instance.
                self._make_folder(folder)
                os.replace(temp, path)
            if self.fsync:
                fsync_folder(folder)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise SpoolWriteError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
        return size

    def _make_folder(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync:  # the new folders' own entries must survive a power loss too
            for parent in (folder.parent, folder.parent.parent):
                fsync_folder(parent)

    def store_instance(
        self,
        header: InstanceHeader,
        parts: tuple[bytes | memoryview, ...],
        *,
        transfer_syntax_uid: str,
        calling_ae_title: str,
    ) -> bool:
        """Write an instance durably and index it. Returns ``True`` when it replaced an
        earlier copy of the same SOP Instance UID.

        Raises
        ------
        SpoolWriteError
            If the file or its index record cannot be written; nothing is half written.
        """
        path = self.instance_path(header)
        size = self._write_file(path, parts)
        try:
            with self._transaction() as db:
                now = db.now()
                previous = db.execute(
                    "SELECT path FROM instances WHERE sop_instance_uid = ?",
                    (header.sop_instance_uid,),
                ).fetchone()
                self._upsert_instance(
                    db, header, path, size, transfer_syntax_uid, now, calling_ae_title
                )
                self._touch_series(db, header.study_instance_uid, header.series_instance_uid, now)
        except self._index.errors as exc:
            raise SpoolWriteError(f"cannot index {header.sop_instance_uid}: {exc}") from exc
        if previous is not None and previous[0] != str(path):
            # Re-sent under another series: the index now points at the new file.
            Path(previous[0]).unlink(missing_ok=True)
        return previous is not None

    @staticmethod
    def _upsert_instance(
        db: Transaction,
        header: InstanceHeader,
        path: Path,
        size: int,
        transfer_syntax_uid: str,
        received_at: float,
        calling_ae_title: str,
    ) -> None:
        db.execute(
            "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(sop_instance_uid) DO UPDATE SET "
            "study_instance_uid=excluded.study_instance_uid, "
            "series_instance_uid=excluded.series_instance_uid, "
            "sop_class_uid=excluded.sop_class_uid, "
            "transfer_syntax_uid=excluded.transfer_syntax_uid, path=excluded.path, "
            "size_bytes=excluded.size_bytes, received_at=excluded.received_at, "
            "calling_ae_title=excluded.calling_ae_title, header_json=excluded.header_json, "
            "frames=excluded.frames, announced_frames=excluded.announced_frames",
            (
                header.sop_instance_uid,
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_class_uid,
                transfer_syntax_uid,
                str(path),
                size,
                received_at,
                calling_ae_title,
                _header_to_json(header),
                header.number_of_frames,
                header.announced_frames,
            ),
        )

    def _touch_series(self, db: Transaction, study: str, series: str, now: float) -> None:
        select = ("SELECT state, generation FROM series WHERE study_instance_uid = ? AND "
                  "series_instance_uid = ?" + self.dialect.lock_rows)
        row = db.execute(select, (study, series)).fetchone()
        if row is None:
            if db.execute(
                "INSERT INTO series (study_instance_uid, series_instance_uid, state, "
                "first_received_at, last_received_at, quiet_since, updated_at) "
                "VALUES (?,?,'receiving',?,?,?,?) ON CONFLICT DO NOTHING",
                (study, series, now, now, now, now),
            ).rowcount == 1:
                return
            # Another node recorded the series' first instance meanwhile (PostgreSQL).
            row = db.execute(select, (study, series)).fetchone()
        state, generation = row
        if state in _CLOSED_STATES:
            # A late arrival: the series is received again and completes again later.
            db.execute(
                "UPDATE series SET state='receiving', reason=NULL, completed_at=NULL, "
                "generation=?, last_received_at=?, quiet_since=?, updated_at=?, "
                "lease_owner=NULL, lease_expires_at=NULL "
                "WHERE study_instance_uid = ? AND series_instance_uid = ?",
                (generation + 1, now, now, now, study, series),
            )
            db.execute(
                "UPDATE jobs SET state='superseded', reason='series reopened by a late "
                "arrival', updated_at=? WHERE study_instance_uid=? AND "
                "series_instance_uid=? AND state='queued'",
                (now, study, series),
            )
            LOGGER.info(
                "Series %s reopened by a late arrival (was %s, generation %d)",
                series,
                state,
                generation + 1,
            )
        else:
            db.execute(
                "UPDATE series SET last_received_at=?, quiet_since=?, updated_at=? "
                "WHERE study_instance_uid = ? AND series_instance_uid = ?",
                (now, now, now, study, series),
            )

    # -- recovery ----------------------------------------------------------------------

    def recover(self, owner: str | None = None) -> None:
        """Bring the spool back to a consistent state after a stop or crash.

        Removes half-written temp files (received instances and result objects), indexes
        files that were renamed in but not recorded, restarts the quiet timer of series
        still receiving (their senders could not reach us while we were down), and takes
        back the assessments and jobs cut short: those claimed without a lease, under one
        that ran out, or by ``owner`` (this node). Another node's live claims are that
        node's, still at work.

        In a spool folder shared with other nodes (PostgreSQL store) a temp file is
        removed, and an unrecorded file indexed, only when it is this node's or stale
        (:class:`~dcn_node.store.shared_folder.NodeFiles`): another node may be writing
        it, or about to record it, right now.
        """
        for temp in self.node_files.temp_leftovers(self.incoming_dir.glob("*.tmp")):
            temp.unlink(missing_ok=True)
        # A result object cut off while written (results/<series>/<generation>/<kind>/,
        # results.builder): the job runs again and writes it whole.
        for temp in self.node_files.temp_leftovers(self.root.glob("results/*/*/*/.*.partial")):
            temp.unlink(missing_ok=True)
        known = {row[0] for row in self.query("SELECT path FROM instances")}
        orphans = self.node_files.stale(
            p for p in self.instances_dir.glob("*/*/*.dcm") if str(p) not in known)
        for path in orphans:
            try:
                header, transfer_syntax = read_header_from_file(path)
            except InvalidInstanceError as exc:
                LOGGER.warning("Spool file %s cannot be indexed (%s); left in place", path, exc)
                continue
            if self._index_existing(path, header, transfer_syntax):
                LOGGER.info("Indexed spool file %s written before a crash", path.name)
        with self._transaction() as db:
            now = db.now()
            db.execute("UPDATE series SET quiet_since=? WHERE state='receiving'", (now,))
            # A series being assessed when we stopped is assessed again.
            db.execute(
                "UPDATE series SET state='receiving', quiet_since=?, lease_owner=NULL, "
                "lease_expires_at=NULL WHERE state='complete' AND (lease_expires_at IS NULL "
                "OR lease_expires_at <= ? OR lease_owner = ?)", (now, now, owner))
            # A model run cut short by the stop runs again; one under another node's lease
            # that has not run out is that node's, which is still at it.
            db.execute(
                "UPDATE jobs SET state='queued', lease_owner=NULL, lease_expires_at=NULL "
                "WHERE state='processing' AND (lease_expires_at IS NULL OR "
                "lease_expires_at <= ? OR lease_owner = ?)", (now, owner))
            db.execute(
                "UPDATE series SET state='queued' WHERE state='processing' AND NOT EXISTS ("
                "SELECT 1 FROM jobs j WHERE j.study_instance_uid = series.study_instance_uid "
                "AND j.series_instance_uid = series.series_instance_uid AND "
                "j.generation = series.generation AND j.state = 'processing')")

    def _index_existing(self, path: Path, header: InstanceHeader, transfer_syntax: str
                        ) -> bool:
        """Index a file found in the spool unless its instance is indexed already (a
        node recorded it since, or it was re-sent under another series and this is the
        copy left behind): a file found never overwrites what a node recorded."""
        stat = path.stat()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?"
                          + self.dialect.lock_rows, (header.sop_instance_uid,)).fetchone():
                return False
            self._upsert_instance(
                db, header, path, stat.st_size, transfer_syntax, stat.st_mtime, ""
            )
            self._touch_series(
                db, header.study_instance_uid, header.series_instance_uid, stat.st_mtime
            )
        return True

    # -- series ------------------------------------------------------------------------

    _SERIES_SELECT = (
        "SELECT s.study_instance_uid, s.series_instance_uid, s.state, s.reason, "
        "(SELECT COUNT(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid "
        " AND i.series_instance_uid = s.series_instance_uid), "
        "s.first_received_at, s.last_received_at, s.quiet_since, s.completed_at, s.generation, "
        "(SELECT COALESCE(SUM(i.frames), 0) FROM instances i "
        " WHERE i.study_instance_uid = s.study_instance_uid "
        " AND i.series_instance_uid = s.series_instance_uid), "
        "(SELECT MAX(i.announced_frames) FROM instances i "
        " WHERE i.study_instance_uid = s.study_instance_uid "
        " AND i.series_instance_uid = s.series_instance_uid) "
        "FROM series s"
    )

    def list_series(self, state: str | None = None) -> list[SeriesRecord]:
        query = self._SERIES_SELECT
        args: tuple[str, ...] = ()
        if state is not None:
            query, args = query + " WHERE s.state = ?", (state,)
        rows = self.query(query + " ORDER BY s.first_received_at", args)
        return [SeriesRecord(*r) for r in rows]

    def series_to_assess(self, now: float) -> list[SeriesRecord]:
        """Series that may be complete: those receiving, and those whose assessment's
        lease ran out at ``now`` (the store's time) before its holder decided."""
        rows = self.query(
            self._SERIES_SELECT + " WHERE s.state = 'receiving' OR (s.state = 'complete' "
            "AND s.lease_expires_at <= ?) ORDER BY s.first_received_at", (now,))
        return [SeriesRecord(*r) for r in rows]

    def get_series(self, study: str, series: str) -> SeriesRecord | None:
        rows = self.query(
            self._SERIES_SELECT + " WHERE s.study_instance_uid = ? AND s.series_instance_uid = ?",
            (study, series),
        )
        return SeriesRecord(*rows[0]) if rows else None

    def series_instances(self, study: str, series: str) -> list[StoredInstance]:
        rows = self.query(
            "SELECT header_json, path, transfer_syntax_uid, received_at FROM instances "
            "WHERE study_instance_uid = ? AND series_instance_uid = ?",
            (study, series),
        )
        return [StoredInstance(_header_from_json(h), Path(p), ts, t) for h, p, ts, t in rows]

    def claim_assessment(self, record: SeriesRecord, owner: str,
                         lease_seconds: float | None = None) -> bool:
        """Take a series that may be complete for assessing: it becomes ``complete``,
        held by ``owner`` (under a lease of ``lease_seconds``; None: until it decides or
        the node recovers, one node). Fails (False) when an instance arrived since
        ``record`` was read, or another node holds it and its lease has not run out."""
        with self._transaction() as db:
            now = db.now()
            return db.execute(
                "UPDATE series SET state='complete', lease_owner=?, lease_expires_at=?, "
                "updated_at=? WHERE study_instance_uid=? AND series_instance_uid=? AND "
                "generation=? AND quiet_since=? AND (state='receiving' OR "
                "(state='complete' AND lease_expires_at <= ?))",
                (owner, None if lease_seconds is None else now + lease_seconds, now,
                 record.study_instance_uid, record.series_instance_uid, record.generation,
                 record.quiet_since, now),
            ).rowcount == 1

    def release_assessment(self, record: SeriesRecord, owner: str) -> None:
        """Give back an assessment ``owner`` holds without deciding (the series was not
        complete after all): it is receiving again, its quiet timer untouched."""
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET state='receiving', lease_owner=NULL, "
                "lease_expires_at=NULL WHERE study_instance_uid=? AND series_instance_uid=? "
                "AND generation=? AND state='complete' AND lease_owner=?",
                (record.study_instance_uid, record.series_instance_uid, record.generation,
                 owner))

    def close_series(
        self, record: SeriesRecord, state: str, reason: str | None, *, enqueue: bool,
        owner: str | None = None,
    ) -> bool:
        """Record the outcome of assessing a complete series, and queue a job if accepted.

        Only applies when the series is still at the generation that was assessed, so an
        instance arriving during the assessment wins, and, for a series claimed with
        :meth:`claim_assessment`, only while ``owner``'s claim holds (a claim whose lease
        ran out and was taken over decides nothing). Returns whether it applied.
        """
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        with self._transaction() as db:
            now = db.now()
            cursor = db.execute(
                "UPDATE series SET state=?, reason=?, completed_at=?, updated_at=?, "
                "lease_owner=NULL, lease_expires_at=NULL "
                "WHERE study_instance_uid=? AND series_instance_uid=? AND generation=? "
                "AND quiet_since=? AND (state='receiving' OR (state='complete' AND "
                "lease_owner=?))",
                (state, reason, now, now, record.study_instance_uid,
                 record.series_instance_uid, record.generation, record.quiet_since, owner),
            )
            if cursor.rowcount != 1:
                return False
            if enqueue:
                db.execute(
                    "INSERT INTO jobs (study_instance_uid, series_instance_uid, generation, "
                    "state, created_at, updated_at) VALUES (?,?,?,'queued',?,?) "
                    "ON CONFLICT DO NOTHING",
                    (record.study_instance_uid, record.series_instance_uid,
                     record.generation, now, now),
                )
        return True

    # -- timeline --------------------------------------------------------------------

    def record_event(
        self, study: str, series: str, generation: int, event: str,
        detail: str | None = None, at: float | None = None,
    ) -> None:
        """Add one event to a series' timeline (``inference_start``, ``results_sent`` ...)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO timeline (study_instance_uid, series_instance_uid, generation, "
                "event, at, detail) VALUES (?,?,?,?,?,?)",
                (study, series, generation, event, db.now() if at is None else at, detail),
            )

    def timeline(self, study: str, series: str) -> list[tuple[int, str, float, str | None]]:
        """A series' events as (generation, event, at, detail), oldest first, with the
        first arrival and completion taken from the series record."""
        record = self.get_series(study, series)
        events = [
            (g, e, a, d)
            for g, e, a, d in self.query(
                "SELECT generation, event, at, detail FROM timeline WHERE "
                "study_instance_uid=? AND series_instance_uid=? ORDER BY at, "
                + self.dialect.write_order,
                (study, series),
            )
        ]
        if record is not None:
            events.append((0, "first_received", record.first_received_at, None))
            if record.completed_at is not None:
                events.append((record.generation, "complete", record.completed_at, None))
        return sorted(events, key=lambda item: item[2])

    def results_dir(self, job: Job) -> Path:
        """Where a job's results are kept: results/<series>/<generation>/."""
        return self.results_dir_for(job.series_instance_uid, job.generation)

    def results_dir_for(self, series: str, generation: int) -> Path:
        """Where the results of one generation of a series are kept."""
        return self.root / "results" / _safe_component(series) / str(generation)
