"""An installed wheel, not the checkout: the project builds into a wheel that carries the
shipped weights, their manifest and model card, and the default configuration (package data,
read through importlib.resources), and that wheel, installed non-editable into a folder of its
own, runs ``dcn-node analyze`` on the shipped weights and default config and ``dcn-node serve``
from a working directory outside the checkout.

The children run the venv's interpreter (the dependencies come from it) with the installed
folder first on ``PYTHONPATH``: its ``dcn_node`` is found before the editable install's
finder, which comes last on ``sys.meta_path``. Each child prints where ``dcn_node``, its
default config and its weights came from, and, when done, every loaded module whose file lies
in the checkout; the test asserts the first are in the installed folder and the last is empty.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dcn_node.inference.weights import load_manifest
from dcn_train.phantom import generate_phantom
from tests.conftest import NODE_AET, free_port, test_config, wait_for

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "dcn_node" / "models"

#: The child: reports where the package came from, runs the CLI, then reports every loaded
#: module that came from the checkout, the venv of the dependencies aside (none may).
RUNNER = """
import json, os, sys
import dcn_node, dcn_node.cli, dcn_node.config, dcn_node.inference.engine as engine

def report(**fields):
    print("WHERE " + json.dumps(fields), file=sys.stderr, flush=True)

checkout = os.path.join(os.environ["DCN_CHECKOUT"], "")
venv = os.path.join(sys.prefix, "")  # the dependencies' venv may lie inside the checkout

def from_checkout(module):
    path = getattr(module, "__file__", None) or ""
    return path.startswith(checkout) and not path.startswith(venv)

report(package=dcn_node.__file__, config=str(dcn_node.config.DEFAULT_CONFIG_PATH),
       models=str(engine.DEFAULT_MODELS_DIR))
code = dcn_node.cli.main(sys.argv[1:])
report(from_checkout=sorted(name for name, module in list(sys.modules.items())
                            if from_checkout(module)))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built without network from a copy of what the build reads (so the
    checkout gets no build/ or egg-info, and nothing stale from an earlier build)."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("dcn_node", "dcn_train"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "checkpoints", "*.log", "*.tmp"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", str(work / "dist"), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (built,) = (work / "dist").glob("dcn_node-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed, not editable, into a folder of its own."""
    target = tmp_path_factory.mktemp("installed") / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return target


def child_env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1",
            "DCN_CHECKOUT": str(ROOT)}


def where(output: str) -> list[dict]:
    return [json.loads(line.removeprefix("WHERE ")) for line in output.splitlines()
            if line.startswith("WHERE ")]


def assert_ran_from(site: Path, output: str) -> None:
    """The child's dcn_node, default config and weights are the installed ones, and no module
    it loaded came from the checkout."""
    started, finished = where(output)
    for key in ("package", "config", "models"):
        assert Path(started[key]).is_relative_to(site), (key, started[key])
    assert Path(started["config"]).name == "dcn-node.yaml"
    assert Path(started["models"]) == site / "dcn_node" / "models"
    assert finished["from_checkout"] == []


def test_the_wheel_carries_the_weights_and_the_default_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    manifest = load_manifest(SHIPPED, "lite")
    shipped = {"lite-manifest.json", "README.md"} | {
        entry["file"] for entry in manifest["files"].values()}
    assert {f"dcn_node/models/{name}" for name in shipped} <= names
    assert "dcn_node/dcn-node.yaml" in names
    assert "dcn_node/py.typed" in names
    # Package data only: no training leftovers, no tests.
    assert not [n for n in names if "checkpoints" in n or n.startswith("tests/")]
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("dcn_node/models/lite-manifest.json") == (
            SHIPPED / "lite-manifest.json").read_bytes()


def test_installed_wheel_analyzes_with_the_shipped_weights(
    site: Path, tmp_path: Path
) -> None:
    case = generate_phantom(tmp_path / "case", seed=31, slices=24, matrix=128)
    run = tmp_path / "run"  # outside the checkout: nothing found relative to it
    run.mkdir()
    out = run / "result"
    # No --models, no --config: the weights and the config installed with the package.
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, "analyze", str(case.series_dir), "--out", str(out)],
        cwd=run, env=child_env(site), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert_ran_from(site, done.stderr)
    summary = json.loads(done.stdout)
    assert summary["series_instance_uid"] == case.series_instance_uid
    assert summary["model_version"] == load_manifest(SHIPPED, "lite")["model_version"]
    for name in ("summary.json", "masks.npz"):
        assert (out / name).stat().st_size > 0, name
    for kind in ("seg", "sc", "sr", "ko"):
        assert list((out / kind).glob("*.dcm")), kind


def test_installed_wheel_serves_and_stops_on_sigterm(site: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    dicom_port, metrics_port = free_port(), free_port()
    # The model on and no models_dir: /readyz waits for the installed weights to load.
    config = test_config(run / "spool", node={"port": dicom_port},
                         metrics={"host": "127.0.0.1", "port": metrics_port},
                         inference={"enabled": True, "device": "cpu"})
    config_path = run / "node.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = run / "node.log"
    with open(log_path, "w") as log:
        node = subprocess.Popen(
            [sys.executable, "-c", RUNNER, "serve", "--config", str(config_path)],
            cwd=run, env=child_env(site), stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        def ready() -> bool:
            if node.poll() is not None:
                pytest.fail(f"node exited with {node.returncode}: {log_path.read_text()}")
            try:
                url = f"http://127.0.0.1:{metrics_port}/readyz"
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status == 200
            except OSError:  # not listening yet, or 503 while the model loads
                return False

        wait_for(ready, timeout=60, interval=0.2)
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", dicom_port, ae_title=NODE_AET)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0, log_path.read_text()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)
    assert_ran_from(site, log_path.read_text())
