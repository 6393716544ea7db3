"""The spool index's schema versions: an index written by any earlier dcn-node opens, is
migrated to the current version in place, and keeps what it held; a newer one is refused.
PostgreSQL (store.url) runs the same migrations from an empty database (tests/postgres.py).

Each earlier schema below is verbatim from the commit named (``git show COMMIT:PATH``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dcn_node.store import schema
from dcn_node.store.outbox import Outbox
from dcn_node.store.spool import Spool
from tests.postgres import PostgresServer

#: d2ac3fb dcn_node/spool.py: the first index (no frame counts, no timeline, no outbox).
SCHEMA_D2AC3FB = """
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
    header_json TEXT NOT NULL
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
"""

#: 693650a dcn_node/spool.py: frame counts on instances.
SCHEMA_693650A = """
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
"""

#: d8b4bc9 dcn_node/spool.py + dcn_node/outbox.py: the timeline and the outbox (unchanged
#: up to schema version 1, which only records the version).
SCHEMA_D8B4BC9 = """
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

#: 2b39b15 dcn_node/schema.py _V1: schema version 1, the tables of d8b4bc9 with their
#: version recorded (PRAGMA user_version = 1).
SCHEMA_2B39B15 = SCHEMA_D8B4BC9

EARLIER = {"d2ac3fb": SCHEMA_D2AC3FB, "693650a": SCHEMA_693650A, "d8b4bc9": SCHEMA_D8B4BC9,
           "2b39b15": SCHEMA_2B39B15}
#: The version each earlier index recorded (none: 0).
RECORDED = {"2b39b15": 1}
TABLES = ("instances", "series", "jobs", "timeline", "result_sets", "deliveries")
STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def earlier_index(spool_dir: Path, script: str, version: int = 0) -> None:
    """An index as that version left it: one instance of one finished series."""
    spool_dir.mkdir(parents=True)
    db = sqlite3.connect(spool_dir / "index.sqlite3")
    db.executescript(script)
    db.execute(f"PRAGMA user_version = {version}")
    columns = {row[1] for row in db.execute("PRAGMA table_info(instances)")}
    row = {"sop_instance_uid": SOP, "study_instance_uid": STUDY,
           "series_instance_uid": SERIES, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
           "transfer_syntax_uid": "1.2.840.10008.1.2.1", "path": "x.dcm", "size_bytes": 10,
           "received_at": 1.0, "calling_ae_title": "PACS", "header_json": "{}",
           "frames": 1, "announced_frames": None}
    row = {k: v for k, v in row.items() if k in columns}
    db.execute(f"INSERT INTO instances ({', '.join(row)}) VALUES "
               f"({', '.join('?' * len(row))})", tuple(row.values()))
    db.execute("INSERT INTO series VALUES (?,?,?,?,?,?,?,?,?,?)",
               (STUDY, SERIES, "done", None, 1.0, 2.0, 2.0, 3.0, 0, 3.0))
    db.commit()
    db.close()


@pytest.mark.parametrize("commit", sorted(EARLIER))
def test_every_earlier_index_is_migrated_and_keeps_its_records(tmp_path: Path,
                                                                commit: str) -> None:
    earlier_index(tmp_path / "spool", EARLIER[commit], RECORDED.get(commit, 0))
    spool = Spool(tmp_path / "spool")
    try:
        db = sqlite3.connect(tmp_path / "spool" / "index.sqlite3")
        assert schema.version_of(db) == schema.SCHEMA_VERSION
        current = sqlite3.connect(":memory:")
        schema.migrate(current)
        for table in TABLES:
            have = [row[1:3] for row in db.execute(f"PRAGMA table_info({table})")]
            want = [row[1:3] for row in current.execute(f"PRAGMA table_info({table})")]
            assert sorted(have) == sorted(want), table
        record = spool.get_series(STUDY, SERIES)
        assert record is not None and record.state == "done" and record.instances == 1
        assert spool.query("SELECT frames FROM instances") == [(1,)]
        # The outbox and the timeline work on the migrated index.
        Outbox(spool)
        spool.record_event(STUDY, SERIES, 0, "retried", "after migration")
        assert "retried" in [e for _, e, _, _ in spool.timeline(STUDY, SERIES)]
    finally:
        spool.close()
    # Opening it again changes nothing.
    again = Spool(tmp_path / "spool")
    again.close()


def stored_version(spool_dir: Path, url: str | None) -> int:
    if url is None:
        return schema.version_of(sqlite3.connect(spool_dir / "index.sqlite3"))
    import psycopg

    with psycopg.connect(url) as conn:
        return schema.version_of_postgres(conn)


def test_a_new_index_gets_the_current_version(tmp_path: Path, store_url: str | None) -> None:
    Spool(tmp_path / "spool", url=store_url).close()
    assert stored_version(tmp_path / "spool", store_url) == schema.SCHEMA_VERSION


