"""Losses of section 2.5."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTH = 1.0  # s in equation 5


def dice_loss_per_slice(logits: Tensor, target: Tensor) -> Tensor:
    """1 - (sum p g + s) / (sum p + sum g + s) per slice (equation 5 as printed), shape (N,).

    Equation 5's middle form has 2|X n Y|; its right-hand form drops the 2. We use the
    factor 2 so that a perfect prediction gives a loss of ~0, as the DSC definition intends.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    return 1 - (2 * (p * g).sum(1) + SMOOTH) / (p.sum(1) + g.sum(1) + SMOOTH)


def dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean slice Dice loss (lung U-Net)."""
    return dice_loss_per_slice(logits, target).mean()


def dense_dice_loss(logits: Tensor, target: Tensor, image: Tensor, dense_from: float
                    ) -> Tensor:
    """The lung Dice over the dense pixels alone (windowed value >= ``dense_from``), for the
    slices that have dense lung: consolidation and vessels are lung, chest wall, heart and
    muscle are not, and over the whole slice that choice is a few per cent of the Dice,
    drowned by the aerated lung the U-Net already gets right."""
    dense = (image >= dense_from).float()
    p = (torch.sigmoid(logits.float()) * dense).flatten(1)
    g = (target.float() * dense).flatten(1)
    per_slice = 1 - (2 * (p * g).sum(1) + SMOOTH) / (p.sum(1) + g.sum(1) + SMOOTH)
    has_dense_lung = g.sum(1) > 0
    if not has_dense_lung.any():
        return per_slice.sum() * 0.0
    return per_slice[has_dense_lung].mean()


def dcn_loss(
    segmentation_logits: Tensor,
    lesion: Tensor,
    classification_logits: Tensor,
    slice_label: Tensor,
    weight: Tensor,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Equation 8: w * L_Dice + lambda * L_cls. ``weight`` is w of equation 7 per slice
    (1 for slices with annotated lesions, else 0). Returns (total, seg, cls)."""
    dice = dice_loss_per_slice(segmentation_logits, lesion)
    seg = (weight * dice).sum() / weight.sum().clamp(min=1.0)
    cls = F.binary_cross_entropy_with_logits(classification_logits.float(), slice_label.float())
    return seg + lam * cls, seg, cls
