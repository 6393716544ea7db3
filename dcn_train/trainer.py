"""Training loops with checkpoints, resume and a readable log (paper 2.5 and 3.2.1).

Stages run in order, each resumable from its last finished epoch:

1. ``lung``: U-Net on (windowed slice -> lung mask), Dice loss; a share of every epoch's
   slices (``lung_lesion_fraction``) comes from slices with lesions, optionally a share
   (``lung_real_share``) from the real CTs; optionally a second Dice over the dense pixels
   alone (``lung_dense_dice_weight``).
2. ``dcn``: DCN on lung-masked slices; weighted Dice (lesion slices only) + lambda * BCE;
   each epoch takes every lesion slice (up to a cap) and as many lesion-free slices drawn
   afresh (under-sampling, 3.2.1), optionally a share of them by their loss (hard
   negatives).
3. ``spm``: the three-layer FCN on resampled slice-probability curves, BCE.

Adam, lr 1e-3, decayed x0.95 per epoch, fixed seeds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dcn_node.errors import DcnNodeError
from dcn_node.inference.anatomy import AIR_HU
from dcn_node.inference.engine import cpu_supports_bfloat16, run_lung_then_dcn
from dcn_node.inference.networks import DCN, PROFILES, SliceProbabilityMapping, UNet
from dcn_node.inference.networks import resample_slice_probabilities as resample
from dcn_node.inference.transforms import window
from dcn_node.inference.weights import load_checked_state, load_manifest, save_weights
from dcn_train.cases import Case
from dcn_train.losses import dcn_loss, dense_dice_loss, dice_loss

__all__ = ["TrainSettings", "Trainer", "save_weights"]

LOGGER = logging.getLogger(__name__)

#: AIR_HU on the networks' windowed scale: the dense pixels of the lung's dense Dice.
DENSE_WINDOWED = float(window(np.array([AIR_HU], np.float32))[0])

_Network = TypeVar("_Network", bound=torch.nn.Module)


@dataclass(frozen=True)
class TrainSettings:
    profile: str = "lite"
    lung_epochs: int = 50
    dcn_epochs: int = 100
    spm_epochs: int = 20
    lung_batch: int = 16
    dcn_batch: int = 8
    spm_batch: int = 16
    learning_rate: float = 1e-3
    lr_decay: float = 0.95
    #: Slices per lung epoch and lesion slices per DCN epoch (CPU budgets; 0 = all).
    lung_slices_per_epoch: int = 0
    dcn_positives_per_epoch: int = 0
    #: Share of each lung epoch drawn from slices with lesions: dense consolidation looks
    #: like soft tissue, and a lung mask that leaves it out hides it from the DCN (which
    #: sees only the masked lung), so the U-Net must see many of them.
    lung_lesion_fraction: float = 0.5
    #: Share of each lung epoch drawn from the real CTs of the corpus (cases named
    #: ``real-*``), each part with ``lung_lesion_fraction`` lesion slices; 0 = as many as
    #: they are among all slices (6 % of corpus v3). Real consolidation beside a real chest
    #: wall is what the U-Net missed (2-15 % of inserted dense lesion held), and phantoms
    #: alone taught it to take paraspinal muscle in with the dense lung.
    lung_real_share: float = 0.0
    #: Weight of a second lung Dice over the dense pixels alone (-320 HU and up: dense
    #: consolidation and vessels against chest wall, heart and muscle;
    #: :func:`~dcn_train.losses.dense_dice_loss`). 0: the whole-slice Dice only, under which
    #: the U-Net held only ~36 % of the phantoms' dense lesion voxels.
    lung_dense_dice_weight: float = 0.0
    seed: int = 0
    device: str = "cpu"
    #: bfloat16 autocast on CPUs with native bfloat16 / float16 on CUDA during training.
    mixed_precision: bool = True
    #: A weights folder (with its manifest) whose networks start each stage that has no
    #: checkpoint yet: fine-tuning shipped weights on more epochs or on a hospital's cases.
    init_from: str = ""
    #: Weight of the segmentation Dice on lesion-free slices of cases whose lesion mask is
    #: complete (phantoms, real scans with inserted lesions, a hospital case with a
    #: lesion_mask column). 0 is the paper (equation 7: only slices with lesion count), which
    #: leaves lesion drawn over a tumour or a lobar pneumonia unpunished; cases without a
    #: lesion mask always keep weight 0 there (their lesions are unknown, not absent).
    negative_slice_dice_weight: float = 0.0
    #: Largest number of pixels by which the DCN's lung mask is grown or shrunk in training
    #: (half the slices, each way equally often; 0 = the truth mask as it is). At inference
    #: the DCN takes the lung U-Net's mask, whose edge differs from the truth by a few
    #: pixels; a DCN that only ever saw the truth edge learned it (a 4-pixel edge change
    #: moved a slice probability from 0.34 to 0.51), and outlines chest wall let in by a
    #: wider mask as lesion.
    lung_mask_jitter: int = 0
    #: Share of each DCN epoch's lesion-free slices drawn by their classification loss
    #: (online hard negative mining; the rest uniformly, as in 3.2.1). Drawn uniformly,
    #: a tumour or lobar-pneumonia slice is a few per cent of the negatives, and the slice
    #: classifier called them COVID-19 with 0.97-0.99. Each negative's loss is scored once
    #: at the stage's start and updated whenever a step sees it.
    hard_negative_share: float = 0.0


def _jitter_lung(lung: np.ndarray, largest: int) -> np.ndarray:
    """The lung mask grown or shrunk by 1..``largest`` pixels, or as it is (half the time)."""
    if largest <= 0 or random.random() < 0.5 or not lung.any():
        return lung
    pixels = random.randint(1, largest)
    if random.random() < 0.5:
        return ndimage.binary_dilation(lung, iterations=pixels)
    shrunk = ndimage.binary_erosion(lung, iterations=pixels)
    return shrunk if shrunk.any() else lung


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(items, size: int) -> list:
    """Consecutive batches of ``size`` (a short last batch is dropped, as before; at least
    one batch)."""
    steps = max(1, len(items) // size)
    return [items[i * size:(i + 1) * size] for i in range(steps)]


def _slices_with_lesion(case: Case) -> np.ndarray:
    """Per slice: does the case's lesion mask mark anything (all False without a mask)."""
    if case.lesion is None:
        return np.zeros(len(case.image), bool)
    return np.asarray(case.lesion.reshape(len(case.lesion), -1).any(1))


