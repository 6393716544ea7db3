"""The three networks of the paper (section 2), with width and input size as parameters.

- :class:`UNet`: lung segmentation (2.2), and the DCN's segmentation branch (2.3.1).
- :class:`DCN`: the dual-branch combination network: U-Net segmentation branch, ResNet-50
  classification branch, a lesion attention module (:class:`LesionAttention`, 2.3.2,
  equations 1-3) before each of the four residual stages.
- :class:`SliceProbabilityMapping`: slice probabilities sorted, resampled to 100 values,
  a three-layer FCN 100 -> 256 -> 128 -> 1 (2.4).

Profiles (:data:`PROFILES`): ``paper`` has the paper's sizes (U-Net 64..1024, ResNet-50
64..2048, 512x512 input); ``lite`` keeps every structure and narrows the widths and the input
so the whole pipeline runs on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Values the slice probability curve is resampled to (section 2.4).
SPM_POINTS = 100
#: The individual-level mappings: the trained FCN (the paper), the largest slice
#: probability (its Table 4 ablation) and ``slabs`` (:func:`top_slab_logit`).
MAPPINGS = ("fcn", "max", "slabs")
#: The ``slabs`` mapping: slice probabilities pooled (largest) into slabs this thick, then
#: the mean logit of the highest TOP_SLABS of them.
SLAB_MM = 5.0
TOP_SLABS = 4


@dataclass(frozen=True)
class ModelProfile:
    """Sizes of the networks. ``unet_width`` is the first encoder block's channels (the
    paper's 64; the five blocks have 1, 2, 4, 8, 16 times it); ``resnet_width`` is the
    ResNet stem's channels (64 in ResNet-50; stage outputs are 4, 8, 16, 32 times it)."""

    name: str
    unet_width: int
    resnet_width: int
    resnet_blocks: tuple[int, int, int, int]
    input_size: int
    #: F_int of the LA modules, as a fraction of the classification channels F_c.
    attention_ratio: float = 0.5


PROFILES: dict[str, ModelProfile] = {
    "paper": ModelProfile("paper", unet_width=64, resnet_width=64, resnet_blocks=(3, 4, 6, 3),
                          input_size=512),
    "lite": ModelProfile("lite", unet_width=8, resnet_width=8, resnet_blocks=(3, 4, 6, 3),
                         input_size=256),
}


class ConvBlock(nn.Module):
    """Conv3x3 - BN - ReLU - Conv3x3, as the paper describes the U-Net blocks (2.3.1)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class UNet(nn.Module):
    """U-Net: five encoder blocks (w, 2w, 4w, 8w, 16w), four 2x2 max-pools, four 2x2
    up-samplings, skip connections by concatenation, a 1x1 conv to one logit per pixel.

    :meth:`forward_features` also returns the bottleneck and decoder features, coarsest
    first (at 1/16, 1/8, 1/4, 1/2 and 1 of the input size), for the DCN's LA modules.
    """

    def __init__(self, in_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        channels = [width * 2**i for i in range(5)]
        self.channels = channels
        self.encoder = nn.ModuleList()
        previous = in_channels
        for count in channels:
            self.encoder.append(ConvBlock(previous, count))
            previous = count
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for count in reversed(channels[:-1]):
            # 2x2 up-sampling (transposed conv) halving the channels, then concat the skip.
            self.up.append(nn.ConvTranspose2d(count * 2, count, 2, stride=2))
            self.decoder.append(ConvBlock(count * 2, count))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for index, block in enumerate(self.encoder):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        features = [x]  # bottleneck, 1/16
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([up(F.relu(x)), skip], dim=1))
            features.append(x)
        return self.head(F.relu(x)), features

    def forward(self, x: Tensor) -> Tensor:
        """Lesion or lung logits, shape (N, 1, H, W)."""
        return self.forward_features(x)[0]


class LesionAttention(nn.Module):
    """Lesion attention, equations 1-3 of the paper.

    x_input = [W_c x_c + b_c, W_s x_s + b_s]             (1)  1x1 convs to F_int, concat
    alpha   = sigmoid(W_int ReLU(x_input) + b_int)       (2)  1x1 conv 2F_int -> 1
    x_out   = f3([alpha * x_c, x_s])                      (3)  f3: 1x1 conv (F_c+F_s -> F_c),
                                                              1x1 conv (F_c -> F_c), BN, ReLU
    """

    def __init__(self, f_c: int, f_s: int, f_int: int) -> None:
        super().__init__()
        self.w_c = nn.Conv2d(f_c, f_int, 1)
        self.w_s = nn.Conv2d(f_s, f_int, 1)
        self.w_int = nn.Conv2d(2 * f_int, 1, 1)
        self.f3 = nn.Sequential(
            nn.Conv2d(f_c + f_s, f_c, 1),
            nn.Conv2d(f_c, f_c, 1, bias=False),
            nn.BatchNorm2d(f_c),
            nn.ReLU(inplace=True),
        )

    def forward(self, x_c: Tensor, x_s: Tensor) -> tuple[Tensor, Tensor]:
        x_input = torch.cat([self.w_c(x_c), self.w_s(x_s)], dim=1)
        alpha = torch.sigmoid(self.w_int(F.relu(x_input)))
        return self.f3(torch.cat([alpha * x_c, x_s], dim=1)), alpha


class PlainFusion(nn.Module):
    """Ablation (Table 4, "without LA"): the LA module replaced by one 1x1 conv."""

    def __init__(self, f_c: int, f_s: int, f_int: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(f_c + f_s, f_c, 1)

    def forward(self, x_c: Tensor, x_s: Tensor) -> tuple[Tensor, None]:
        return self.conv(torch.cat([x_c, x_s], dim=1)), None


class Bottleneck(nn.Module):
    """ResNet-50's residual unit: 1x1 reduce, 3x3, 1x1 expand (x4), identity or projection."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


