"""A real Orthanc (Debian's ``orthanc`` package) on loopback, as the PACS in tests.

Started as ``nobody`` when we are root (Orthanc refuses nothing as root, but a PACS should
not run as root and the tests should not depend on it), with TCP_NODELAY set as
DICOM-NOTES.md advises. Talked to over its REST API with urllib.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ORTHANC_AET = "ORTHANC"
GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"
#: Debian's orthanc-dicomweb: QIDO-RS/WADO-RS, what OHIF reads a PACS through.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Logs every instance Orthanc stores, a re-sent one too (its change log and statistics
#: count an instance once, whatever arrives again under its UID).
_STORE_COUNTER_LUA = """\
function OnStoredInstance(instanceId, tags, metadata, origin)
  print("dcn-test stored " .. tags["SOPInstanceUID"])
end
"""
_STORED_LINE = "Lua says: dcn-test stored "


@contextlib.contextmanager
def orthanc_workdir() -> Iterator[Path]:
    """A folder Orthanc can use even when it runs as ``nobody``: pytest's own temp
    folders are private to root, so this one is made directly under the system temp."""
    workdir = Path(tempfile.mkdtemp(prefix="dcn-orthanc-"))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class Orthanc:
    """One Orthanc process with its own storage folder and ports."""

    def __init__(self, workdir: Path, dicom_port: int, http_port: int, *,
                 count_stores: bool = False) -> None:
        self.workdir = workdir
        #: Log every stored instance (:meth:`stores`): duplicates become visible.
        self.count_stores = count_stores
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "orthanc.log"
        #: Peers added with add_modality, kept in the config across restarts.
        self.modalities: dict[str, list[Any]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0, *, gdcm: bool = False,
              dicomweb: bool = False) -> None:
        """Start (or restart, on the same storage). ``gdcm`` loads the GDCM plugin, the
        only JPEG 2000 encoder and decoder Orthanc has (DCMTK, built in, has none);
        ``dicomweb`` the DICOMweb plugin under ``/dicom-web/``."""
        plugins = [path for path, wanted in ((GDCM_PLUGIN, gdcm), (DICOMWEB_PLUGIN, dicomweb))
                   if wanted]
        for path in plugins:
            if not Path(path).exists():
                package = "orthanc-gdcm" if path == GDCM_PLUGIN else "orthanc-dicomweb"
                raise RuntimeError(f"{path} missing: install Debian's {package}")
        storage = self.workdir / "db"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dcn-node test PACS",
            "DicomAet": ORTHANC_AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            # A re-run sends objects with the same UIDs: the PACS keeps the newest.
            "OverwriteInstances": True,
            "StableAge": 2,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            # Loaded only on request: with it, JPEG-LS encoding crashed Orthanc 1.10.1
            # (segfault), while DCMTK's built-in JPEG-LS codec works without it.
            "Plugins": plugins,
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        }
        if self.count_stores:
            script = self.workdir / "count-stores.lua"
            script.write_text(_STORE_COUNTER_LUA)
            script.chmod(0o644)
            config["LuaScripts"] = [str(script)]
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        command = [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(config_path)]
        if os.geteuid() == 0:
            for path in (self.workdir, storage):
                path.chmod(0o777)
            config_path.chmod(0o644)
            # setpriv execs Orthanc itself (runuser would stay as a parent that does not
            # pass SIGTERM on), so stop() really stops the PACS.
            nobody = pwd.getpwnam("nobody")
            command = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                       "--clear-groups", "--", *command]
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within the timeout")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def stores(self) -> collections.Counter[str]:
        """SOP Instance UID -> times Orthanc stored it (C-STORE or upload), across
        restarts; needs ``count_stores``."""
        if not self.count_stores:
            raise RuntimeError("Orthanc(count_stores=True) counts the stores")
        counts: collections.Counter[str] = collections.Counter()
        if self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines():
                if _STORED_LINE in line:
                    counts[line.split(_STORED_LINE, 1)[1].strip()] += 1
        return counts

    # -- REST --------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                raw: bytes | None = None, timeout: float = 120.0) -> Any:
        data = raw if raw is not None else (None if body is None else
                                            json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if raw is not None:
            request.add_header("Content-Type", "application/dicom")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:1000]
            raise RuntimeError(f"Orthanc {method} {path}: HTTP {exc.code}: {detail}") from exc
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> str:
        """POST one DICOM file; returns the Orthanc instance id."""
        return str(self.request("POST", "/instances", raw=path.read_bytes())["ID"])

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        self.modalities[name] = [ae_title, "127.0.0.1", port]
        self.request("PUT", f"/modalities/{name}",
                     {"AET": ae_title, "Host": "127.0.0.1", "Port": port})

    def transcode_series(self, series_id: str, transfer_syntax: str) -> None:
        """Re-encode the stored series in ``transfer_syntax``, keeping every UID (the
        transcoded instances replace the originals), so Orthanc sends it that way."""
        self.request("POST", f"/series/{series_id}/modify", {
            "Transcode": transfer_syntax, "Force": True,
            "Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        })

    def series_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every series of the study (expanded), found by its Study Instance UID."""
        ids = self.request("POST", "/tools/find", {
            "Level": "Series", "Query": {"StudyInstanceUID": study_instance_uid},
            "Expand": True,
        })
        return list(ids)