def draw_lung_slices(pool: list[tuple[int, int]], with_lesion: set[tuple[int, int]],
                     real: set[int], count: int, lesion_fraction: float, real_share: float
                     ) -> list[tuple[int, int]]:
    """One lung epoch's distinct (case, slice) pairs, shuffled: ``real_share`` of
    ``count`` from the slices of the ``real`` cases (in proportion when 0 or when every case
    or none is real), and within each part ``lesion_fraction`` from slices
    ``with_lesion``, the rest from all of the part."""
    real_slices = [ref for ref in pool if ref[0] in real]
    parts = [(pool, count)]
    if real_share and 0 < len(real_slices) < len(pool):
        real_count = round(count * real_share)
        parts = [(real_slices, real_count),
                 ([ref for ref in pool if ref[0] not in real], count - real_count)]
    chosen: list[tuple[int, int]] = []
    for part, part_count in parts:
        lesion_part = [ref for ref in part if ref in with_lesion]
        lesions = min(len(lesion_part), round(part_count * lesion_fraction))
        picked = random.sample(lesion_part, lesions)
        taken = set(picked)
        rest = [ref for ref in part if ref not in taken]
        chosen += picked + random.sample(rest, min(part_count - lesions, len(rest)))
    random.shuffle(chosen)
    return chosen


def draw_negatives(losses: np.ndarray, count: int, hard_share: float,
                   rng: np.random.RandomState) -> np.ndarray:
    """Indices of ``count`` distinct negatives: ``hard_share`` of them drawn with
    probability proportional to ``losses``, the rest uniformly from the others."""
    count = min(count, len(losses))
    hard = min(count, int(round(count * hard_share)))
    chosen = np.empty(0, dtype=np.int64)
    weights = np.clip(losses.astype(np.float64), 0.0, None) + 1e-6
    if hard:
        chosen = rng.choice(len(losses), size=hard, replace=False, p=weights / weights.sum())
    rest = np.setdiff1d(np.arange(len(losses)), chosen)
    uniform = rng.choice(rest, size=count - hard, replace=False)
    return np.concatenate([chosen, uniform]).astype(np.int64)


