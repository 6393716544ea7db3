"""Preprocessing of section 3.1.2: HU window -900..100 scaled to [0, 1], resizing to the
profile's input size and back, lung masking of the DCN input."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WINDOW_LOW_HU = -900.0
WINDOW_HIGH_HU = 100.0


def window(hu: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """HU -> [0, 1] over the paper's -900..100 HU window (float32)."""
    scale = WINDOW_HIGH_HU - WINDOW_LOW_HU
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - WINDOW_LOW_HU) / scale).clamp(0.0, 1.0)
    return np.clip((hu.astype(np.float32) - WINDOW_LOW_HU) / scale, 0.0, 1.0)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W) images to (.., size, size), area-averaged when shrinking."""
    four_d = images if images.dim() == 4 else images[:, None]
    if four_d.shape[-2:] == (size, size):
        return images
    shrinking = four_d.shape[-1] > size
    out = F.interpolate(
        four_d.float(), size=(size, size), mode="area" if shrinking else "bilinear",
        **({} if shrinking else {"align_corners": False}),
    )
    return out if images.dim() == 4 else out[:, 0]


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean (N, H, W) masks to (N, size, size): a pixel is in when half its area is."""
    return resize_images(masks.float(), size) >= 0.5


def probabilities_to_shape(probabilities: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) probabilities back to the volume's (N, rows, columns), bilinear."""
    if probabilities.shape[-2:] == shape:
        return probabilities
    return F.interpolate(
        probabilities[:, None].float(), size=shape, mode="bilinear", align_corners=False
    )[:, 0]
