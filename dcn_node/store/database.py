"""The index's connection: SQLite in the spool (the default) or PostgreSQL (``store.url``).

:func:`open_index` returns an :class:`Index`; the spool and the outbox run their statements
through it, written once with ``?`` placeholders (:class:`~dcn_node.store.schema.Dialect`
says them in PostgreSQL's words). Both backends give the same three things:

* :meth:`Index.transaction`: one write transaction (SQLite: ``BEGIN IMMEDIATE`` on the one
  connection, behind a lock, as before; PostgreSQL: a pooled connection, READ COMMITTED,
  rows locked by the statements that claim them);
* :meth:`Index.query`: a read;
* :meth:`Transaction.now` / :meth:`Index.now`: the time, in seconds since the epoch, from
  the database's clock on PostgreSQL (nodes of a cluster agree on it) and from the host's
  on SQLite (one node, one clock).

psycopg (the ``cluster`` extra) is imported only when a PostgreSQL URL is configured.
When the PostgreSQL server cannot be reached, or drops a connection, the store raises
:class:`~dcn_node.errors.StoreUnavailableError` (where and why, no password) and logs the
loss once, and its return once; the next statement after the server is back works.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dcn_node.errors import ConfigError, StoreUnavailableError
from dcn_node.store import schema

if TYPE_CHECKING:
    import psycopg

LOGGER = logging.getLogger(__name__)

#: Idle PostgreSQL connections kept for reuse (more are opened when threads need them).
_POOL_IDLE = 8


class Rows(Protocol):
    """What a statement returns: its rows and how many it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Transaction:
    """The statements of one write transaction."""

    dialect: schema.Dialect

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def now(self) -> float:
        """The time of this transaction's database (seconds since the epoch)."""
        raise NotImplementedError


class Index:
    """The index's database, whichever it is."""

    dialect: schema.Dialect
    #: What a failing statement raises (wrapped by the spool into its own errors), the
    #: store's loss included.
    errors: tuple[type[Exception], ...]
    #: Where the index is, for logs (never a password).
    where: str

    def transaction(self) -> AbstractContextManager[Transaction]:
        raise NotImplementedError

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# -- SQLite --------------------------------------------------------------------------------


class _SqliteTransaction(Transaction):
    dialect = schema.SQLITE

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        return self._db.execute(sql, args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def now(self) -> float:
        return time.time()


class SqliteIndex(Index):
    """``index.sqlite3``: one connection behind a lock (SQLite serialises writers anyway,
    and one connection keeps a commit to a single WAL append)."""

    dialect = schema.SQLITE
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, *, fsync: bool) -> None:
        self.where = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")
        try:
            schema.migrate(self._db)
        except BaseException:
            self._db.close()
            raise
        self._tx = _SqliteTransaction(self._db)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def now(self) -> float:
        return time.time()

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- PostgreSQL ----------------------------------------------------------------------------


class _PostgresTransaction(Transaction):
    dialect = schema.POSTGRESQL

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Rows:
        return self._conn.execute(self.dialect.sql(sql), tuple(args))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._conn.cursor() as cursor:
                cursor.executemany(self.dialect.sql(sql), [tuple(r) for r in rows])

    def now(self) -> float:
        assert self.dialect.now_sql is not None
        row = self._conn.execute(self.dialect.now_sql).fetchone()
        assert row is not None
        return float(row[0])


def _without_secrets(text: str, secrets: Sequence[str]) -> str:
    """``text`` on one line, shortened, with ``secrets`` (the URL's password, the URL)
    blanked out, for a log line or a readiness answer."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)  # any other URL's password
    return " ".join(text.split())[:300]


class PostgresIndex(Index):
    """A PostgreSQL database shared by the nodes of a cluster: a small pool of autocommit
    connections, one per thread while it runs a statement or a transaction.

    A connection that fails to open or breaks (the server stopped, the network dropped)
    raises :class:`StoreUnavailableError` and empties the pool: the idle connections went
    to the same server. Errors of a statement on a sound connection are psycopg's own.
    """

    dialect = schema.POSTGRESQL

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError("store.url", [
                "a PostgreSQL store needs psycopg: pip install 'dcn-node[cluster]'"]) from None
        self._psycopg = psycopg
        self.errors = (psycopg.Error, StoreUnavailableError)
        self._url = url
        info = psycopg.conninfo.conninfo_to_dict(url)
        self.where = f"postgresql database {info.get('dbname', '?')} on " \
                     f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"
        self._secrets = [str(s) for s in (info.get("password"), url) if s]
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._closed = False
        #: Since when the server cannot be reached (time.monotonic()); None: it can.
        self._lost_since: float | None = None
        with self._connection() as conn:
            schema.migrate_postgres(conn)

    def _unavailable(self, exc: Exception) -> StoreUnavailableError:
        """The error to raise for a lost server (logged at the first loss only)."""
        reason = _without_secrets(str(exc) or type(exc).__name__, self._secrets)
        with self._lock:
            first = self._lost_since is None
            if first:
                self._lost_since = time.monotonic()
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if first:
            LOGGER.error("Store unreachable: %s: %s", self.where, reason)
        return StoreUnavailableError(f"{self.where} unreachable: {reason}")

    def _reachable(self) -> None:
        with self._lock:
            lost_since, self._lost_since = self._lost_since, None
        if lost_since is not None:
            LOGGER.warning("Store reachable again: %s (after %.0f s)", self.where,
                           time.monotonic() - lost_since)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            if self._closed:
                raise self._psycopg.InterfaceError("the store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                conn = self._psycopg.connect(self._url, autocommit=True)
            except self._psycopg.OperationalError as exc:
                raise self._unavailable(exc) from None
        try:
            yield conn
        except self._psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise self._unavailable(exc) from None
            raise
        else:
            if self._lost_since is not None:
                self._reachable()
        finally:
            idle = (not conn.closed and conn.info.transaction_status
                    == self._psycopg.pq.TransactionStatus.IDLE)
            with self._lock:
                keep = idle and not self._closed and len(self._idle) < _POOL_IDLE
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._connection() as conn, conn.transaction():
            yield _PostgresTransaction(conn)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._connection() as conn:
            return conn.execute(self.dialect.sql(sql), tuple(args)).fetchall()

    def now(self) -> float:
        assert self.dialect.now_sql is not None
        return float(self.query(self.dialect.now_sql)[0][0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def open_index(spool_dir: Path, *, fsync: bool = False, url: str | None = None) -> Index:
    """The index of a spool: ``spool_dir/index.sqlite3``, or the PostgreSQL database at
    ``url``; either is migrated to the current schema on opening.

    Raises
    ------
    schema.SchemaVersionError
        If the index was written by a newer dcn-node.
    ConfigError
        If ``url`` is given and psycopg (the ``cluster`` extra) is not installed.
    StoreUnavailableError
        If the PostgreSQL server cannot be reached.
    """
    if url is None:
        return SqliteIndex(spool_dir / "index.sqlite3", fsync=fsync)
    return PostgresIndex(url)
