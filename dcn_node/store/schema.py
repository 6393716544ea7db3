"""The index's schema, the one place that defines it, its migrations and its dialects.

The index holds the received instances and series (the spool), the analysis jobs and each
series' timeline, and the result sets with their deliveries (the outbox). It lives in SQLite
(``SPOOL/index.sqlite3``, the default) or in PostgreSQL (``store.url``, cluster mode). The
tables are written once, below, in SQLite's words; :class:`Dialect` is the one small place
that says them in PostgreSQL's (column types, identity keys, placeholders, row locks, the
database's clock). Both run the same numbered steps: SQLite keeps its version in
``PRAGMA user_version``, PostgreSQL in the one-row table ``schema_version``. :func:`migrate`
(:func:`migrate_postgres`) brings any earlier index up to :data:`SCHEMA_VERSION` in one
transaction when the spool opens it, and refuses an index written by a newer dcn-node
(opening it could lose what that one recorded).

Versions:

* 0 - no version recorded: every index written before versions were (the schemas of
  commits d2ac3fb, 693650a and d8b4bc9; tests/test_schema.py keeps each), or an empty
  PostgreSQL database;
* 1 - the schema of :data:`_V1`;
* 2 - leases (:data:`_V2`): who holds a job or a delivery until when, each job's claim
  count (the fencing token: a finish is applied only by the latest claim), and at most one
  job per series and generation;
* 3 - assessment claims (:data:`_V3`): who is assessing a ``complete`` series until when,
  so that a node restarting takes back only its own assessments and those whose lease
  ran out, not another live node's.

A new version appends a step to :data:`_STEPS` and never edits an earlier one.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dcn_node.errors import DcnNodeError

if TYPE_CHECKING:
    import psycopg

LOGGER = logging.getLogger(__name__)

#: The version this code writes and reads.
SCHEMA_VERSION = 3

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


#: Leases and fencing. A claim sets the holder and until when (NULL: held until the holder
#: finishes or the node recovers, as before leases) and counts the job's claims; a job is
#: finished only by the claim whose count is still the job's.
_V2 = """
ALTER TABLE jobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_once_per_generation
    ON jobs (study_instance_uid, series_instance_uid, generation);
