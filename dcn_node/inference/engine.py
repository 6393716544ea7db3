"""The inference engine: lung U-Net -> DCN on lung slices -> slice probability mapping.

Models are loaded once (weights checked against the SHA-256 in their manifest). Slices go
through in batches at the profile's input size; results come back in the volume's geometry.
The optimized path folds batch norms into the convolutions before them and uses
channels_last, bfloat16 autocast on CPUs with native bfloat16 (AVX512-BF16/AMX) and float16
autocast on CUDA; ``optimized=False`` is plain float32 (the benchmark baseline).
Slices where the U-Net finds no lung skip the DCN. The same input gives the same output.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dcn_node.errors import DcnNodeError
from dcn_node.inference.networks import DCN, PROFILES, SliceProbabilityMapping, UNet
from dcn_node.inference.transforms import probabilities_to_shape, resize_images, window
from dcn_node.inference.weights import (
    NETWORKS,
    ModelIntegrityError,
    load_checked_state,
    load_manifest,
)
from dcn_node.volume import Volume

__all__ = ["AnalysisResult", "Engine", "ModelIntegrityError", "run_lung_then_dcn"]

LOGGER = logging.getLogger(__name__)

#: Shipped weights: models/ at the project root.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


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


@functools.cache
def cpu_supports_bfloat16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into
    that conv (eval mode only: the running statistics become the conv's weight and bias)
    and put an Identity in its place. Same outputs up to float rounding, one pass over
    the activations less per folded pair. Returns ``model``, changed in place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode")
    for sequential in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        for index in range(1, len(sequential)):
            conv, norm = sequential[index - 1], sequential[index]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                sequential[index - 1] = fuse_conv_bn_eval(conv, norm)
                sequential[index] = torch.nn.Identity()
    return model


@dataclass
class LungDcnOutput:
    """The lung U-Net and DCN outputs at the model's input size, for all N slices."""

    lung_probability: torch.Tensor  # (N, S, S)
    #: Indices of the slices with lung: the only ones the DCN ran on.
    lung_slices: torch.Tensor
    slice_probability: torch.Tensor  # (N,), 0 where skipped
    lesion_probability: torch.Tensor  # (N, S, S), 0 where skipped
    attention: list[torch.Tensor]  # four (N, h_k, w_k), 0 where skipped
    #: Seconds spent in the lung U-Net and in the DCN (outputs copied back included).
    lung_seconds: float = 0.0
    dcn_seconds: float = 0.0


def run_lung_then_dcn(
    lung_model: UNet,
    dcn: DCN,
    image: torch.Tensor,
    *,
    batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    threshold: float = 0.5,
) -> LungDcnOutput:
    """Sections 2.2-2.3 on windowed slices ``image`` (N, S, S): the lung U-Net on every
    slice, then the DCN on the lung-masked slices that have lung. Used by the engine and
    by training (slice probabilities for the SPM)."""
    slices, size = image.shape[0], image.shape[-1]
    started = time.perf_counter()
    lung_prob = torch.empty((slices, size, size))
    for start in range(0, slices, batch_size):
        with context():
            logits = lung_model(prepare(image[start:start + batch_size, None]))
        lung_prob[start:start + len(logits)] = torch.sigmoid(logits.float())[:, 0].cpu()
    lung_seconds = time.perf_counter() - started
    started = time.perf_counter()
    lung = lung_prob >= threshold
    keep = torch.nonzero(lung.flatten(1).any(1)).flatten()
    slice_prob = torch.zeros(slices)
    lesion_prob = torch.zeros((slices, size, size))
    attention = [torch.zeros((slices, side, side)) for side in dcn.attention_sizes(size)]
    for start in range(0, len(keep), batch_size):
        index = keep[start:start + batch_size]
        with context():
            out = dcn(prepare((image[index] * lung[index])[:, None]))
        slice_prob[index] = torch.sigmoid(out.classification.float()).cpu()
        lesion_prob[index] = torch.sigmoid(out.segmentation.float())[:, 0].cpu()
        for k, alpha in enumerate(out.attention):
            attention[k][index] = alpha.float()[:, 0].cpu()
    return LungDcnOutput(lung_prob, keep, slice_prob, lesion_prob, attention,
                         lung_seconds, time.perf_counter() - started)


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
        batch norms folded, channels_last, reduced-precision autocast where supported;
        False = fp32 eager.
    reduced_precision:
        With ``optimized``: allow the autocast (False = the optimized path in float32).
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
        reduced_precision: bool = True,
    ) -> None:
        self.profile = PROFILES[profile]
        self.device = select_device(device)
        self.batch_size = batch_size
        self.threshold = threshold
        self.manifest = load_manifest(Path(models_dir), profile)
        self.model_version = str(self.manifest["model_version"])
        self.lung_model = UNet(1, self.profile.unet_width)
        self.dcn = DCN(self.profile)
        self.spm = SliceProbabilityMapping()
        for name, model in zip(NETWORKS, (self.lung_model, self.dcn, self.spm), strict=True):
            model.load_state_dict(load_checked_state(Path(models_dir), self.manifest, name))
            model.to(self.device).eval()
        self.optimized = optimized
        self.autocast_dtype: torch.dtype | None = None
        if optimized:
            fold_batch_norms(self.lung_model)
            fold_batch_norms(self.dcn)
            self.lung_model.to(memory_format=torch.channels_last)
            self.dcn.to(memory_format=torch.channels_last)
            if reduced_precision and self.device.type != "cpu":
                self.autocast_dtype = torch.float16
            elif reduced_precision and cpu_supports_bfloat16():
                self.autocast_dtype = torch.bfloat16
        LOGGER.info(
            "Model %s (%s) on %s, %s", self.model_version, profile, self.device,
            f"autocast {self.autocast_dtype}" if self.autocast_dtype else "float32",
        )

    def _context(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.optimized else batch

    @torch.inference_mode()
    def analyze(self, volume: Volume) -> AnalysisResult:
        """Run the three networks on ``volume``. ``timings`` of the result holds the seconds
        of each stage: preprocessing (window, resize), lung_segmentation, dcn, spm and
        postprocessing (masks back to the volume's geometry)."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        size = self.profile.input_size
        slices, rows, columns = volume.hu.shape
        image = resize_images(torch.from_numpy(window(volume.hu)), size)  # (n, S, S)
        timings["preprocessing"] = time.perf_counter() - started

        out = run_lung_then_dcn(
            self.lung_model, self.dcn, image, batch_size=self.batch_size,
            prepare=self._prepare, context=self._context, threshold=self.threshold,
        )
        timings["lung_segmentation"] = out.lung_seconds
        timings["dcn"] = out.dcn_seconds

        mark = time.perf_counter()
        kept = out.slice_probability[out.lung_slices] if len(out.lung_slices) \
            else torch.zeros(1)
        logit = self.spm(kept.to(self.device))
        probability = float(torch.sigmoid(logit.float()).item())
        timings["spm"] = time.perf_counter() - mark

        mark = time.perf_counter()
        lung = probabilities_to_shape(out.lung_probability, (rows, columns)) >= self.threshold
        lesion = (
            probabilities_to_shape(out.lesion_probability, (rows, columns)) >= self.threshold
        ) & lung
        timings["postprocessing"] = time.perf_counter() - mark
        return AnalysisResult(
            lung=lung.numpy(),
            lesion=lesion.numpy(),
            slice_probabilities=out.slice_probability.numpy(),
            attention=[a.numpy() for a in out.attention],
            probability=probability,
            positive=probability >= self.threshold,
            model_version=self.model_version,
            seconds=time.perf_counter() - started,
            timings=timings,
        )