@dataclass
class DCNOutput:
    """What one DCN forward pass gives, for a batch of N slices."""

    #: Slice-level COVID logits, shape (N,).
    classification: Tensor
    #: Lesion logits, shape (N, 1, H, W).
    segmentation: Tensor
    #: The four LA attention maps alpha (N, 1, h_k, w_k), or empty (LA ablated).
    attention: list[Tensor]


class DCN(nn.Module):
    """Dual-branch combination network (section 2.3).

    The classification branch is ResNet-50 (stem, four stages of 3, 4, 6, 3 bottlenecks);
    before each stage an LA module fuses its input x_c with the segmentation branch's
    features of the same scale x_s: the U-Net decoder at 1/4 for stages 1 and 2 (both run
    at 1/4), at 1/8 for stage 3, the U-Net bottleneck at 1/16 for stage 4. x_s is detached:
    no gradient flows between the branches (2.3.1).
    """

    #: Index into UNet features (coarsest first: 1/16, 1/8, 1/4, 1/2, 1) per ResNet stage.
    _SEGMENTATION_SCALE = (2, 2, 1, 0)

    def __init__(
        self,
        profile: ModelProfile,
        attention: Literal["la", "conv1x1"] = "la",
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.profile = profile
        self.segmentation = UNet(in_channels, profile.unet_width)
        width = profile.resnet_width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        fusion = LesionAttention if attention == "la" else PlainFusion
        unet_channels = list(reversed(self.segmentation.channels))  # coarsest first
        self.fusions = nn.ModuleList()
        self.stages = nn.ModuleList()
        in_c = width
        for index, blocks in enumerate(profile.resnet_blocks):
            f_s = unet_channels[self._SEGMENTATION_SCALE[index]]
            f_int = max(1, round(in_c * profile.attention_ratio))
            self.fusions.append(fusion(in_c, f_s, f_int))
            stage_width = width * 2**index
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(in_c, stage_width, stride if block == 0 else 1))
                in_c = stage_width * Bottleneck.expansion
            self.stages.append(nn.Sequential(*layers))
        self.classifier = nn.Linear(in_c, 1)

    #: Downsampling of each ResNet stage's input (stem /4; stages 2-4 stride 2 each).
    _STAGE_INPUT_STRIDE = (4, 4, 8, 16)

    def attention_sizes(self, input_size: int) -> list[int]:
        """Side length of the four attention maps for a square input of ``input_size``."""
        return [-(-input_size // stride) for stride in self._STAGE_INPUT_STRIDE]

    def forward(self, x: Tensor) -> DCNOutput:
        lesion_logits, features = self.segmentation.forward_features(x)
        c = self.stem(x)
        attention_maps = []
        for index, (fusion, stage) in enumerate(zip(self.fusions, self.stages, strict=True)):
            # Detached: the classification loss does not train the segmentation branch.
            s = features[self._SEGMENTATION_SCALE[index]].detach()
            if s.shape[-2:] != c.shape[-2:]:
                s = F.interpolate(s, size=c.shape[-2:], mode="bilinear", align_corners=False)
            c, alpha = fusion(c, s)
            if alpha is not None:
                attention_maps.append(alpha)
            c = stage(c)
        pooled = torch.flatten(F.adaptive_avg_pool2d(c, 1), 1)
        return DCNOutput(self.classifier(pooled).squeeze(1), lesion_logits, attention_maps)


def resample_slice_probabilities(probabilities: Tensor, points: int = SPM_POINTS) -> Tensor:
    """Sort slice probabilities descending and resample the curve to ``points`` values at
    equal intervals by linear interpolation (section 2.4). Shape (n,) -> (points,);
    a batch (B, n) -> (B, points)."""
    if probabilities.numel() == 0:
        raise ValueError("no slice probabilities to resample")
    curve = torch.sort(probabilities.float(), dim=-1, descending=True).values
    batched = curve.reshape(-1, 1, curve.shape[-1])
    if curve.shape[-1] == 1:
        resampled = batched.expand(-1, 1, points)
    else:
        resampled = F.interpolate(batched, size=points, mode="linear", align_corners=True)
    return resampled.reshape(*curve.shape[:-1], points)


def top_slab_logit(probabilities: Tensor, slice_mm: float, *, slab_mm: float = SLAB_MM,
                   top: int = TOP_SLABS) -> Tensor:
    """The mean logit of the ``top`` highest slabs of ``slab_mm``: each slab holds the
    largest probability of the consecutive slices (n,) in it, from the series' first
    slice on.

    Why not only the paper's curve: it is a share of the series, so a lesion over 10 mm of
    a 300 mm chest is 3 of its 100 points, weighed by the FCN against the other 97, whose
    level moves with noise and normal findings (on the corpus v5 validation phantoms it
    ranks worse than the largest slice probability alone). Why slabs: the highest 4
    *slices* cover 5 mm of the body in a 1.25 mm series and 20 mm in a 5 mm one; the
    highest 4 slabs of 5 mm are 20 mm in any series. The logit keeps 0.999 and 0.9999
    apart; the mean over a few slabs keeps one confident slab from deciding alone, as it
    does for ``max``."""
    if slice_mm <= 0:
        raise ValueError(f"slice spacing {slice_mm} mm: the slabs mapping needs a positive one")
    per_slab = max(1, round(slab_mm / slice_mm))
    p = probabilities.float().flatten().clamp(1e-6, 1 - 1e-6)
    if p.numel() == 0:
        raise ValueError("no slice probabilities to map")
    short = (-p.numel()) % per_slab
    if short:
        p = F.pad(p, (0, short), value=1e-6)
    slabs = p.reshape(-1, per_slab).max(dim=1).values
    highest = slabs.topk(min(top, slabs.numel())).values
    return torch.log(highest / (1 - highest)).mean()


class SliceProbabilityMapping(nn.Module):
    """Individual-level classifier on the resampled slice probability curve (2.4).

    ``mode="fcn"``: three layers 100 -> 256 -> 128 -> 1 (the paper). ``mode="max"``: the
    Table 4 ablation, the largest slice probability (no weights). ``mode="slabs"``:
    :func:`top_slab_logit` of every slice of the series in order (no weights; needs
    ``slice_mm``).
    """

    def __init__(self, mode: Literal["fcn", "max", "slabs"] = "fcn") -> None:
        super().__init__()
        self.mode = mode
        self.fcn = nn.Sequential(
            nn.Linear(SPM_POINTS, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 1),
        )

    def forward(self, slice_probabilities: Tensor, slice_mm: float | None = None) -> Tensor:
        """Individual-level logit(s) from slice probabilities (n,) or a batch of
        already-resampled curves (B, 100); ``slabs`` takes one series' (n,) in slice order
        and its ``slice_mm``."""
        if self.mode == "slabs":
            if slice_mm is None:
                raise ValueError("the slabs mapping needs the slice spacing")
            return top_slab_logit(slice_probabilities, slice_mm)
        if self.mode == "max":
            p = slice_probabilities.max(dim=-1).values.clamp(1e-6, 1 - 1e-6)
            return torch.log(p / (1 - p))
        curve = slice_probabilities
        if curve.dim() == 1:
            curve = resample_slice_probabilities(curve).unsqueeze(0)
        return self.fcn(curve).squeeze(-1)
