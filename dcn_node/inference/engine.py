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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcn_node.config import QualityGateSettings, package_path
from dcn_node.errors import DcnNodeError
from dcn_node.inference.anatomy import classical_anatomy, constrain_lung
from dcn_node.inference.networks import (
    DCN,
    MAPPINGS,
    PROFILES,
    SliceProbabilityMapping,
    UNet,
)
from dcn_node.inference.pattern import (
    FEATURES,
    pattern_features,
    pattern_probability,
    subsample_step,
)
from dcn_node.inference.quality import GateResult, NotAssessable, assess
from dcn_node.inference.transforms import (
    GridGeometry,
    probabilities_to_shape,
    resize_images,
    window,
)
from dcn_node.inference.weights import (
    NETWORKS,
    ModelIntegrityError,
    load_checked_state,
    load_manifest,
)
from dcn_node.ops.memory import trim
from dcn_node.volume import Volume

__all__ = ["AnalysisResult", "Engine", "ModelIntegrityError", "run_lung_then_dcn"]

LOGGER = logging.getLogger(__name__)

#: The shipped weights, their manifest and model card: package data (``dcn_node/models/``).
DEFAULT_MODELS_DIR = package_path("models")

#: The gate of an engine built without one: the model's own output for evaluation,
#: calibration and the benchmarks (the verdict and its reason recorded, the lesions of a
#: not-assessable series kept). The node passes its configured ``inference.quality_gate``.
MEASURING_GATE = QualityGateSettings(report_lesions_when_not_assessable=True)

#: The individual-level mappings the engine runs: the SPM's own (networks.MAPPINGS) and
#: ``pattern`` (dcn_node.inference.pattern).
INDIVIDUAL_MAPPINGS = (*MAPPINGS, "pattern")


@dataclass
class AnalysisResult:
    """The model's output for one volume, in the volume's geometry."""

    lung: np.ndarray  # bool (slices, rows, columns)
    lesion: np.ndarray  # bool (slices, rows, columns)
    #: DCN probability per slice; 0 where the slice has no lung (not run).
    slice_probabilities: np.ndarray
    #: The four LA attention maps per slice, each (slices, h_k, w_k) float32 covering the
    #: volume's field of view, 0 where skipped.
    attention: list[np.ndarray]
    #: The model's calibrated patient-level probability, computed even when the quality gate
    #: says the series is not assessable (then it is not reported: see ``assessable``).
    probability: float
    #: ``assessable`` and ``probability >= threshold``.
    positive: bool
    model_version: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    #: The decision threshold the probability was compared with.
    threshold: float = 0.5
    #: The quality gate's verdict (None: not run, e.g. results built from saved masks).
    quality: GateResult | None = None
    #: The DCN's lesion probability per pixel at the network's resolution, (slices, h, w)
    #: float16 covering the volume's field of view (None: not kept).
    lesion_probability: np.ndarray | None = None
    #: The mapping's output before calibration (what ``dcn-node calibrate`` fits).
    uncalibrated_probability: float | None = None
    #: The ``pattern`` mapping's features (None with another mapping).
    pattern_features: dict[str, float] | None = None
    #: The series is not assessable and its lesions were withheld (``lesion`` emptied, no
    #: heat maps): ``quality_gate.report_lesions_when_not_assessable`` is off.
    lesions_withheld: bool = False

    @property
    def assessable(self) -> bool:
        return self.quality is None or self.quality.assessable

    def segment_stack(self) -> np.ndarray | None:
        """The one (slices, rows, columns, 2) bool array whose [..., 0] is ``lesion`` and
        [..., 1] is ``lung``, when the engine made them so (None otherwise)."""
        base = self.lesion.base
        if (base is None or base is not self.lung.base or base.dtype != np.bool_
                or base.shape != (*self.lesion.shape, 2)):
            return None
        start = base.__array_interface__["data"][0]
        if (self.lesion.__array_interface__["data"][0] != start
                or self.lung.__array_interface__["data"][0] != start + 1):
            return None
        return base


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


#: A batch of windowed slices (n, S, S) on the network grid, by slice indices.
SliceSource = Callable[[torch.Tensor], torch.Tensor]


