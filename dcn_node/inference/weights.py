"""Weights on disk: ``<profile>-{lung,dcn,spm}.pt`` state dicts and a manifest with their
SHA-256, written by training and checked by the engine before loading."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dcn_node.errors import DcnNodeError
from dcn_node.inference.networks import PROFILES

LOGGER = logging.getLogger(__name__)

#: The three networks, in the order they run.
NETWORKS = ("lung", "dcn", "spm")


class ModelIntegrityError(DcnNodeError):
    """A weights file is missing or its SHA-256 differs from its manifest."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(models_dir: Path, profile: str) -> Path:
    return Path(models_dir) / f"{profile}-manifest.json"


def model_version_for(profile: str, files: dict[str, dict[str, str]], extra: str = "") -> str:
    """``PROFILE-YYYYMMDD-xxxxxxxx``: the training date, and the start of a hash of the
    networks' SHA-256s (and ``extra``: the calibration), so two sets of weights trained the
    same day never share a version (it is written into every result object)."""
    digest = hashlib.sha256(
        ("".join(files[name]["sha256"] for name in NETWORKS) + extra).encode())
    return f"{profile}-{time.strftime('%Y%m%d')}-{digest.hexdigest()[:8]}"


def save_weights(out_dir: Path, settings: Any, lung: torch.nn.Module, dcn: torch.nn.Module,
                 spm: torch.nn.Module) -> Path:
    """Write the state dicts (loadable with ``weights_only=True``) and the manifest of
    ``settings.profile``; ``settings`` (a dataclass) is recorded as the training set-up."""
    from dcn_node import __version__

    files = {}
    for name, model in zip(NETWORKS, (lung, dcn, spm), strict=True):
        path = out_dir / f"{settings.profile}-{name}.pt"
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, path)
        files[name] = {"file": path.name, "sha256": sha256_of(path)}
    manifest = manifest_path(out_dir, settings.profile)
    manifest.write_text(json.dumps({
        "model_version": model_version_for(settings.profile, files),
        "software_version": __version__,
        "profile": asdict(PROFILES[settings.profile]),
        "training": asdict(settings),
        "files": files,
    }, indent=2) + "\n")
    LOGGER.info("weights written: %s", ", ".join(f["file"] for f in files.values()))
    return manifest


def load_manifest(models_dir: Path, profile: str) -> dict[str, Any]:
    path = manifest_path(models_dir, profile)
    if not path.exists():
        raise ModelIntegrityError(f"no model manifest {path}")
    return json.loads(path.read_text())


def load_checked_state(models_dir: Path, manifest: dict[str, Any],
                       name: str) -> dict[str, torch.Tensor]:
    """One network's state dict, after checking its SHA-256 against the manifest."""
    entry = manifest["files"][name]
    path = Path(models_dir) / entry["file"]
    if not path.exists():
        raise ModelIntegrityError(f"weights file {path} missing")
    if sha256_of(path) != entry["sha256"]:
        raise ModelIntegrityError(f"{path.name}: SHA-256 differs from the manifest")
    return torch.load(path, map_location="cpu", weights_only=True)
