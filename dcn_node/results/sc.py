"""Overlay Secondary Captures: what most PACS viewers show when they show no SEG.

One single-frame RGB Secondary Capture per key slice (single-frame SC is the one image type
every PACS viewer displays; multi-frame true colour SC is often shown only frame by frame or
not at all). Each image is the CT slice in a lung window with the lesion outline, the
attention map of one lesion-attention module as a translucent heat map with its colour bar,
orientation letters and burned-in text: the patient-level probability and finding, the slice
position, and "AI result - not for diagnostic use". No patient name is burned in (the
header carries the patient). BurnedInAnnotation is YES; RGB images carry no VOI LUT.

The text sits in a panel *below* the image, clear of the corners: viewers draw their own
overlays over the top of the viewport (OHIF's cine controls, date and series description)
and its bottom corners (window, image number), and text burned in there is hidden. Text is
Pillow's rendering of DejaVu Sans (``font``); the heat map colours are matplotlib's
perceptually uniform ``inferno`` map.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from dcn_node.config import ResultsSettings, ScResultSettings
from dcn_node.results import common
from dcn_node.results.font import draw_text, glyphs, pick_size
from dcn_node.volume import Volume

if TYPE_CHECKING:
    from dcn_node.inference.engine import AnalysisResult

LOGGER = logging.getLogger(__name__)

OUTLINE_RGB = (0, 255, 70)
WARNING_RGB = (255, 210, 0)
TEXT_RGB = (235, 235, 235)
POSITIVE_RGB = (255, 120, 60)
NEGATIVE_RGB = (120, 220, 120)
#: Attention below this fraction of the scale is not tinted; above, opacity ramps up.
HEAT_FLOOR = 0.15

#: The heat map's colour map (dark violet through red and orange to pale yellow).
HEAT_COLORMAP = "inferno"


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB float32 in [0, 255]."""
    colormap = matplotlib.colormaps[HEAT_COLORMAP]
    return (colormap(np.clip(values, 0, 1))[..., :3] * 255).astype(np.float32)


def attention_map(result: AnalysisResult, module: int) -> np.ndarray | None:
    """The (slices, h, w) attention map of LA module ``module`` (1-based), or None."""
    if not 1 <= module <= len(result.attention):
        return None
    return result.attention[module - 1]


def heat_map(result: AnalysisResult, settings: ScResultSettings,
             index: int | slice | None = None) -> np.ndarray | None:
    """The configured heat map (slices, h, w) float32, zero outside the lungs, or None;
    with ``index``, of that slice only (1, h, w), or of those slices.

    The lung mask is brought to the map's resolution (a map pixel counts as lung when any
    of its area is), so nothing outside the lungs is ever tinted.
    """
    if settings.heatmap == "lesion_probability":
        values = result.lesion_probability
    else:
        values = attention_map(result, settings.attention_module)
    if values is None:
        return None
    import torch
    import torch.nn.functional as F

    rows = slice(index, index + 1) if isinstance(index, int) else index or slice(None)
    values, lung_mask = values[rows], result.lung[rows]
    shown = np.empty(values.shape, np.float32)
    for start in range(0, len(values), 16):  # a float copy of the lung mask, 16 slices at a time
        lung = torch.from_numpy(lung_mask[start:start + 16])[:, None].float()
        inside = F.adaptive_max_pool2d(lung, values.shape[1:])[:, 0].numpy() > 0 \
            if values.shape[1] <= lung.shape[2] else \
            F.interpolate(lung, size=values.shape[1:], mode="nearest")[:, 0].numpy() > 0
        shown[start:start + 16] = values[start:start + 16] * inside
    return shown


def _strongest_heat_slice(result: AnalysisResult, settings: ScResultSettings) -> int | None:
    """The slice with the strongest heat-map peak (the larger total breaks ties), None when
    the map is empty; the map is made 32 slices at a time, never whole."""
    slices = result.lung.shape[0]
    peaks, totals = np.zeros(slices), np.zeros(slices)
    for start in range(0, slices, 32):
        part = heat_map(result, settings, slice(start, start + 32))
        if part is None:
            return None
        flat = part.reshape(len(part), -1)
        peaks[start:start + len(part)] = flat.max(axis=1, initial=0.0)
        totals[start:start + len(part)] = flat.sum(axis=1)
    if not peaks.max(initial=0.0) > 0:
        return None
    return int(np.lexsort((totals, peaks))[-1])


def heat_legend(settings: ScResultSettings) -> str:
    if settings.heatmap == "lesion_probability":
        return "heat map: lesion probability, in the lungs"
    return f"heat map: attention of LA module {settings.attention_module}, in the lungs"


