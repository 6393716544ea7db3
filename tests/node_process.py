"""`dcn-node serve` (or `receive`, or `worker`) as a real child process, for tests that
kill or restart it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import NODE_AET, free_port, test_config, wait_for


class NodeProcess:
    """`python -m dcn_node serve` with a config in ``workdir``; logs to a file.

    ``command``: ``serve``, ``receive`` or ``worker`` (whose start waits for its /readyz,
    on a port of its own, instead of a C-ECHO); ``spool_dir``: default ``workdir/spool``
    (nodes of a cluster share one).
    """

    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None,
                 command: str = "serve", spool_dir: Path | None = None,
                 **sections: dict) -> None:
        self.workdir = workdir
        self.command = command
        #: Extra environment of the child (e.g. NOTIFY_SOCKET).
        self.env = env or {}
        #: The DICOM port: node.port when the caller gives one, else a free one.
        self.port = int(sections.get("node", {}).get("port") or free_port())
        sections["completion"] = {"quiet_seconds": 2.0, **sections.get("completion", {})}
        sections["node"] = {**sections.get("node", {}), "port": self.port}
        #: The /metrics, /healthz and /readyz port (0: picked by the node, unknown here).
        self.metrics_port = int(sections.get("metrics", {}).get("port", 0))
        if command == "worker" and not self.metrics_port:
            self.metrics_port = free_port()
            sections["metrics"] = {**sections.get("metrics", {}), "port": self.metrics_port}
        config = test_config(spool_dir or workdir / "spool", **sections)
        self.config_path = workdir / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "node.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dcn_node", self.command, "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **self.env},
        )
        log.close()
        if self.command == "worker":
            wait_for(self._ready, timeout=60, interval=0.3)
        else:
            wait_for(self._answers_echo, timeout=30, interval=0.2)

    def _ready(self) -> bool:
        """A worker's /readyz answers 200 (model loaded, store and broker reachable)."""
        import urllib.error
        import urllib.request

        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"{self.command} exited with {self.process.returncode}: "
                        f"{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz",
                                        timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _answers_echo(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"node exited with {self.process.returncode}: {self.log_path.read_text()}")
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
        if not assoc.is_established:
            return False
        assoc.release()
        return True

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def status(self) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "dcn_node", "status", "--json", "--config",
             str(self.config_path)],
            cwd=self.workdir, capture_output=True, text=True, check=True, timeout=60,
        )
        return json.loads(result.stdout)

    def series_state(self, series_instance_uid: str) -> dict | None:
        for series in self.status()["series"]:
            if series["series_instance_uid"] == series_instance_uid:
                return series
        return None
