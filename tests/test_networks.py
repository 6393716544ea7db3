"""The networks against the paper (sections 2.2-2.4): shapes, LA equations, detachment, SPM."""

from __future__ import annotations

import math

import pytest
import torch

from dcn_node.inference.networks import (
    DCN,
    PROFILES,
    SPM_POINTS,
    LesionAttention,
    ModelProfile,
    SliceProbabilityMapping,
    UNet,
    resample_slice_probabilities,
    top_slab_logit,
)

# Narrow variant for fast tests: every structure, tiny widths.
TINY = ModelProfile("tiny", unet_width=2, resnet_width=2, resnet_blocks=(3, 4, 6, 3),
                    input_size=64)


def test_profiles_follow_the_paper_sizes() -> None:
    paper = PROFILES["paper"]
    assert (paper.unet_width, paper.resnet_width, paper.input_size) == (64, 64, 512)
    assert paper.resnet_blocks == (3, 4, 6, 3)  # ResNet-50
    unet = UNet(1, paper.unet_width)
    assert unet.channels == [64, 128, 256, 512, 1024]
    lite = PROFILES["lite"]
    assert lite.resnet_blocks == (3, 4, 6, 3) and lite.input_size < paper.input_size


def test_unet_structure_four_pools_four_upsamplings() -> None:
    unet = UNet(1, 4)
    assert len(unet.encoder) == 5 and len(unet.up) == 4 and len(unet.decoder) == 4
    block = unet.encoder[0].body
    assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert all(up.kernel_size == (2, 2) and up.stride == (2, 2) for up in unet.up)
    logits, features = unet.forward_features(torch.zeros(2, 1, 64, 64))
    assert logits.shape == (2, 1, 64, 64)
    assert [f.shape[-1] for f in features] == [4, 8, 16, 32, 64]
    assert [f.shape[1] for f in features] == [64, 32, 16, 8, 4]


def test_lesion_attention_implements_equations_1_to_3() -> None:
    torch.manual_seed(0)
    f_c, f_s, f_int = 6, 4, 3
    la = LesionAttention(f_c, f_s, f_int).eval()
    x_c, x_s = torch.randn(2, f_c, 5, 5), torch.randn(2, f_s, 5, 5)
    out, alpha = la(x_c, x_s)
    # Equation 1: 1x1 convs to F_int each, channel concatenation.
    assert la.w_c.kernel_size == (1, 1) and la.w_c.out_channels == f_int
    assert la.w_s.kernel_size == (1, 1) and la.w_s.out_channels == f_int
    x_input = torch.cat([la.w_c(x_c), la.w_s(x_s)], 1)
    # Equation 2: ReLU, 1x1 conv 2F_int -> 1, sigmoid.
    assert la.w_int.in_channels == 2 * f_int and la.w_int.out_channels == 1
    expected_alpha = torch.sigmoid(la.w_int(torch.relu(x_input)))
    torch.testing.assert_close(alpha, expected_alpha)
    assert alpha.shape == (2, 1, 5, 5) and 0 <= alpha.min() and alpha.max() <= 1
    # Equation 3: f3([alpha * x_c, x_s]); f3 = 1x1 (Fc+Fs -> Fc), 1x1 (Fc -> Fc), BN, ReLU.
    names = [type(m).__name__ for m in la.f3]
    assert names == ["Conv2d", "Conv2d", "BatchNorm2d", "ReLU"]
    assert (la.f3[0].in_channels, la.f3[0].out_channels) == (f_c + f_s, f_c)
    assert (la.f3[1].in_channels, la.f3[1].out_channels) == (f_c, f_c)
    torch.testing.assert_close(out, la.f3(torch.cat([expected_alpha * x_c, x_s], 1)))
    assert out.shape == x_c.shape


def test_dcn_returns_classification_segmentation_and_four_attention_maps() -> None:
    model = DCN(TINY).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 1, 64, 64))
    assert out.classification.shape == (3,)
    assert out.segmentation.shape == (3, 1, 64, 64)
    assert len(out.attention) == 4
    assert [a.shape[-1] for a in out.attention] == [16, 16, 8, 4]
    # ResNet-50: stages of 3, 4, 6, 3 bottlenecks, stage outputs 4..32 x width.
    assert [len(stage) for stage in model.stages] == [3, 4, 6, 3]
    assert model.classifier.in_features == 32 * TINY.resnet_width


