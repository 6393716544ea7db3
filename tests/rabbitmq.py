"""A real RabbitMQ (Debian's ``rabbitmq-server`` package) on loopback, the broker in tests.

Each server is private to its test: its own node name, AMQP port, Erlang distribution
port and epmd port (all free ports on 127.0.0.1, so it meets neither a system RabbitMQ nor
another test's), its data (``RABBITMQ_MNESIA_BASE``), logs, config file, cookie (``HOME``)
and an empty plugin list (no management plugin) in a temp folder. :meth:`RabbitMQ.stop` and
:meth:`RabbitMQ.start` restart it on the same ports and data: durable (quorum) queues and
their messages survive, as on a broker restart in production.

Tests that need it are skipped, with the reason, when the package or celery is missing;
``make test`` installs ``rabbitmq-server`` (system-deps) and celery (the ``cluster`` extra).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import free_port

#: The server script itself (/usr/sbin/rabbitmq-server is a wrapper that changes user).
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
EPMD = "epmd"


class RabbitMQ:
    """One RabbitMQ node with its own folder and ports (started by the constructor)."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="dcn-rabbitmq-"))
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"dcn-test-{self.port}@localhost"
        self.log_dir = self.workdir / "log"
        self.process: subprocess.Popen[bytes] | None = None
        (self.workdir / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
            "disk_free_limit.absolute = 50MB",
            "vm_memory_high_watermark.relative = 0.2",
            # A closed connection's unacknowledged messages go back at once; heartbeats
            # find a half-open one (a kill -9 closes the socket anyway).
            "heartbeat = 10",
            "",
        ]))
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        self.start()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        base = self.workdir
        return {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_LOGS": str(self.log_dir / "rabbit.log"),
        }

    def start(self, timeout: float = 90.0) -> None:
        """Start (or start again, on the same ports and data); returns once AMQP answers."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "server.out", "ab") as out:
            self.process = subprocess.Popen([str(SERVER)], stdout=out,
                                            stderr=subprocess.STDOUT, env=self._env(),
                                            cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited ({self.process.returncode}): "
                                   f"{self.tail()}")
            if self.answers():
                return
            time.sleep(0.3)
        raise RuntimeError(f"rabbitmq-server did not answer within {timeout} s: {self.tail()}")

    def answers(self) -> bool:
        """Whether an AMQP connection can be opened now."""
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1,
                            transport_options={"max_retries": 0}) as connection:
                connection.connect()
            return True
        except Exception:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node (SIGTERM: Erlang's orderly shutdown, which keeps durable queues
        and their messages); :meth:`start` brings it back."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def queue_depth(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of ``queue``, by a passive declare."""
        from kombu import Connection

        with Connection(self.url, connect_timeout=5) as connection:
            channel = connection.channel()
            _, messages, consumers = channel.queue_declare(queue, passive=True)
            return int(messages), int(consumers)

    def tail(self) -> str:
        parts = []
        for path in (self.workdir / "server.out", self.log_dir / "rabbit.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the node and its private epmd; remove its folder."""
        try:
            self.stop()
        finally:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([EPMD, "-port", str(self.epmd_port), "-kill"],
                               capture_output=True, timeout=10,
                               env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)})
            shutil.rmtree(self.workdir, ignore_errors=True)


def require_rabbitmq() -> None:
    """Skip the test when celery or the server is missing (``make test`` installs both)."""
    pytest.importorskip("celery", reason="celery missing: pip install -e '.[cluster]'")
    if not SERVER.exists():
        pytest.skip(f"{SERVER} missing (apt-get install rabbitmq-server; make test "
                    "installs it as root)")


@contextlib.contextmanager
def own_rabbitmq() -> Iterator[RabbitMQ]:
    """A broker for one test alone."""
    require_rabbitmq()
    server = RabbitMQ()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rabbitmq() -> Iterator[RabbitMQ]:
    with own_rabbitmq() as server:
        yield server