def key_slices(result: AnalysisResult, settings: ScResultSettings,
               slice_offsets: np.ndarray | None = None) -> list[int]:
    """The slices shown: largest lesion areas first, then the strongest attention.

    Lesion slices closer than ``settings.min_slice_distance_mm`` (along the normal, from
    ``slice_offsets``) to one already chosen are passed over, so neighbours showing the same
    lesion do not take every place. With no lesion and no attention, the slice with the most
    lung (a negative result still gets one overlay).
    """
    slices = result.lesion.shape[0]
    offsets = np.arange(slices, dtype=float) if slice_offsets is None \
        else np.asarray(slice_offsets, dtype=float)
    areas = result.lesion.reshape(slices, -1).sum(axis=1)
    strongest = _strongest_heat_slice(result, settings) \
        if settings.strongest_attention_slice else None
    want_attention = strongest is not None
    lesion_budget = min(settings.largest_lesion_slices,
                        settings.max_images - (1 if want_attention else 0))
    chosen: list[int] = []
    for k in np.argsort(-areas, kind="stable"):
        if len(chosen) >= lesion_budget or areas[k] == 0:
            break
        if all(abs(offsets[k] - offsets[j]) >= settings.min_slice_distance_mm for j in chosen):
            chosen.append(int(k))
    if strongest is not None and strongest not in chosen:
        chosen.append(strongest)
    if not chosen:
        chosen = [int(np.argmax(result.lung.reshape(slices, -1).sum(axis=1)))]
    return chosen[:settings.max_images]