def test_segmentation_features_enter_detached() -> None:
    model = DCN(TINY)
    out = model(torch.rand(2, 1, 64, 64))
    model.zero_grad()
    out.classification.sum().backward()
    # The classification loss must not reach the segmentation branch...
    assert all(p.grad is None or not p.grad.any() for p in model.segmentation.parameters())
    # ...but does train the classification branch and the LA modules.
    assert model.fusions[0].w_s.weight.grad is not None
    assert model.stages[0][0].body[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    out = model(torch.rand(2, 1, 64, 64))
    out.segmentation.sum().backward()
    assert model.segmentation.encoder[0].body[0].weight.grad.abs().sum() > 0
    assert model.stages[0][0].body[0].weight.grad is None


def test_la_ablation_replaces_la_by_a_1x1_conv() -> None:
    model = DCN(TINY, attention="conv1x1").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 64))
    assert out.attention == []
    assert all(type(f).__name__ == "PlainFusion" for f in model.fusions)
    assert all(f.conv.kernel_size == (1, 1) for f in model.fusions)


@pytest.mark.parametrize("slices", [1, 37, 1000])
def test_spm_resamples_to_100_sorted_values(slices: int) -> None:
    probabilities = torch.rand(slices)
    curve = resample_slice_probabilities(probabilities)
    assert curve.shape == (SPM_POINTS,)
    assert torch.all(curve[:-1] >= curve[1:] - 1e-6)  # descending
    assert curve[0] == pytest.approx(probabilities.max().item())
    assert curve[-1] == pytest.approx(probabilities.min().item())
    spm = SliceProbabilityMapping()
    assert spm(probabilities).shape == (1,)


def test_spm_interpolates_linearly_between_sorted_values() -> None:
    curve = resample_slice_probabilities(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(curve, torch.linspace(1.0, 0.0, SPM_POINTS))


def test_spm_fcn_is_100_256_128_1_and_max_ablation() -> None:
    spm = SliceProbabilityMapping()
    linear = [m for m in spm.fcn if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(100, 256), (256, 128),
                                                                   (128, 1)]
    ablated = SliceProbabilityMapping(mode="max")
    logit = ablated(torch.tensor([0.1, 0.8, 0.3]))
    assert torch.sigmoid(logit).item() == pytest.approx(0.8, abs=1e-5)


def test_slabs_mapping_pools_slices_into_millimetres() -> None:
    # One lesion over 10 mm: 2 slices at 5 mm, 8 at 1.25 mm; the slabs mapping gives both
    # series the same score, where the mean of the 4 highest slices would not.
    thick = torch.full((40,), 0.05)
    thick[20:22] = 0.99
    thin = torch.full((160,), 0.05)
    thin[80:88] = 0.99
    slabs = SliceProbabilityMapping(mode="slabs")
    assert slabs(thick, slice_mm=5.0).item() == pytest.approx(slabs(thin, slice_mm=1.25).item())
    expected = (2 * math.log(0.99 / 0.01) + 2 * math.log(0.05 / 0.95)) / 4  # top 4 slabs
    assert slabs(thick, slice_mm=5.0).item() == pytest.approx(expected, rel=1e-4)
    def top_slices(p: torch.Tensor) -> float:
        top = p.topk(4).values
        return torch.log(top / (1 - top)).mean().item()

    assert top_slices(thin) == pytest.approx(math.log(0.99 / 0.01))
    assert top_slices(thick) == pytest.approx(expected, rel=1e-4)
    # A single confident slice does not decide alone: four slabs are averaged.
    spike = torch.full((40,), 0.05)
    spike[10] = 0.999
    assert slabs(spike, slice_mm=5.0) < slabs(thick, slice_mm=5.0) < math.log(0.99 / 0.01)
    # Fewer slabs than four: the mean of those there are; the slice spacing is required.
    assert slabs(torch.tensor([0.5, 0.5]), slice_mm=5.0).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="slice spacing"):
        slabs(thick)
    with pytest.raises(ValueError, match="slice spacing"):
        top_slab_logit(thick, 0.0)


@pytest.mark.parametrize("name", ["lite", "paper"])
def test_both_profiles_build_and_run(name: str) -> None:
    profile = PROFILES[name]
    model = DCN(profile).eval()
    size = 64  # any multiple of 16 runs; the profile's own size is used by the engine
    with torch.no_grad():
        out = model(torch.rand(1, 1, size, size))
    assert out.segmentation.shape == (1, 1, size, size) and len(out.attention) == 4
    channels = [stage[-1].body[-2].out_channels for stage in model.stages]
    assert channels == [profile.resnet_width * 4 * 2**i for i in range(4)]
