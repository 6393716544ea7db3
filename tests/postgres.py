"""A real PostgreSQL (Debian's ``postgresql`` package) on loopback, for the store's tests.

One server per test session: ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin``
(the newest there), on a free port, its data and socket folders in a temp folder, tuned for
tests (no fsync: a crash of the test server loses nothing worth keeping). PostgreSQL refuses
to run as root, so when we are root it runs as the ``postgres`` system user (``nobody``
where that package's user is missing) through ``runuser``, and the temp folder is made with
``tempfile`` rather than under pytest's own (which is private to root, mode 0700, like the
Orthanc fixture's). Each test gets a database of its own (:func:`store_url`). The fixtures
are imported by conftest.py, so that the whole session shares the one server.

Tests that need the server are skipped, with the reason, when the binaries or psycopg are
missing; ``make test`` installs ``postgresql`` (system-deps) and psycopg (the ``cluster``
extra).

A test may also start a server of its own: one it stops and starts again (the store lost
and back), or one whose clock runs apart from the host's (``clock_offset_seconds``, through
Debian's ``faketime`` preloaded into the server: a database host with a skewed clock).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
#: Debian's libfaketime (package faketime): shifts the clock of the processes it is loaded in.
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder (None: no server installed)."""
    found = [p.parent for p in POSTGRES_ROOT.glob("*/bin/initdb") if (p.parent / "pg_ctl").exists()]
    return max(found, key=lambda p: float(p.parent.name)) if found else None


def _run_as() -> list[str]:
    """The command prefix that drops root (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"]
    raise RuntimeError("running as root and neither the postgres nor the nobody user exists")


class PostgresServer:
    """A running test server; :meth:`new_database` gives each test a clean database.

    ``clock_offset_seconds``: the server's clock runs this far from the host's (faketime).
    """

    def __init__(self, bin_dir: Path, clock_offset_seconds: float = 0.0) -> None:
        self.bin_dir = bin_dir
        self.clock_offset_seconds = clock_offset_seconds
        self.workdir = Path(tempfile.mkdtemp(prefix="dcn-postgres-"))
        self.data_dir = self.workdir / "data"
        self.socket_dir = self.workdir / "socket"
        self.socket_dir.mkdir()
        self.port = free_port()
        self._prefix = _run_as()
        self._names = itertools.count()
        if self._prefix:
            user = pwd.getpwnam(self._prefix[2])
            for path in (self.workdir, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._pg("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust",
                 "-E", "UTF8", "--locale=C", "--no-sync")
        self.start()

    def start(self) -> None:
        """Start the server (again, after :meth:`halt`), on the same port and data."""
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=60 -c shared_buffers=16MB")
        clock: list[str] = []
        if self.clock_offset_seconds:
            clock = ["env", f"LD_PRELOAD={LIBFAKETIME}",
                     f"FAKETIME={self.clock_offset_seconds:+.0f}", "DONT_FAKE_MONOTONIC=1"]
        self._pg("pg_ctl", "-D", str(self.data_dir), "-l", str(self.workdir / "server.log"),
                 "-o", options, "-w", "-t", "60", "start", env_prefix=clock)

    def halt(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: its clients are disconnected, what they committed
        is kept; ``immediate``: a crash, which loses the last commits of this server
        without synchronous commits); :meth:`start` brings it back with its databases."""
        self._pg("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def _pg(self, program: str, *args: str, env_prefix: list[str] | None = None) -> None:
        command = [*self._prefix, *(env_prefix or []), str(self.bin_dir / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.workdir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr[-2000:]}"
                               f"{tail}")

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self.halt("immediate")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def require_postgres_bin() -> Path:
    """The server's bin folder; skips the test when psycopg or the server is missing."""
    pytest.importorskip("psycopg", reason="psycopg missing: pip install -e '.[cluster]'")
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip(f"no PostgreSQL server under {POSTGRES_ROOT}/<version>/bin "
                    "(apt-get install postgresql; make test installs it as root)")
    return bin_dir


@contextlib.contextmanager
def own_postgres_server(clock_offset_seconds: float = 0.0) -> Iterator[PostgresServer]:
    """A server for one test alone (to stop and start, or with a skewed clock)."""
    bin_dir = require_postgres_bin()
    if clock_offset_seconds and not LIBFAKETIME.exists():
        pytest.skip(f"{LIBFAKETIME} missing (apt-get install faketime; make test installs "
                    "it as root)")
    server = PostgresServer(bin_dir, clock_offset_seconds)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = require_postgres_bin()
    started = time.monotonic()
    server = PostgresServer(bin_dir)
    print(f"PostgreSQL {bin_dir.parent.name} up in {time.monotonic() - started:.1f} s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Each backend in turn: None (SQLite in the spool) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()
