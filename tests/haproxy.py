"""A real haproxy (Debian's ``haproxy`` package) on loopback: the L4 load balancer in front
of several receivers in the cluster tests.

TCP mode (haproxy never reads the DICOM it forwards), round robin over the receivers'
DICOM ports; each receiver is health-checked on its own ``/readyz`` (the metrics port), so
one that is down or not ready (store unreachable, spool full) leaves the rotation within
about a second and comes back once it answers 200 again. A connection the balancer could
not open to a receiver is tried again on another one (``retries``, ``option redispatch``);
an association already forwarded to a receiver that dies is cut, and the sender sends what
was not acknowledged again, as a PACS does. The production configuration
(deploy/haproxy/haproxy.cfg) has the same shape.

Runs in the foreground (``-db``) from a temp folder, with an admin socket there for its
statistics (per receiver: up or down, sessions now and in all). ``make test`` installs the
package when missing and root; the tests that need it fail with that hint otherwise.
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port


@dataclass(frozen=True)
class Receiver:
    """One server of the backend: its DICOM port and the port of its ``/readyz``."""

    name: str
    port: int
    health_port: int


def require_haproxy() -> str:
    path = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        pytest.fail("haproxy not installed: run `make test`, which installs the Debian "
                    "peers (apt-get install haproxy)")
    return path


def config_text(port: int, receivers: list[Receiver], admin_socket: Path, *,
                check_interval_ms: int = 300) -> str:
    """haproxy.cfg for one DICOM frontend on loopback ``port`` over ``receivers``."""
    servers = "\n".join(
        f"    server {r.name} 127.0.0.1:{r.port} check port {r.health_port}"
        for r in receivers)
    return f"""\
global
    maxconn 512
    stats socket {admin_socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    # An association idles between C-STOREs; the node's own timeouts end dead ones.
    timeout client 120s
    timeout server 120s
    # A refused connection is tried again on another receiver.
    retries 2
    option redispatch

frontend dicom
    bind 127.0.0.1:{port}
    default_backend receivers

backend receivers
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {check_interval_ms}ms fastinter {check_interval_ms}ms fall 2 rise 1
{servers}
"""


class HAProxy:
    """One haproxy process with its config, admin socket and log in ``workdir``."""

    def __init__(self, workdir: Path, receivers: list[Receiver], *,
                 port: int | None = None) -> None:
        self.workdir = workdir
        self.receivers = receivers
        #: The DICOM frontend's port (default: a free one).
        self.port = port or free_port()
        self.admin_socket = workdir / "admin.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        binary = require_haproxy()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_text(self.port, self.receivers, self.admin_socket))
        check = subprocess.run([binary, "-c", "-f", str(self.config_path)],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([binary, "-db", "-f", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("haproxy's admin socket did not answer within the timeout")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def command(self, line: str) -> str:
        """One command on the admin socket (e.g. ``show stat``); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """Per receiver (by name): haproxy's statistics row (``status`` UP/DOWN/...,
        ``scur`` sessions now, ``stot`` sessions in all, ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row["pxname"] == "receivers" and row["svname"] not in ("BACKEND",)}

    def status(self, name: str) -> str:
        """``UP``, ``DOWN``, ... (haproxy's words; a transition reads e.g. ``UP 1/2``)."""
        return self.stats()[name]["status"]

    def sessions(self) -> dict[str, int]:
        """Per receiver: the connections haproxy forwarded to it so far."""
        return {name: int(row["stot"] or 0) for name, row in self.stats().items()}

    def busy(self) -> list[str]:
        """Receivers with a connection open through the balancer now."""
        return [name for name, row in self.stats().items() if int(row["scur"] or 0) > 0]

    def wait_until(self, name: str, status: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.status(name) != status:
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy: {name} is {self.status(name)}, not {status}, "
                                   f"after {timeout} s")
            time.sleep(0.1)