def lung_batches(
    lung_model: UNet, images: SliceSource, slices: int, *, batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Section 2.2, batch by batch: (slice indices, lung probabilities (n, S, S) on the CPU)."""
    for start in range(0, slices, batch_size):
        index = torch.arange(start, min(start + batch_size, slices))
        with context():
            logits = lung_model(prepare(images(index)[:, None]))
        yield index, torch.sigmoid(logits.float())[:, 0].cpu()


def dcn_batches(
    dcn: DCN, inputs: SliceSource, keep: torch.Tensor, *, batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """Section 2.3 on the lung-masked slices ``keep``, batch by batch: (slice indices, slice
    probabilities, lesion probabilities (n, S, S), the four attention maps), on the CPU."""
    for start in range(0, len(keep), batch_size):
        index = keep[start:start + batch_size]
        with context():
            out = dcn(prepare(inputs(index)[:, None]))
        yield (index, torch.sigmoid(out.classification.float()).cpu(),
               torch.sigmoid(out.segmentation.float())[:, 0].cpu(),
               [alpha.float()[:, 0].cpu() for alpha in out.attention])


def run_lung(
    lung_model: UNet, image: torch.Tensor, *, batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Section 2.2: lung probabilities (N, S, S) of windowed slices ``image`` (N, S, S)."""
    slices, size = image.shape[0], image.shape[-1]
    lung_prob = torch.empty((slices, size, size))
    for index, prob in lung_batches(lung_model, image.__getitem__, slices,
                                    batch_size=batch_size, prepare=prepare, context=context):
        lung_prob[index] = prob
    return lung_prob


def run_dcn(
    dcn: DCN, image: torch.Tensor, lung: torch.Tensor, *, batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Section 2.3 on the lung-masked slices that have lung: (slices run, slice
    probabilities, lesion probabilities, four attention maps), 0 where not run."""
    slices, size = image.shape[0], image.shape[-1]
    keep = torch.nonzero(lung.flatten(1).any(1)).flatten()
    slice_prob = torch.zeros(slices)
    lesion_prob = torch.zeros((slices, size, size))
    attention = [torch.zeros((slices, side, side)) for side in dcn.attention_sizes(size)]
    batches = dcn_batches(dcn, lambda index: image[index] * lung[index], keep,
                          batch_size=batch_size, prepare=prepare, context=context)
    for index, probability, lesion, alphas in batches:
        slice_prob[index] = probability
        lesion_prob[index] = lesion
        for k, alpha in enumerate(alphas):
            attention[k][index] = alpha
    return keep, slice_prob, lesion_prob, attention


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
    """Sections 2.2-2.3 on windowed slices ``image`` (N, S, S) with the U-Net's own lung
    mask (no anatomical constraint: training's cached cases hold no HU). Used by training
    (slice probabilities for the SPM) and the benchmarks."""
    started = time.perf_counter()
    lung_prob = run_lung(lung_model, image, batch_size=batch_size, prepare=prepare,
                         context=context)
    lung_seconds = time.perf_counter() - started
    started = time.perf_counter()
    keep, slice_prob, lesion_prob, attention = run_dcn(
        dcn, image, lung_prob >= threshold, batch_size=batch_size, prepare=prepare,
        context=context)
    return LungDcnOutput(lung_prob, keep, slice_prob, lesion_prob, attention,
                         lung_seconds, time.perf_counter() - started)


def calibrated(probability: float | np.ndarray, calibration: dict[str, float] | None
               ) -> float | np.ndarray:
    """Platt scaling of the SPM's probability (a number or an array): sigmoid(scale *
    logit(p) + shift), fitted on validation cases (``calibration`` of the manifest, made by
    :mod:`dcn_train.calibration`; None: unchanged)."""
    if not calibration:
        return probability
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-7, 1 - 1e-7)
    z = calibration["scale"] * np.log(p / (1 - p)) + calibration["shift"]
    out = 1.0 / (1.0 + np.exp(-z))
    return float(out) if out.ndim == 0 else out


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
    quality_gate:
        The node's ``inference.quality_gate`` (off by default there: a not-assessable
        series' lesions withheld); None: :data:`MEASURING_GATE`, the lesions kept.
    mapping:
        The individual-level mapping, ``fcn`` (the trained SPM), ``max`` (the largest
        slice probability), ``slabs`` (the mean logit of the highest 5 mm slabs,
        :func:`~dcn_node.inference.networks.top_slab_logit`) or ``pattern`` (a logistic
        regression on the SPM and the shape of the outlined lesions,
        :mod:`dcn_node.inference.pattern`; its weights are the manifest's ``pattern``);
        None: the manifest's ``mapping`` (chosen on validation cases by
        :mod:`dcn_train.calibration`), else ``fcn``.
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
        decision_threshold: float | None = None,
        quality_gate: QualityGateSettings | None = None,
        mapping: str | None = None,
    ) -> None:
        self.profile = PROFILES[profile]
        self.device = select_device(device)
        self.batch_size = batch_size
        #: Mask threshold of the lung and lesion probability maps.
        self.threshold = threshold
        self.quality_gate = quality_gate or MEASURING_GATE
        self.manifest = load_manifest(Path(models_dir), profile)
        self.calibration: dict[str, float] | None = self.manifest.get("calibration")
        #: Patient-level decision threshold: the caller's, else the model's own.
        self.decision_threshold = float(
            decision_threshold if decision_threshold is not None
            else self.manifest.get("decision_threshold", 0.5))
        self.model_version = str(self.manifest["model_version"])
        self.lung_model = UNet(1, self.profile.unet_width)
        self.dcn = DCN(self.profile)
        self.mapping = mapping or str(self.manifest.get("mapping", "fcn"))
        if self.mapping not in INDIVIDUAL_MAPPINGS:
            raise ModelIntegrityError(f"unknown individual-level mapping {self.mapping!r}")
        self.pattern: dict[str, Any] | None = None
        if self.mapping == "pattern":
            self.pattern = self.manifest.get("pattern")
            if not self.pattern or list(self.pattern.get("features", ())) != list(FEATURES):
                raise ModelIntegrityError("mapping 'pattern' needs the manifest's 'pattern' "
                                          f"weights over the features {', '.join(FEATURES)}")
        # The pattern mapping weighs the trained SPM's output among its features.
        self.spm = SliceProbabilityMapping(
            "fcn" if self.mapping == "pattern" else self.mapping)  # type: ignore[arg-type]
        for name, model in zip(NETWORKS, (self.lung_model, self.dcn, self.spm), strict=True):
            model.load_state_dict(load_checked_state(Path(models_dir), self.manifest, name))
            model.to(self.device).eval()
        self.optimized = optimized
        self.autocast_dtype: torch.dtype | None = None
        if optimized:
            fold_batch_norms(self.lung_model)
            fold_batch_norms(self.dcn)
            # Module.to documents to(memory_format=...), but torch's overloads omit it.
            self.lung_model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self.dcn.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
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
        """Run the quality gate and the three networks on ``volume``.

        The lung U-Net's mask is kept to what the image's anatomy allows
        (:func:`~dcn_node.inference.anatomy.constrain_lung`) before the DCN sees it, and
        lesions to that mask. ``timings`` of the result holds the seconds of each stage:
        preprocessing (the work grid, anatomy), lung_segmentation, dcn, spm and
        postprocessing (lesion masks back to the volume's geometry).

        Memory: the volume's HU are read slice batch by slice batch and never copied whole.
        Whole-volume mask work (anatomy, the lung constraint) runs on the *work grid*, the
        volume's pixels shrunk to at most the network's input size
        (:attr:`GridGeometry.work_shape`); only
        the final lung and lesion masks are held at the volume's own size.
        """
        started = time.perf_counter()
        timings: dict[str, float] = {}
        hu = volume.hu
        slices = hu.shape[0]
        spacing = float(volume.pixel_spacing[1])
        slice_spacing = volume.slice_spacing_mm
        geometry = GridGeometry.of((hu.shape[1], hu.shape[2]), spacing,
                                   self.profile.input_size)
        work = geometry.work_shape
        work_spacing = spacing * hu.shape[2] / work[1]
        hu_work = np.empty((slices, *work), np.int16)
        for part in _batches(slices, self.batch_size):
            scaled = resize_images(torch.from_numpy(np.asarray(hu[part], np.float32)), work)
            hu_work[part] = scaled.round().clamp(-32768, 32767).to(torch.int16).numpy()
        anatomy = classical_anatomy(hu_work, work_spacing, slice_spacing)
        quality = assess(anatomy, work_spacing, slice_spacing, self.quality_gate)
        timings["preprocessing"] = time.perf_counter() - started
        trim()

        def network_images(index: torch.Tensor) -> torch.Tensor:
            return geometry.to_grid(window(torch.from_numpy(hu[index.numpy()])))

        mark = time.perf_counter()
        lung_prob = np.empty((slices, *work), np.float16)
        for index, prob in lung_batches(
                self.lung_model, network_images, slices, batch_size=self.batch_size,
                prepare=self._prepare, context=self._context):
            lung_prob[index.numpy()] = geometry.from_grid(prob, work).numpy()
        lung_work = constrain_lung(lung_prob >= self.threshold, hu_work, anatomy,
                                   work_spacing, slice_spacing)
        del hu_work, anatomy
        trim()
        if quality.reason is NotAssessable.NO_LUNGS:  # whatever the U-Net saw is not lung
            lung_work[:] = False
        # The U-Net's probabilities where the constraint agrees; 1 where it filled a hole
        # and 0 where it took lung away, so the full-size mask keeps the U-Net's edges.
        lung_prob[lung_work & (lung_prob < self.threshold)] = 1.0
        lung_prob[~lung_work & (lung_prob >= self.threshold)] = 0.0
        # Both masks in one (slices, rows, columns, 2) array, lesions then lungs: the SEG
        # takes it as it is (no second copy of the masks; see segment_stack).
        masks = np.zeros((*hu.shape, 2), bool)
        lesion, lung = masks[..., 0], masks[..., 1]
        for part in _batches(slices, self.batch_size):
            lung[part] = _at_least(lung_prob[part], hu.shape[1:], self.threshold)
        del lung_prob, lung_work
        trim()
        timings["lung_segmentation"] = time.perf_counter() - mark

        mark = time.perf_counter()
        # The DCN's lung mask: the full-size mask brought to the network grid (the DCN's
        # slice probability moves with a few pixels of its lung mask's edge).
        lung_net = torch.empty((slices, self.profile.input_size, self.profile.input_size),
                               dtype=torch.bool)
        for part in _batches(slices, self.batch_size):
            lung_net[part] = geometry.to_grid(torch.from_numpy(lung[part]), masks=True)
        keep = torch.nonzero(lung_net.flatten(1).any(1)).flatten()
        slice_prob = torch.zeros(slices)
        lesion_prob = np.zeros((slices, *geometry.inner), np.float16)
        attention = [np.zeros((slices, *geometry.field_of_view_shape(side)), np.float32)
                     for side in self.dcn.attention_sizes(self.profile.input_size)]
        upsampling = 0.0
        for index, batch_probability, lesion_batch, alphas in dcn_batches(
                self.dcn, lambda index: network_images(index) * lung_net[index], keep,
                batch_size=self.batch_size, prepare=self._prepare, context=self._context):
            rows = index.numpy()
            slice_prob[index] = batch_probability
            cropped = geometry.crop_to_field_of_view(lesion_batch)
            lesion_prob[rows] = cropped.numpy()
            for k, alpha in enumerate(alphas):
                attention[k][rows] = geometry.crop_to_field_of_view(alpha).numpy()
            mark_up = time.perf_counter()
            lesion[rows] = _at_least(cropped, hu.shape[1:], self.threshold) & lung[rows]
            upsampling += time.perf_counter() - mark_up
        timings["dcn"] = time.perf_counter() - mark - upsampling
        trim()

        mark = time.perf_counter()
        if self.spm.mode == "slabs":  # every slice in order: slabs are millimetres
            logit = self.spm(slice_prob, slice_mm=slice_spacing)
        else:
            kept = slice_prob[keep] if len(keep) else torch.zeros(1)
            logit = self.spm(kept.to(self.device))
        uncalibrated = float(torch.sigmoid(logit.float()).item())
        features = None
        if self.pattern is not None:
            step = subsample_step(hu.shape)
            features = pattern_features(
                lung[:, ::step, ::step], lesion[:, ::step, ::step],
                np.asarray(hu[:, ::step, ::step]), spacing * step, slice_prob.numpy(),
                uncalibrated)
            uncalibrated = pattern_probability(features, self.pattern)
        probability = float(calibrated(uncalibrated, self.calibration))
        timings["spm"] = time.perf_counter() - mark
        timings["postprocessing"] = upsampling
        positive = quality.assessable and probability >= self.decision_threshold
        withheld = not quality.assessable \
            and not self.quality_gate.report_lesions_when_not_assessable
        if withheld:  # in place: ``lesion`` may be a view of the SEG's stack
            lesion[:] = False
            attention = []
        return AnalysisResult(
            lung=lung,
            lesion=lesion,
            slice_probabilities=slice_prob.numpy(),
            attention=attention,
            probability=probability,
            positive=positive,
            model_version=self.model_version,
            seconds=time.perf_counter() - started,
            timings=timings,
            threshold=self.decision_threshold,
            quality=quality,
            lesion_probability=None if withheld else lesion_prob,
            uncalibrated_probability=uncalibrated,
            pattern_features=features,
            lesions_withheld=withheld,
        )


def _batches(slices: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, slices, batch_size):
        yield slice(start, min(start + batch_size, slices))


def _at_least(maps: np.ndarray | torch.Tensor, shape: tuple[int, ...], threshold: float
              ) -> np.ndarray:
    """(n, h, w) probabilities resized (bilinear) to (n, *shape), thresholded."""
    values = torch.as_tensor(maps).float()
    return (probabilities_to_shape(values, (int(shape[0]), int(shape[1]))) >= threshold).numpy()
