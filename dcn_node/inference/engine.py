"""The inference engine: lung U-Net -> DCN on lung slices -> slice probability mapping.

Models are loaded once (weights checked against the SHA-256 in their manifest). Slices go
through in batches at the profile's input size; results come back in the volume's geometry.
The optimized path uses channels_last and bfloat16 autocast on CPUs that support bfloat16,
float16 autocast on CUDA; ``optimized=False`` is plain float32 (the benchmark baseline).
Slices where the U-Net finds no lung skip the DCN. The same input gives the same output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dcn_node.errors import DcnNodeError
from dcn_node.inference.networks import DCN, PROFILES, SliceProbabilityMapping, UNet
from dcn_node.inference.transforms import probabilities_to_shape, resize_images, window
from dcn_node.volume import Volume

LOGGER = logging.getLogger(__name__)

#: Shipped weights: models/ at the project root.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


class ModelIntegrityError(DcnNodeError):
    """A weights file is missing or its SHA-256 differs from its manifest."""


@dataclass
class AnalysisResult:
    """The model's output for one volume, in the volume's geometry."""

    lung: np.ndarray  # bool (slices, rows, columns)
    lesion: np.ndarray  # bool (slices, rows, columns)
    #: DCN probability per slice; 0 where the slice has no lung (not run).
    slice_probabilities: np.ndarray
    #: The four LA attention maps per slice, each (slices, h_k, w_k) float32, 0 where skipped.
    attention: list[np.ndarray]
    probability: float
    positive: bool
    model_version: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DcnNodeError("inference.device is cuda but no CUDA device is available")
    return torch.device(requested)


def cpu_supports_bfloat16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX)."""
    return _has_cpu_flag("avx512_bf16") or _has_cpu_flag("amx_bf16")


def _has_cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class Engine:
    """Runs the three networks of one profile on CT volumes.

    Parameters
    ----------
    models_dir:
        Folder with ``<profile>-manifest.json`` and the weights it lists.
    profile:
        ``lite`` or ``paper``.
    device:
        ``auto``, ``cpu`` or ``cuda``.
    optimized:
        channels_last + reduced-precision autocast where supported; False = fp32 eager.
    """

    def __init__(
        self,
        models_dir: Path = DEFAULT_MODELS_DIR,
        profile: str = "lite",
        device: str = "auto",
        *,
        optimized: bool = True,
        batch_size: int = 16,
        threshold: float = 0.5,
    ) -> None:
        self.profile = PROFILES[profile]
        self.device = select_device(device)
        self.batch_size = batch_size
        self.threshold = threshold
        manifest_path = Path(models_dir) / f"{profile}-manifest.json"
        if not manifest_path.exists():
            raise ModelIntegrityError(f"no model manifest {manifest_path}")
        self.manifest = json.loads(manifest_path.read_text())
        self.model_version = str(self.manifest["model_version"])
        self.lung_model = UNet(1, self.profile.unet_width)
        self.dcn = DCN(self.profile)
        self.spm = SliceProbabilityMapping()
        for name, model in (("lung", self.lung_model), ("dcn", self.dcn), ("spm", self.spm)):
            model.load_state_dict(self._load_checked(Path(models_dir), name))
            model.to(self.device).eval()
        if self.device.type == "cpu":
            self.autocast_dtype = torch.bfloat16 if cpu_supports_bfloat16() else None
        else:
            self.autocast_dtype = torch.float16
        self.optimized = optimized
        self.channels_last = optimized
        if not optimized:
            self.autocast_dtype = None
        if self.channels_last:
            self.lung_model.to(memory_format=torch.channels_last)
            self.dcn.to(memory_format=torch.channels_last)
        LOGGER.info(
            "Model %s (%s) on %s, %s", self.model_version, profile, self.device,
            f"autocast {self.autocast_dtype}" if self.autocast_dtype else "float32",
        )

    def _load_checked(self, models_dir: Path, name: str) -> dict[str, torch.Tensor]:
        from dcn_node.training.trainer import sha256_of

        entry = self.manifest["files"][name]
        path = models_dir / entry["file"]
        if not path.exists():
            raise ModelIntegrityError(f"weights file {path} missing")
        if sha256_of(path) != entry["sha256"]:
            raise ModelIntegrityError(f"{path.name}: SHA-256 differs from the manifest")
        return torch.load(path, map_location="cpu", weights_only=True)

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last \
            else batch

    @torch.inference_mode()
    def analyze(self, volume: Volume) -> AnalysisResult:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        size = self.profile.input_size
        slices, rows, columns = volume.hu.shape
        image = resize_images(torch.from_numpy(window(volume.hu)), size)  # (n, S, S)

        mark = time.perf_counter()
        lung_prob = torch.empty((slices, size, size))
        for start in range(0, slices, self.batch_size):
            batch = self._prepare(image[start:start + self.batch_size, None])
            with self._context():
                logits = self.lung_model(batch)
            lung_prob[start:start + len(batch)] = torch.sigmoid(logits.float())[:, 0].cpu()
        lung_small = lung_prob >= self.threshold
        timings["lung"] = time.perf_counter() - mark

        mark = time.perf_counter()
        keep = torch.nonzero(lung_small.flatten(1).any(1)).flatten()
        slice_prob = torch.zeros(slices)
        lesion_prob = torch.zeros((slices, size, size))
        attention = [torch.zeros((slices, size // s, size // s)) for s in (4, 4, 8, 16)]
        for start in range(0, len(keep), self.batch_size):
            index = keep[start:start + self.batch_size]
            masked = image[index] * lung_small[index]
            with self._context():
                out = self.dcn(self._prepare(masked[:, None]))
            slice_prob[index] = torch.sigmoid(out.classification.float()).cpu()
            lesion_prob[index] = torch.sigmoid(out.segmentation.float())[:, 0].cpu()
            for k, alpha in enumerate(out.attention):
                attention[k][index] = alpha.float()[:, 0].cpu()
        timings["dcn"] = time.perf_counter() - mark

        kept = slice_prob[keep] if len(keep) else torch.zeros(1)
        logit = self.spm(kept.to(self.device))
        probability = float(torch.sigmoid(logit.float()).item())

        mark = time.perf_counter()
        lung = probabilities_to_shape(lung_prob, (rows, columns)) >= self.threshold
        lesion = (probabilities_to_shape(lesion_prob, (rows, columns)) >= self.threshold) & lung
        timings["resize"] = time.perf_counter() - mark
        return AnalysisResult(
            lung=lung.numpy(),
            lesion=lesion.numpy(),
            slice_probabilities=slice_prob.numpy(),
            attention=[a.numpy() for a in attention],
            probability=probability,
            positive=probability >= self.threshold,
            model_version=self.model_version,
            seconds=time.perf_counter() - started,
            timings=timings,
        )