ALTER TABLE deliveries ADD COLUMN lease_owner TEXT;
ALTER TABLE deliveries ADD COLUMN lease_expires_at REAL;
"""

#: A series being assessed (state ``complete``) is claimed like a job: its holder and until
#: when (NULL: until the holder decides or the node recovers, one node).
_V3 = """
ALTER TABLE series ADD COLUMN lease_owner TEXT;
ALTER TABLE series ADD COLUMN lease_expires_at REAL;
"""


class SchemaVersionError(DcnNodeError):
    """The index was written by a newer dcn-node than this one."""


class Dialect:
    """How one database says what the store's SQL means.

    The store writes its statements once, in SQLite's words with ``?`` placeholders; upserts
    (``ON CONFLICT ... DO UPDATE``/``DO NOTHING``) and ``RETURNING`` read the same in both.
    What differs is said here: the DDL's types, the placeholders, row locks, the order rows
    were written in, and whose clock ``now`` is.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        postgres = name == "postgresql"
        #: Appended to a SELECT of rows about to be updated (PostgreSQL: lock them; SQLite's
        #: write transactions are serialised already).
        self.lock_rows = " FOR UPDATE" if postgres else ""
        #: Appended to a claiming SELECT: rows another claimer holds are passed over.
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if postgres else ""
        #: A column that orders a table's rows as written (tables without a key).
        self.write_order = "ctid" if postgres else "rowid"
        #: The database's clock in seconds since the epoch (None: the host's, time.time()).
        self.now_sql = ("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"
                        if postgres else None)

    def sql(self, statement: str) -> str:
        """A statement with ``?`` placeholders, as this database takes it."""
        return _pyformat(statement) if self.name == "postgresql" else statement

    def ddl(self, script: str) -> list[str]:
        """The statements of a DDL script written for SQLite, in this database's types:
        PostgreSQL gets 64-bit integers, identity keys and double precision (its REAL is
        4 bytes: too few for a timestamp)."""
        if self.name == "postgresql":
            script = script.replace("INTEGER PRIMARY KEY AUTOINCREMENT",
                                    "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
            script = re.sub(r"\bINTEGER\b", "BIGINT", script)
            script = re.sub(r"\bREAL\b", "DOUBLE PRECISION", script)
        return _statements(script)


@functools.lru_cache(maxsize=512)
def _pyformat(statement: str) -> str:
    # The store's statements hold no "?" other than placeholders (values are parameters).
    return statement.replace("%", "%%").replace("?", "%s")


SQLITE = Dialect("sqlite")
POSTGRESQL = Dialect("postgresql")


def _statements(script: str) -> list[str]:
    """The statements of a DDL script (no ``;`` inside these statements)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


class _Target:
    """The database a migration step changes, in the few words the steps need."""

    def __init__(self, dialect: Dialect, execute: Callable[..., Any]) -> None:
        self.dialect = dialect
        self._execute = execute

    def execute(self, statement: str, args: tuple = ()) -> Any:
        return self._execute(self.dialect.sql(statement), args)

    def script(self, script: str) -> None:
        for statement in self.dialect.ddl(script):
            self._execute(statement, ())

    def tables(self) -> set[str]:
        if self.dialect is SQLITE:
            return {r[0] for r in self.execute("SELECT name FROM sqlite_master").fetchall()}
        return {r[0] for r in self.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema()").fetchall()}

    def columns(self, table: str) -> set[str]:
        if self.dialect is SQLITE:
            return {r[1] for r in self.execute(f"PRAGMA table_info({table})").fetchall()}
        return {r[0] for r in self.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?", (table,)).fetchall()}


def _to_1(db: _Target) -> None:
    """Any unversioned index -> 1. The first one (d2ac3fb) lacks the frame counts on
    instances (its instances are single-frame: 1, none announced); indexes before the
    return path (d8b4bc9) lack the timeline and the outbox tables, made here. An empty
    PostgreSQL database gets every table here."""
    if "instances" in db.tables():
        present = db.columns("instances")
        if "frames" not in present:
            db.script("ALTER TABLE instances ADD COLUMN frames INTEGER NOT NULL DEFAULT 1")
        if "announced_frames" not in present:
            db.script("ALTER TABLE instances ADD COLUMN announced_frames INTEGER")
    db.script(_V1)


def _to_2(db: _Target) -> None:
    """1 -> 2: the lease and claim columns, one job per series and generation."""
    db.script(_V2)


def _to_3(db: _Target) -> None:
    """2 -> 3: the lease columns of a series being assessed."""
    db.script(_V3)


#: _STEPS[n] takes an index from version n to n + 1.
_STEPS: list[Callable[[_Target], None]] = [_to_1, _to_2, _to_3]
assert len(_STEPS) == SCHEMA_VERSION


def _refuse_newer(found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the spool index has schema version {found}, written by a newer dcn-node; this "
            f"one reads up to {SCHEMA_VERSION}: run the newer version, or move the spool "
            "aside")


def version_of(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection) -> int:
    """Bring the SQLite index on ``db`` (autocommit connection) to :data:`SCHEMA_VERSION`.

    Returns the version found. All steps run in one transaction: an interrupted migration
    leaves the index as it was.

    Raises
    ------
    SchemaVersionError
        If the index is newer than :data:`SCHEMA_VERSION`.
    """
    found = version_of(db)
    _refuse_newer(found)
    if found == SCHEMA_VERSION:
        return found
    db.execute("BEGIN IMMEDIATE")
    try:
        target = _Target(SQLITE, db.execute)
        for step in _STEPS[found:]:
            step(target)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    LOGGER.info("Spool index migrated from schema version %d to %d", found, SCHEMA_VERSION)
    return found


#: pg_advisory_xact_lock's key: nodes starting together migrate one after the other.
_MIGRATION_LOCK = 0x64636E  # "dcn"


def version_of_postgres(conn: psycopg.Connection[Any]) -> int:
    """The schema version of the PostgreSQL database on ``conn`` (0: none recorded)."""
    exists = conn.execute("SELECT to_regclass('schema_version')").fetchone()
    if exists is None or exists[0] is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate_postgres(conn: psycopg.Connection[Any]) -> int:
    """Bring the PostgreSQL database on ``conn`` (autocommit) to :data:`SCHEMA_VERSION`
    with the same steps as SQLite, in one transaction under an advisory lock.

    Returns the version found.

    Raises
    ------
    SchemaVersionError
        If the database is newer than :data:`SCHEMA_VERSION` (left untouched).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        found = version_of_postgres(conn)
        _refuse_newer(found)
        if found == SCHEMA_VERSION:
            return found
        for step in _STEPS[found:]:
            step(_Target(POSTGRESQL, conn.execute))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
    LOGGER.info("Store database migrated from schema version %d to %d", found,
                SCHEMA_VERSION)
    return found