def test_an_index_from_a_newer_node_is_refused_untouched(tmp_path: Path,
                                                         store_url: str | None) -> None:
    Spool(tmp_path / "spool", url=store_url).close()
    newer = schema.SCHEMA_VERSION + 1
    if store_url is None:
        db = sqlite3.connect(tmp_path / "spool" / "index.sqlite3")
        db.execute(f"PRAGMA user_version = {newer}")
        db.commit()
        db.close()
    else:
        import psycopg

        with psycopg.connect(store_url) as conn:
            conn.execute("UPDATE schema_version SET version = %s", (newer,))
    with pytest.raises(schema.SchemaVersionError, match="newer dcn-node"):
        Spool(tmp_path / "spool", url=store_url)
    assert stored_version(tmp_path / "spool", store_url) == newer


def test_an_empty_postgresql_database_gets_the_same_tables_as_sqlite(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    """The same migrations from an empty database: the same tables and columns, with
    PostgreSQL's types (64-bit integers, double precision timestamps, identity keys)."""
    import psycopg

    url = postgres_server.new_database()
    spool = Spool(tmp_path / "spool", url=url)
    try:
        sqlite = sqlite3.connect(":memory:")
        schema.migrate(sqlite)
        with psycopg.connect(url) as conn:
            assert schema.version_of_postgres(conn) == schema.SCHEMA_VERSION
            for table in TABLES:
                have = dict(conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = %s", (table,)).fetchall())
                want = {row[1]: row[2] for row in sqlite.execute(f"PRAGMA table_info({table})")}
                assert sorted(have) == sorted(want), table
                assert {have[c] for c, t in want.items() if t == "REAL"} <= {"double precision"}
                assert {have[c] for c, t in want.items() if t == "INTEGER"} <= {"bigint"}
            identity = conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE is_identity = 'YES' "
                "ORDER BY column_name").fetchall()
            assert [r[0] for r in identity] == ["delivery_id", "job_id", "result_set_id"]
        spool.record_event("1.2", "1.2.3", 0, "retried", "after migration")
        assert "retried" in [e for _, e, _, _ in spool.timeline("1.2", "1.2.3")]
    finally:
        spool.close()
    # Opening it again changes nothing.
    Spool(tmp_path / "spool", url=url).close()
    assert stored_version(tmp_path / "spool", url) == schema.SCHEMA_VERSION


def test_a_postgresql_database_at_version_1_takes_the_next_step_and_keeps_its_jobs(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    """The numbered steps run on PostgreSQL from wherever a database stands, as on SQLite."""
    import psycopg

    url = postgres_server.new_database()
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        schema._STEPS[0](schema._Target(schema.POSTGRESQL, conn.execute))
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute("INSERT INTO jobs (study_instance_uid, series_instance_uid, generation, "
                     "state, created_at, updated_at) VALUES (%s, %s, 0, 'processing', 1, 1)",
                     (STUDY, SERIES))
    spool = Spool(tmp_path / "spool", url=url)
    try:
        (job,) = spool.list_jobs()
        assert (job.state, job.claim) == ("processing", 0)
        spool.recover()  # an unleased job of the older version runs again
        assert [j.state for j in spool.list_jobs()] == ["queued"]
    finally:
        spool.close()
    assert stored_version(tmp_path / "spool", url) == schema.SCHEMA_VERSION


def test_an_index_at_version_2_takes_step_3_and_its_assessments_run_again(
        tmp_path: Path, store_url: str | None) -> None:
    """A series an older node was assessing (``complete``, no claim recorded) is taken
    back by the first recovery after the upgrade, on either backend; assessments are
    claimed from then on."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    series_row = (STUDY, SERIES, "complete", None, 1.0, 2.0, 2.0, None, 0, 3.0)
    insert = "INSERT INTO series VALUES (?,?,?,?,?,?,?,?,?,?)"
    if store_url is None:
        db = sqlite3.connect(spool_dir / "index.sqlite3", isolation_level=None)
        target = schema._Target(schema.SQLITE, db.execute)
        for step in schema._STEPS[:2]:
            step(target)
        target.execute(insert, series_row)
        db.execute("PRAGMA user_version = 2")
        db.close()
    else:
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn, conn.transaction():
            target = schema._Target(schema.POSTGRESQL, conn.execute)
            for step in schema._STEPS[:2]:
                step(target)
            target.execute(insert, series_row)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (2)")
    spool = Spool(spool_dir, url=store_url)
    try:
        spool.recover("node-a")
        (record,) = spool.list_series()
        assert record.state == "receiving"
        assert spool.claim_assessment(record, "node-a", lease_seconds=60.0)
        assert spool.query("SELECT state, lease_owner FROM series") == [("complete", "node-a")]
    finally:
        spool.close()
    assert stored_version(spool_dir, store_url) == schema.SCHEMA_VERSION == 3
