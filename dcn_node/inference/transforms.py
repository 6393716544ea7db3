"""Preprocessing of section 3.1.2: HU window -900..100 scaled to [0, 1], resizing to the
profile's input size and back, lung masking of the DCN input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F

WINDOW_LOW_HU = -900.0
WINDOW_HIGH_HU = 100.0


@overload
def window(hu: torch.Tensor) -> torch.Tensor: ...
@overload
def window(hu: np.ndarray) -> np.ndarray: ...
def window(hu: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """HU -> [0, 1] over the paper's -900..100 HU window (float32)."""
    scale = WINDOW_HIGH_HU - WINDOW_LOW_HU
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - WINDOW_LOW_HU) / scale).clamp(0.0, 1.0)
    return np.clip((hu.astype(np.float32) - WINDOW_LOW_HU) / scale, 0.0, 1.0)


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W) images to (.., size, size) or (.., rows, columns),
    area-averaged when shrinking (judged by the columns)."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    four_d = images if images.dim() == 4 else images[:, None]
    if tuple(four_d.shape[-2:]) == shape:
        return images
    shrinking = four_d.shape[-1] > shape[1]
    out = F.interpolate(
        four_d.float(), size=shape, mode="area" if shrinking else "bilinear",
        **({} if shrinking else {"align_corners": False}),
    )
    return out if images.dim() == 4 else out[:, 0]


def resize_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Boolean (N, H, W) masks resized as :func:`resize_images`: a pixel is in when half
    its area is."""
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
class GridGeometry:
    """Where a volume's slices lie on the network's (S, S) grid.

    A slice is resized to ``inner`` = (n_rows, n_columns) pixels and padded, centred, to
    (S, S); n = S unless the field of view is smaller than :data:`MIN_FIELD_OF_VIEW_MM`.
    """

    shape: tuple[int, int]  # the volume's (rows, columns)
    inner: tuple[int, int]  # (n_rows, n_columns)
    size: int

    @classmethod
    def of(cls, shape: tuple[int, int], pixel_spacing_mm: float | None, size: int
           ) -> GridGeometry:
        """The geometry of slices of ``shape``; without a pixel spacing, a plain resize."""
        return cls(shape, _inner_shape(shape, pixel_spacing_mm, size), size)

    @property
    def work_shape(self) -> tuple[int, int]:
        """Where whole-volume mask work is done: the volume's own pixels, shrunk until the
        longer side is at most the network's input size (a quarter of the voxels of a
        512 x 512 series on a 256 grid; a small or cropped image keeps every pixel)."""
        scale = min(1.0, self.size / max(self.shape))
        return (max(1, round(self.shape[0] * scale)), max(1, round(self.shape[1] * scale)))

    def field_of_view_shape(self, side: int) -> tuple[int, int]:
        """The (rows, columns) of a (side, side) network-grid map that cover the volume."""
        scale = side / self.size
        return (max(1, round(self.inner[0] * scale)), max(1, round(self.inner[1] * scale)))

    def _window(self, side: int) -> tuple[slice, slice]:
        rows, columns = self.field_of_view_shape(side)
        top, left = (side - rows) // 2, (side - columns) // 2
        return slice(top, top + rows), slice(left, left + columns)

    def crop_to_field_of_view(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, h, h) network-grid maps (any h) cropped to the part covering the volume."""
        rows, columns = self._window(maps.shape[-1])
        return maps[:, rows, columns].contiguous()

    def to_grid(self, slices: torch.Tensor, *, masks: bool = False) -> torch.Tensor:
        """(N, h, w) slices covering the field of view (any h, w: the volume's own pixels
        or the work grid's), or boolean masks, onto the (N, S, S) network grid."""
        scaled = resize_masks(slices, self.inner) if masks else resize_images(slices, self.inner)
        if self.inner == (self.size, self.size):
            return scaled
        images = torch.zeros((slices.shape[0], self.size, self.size), dtype=scaled.dtype)
        rows, columns = self._window(self.size)
        images[:, rows, columns] = scaled
        return images

    def from_grid(self, maps: torch.Tensor, shape: tuple[int, int] | None = None
                  ) -> torch.Tensor:
        """(N, S, S) network outputs back to (N, *shape) (default: the volume's), bilinear
        when enlarging, area-averaged when shrinking."""
        return resize_images(self.crop_to_field_of_view(maps), shape or self.shape)


@dataclass(frozen=True)
class NetworkGrid(GridGeometry):
    """Slices on the network's (S, S) grid (``images``), and how to map results back."""

    images: torch.Tensor = field(repr=False)


def _inner_shape(shape: tuple[int, int], pixel_spacing_mm: float | None, size: int
                 ) -> tuple[int, int]:
    if pixel_spacing_mm is None:
        return (size, size)
    return tuple(  # type: ignore[return-value]
        max(1, round(size * min(1.0, n * pixel_spacing_mm / MIN_FIELD_OF_VIEW_MM)))
        for n in shape)


def to_network_grid(slices: torch.Tensor, pixel_spacing_mm: float | None, size: int, *,
                    masks: bool = False) -> NetworkGrid:
    """(N, rows, columns) windowed slices (or boolean masks) onto the network grid; without
    a pixel spacing, a plain resize to (size, size)."""
    geometry = GridGeometry.of((int(slices.shape[-2]), int(slices.shape[-1])),
                               pixel_spacing_mm, size)
    return NetworkGrid(geometry.shape, geometry.inner, size,
                       geometry.to_grid(slices, masks=masks))
