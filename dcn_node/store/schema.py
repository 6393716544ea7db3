"""The spool index's schema, the one place that defines it, and its migrations.

The index (``SPOOL/index.sqlite3``) holds the received instances and series (the spool), the
analysis jobs and each series' timeline, and the result sets with their deliveries (the
outbox). Its version is SQLite's ``PRAGMA user_version``; :func:`migrate` brings any earlier
index up to :data:`SCHEMA_VERSION` in one transaction when the spool opens it, and refuses
an index written by a newer dcn-node (opening it could lose what that one recorded).

Versions:

* 0 - no version recorded: every index written before versions were (the schemas of
  commits d2ac3fb, 693650a and d8b4bc9; tests/test_schema.py keeps each);
* 1 - the schema below.

A new version appends a step to :data:`_STEPS` and never edits an earlier one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from dcn_node.errors import DcnNodeError

LOGGER = logging.getLogger(__name__)

#: The version this code writes and reads.
SCHEMA_VERSION = 1

_V1 = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    calling_ae_title TEXT NOT NULL,
    header_json TEXT NOT NULL,
    -- frames in this instance, and the count the data announces (ImagesInAcquisition, or
    -- NumberOfFrames of a multi-frame instance): lets completion skip loading headers
    frames INTEGER NOT NULL,
    announced_frames INTEGER
);
CREATE INDEX IF NOT EXISTS instances_by_series
    ON instances (study_instance_uid, series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    -- the quiet timer runs from here: last arrival, or the node's restart
    quiet_since REAL NOT NULL,
    completed_at REAL,
    -- bumped each time a late arrival reopens the series; later results supersede
    generation INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (study_instance_uid, series_instance_uid)
);
CREATE INDEX IF NOT EXISTS series_by_state ON series (state);
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, job_id);
-- what happened to a series when: received, complete, inference, results, deliveries
CREATE TABLE IF NOT EXISTS timeline (
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    event TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS timeline_by_series
    ON timeline (study_instance_uid, series_instance_uid, at);
CREATE TABLE IF NOT EXISTS result_sets (
    result_set_id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    folder TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS result_sets_by_series
    ON result_sets (study_instance_uid, series_instance_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id INTEGER PRIMARY KEY AUTOINCREMENT,
    result_set_id INTEGER NOT NULL REFERENCES result_sets (result_set_id),
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, destination, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_set ON deliveries (result_set_id);
"""


class SchemaVersionError(DcnNodeError):
    """The index was written by a newer dcn-node than this one."""


def _statements(script: str) -> list[str]:
    """The statements of a DDL script (no ``;`` inside these statements)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _to_1(db: sqlite3.Connection) -> None:
    """Any unversioned index -> 1. The first one (d2ac3fb) lacks the frame counts on
    instances (its instances are single-frame: 1, none announced); indexes before the
    return path (d8b4bc9) lack the timeline and the outbox tables, made here."""
    if "instances" in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}:
        present = _columns(db, "instances")
        if "frames" not in present:
            db.execute("ALTER TABLE instances ADD COLUMN frames INTEGER NOT NULL DEFAULT 1")
        if "announced_frames" not in present:
            db.execute("ALTER TABLE instances ADD COLUMN announced_frames INTEGER")
    for statement in _statements(_V1):
        db.execute(statement)


#: _STEPS[n] takes an index from version n to n + 1.
_STEPS: list[Callable[[sqlite3.Connection], None]] = [_to_1]
assert len(_STEPS) == SCHEMA_VERSION


def version_of(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection) -> int:
    """Bring the index on ``db`` (autocommit connection) to :data:`SCHEMA_VERSION`.

    Returns the version found. All steps run in one transaction: an interrupted migration
    leaves the index as it was.

    Raises
    ------
    SchemaVersionError
        If the index is newer than :data:`SCHEMA_VERSION`.
    """
    found = version_of(db)
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the spool index has schema version {found}, written by a newer dcn-node; this "
            f"one reads up to {SCHEMA_VERSION}: run the newer version, or move the spool "
            "aside")
    if found == SCHEMA_VERSION:
        return found
    db.execute("BEGIN IMMEDIATE")
    try:
        for step in _STEPS[found:]:
            step(db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    LOGGER.info("Spool index migrated from schema version %d to %d", found, SCHEMA_VERSION)
    return found