def _resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling with pixel centres aligned (area-consistent, any factor)."""
    rows = (np.arange(shape[0]) + 0.5) * image.shape[0] / shape[0] - 0.5
    cols = (np.arange(shape[1]) + 0.5) * image.shape[1] / shape[1] - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(image.astype(np.float32), grid, order=1, mode="nearest")


def _slice_label(volume: Volume, index: int) -> str:
    """Where the slice is: the source image number and z (or position along the normal)."""
    ds = volume.source_datasets[index]
    number = ds.get("InstanceNumber")
    frame = volume.frame_numbers[index]
    iop = ds.get("ImageOrientationPatient")
    offset = float(volume.slice_offsets[index])
    where = f"position {offset:.1f} mm"
    if iop is not None:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        if abs(normal[2]) > 0.9:
            where = f"z {offset * np.sign(normal[2]):.1f} mm"
    image = f"image {number}" if number is not None else "image"
    if len(set(volume.sop_instance_uids)) < len(volume.sop_instance_uids):
        image += f" frame {frame}"
    return f"Slice {index + 1}/{len(volume.sop_instance_uids)} ({image}, {where})"


@dataclass(frozen=True)
class OverlayLayout:
    """Where things sit in an overlay: the CT image in ``canvas[:height, :width]``, each CT
    pixel drawn as ``scale`` x ``scale`` pixels; the colour bar right of it (``panel`` wide);
    below, text lines of ``line`` pixels from ``text_top``, the heat-map legend on line 3;
    then a blank margin, where viewers put their corner overlays."""

    scale: int
    height: int
    width: int
    panel: int
    size: int
    line: int
    text_top: int
    canvas_height: int

    def text_y(self, line_number: int) -> int:
        return self.text_top + line_number * self.line

    @property
    def legend_rows(self) -> tuple[int, int]:
        return self.text_y(3), self.text_y(4)


#: Text lines below the image, then blank lines under them for the viewer's overlays.
TEXT_LINES, BLANK_LINES = 6, 2


def overlay_layout(volume: Volume, settings: ResultsSettings) -> OverlayLayout:
    rows, columns = volume.hu.shape[1:]
    scale = max(1, math.ceil(settings.sc.min_image_size / max(rows, columns)))
    height, width = rows * scale, columns * scale
    size = pick_size(width)
    line = glyphs(size).height + max(2, size // 5)
    text_top = height + line // 2
    return OverlayLayout(scale=scale, height=height, width=width, panel=6 * size, size=size,
                         line=line, text_top=text_top,
                         canvas_height=text_top + (TEXT_LINES + BLANK_LINES) * line)


def _fit(text: str, size: int, room: int, *, bold: bool = False) -> str:
    """``text`` shortened with an ellipsis to fit ``room`` pixels."""
    while glyphs(size, bold).width(text) > room and len(text) > 8:
        text = text[:-5].rstrip() + "..."
    return text


def render_overlay(volume: Volume, result: AnalysisResult, index: int,
                   settings: ResultsSettings) -> np.ndarray:
    """The RGB uint8 overlay of slice ``index``: image, colour bar, text panel below."""
    sc = settings.sc
    layout = overlay_layout(volume, settings)
    scale, height, width, size = layout.scale, layout.height, layout.width, layout.size
    canvas = np.zeros((layout.canvas_height, width + layout.panel, 3), np.uint8)
    margin = layout.line // 2
    room = canvas.shape[1] - 2 * margin

    # The CT in the lung window.
    low = sc.window_center - sc.window_width / 2
    gray = np.clip((volume.hu[index] - low) / sc.window_width, 0, 1)
    gray = _resample(gray, (height, width)) * 255
    image = np.repeat(gray[:, :, None], 3, axis=2)

    # The heat map, translucent, only inside the lungs, transparent where it is weak.
    attention = heat_map(result, sc, index)
    shows_heat = attention is not None and sc.heatmap_opacity > 0
    top = 1.0
    if shows_heat and attention is not None:
        lung = np.repeat(np.repeat(result.lung[index], scale, axis=0), scale, axis=1)
        values = _resample(attention[0], (height, width)) * lung
        if sc.heatmap == "attention":  # relative: scaled to its maximum inside the lungs
            top = max(float(values.max(initial=0.0)), 1e-6)
        values = np.clip(values / top, 0, 1)
        alpha = sc.heatmap_opacity * np.clip((values - HEAT_FLOOR) / (0.6 - HEAT_FLOOR), 0, 1)
        image = image * (1 - alpha[..., None]) + heat_colors(values) * alpha[..., None]

    # The lesion outline, drawn just outside the lesion so its pixels stay visible.
    lesion = np.repeat(np.repeat(result.lesion[index], scale, axis=0), scale, axis=1)
    if lesion.any():
        thickness = max(2, round(width / 300))
        outline = ndimage.binary_dilation(lesion, iterations=thickness) & ~lesion
        image[outline] = OUTLINE_RGB
    canvas[:height, :width] = np.rint(image).astype(np.uint8)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)  # all text and the colour bar: one pass of Pillow's

    # Orientation letters on the left and bottom edges (the top is under viewer controls).
    row_dir, col_dir = common.patient_orientation(volume)
    opposite = str.maketrans("LRAPHF", "RLPAFH")
    left = row_dir.translate(opposite)
    draw_text(draw, 6, height // 2 - layout.line // 2, left, TEXT_RGB, size=size,
              bold=True, shadow=True)
    draw_text(draw, width // 2 - size // 2, height - layout.line - 2, col_dir, TEXT_RGB,
              size=size, bold=True, shadow=True)

    # Text panel: the patient-level result, the lesions, the slice, the legend, the warning.
    threshold = common.decision_threshold(settings, result)
    if result.assessable:
        positive = result.probability >= threshold
        x = margin + draw_text(draw, margin, layout.text_y(0),
                               f"COVID-19 probability {result.probability:.2f} - ", TEXT_RGB,
                               size=size, bold=True)
        draw_text(draw, x, layout.text_y(0),
                  f"{'POSITIVE' if positive else 'negative'} at threshold {threshold:.2f}",
                  POSITIVE_RGB if positive else NEGATIVE_RGB, size=size, bold=True)
    else:  # the quality gate's reason instead of a probability
        reason = result.quality.reason.value.replace("_", " ")  # type: ignore[union-attr]
        draw_text(draw, margin, layout.text_y(0), f"NOT ASSESSABLE: {reason}", WARNING_RGB,
                  size=size, bold=True)
    numbers = common.measurements(volume, result)  # the SR's numbers
    second = (f"Lesions {numbers['lesion_ml']:.1f} ml = {numbers['involvement_percent']:.1f} % "
              f"of the lungs ({numbers['lung_ml']:.0f} ml), on "
              f"{numbers['slices_with_lesions']} slices")
    if not result.assessable:
        second = result.quality.detail  # type: ignore[union-attr]
    draw_text(draw, margin, layout.text_y(1), _fit(second, size, room),
              WARNING_RGB if not result.assessable else TEXT_RGB, size=size)
    area_cm2 = float(result.lesion[index].sum()) * volume.pixel_spacing[0] \
        * volume.pixel_spacing[1] / 100.0
    detail = f"{_slice_label(volume, index)}: lesion {area_cm2:.1f} cm2"
    if result.lesions_withheld:  # no lesion area or slice probability to stand beside it
        detail = _slice_label(volume, index)
    elif len(result.slice_probabilities) > index:
        longer = f"{detail}, slice prob. {float(result.slice_probabilities[index]):.2f}"
        if glyphs(size).width(longer) <= room:
            detail = longer
    draw_text(draw, margin, layout.text_y(2), _fit(detail, size, room), TEXT_RGB, size=size)
    if result.lesions_withheld:  # quality_gate.report_lesions_when_not_assessable off
        draw_text(draw, margin, layout.text_y(3),
                  _fit("no lesion outline or heat map: series not assessable", size, room),
                  TEXT_RGB, size=size)
    else:
        x = margin + draw_text(draw, margin, layout.text_y(3), "outline: lesion", OUTLINE_RGB,
                               size=size)
        if shows_heat:
            draw_text(draw, x, layout.text_y(3), "   " + heat_legend(sc), TEXT_RGB, size=size)
    # The model version on a line of its own: it names the weights, and beside the warning
    # it was cut short on a 512-pixel image.
    draw_text(draw, margin, layout.text_y(4), _fit(f"model {result.model_version}", size, room),
              TEXT_RGB, size=size)
    draw_text(draw, margin, layout.text_y(5),
              _fit(common.NOT_FOR_DIAGNOSIS.upper(), size, room, bold=True), WARNING_RGB,
              size=size, bold=True)

    # Colour bar, right of the image.
    if shows_heat:
        _colour_bar(picture, draw, width, height, layout.panel, size, top,
                    "prob." if sc.heatmap == "lesion_probability" else "attn.")
    return np.asarray(picture)


def _colour_bar(picture: Image.Image, draw: ImageDraw.ImageDraw, x0: int, height: int,
                panel: int, size: int, top: float, label: str) -> None:
    bar_height = int(height * 0.6)
    bar_top = (height - bar_height) // 2
    bar_left, bar_width = x0 + panel // 6, max(8, panel // 5)
    values = np.linspace(1, 0, bar_height)[:, None]
    colors = heat_colors(np.repeat(values, bar_width, axis=1))
    picture.paste(Image.fromarray(np.rint(colors).astype(np.uint8)), (bar_left, bar_top))
    text_x = bar_left + bar_width + 4
    line = glyphs(size).height
    for fraction in (1.0, 0.5, HEAT_FLOOR, 0.0):
        y = bar_top + int((1 - fraction) * (bar_height - 1))
        draw.line([(bar_left + bar_width, y), (bar_left + bar_width + 2, y)], fill=TEXT_RGB)
        draw_text(draw, text_x, y - line // 2, f"{fraction * top:.2g}", TEXT_RGB, size=size)
    draw_text(draw, bar_left - 2, bar_top - line - 6, label, TEXT_RGB, size=size)


def build_overlays(volume: Volume, result: AnalysisResult, settings: ResultsSettings,
                   indices: list[int]) -> list[hd.sc.SCImage]:
    """One RGB Secondary Capture per key slice (``indices``, from :func:`key_slices`,
    head first), in the source study, as one new series."""
    version = result.model_version
    header = common.source_header(volume)
    series_uid = common.result_uid(settings, volume, version, "sc-series")
    orientation = common.patient_orientation(volume)
    images = []
    for number, index in enumerate(indices, start=1):
        source_uid = volume.sop_instance_uids[index]
        frame = volume.frame_numbers[index]
        pixels = render_overlay(volume, result, index, settings)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=settings.sc.series_number,
            sop_instance_uid=common.result_uid(settings, volume, version, "sc", number),
            instance_number=number,
            manufacturer=settings.manufacturer,
            patient_orientation=orientation,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=common.contributing_equipment(settings, version),
            series_description=settings.sc.series_description,
            coding_schemes=common.coding_schemes(),
            **common.equipment_kwargs(settings, version, volume),  # type: ignore[arg-type]
        )
        image.ConversionType = "WSD"  # made on a workstation, not digitised
        image.BurnedInAnnotation = "YES"
        # An unpaired body part: no Laterality needed (dciodvfy checks the condition).
        image.BodyPartExamined = "CHEST"
        image.ImageComments = common.NOT_FOR_DIAGNOSIS
        image.DerivationDescription = (
            f"CT slice in lung window with AI lesion outline and {settings.sc.heatmap} "
            "heat map inside the lungs")
        reference = Dataset()
        reference.ReferencedSOPClassUID = volume.source_datasets[index].SOPClassUID
        reference.ReferencedSOPInstanceUID = source_uid
        if len(set(volume.sop_instance_uids)) < len(volume.sop_instance_uids):
            reference.ReferencedFrameNumber = frame
        image.SourceImageSequence = [reference]
        common.finish(image, settings, volume)
        images.append(image)
    LOGGER.info("%d overlay SC(s) for series %s (slices %s)", len(images),
                volume.series_instance_uid, indices)
    return images