def _case_kind(name: str) -> str:
    """phantom-10003-other -> other; real-nsclc-1-other2 -> real-other; a hospital's
    case -> case (for the log only)."""
    if name.startswith("phantom-") and name.count("-") >= 2:
        return name.split("-")[2]
    if name.startswith("real-"):
        return next((f"real-{k}" for k in ("other", "covid") if f"-{k}" in name), "real")
    return "case"


def _save_replacing(state: dict, path: Path) -> None:
    """torch.save through a temporary file: an interrupted run never leaves a torn one."""
    temp = path.with_suffix(".tmp")
    torch.save(state, temp)
    temp.replace(path)


class _Progress:
    """One log line per ~10 % of an epoch: step, loss, speed."""

    def __init__(self, stage: str, epoch: int, epochs: int, steps: int) -> None:
        self.stage, self.epoch, self.epochs, self.steps = stage, epoch, epochs, steps
        self.started = time.perf_counter()
        self.every = max(1, steps // 10)

    def step(self, index: int, **losses: float) -> None:
        if (index + 1) % self.every and index + 1 != self.steps:
            return
        elapsed = time.perf_counter() - self.started
        shown = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        LOGGER.info(
            "%s epoch %d/%d [%s%s] %d/%d %s (%.1f s)", self.stage, self.epoch, self.epochs,
            "#" * int(20 * (index + 1) / self.steps), "." * (20 - int(20 * (index + 1) /
                                                                  self.steps)),
            index + 1, self.steps, shown, elapsed,
        )


class Trainer:
    """Trains the three networks of one profile on cached cases into ``out_dir``."""

    def __init__(self, cases: list[Case], out_dir: Path, settings: TrainSettings) -> None:
        self.cases = cases
        self.out_dir = out_dir
        self.settings = settings
        self.profile = PROFILES[settings.profile]
        self.device = torch.device(settings.device)
        self.checkpoints = out_dir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    # -- helpers -----------------------------------------------------------------------

    def _autocast(self) -> torch.autocast:
        # bfloat16 on a CPU without native bfloat16 (AVX512-BF16/AMX) is emulated and
        # ~3x slower than float32 (measured on an AVX-512 Xeon without it): stay in fp32.
        cpu = self.device.type == "cpu"
        enabled = self.settings.mixed_precision and (not cpu or cpu_supports_bfloat16())
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if cpu else torch.float16,
                              enabled=enabled)

    def _optimizer(self, model: torch.nn.Module
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = torch.optim.Adam(model.parameters(), lr=self.settings.learning_rate)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, self.settings.lr_decay)
        return optimizer, scheduler

    def _resume(self, stage: str, model: torch.nn.Module, optimizer, scheduler) -> int:
        path = self.checkpoints / f"{stage}.pt"
        if not path.exists():
            return 0
        state = torch.load(path, map_location=self.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        torch.set_rng_state(state["torch_rng"])
        LOGGER.info("%s: resuming after epoch %d", stage, state["epoch"])
        return int(state["epoch"])

    def _initialize(self, stage: str, model: torch.nn.Module) -> None:
        """Start ``stage`` from the SHA-256-checked weights in ``settings.init_from``."""
        folder = Path(self.settings.init_from)
        manifest = load_manifest(folder, self.settings.profile)
        model.load_state_dict(load_checked_state(folder, manifest, stage))
        LOGGER.info("%s: starting from %s (%s)", stage, folder, manifest.get("model_version"))

    def _checkpoint(self, stage: str, epoch: int, model, optimizer, scheduler) -> None:
        _save_replacing(
            {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "python_rng": random.getstate(),
                "numpy_rng": np.random.get_state(), "torch_rng": torch.get_rng_state(),
            },
            self.checkpoints / f"{stage}.pt",
        )

    def _batch(self, refs: list[tuple[int, int]], with_lung_mask: bool) -> dict[str, torch.Tensor]:
        images, lungs, lesions = [], [], []
        for case_index, slice_index in refs:
            case = self.cases[case_index]
            image = case.image[slice_index].astype(np.float32)
            lung = case.lung[slice_index] if case.lung is not None else np.ones_like(image, bool)
            lesion = (case.lesion[slice_index] if case.lesion is not None
                      else np.zeros_like(image, bool))
            if random.random() < 0.5:  # left-right flip: lungs are near-symmetric
                image, lung, lesion = image[:, ::-1], lung[:, ::-1], lesion[:, ::-1]
            if with_lung_mask and self.settings.lung_mask_jitter:
                lung = _jitter_lung(lung, self.settings.lung_mask_jitter)
                lesion = lesion & lung  # what the DCN cannot see it cannot be asked to outline
            images.append(image * lung if with_lung_mask else image)
            lungs.append(lung)
            lesions.append(lesion)
        return {
            "image": torch.from_numpy(np.stack(images)[:, None].copy()).to(self.device),
            "lung": torch.from_numpy(np.stack(lungs)[:, None].copy()).to(self.device),
            "lesion": torch.from_numpy(np.stack(lesions)[:, None].copy()).to(self.device),
        }

    def _fit(
        self,
        stage: str,
        model: _Network,
        epochs: int,
        batches: Callable[[], list[Callable[[], dict[str, torch.Tensor]]]],
        before: Callable[[_Network], None] | None = None,
    ) -> _Network:
        """The loop every stage shares: Adam with x``lr_decay`` per epoch, resume from the
        stage's checkpoint, one checkpoint per finished epoch. ``batches`` draws an epoch's
        batches, each a callable computing its losses (the total under ``loss``);
        ``before`` sees the starting (resumed or initial) network once when epochs remain."""
        optimizer, scheduler = self._optimizer(model)
        start = self._resume(stage, model, optimizer, scheduler)
        if start == 0 and self.settings.init_from:
            self._initialize(stage, model)
        if before is not None and start < epochs:
            before(model)
        for epoch in range(start + 1, epochs + 1):
            model.train()
            epoch_batches = list(batches())
            progress = _Progress(stage, epoch, epochs, len(epoch_batches))
            for step, compute in enumerate(epoch_batches):
                losses = compute()
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                progress.step(step, **{k: v.item() for k, v in losses.items()})
            scheduler.step()
            self._checkpoint(stage, epoch, model, optimizer, scheduler)
        return model.eval()

    # -- stage 1: lung U-Net -------------------------------------------------------------

    def train_lung(self) -> UNet:
        settings = self.settings
        model = UNet(1, self.profile.unet_width).to(self.device)
        pool = [(c, s) for c, case in enumerate(self.cases) if case.lung is not None
                for s in range(len(case.image))]
        if not pool:
            raise DcnNodeError("no training case has a lung mask: the lung U-Net and the DCN "
                               "need lung masks (manifest column lung_mask)")
        per_epoch = settings.lung_slices_per_epoch or len(pool)
        lesion_slices = [_slices_with_lesion(case) for case in self.cases]
        with_lesion = {(c, s) for c, s in pool if lesion_slices[c][s]}
        real = {c for c, case in enumerate(self.cases) if case.name.startswith("real-")}

        def step(refs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
            batch = self._batch(refs, False)
            with self._autocast():
                logits = model(batch["image"])
            whole = dice_loss(logits, batch["lung"])
            if not settings.lung_dense_dice_weight:
                return {"loss": whole}
            dense = dense_dice_loss(logits, batch["lung"], batch["image"], DENSE_WINDOWED)
            return {"loss": whole + settings.lung_dense_dice_weight * dense, "whole": whole,
                    "dense": dense}

        def epoch() -> list[Callable[[], dict[str, torch.Tensor]]]:
            chosen = draw_lung_slices(pool, with_lesion, real, per_epoch,
                                      settings.lung_lesion_fraction, settings.lung_real_share)
            return [functools.partial(step, part) for part in _batches(chosen,
                                                                        settings.lung_batch)]

        return self._fit("lung", model, settings.lung_epochs, epoch)

    # -- stage 2: DCN ------------------------------------------------------------------

    def train_dcn(self) -> DCN:
        settings = self.settings
        model = DCN(self.profile).to(self.device)
        positives: list[tuple[int, int]] = []
        negatives: list[tuple[int, int]] = []
        for c, case in enumerate(self.cases):
            if case.lung is None:
                continue
            has_lung = case.lung.reshape(len(case.lung), -1).any(1)
            has_lesion = _slices_with_lesion(case)
            for s in np.flatnonzero(has_lung):
                (positives if has_lesion[s] else negatives).append((c, int(s)))
        LOGGER.info("dcn: %d lesion slices, %d lesion-free lung slices", len(positives),
                    len(negatives))

        annotated = [case.lesion is not None for case in self.cases]
        negative_weight = settings.negative_slice_dice_weight

        negative_index = {ref: i for i, ref in enumerate(negatives)}
        negative_loss = np.ones(len(negatives))  # filled by the scoring pass when mining

        def step(part: list[tuple[tuple[int, int], int]]) -> dict[str, torch.Tensor]:
            batch = self._batch([r for r, _ in part], True)
            label = torch.tensor([lab for _, lab in part], dtype=torch.float32,
                                 device=self.device)
            known = torch.tensor([annotated[c] for (c, _), _ in part], dtype=torch.float32,
                                 device=self.device)
            weight = label + (1 - label) * known * negative_weight
            with self._autocast():
                out = model(batch["image"])
            loss, seg, cls = dcn_loss(out.segmentation, batch["lesion"], out.classification,
                                      label, weight=weight)
            if settings.hard_negative_share:
                each = F.binary_cross_entropy_with_logits(
                    out.classification.detach().float().flatten(), label, reduction="none")
                for (ref, lab), value in zip(part, each.tolist(), strict=True):
                    if lab == 0:
                        negative_loss[negative_index[ref]] = value
            return {"loss": loss, "seg": seg, "cls": cls}

        def epoch() -> list[Callable[[], dict[str, torch.Tensor]]]:
            cap = settings.dcn_positives_per_epoch or len(positives)
            pos = random.sample(positives, min(cap, len(positives)))
            if settings.hard_negative_share:
                rng = np.random.RandomState(np.random.randint(2**31))  # checkpointed state
                picked = draw_negatives(negative_loss, len(pos), settings.hard_negative_share,
                                        rng)
                neg = [negatives[i] for i in picked]
                self._log_hard_negatives(negatives, negative_loss, picked, len(pos))
            else:
                neg = random.sample(negatives, min(len(pos), len(negatives)))  # re-drawn
            chosen = [(r, 1) for r in pos] + [(r, 0) for r in neg]
            random.shuffle(chosen)
            return [functools.partial(step, part) for part in _batches(chosen,
                                                                        settings.dcn_batch)]

        def score_negatives(trained: DCN) -> None:
            negative_loss[:] = self._negative_losses(trained, negatives)

        return self._fit("dcn", model, settings.dcn_epochs, epoch,
                         before=score_negatives if settings.hard_negative_share else None)

    @torch.no_grad()
    def _negative_losses(self, model: DCN, negatives: list[tuple[int, int]]) -> np.ndarray:
        """Classification loss (BCE against label 0) of each lesion-free slice under
        ``model``, lung-masked as in training, no flip or jitter."""
        model.eval()
        losses = np.empty(len(negatives))
        started = time.perf_counter()
        for start in range(0, len(negatives), 32):
            refs = negatives[start:start + 32]
            images = np.stack([self._masked_slice(c, s) for c, s in refs])
            with self._autocast():
                logits = model(torch.from_numpy(images[:, None]).to(self.device)).classification
            losses[start:start + len(refs)] = F.softplus(logits.float().flatten()).cpu().numpy()
        model.train()
        LOGGER.info("dcn: scored %d lesion-free slices for hard negatives in %.0f s "
                    "(mean loss %.3f, share above 0.69 i.e. p > 0.5: %.1f %%)", len(negatives),
                    time.perf_counter() - started, losses.mean(), 100 * (losses > 0.693).mean())
        return losses

    def _masked_slice(self, case_index: int, slice_index: int) -> np.ndarray:
        case = self.cases[case_index]
        image = case.image[slice_index].astype(np.float32)
        return image * case.lung[slice_index] if case.lung is not None else image

    def _log_hard_negatives(self, negatives: list[tuple[int, int]], losses: np.ndarray,
                            picked: np.ndarray, count: int) -> None:
        """Where this epoch's negatives come from, by case kind."""
        kinds: dict[str, int] = {}
        for i in picked:
            kind = _case_kind(self.cases[negatives[i][0]].name)
            kinds[kind] = kinds.get(kind, 0) + 1
        LOGGER.info("dcn: %d negatives (mean loss %.3f; all %.3f): %s", count,
                    losses[picked].mean(), losses.mean(),
                    ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))

    # -- stage 3: slice probability mapping -------------------------------------------

    @torch.no_grad()
    def slice_probabilities(self, lung_model: UNet, dcn: DCN, case: Case) -> torch.Tensor:
        """DCN slice probabilities over the slices the lung U-Net finds lung on."""
        image = torch.from_numpy(case.image.astype(np.float32))
        out = run_lung_then_dcn(lung_model, dcn, image, batch_size=32,
                                prepare=lambda batch: batch.to(self.device),
                                context=self._autocast)
        kept = out.slice_probability[out.lung_slices]
        return kept if len(kept) else torch.zeros(1)

    def _case_slice_probabilities(self, lung_model: UNet, dcn: DCN) -> list[torch.Tensor]:
        """Every case's slice probabilities, kept in ``checkpoints/spm-inputs.pt`` for the
        same networks and cases: running both networks over every case is most of this
        stage's time (~13 min for 100 phantoms on 2 cores), the mapping itself seconds."""
        digest = hashlib.sha256()
        for model in (lung_model, dcn):
            for name, tensor in model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = {"networks": digest.hexdigest(), "cases": [c.name for c in self.cases]}
        path = self.checkpoints / "spm-inputs.pt"
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                LOGGER.info("spm: slice probabilities of %d cases from %s", len(self.cases),
                            path)
                return list(saved["probabilities"])
        probabilities = []
        for number, case in enumerate(self.cases, start=1):
            probabilities.append(self.slice_probabilities(lung_model, dcn, case).cpu())
            if number % 10 == 0 or number == len(self.cases):
                LOGGER.info("spm: slice probabilities of %d/%d training cases", number,
                            len(self.cases))
        _save_replacing({"key": key, "probabilities": probabilities}, path)
        return probabilities

    def train_spm(self, lung_model: UNet, dcn: DCN) -> SliceProbabilityMapping:
        settings = self.settings
        if settings.spm_epochs == 0:  # keep the mapping it starts from (or a fresh one)
            return self._fit("spm", SliceProbabilityMapping().to(self.device), 0, list)
        curves, labels = [], []
        all_probabilities = self._case_slice_probabilities(lung_model, dcn)
        for case, probabilities in zip(self.cases, all_probabilities, strict=True):
            # Also every 2nd and 3rd slice: the same patient at thicker slices, so the
            # mapping sees the slice-count variation it must be robust to (2.4).
            for stride in (1, 2, 3):
                curves.append(resample(probabilities[::stride]))
                labels.append(float(case.label))
        x, y = torch.stack(curves), torch.tensor(labels)
        model = SliceProbabilityMapping().to(self.device)

        def step(index: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = model(x[index].to(self.device))
            return {"loss": F.binary_cross_entropy_with_logits(logits, y[index].to(self.device))}

        def epoch() -> list[Callable[[], dict[str, torch.Tensor]]]:
            order = torch.randperm(len(x))
            return [functools.partial(step, part) for part in _batches(order,
                                                                        settings.spm_batch)]

        return self._fit("spm", model, settings.spm_epochs, epoch)

    # -- all ---------------------------------------------------------------------------

    def run(self) -> Path:
        """Train the three stages (resuming where a previous run stopped) and write the
        weights and their manifest; returns the manifest path."""
        _seed_everything(self.settings.seed)
        torch.backends.cudnn.benchmark = False
        lung = self.train_lung()
        dcn = self.train_dcn()
        spm = self.train_spm(lung, dcn)
        return save_weights(self.out_dir, self.settings, lung, dcn, spm)
