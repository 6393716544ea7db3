"""Preprocessing of section 3.1.2: HU window -900..100 scaled to [0, 1], resizing to the
profile's input size and back, lung masking of the DCN input."""

from __future__ import annotations

from dataclasses import dataclass

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


#: The network never sees a field of view smaller than this (mm): a series reconstructed on
#: a small field (a cropped or targeted reconstruction) is padded with air to it, so lungs
#: and lesions keep the size in pixels the networks learned, instead of being magnified.
MIN_FIELD_OF_VIEW_MM = 340.0


@dataclass(frozen=True)
class NetworkGrid:
    """Slices on the network's (S, S) grid, and how to map results back.

    ``images`` holds the slices resized to (n_rows, n_columns) pixels and padded, centred,
    to (S, S); n = S unless the field of view is smaller than :data:`MIN_FIELD_OF_VIEW_MM`.
    """

    images: torch.Tensor
    shape: tuple[int, int]  # the volume's (rows, columns)
    inner: tuple[int, int]  # (n_rows, n_columns)
    size: int

    def _window(self, side: int) -> tuple[slice, slice]:
        scale = side / self.size
        rows, columns = (max(1, round(n * scale)) for n in self.inner)
        top, left = (side - rows) // 2, (side - columns) // 2
        return slice(top, top + rows), slice(left, left + columns)

    def attention_to_volume(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """(N, h, h) maps cropped to the part that covers the volume's field of view."""
        out = []
        for alpha in maps:
            rows, columns = self._window(alpha.shape[-1])
            out.append(alpha[:, rows, columns].contiguous())
        return out


def _inner_shape(shape: tuple[int, int], pixel_spacing_mm: float, size: int
                 ) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        max(1, round(size * min(1.0, n * pixel_spacing_mm / MIN_FIELD_OF_VIEW_MM)))
        for n in shape)


def to_network_grid(slices: torch.Tensor, pixel_spacing_mm: float, size: int, *,
                    masks: bool = False) -> NetworkGrid:
    """(N, rows, columns) windowed slices (or boolean masks) onto the network grid."""
    shape = (int(slices.shape[-2]), int(slices.shape[-1]))
    inner = _inner_shape(shape, pixel_spacing_mm, size)
    if inner == (size, size):
        images = resize_masks(slices, size) if masks else resize_images(slices, size)
        return NetworkGrid(images, shape, inner, size)
    four_d = slices[:, None].float()
    shrinking = inner[0] < shape[0] or inner[1] < shape[1]
    scaled = F.interpolate(four_d, size=inner, mode="area" if shrinking else "bilinear",
                           **({} if shrinking else {"align_corners": False}))[:, 0]
    if masks:
        scaled = scaled >= 0.5
    images = torch.zeros((slices.shape[0], size, size), dtype=scaled.dtype)
    grid = NetworkGrid(images, shape, inner, size)
    rows, columns = grid._window(size)
    images[:, rows, columns] = scaled
    return grid


def from_network_grid(probabilities: torch.Tensor, grid: NetworkGrid) -> torch.Tensor:
    """(N, S, S) network outputs back to the volume's (N, rows, columns), bilinear."""
    rows, columns = grid._window(probabilities.shape[-1])
    return probabilities_to_shape(probabilities[:, rows, columns].contiguous(), grid.shape)
