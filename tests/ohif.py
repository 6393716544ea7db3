"""OHIF v3 (the prebuilt ``@ohif/app`` from npm) served on loopback, as a radiologist's viewer.

``make ohif-deps`` puts the pinned ``@ohif/app`` dist and ``puppeteer-core`` into
``OHIF_DIR`` (default ``~/.cache/dcn-node/ohif``). This module serves that dist with an
``app-config.js`` whose only data source is Orthanc's DICOMweb, and proxies ``/dicom-web/``
to Orthanc on the same origin (OHIF's DICOMweb client then needs no CORS). The browser is
driven by ``tests/ohif_check.mjs`` (puppeteer-core with Debian's headless Chromium).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Pinned here and in the Makefile (``make ohif-deps``).
OHIF_VERSION = "3.13.2"
PUPPETEER_VERSION = "25.16.0"
OHIF_DIR = Path(os.environ.get("OHIF_DIR", Path.home() / ".cache" / "dcn-node" / "ohif"))
CHECK_SCRIPT = Path(__file__).with_name("ohif_check.mjs")

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test PACS)',
      name: 'orthanc',
      wadoUriRoot: '/wado',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


def ohif_dist() -> Path:
    return OHIF_DIR / f"ohif-app-{OHIF_VERSION}" / "dist"


def missing_parts() -> list[str]:
    """What the OHIF test needs and this machine lacks (``make ohif-deps`` installs it)."""
    missing = []
    if not (ohif_dist() / "index.html").exists():
        missing.append(f"@ohif/app@{OHIF_VERSION} in {OHIF_DIR}")
    if not (OHIF_DIR / "node_modules" / "puppeteer-core").exists():
        missing.append(f"puppeteer-core@{PUPPETEER_VERSION} in {OHIF_DIR}")
    for tool in ("node", "chromium"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


def _handler(dist: Path, upstream: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # the test keeps its output for the browser's console

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path.startswith(("/dicom-web/", "/wado")):
                self._proxy()
            elif path == "/app-config.js":
                self._send(APP_CONFIG.encode(), "application/javascript")
            elif (dist / path.lstrip("/")).is_file():
                super().do_GET()
            else:  # the single-page app's own routes (/viewer?..., /segmentation...)
                self._send((dist / "index.html").read_bytes(), "text/html")

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _proxy(self) -> None:
            request = urllib.request.Request(upstream + self.path)
            for name in ("Accept", "Range"):
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    status, headers, body = response.status, response.headers, response.read()
            except urllib.error.HTTPError as exc:
                status, headers, body = exc.code, exc.headers, exc.read()
            self.send_response(status)
            for name in ("Content-Type",):
                if headers.get(name):
                    self.send_header(name, headers[name])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serve_ohif(orthanc_url: str) -> Iterator[str]:
    """Serve OHIF on a free loopback port with ``/dicom-web`` proxied to ``orthanc_url``;
    yields the viewer's base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             _handler(ohif_dist(), orthanc_url))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def check_study(base_url: str, study_uid: str, out_dir: Path, expect: dict[str, Any],
                timeout: float = 420.0) -> dict[str, Any]:
    """Open ``study_uid`` in OHIF in headless Chromium and report what the viewer shows.

    ``expect`` is passed to ``ohif_check.mjs``: the study's ``accession`` (how the worklist
    row is recognised), the series descriptions ``sr``, ``seg``, ``sc``, the texts the SR
    viewport must show (``srLabels``) and the SEG's segment labels (``segSegments``).
    Returns the script's JSON report; screenshots land in ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {"url": base_url, "study": study_uid, "out": str(out_dir),
           "chromium": shutil.which("chromium"), "ohifDir": str(OHIF_DIR), **expect}
    run = subprocess.run(["node", str(CHECK_SCRIPT), json.dumps(job)], capture_output=True,
                         text=True, timeout=timeout, cwd=OHIF_DIR)
    (out_dir / "check.log").write_text(run.stdout + "\n--- stderr\n" + run.stderr)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"ohif_check.mjs exited {run.returncode}:\n"
                           f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))
