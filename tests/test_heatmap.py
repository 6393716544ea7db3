"""The SC heat map means something: it is drawn only inside the lungs.

The overlay is rendered twice, with the heat map and with its opacity at 0; the pixels that
differ are the heat map's visible pixels. At least 80 % of them (in fact all, by
construction) must lie inside the phantom's true lungs, for both heat-map kinds.
"""

from __future__ import annotations

import numpy as np
import pytest

from dcn_node.config import ResultsSettings
from dcn_node.inference.engine import Engine
from dcn_node.results.sc import key_slices, overlay_layout, render_overlay
from dcn_node.volume import load_dicom_folder
from dcn_train.phantom import generate_phantom


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    folder = tmp_path_factory.mktemp("heat")
    case = generate_phantom(folder, 41, thickness_mm=5.0, matrix=256)
    volume = load_dicom_folder(case.series_dir)
    truth = np.load(case.ground_truth_path)
    result = Engine(device="cpu").analyze(volume)
    return volume, result, truth


@pytest.mark.parametrize("kind", ["lesion_probability", "attention"])
def test_heat_map_pixels_lie_inside_the_lungs(analysed, kind: str) -> None:  # noqa: ANN001
    volume, result, truth = analysed
    on = ResultsSettings.model_validate({"sc": {"heatmap": kind, "heatmap_opacity": 0.6}})
    off = ResultsSettings.model_validate({"sc": {"heatmap": kind, "heatmap_opacity": 0.0}})
    visible, inside = 0, 0
    layout = overlay_layout(volume, on)
    for index in key_slices(result, on.sc, volume.slice_offsets):
        with_heat = render_overlay(volume, result, index, on).astype(int)
        without = render_overlay(volume, result, index, off).astype(int)
        differs = np.abs(with_heat - without).sum(axis=2) > 6
        image = differs[:layout.height, :layout.width]
        # Outside the image part only the colour bar and the legend line may differ.
        legend_top, legend_bottom = layout.legend_rows
        assert not differs[layout.height:legend_top].any()
        assert not differs[legend_bottom:].any()
        lung = np.repeat(np.repeat(truth["lung"][index], layout.scale, 0), layout.scale, 1)
        visible += int(image.sum())
        inside += int((image & lung).sum())
    assert visible > 0, "the heat map shows nothing on the key slices"
    assert inside / visible >= 0.8, f"{inside / visible:.1%} of the heat map inside the lungs"
