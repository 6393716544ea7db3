"""Burned-in text for the overlay images: Pillow's FreeType rendering of DejaVu Sans.

The TrueType files are the ones matplotlib ships (``mpl-data/fonts/ttf``), found through
matplotlib's font manager, so no system font package is needed. DejaVu fonts are free to use
and redistribute (Bitstream Vera licence plus public-domain changes). Any Unicode text the
font covers is drawn (patient-facing text is never burned in; this is for numbers and
labels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from matplotlib import font_manager
from PIL import ImageDraw, ImageFont


@dataclass(frozen=True)
class Glyphs:
    """One font at one pixel size: its line height and text widths."""

    font: ImageFont.FreeTypeFont
    height: int

    def width(self, text: str) -> int:
        return int(np.ceil(self.font.getlength(text)))


@functools.cache
def glyphs(size: int, bold: bool = False) -> Glyphs:
    """DejaVu Sans (Bold) at ``size`` pixels."""
    path = font_manager.findfont(font_manager.FontProperties(
        family="DejaVu Sans", weight="bold" if bold else "normal"), fallback_to_default=False)
    font = ImageFont.truetype(path, size)
    ascent, descent = font.getmetrics()
    return Glyphs(font, ascent + descent)


def pick_size(canvas_width: int) -> int:
    """The text size that reads well on a canvas this wide (about 1/32 of the width)."""
    return max(12, round(canvas_width / 32))


def draw_text(
    draw: ImageDraw.ImageDraw,
    x: int,
    y: int,
    text: str,
    color: tuple[int, int, int],
    *,
    size: int = 16,
    bold: bool = False,
    shadow: bool = False,
) -> int:
    """Draw ``text`` with its top-left corner at (x, y); what falls outside is clipped.
    ``shadow`` draws a dark halo first, for text over an image. Returns the width of the
    text in pixels."""
    font = glyphs(size, bold)
    halo = max(1, size // 12) if shadow else 0
    draw.text((x, y), text, fill=tuple(color), font=font.font, stroke_width=halo,
              stroke_fill=(0, 0, 0))
    return font.width(text)
