"""Layers: guaranteed bounds hold and are tight; fused models are frozen and exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from certseg.certify.operator_norm import conv_norm_bound, polyphase_kernel
from certseg.models import create_model
from certseg.nn import (
    AveragedResidual,
    BatchCentering2d,
    InputNormalization,
    InvertibleDownsample,
    InvertibleUpsample,
    LipSequential,
    MaxMin,
    OrthoConv2d,
    OrthoConvTranspose2d,
    OrthoLinear,
    ParallelConcat,
    PositionalBias,
    certified_lipschitz,
    fuse_module,
    structural_lipschitz,
)
from certseg.nn.estimate import jacobian_norm_estimate, linear_norm_estimate

# (layer factory, input shape with the real padding and image sizes)
LAYERS = {
    "conv3x3": (lambda: OrthoConv2d(8, 8, 3), (1, 8, 24, 24)),
    "conv3x3-expand": (lambda: OrthoConv2d(3, 16, 3), (1, 3, 24, 24)),
    "conv3x3-shrink": (lambda: OrthoConv2d(16, 6, 3), (1, 16, 24, 24)),
    "conv5x5": (lambda: OrthoConv2d(6, 6, 5), (1, 6, 24, 24)),
    "conv3x3-dilated6": (lambda: OrthoConv2d(8, 8, 3, dilation=6), (1, 8, 40, 40)),
    "conv1x1": (lambda: OrthoConv2d(12, 5, 1), (1, 12, 9, 11)),
    "stride2-k3": (lambda: OrthoConv2d(8, 16, 3, stride=2), (1, 8, 24, 24)),
    "stride2-k3-square": (lambda: OrthoConv2d(4, 16, 3, stride=2), (1, 4, 24, 24)),
    "stride2-k2": (lambda: OrthoConv2d(8, 16, 2, stride=2), (1, 8, 24, 24)),
    "transpose-k2s2": (lambda: OrthoConvTranspose2d(16, 8, 2, stride=2), (1, 16, 12, 12)),
    "transpose-k4s2": (lambda: OrthoConvTranspose2d(16, 8, 4, stride=2), (1, 16, 12, 12)),
    "klip-scaled": (lambda: OrthoConv2d(8, 8, 3, scale=math.sqrt(2)), (1, 8, 24, 24)),
}


@pytest.fixture(params=sorted(LAYERS))
def layer_case(request):
    torch.manual_seed(sorted(LAYERS).index(request.param))
    make, shape = LAYERS[request.param]
    return make(), shape


def test_guaranteed_bound_holds_and_is_tight(layer_case):
    layer, shape = layer_case
    fused = fuse_module(layer).double()
    estimate = linear_norm_estimate(fused, shape, steps=100)
    bound = certified_lipschitz(fused)
    assert estimate <= bound
    assert bound - estimate <= 1e-3 * layer.scale
    assert structural_lipschitz(fused) == pytest.approx(bound, rel=1e-3)
    # The parametrized (float32) weights are audited too and agree.
    assert certified_lipschitz(layer) == pytest.approx(bound, rel=1e-4)


def test_fused_output_matches_parametrized(layer_case):
    layer, shape = layer_case
    x = torch.rand(shape)
    fused = fuse_module(layer)
    assert torch.allclose(fused(x), layer(x), atol=1e-5)


def test_orthogonal_linear():
    torch.manual_seed(0)
    for fin, fout in [(10, 4), (4, 10), (7, 7)]:
        layer = OrthoLinear(fin, fout)
        fused = fuse_module(layer).double()
        est = linear_norm_estimate(fused, (1, fin), steps=100)
        assert est <= certified_lipschitz(fused) <= est + 1e-6


def test_parametrized_weights_do_not_drift():
    torch.manual_seed(0)
    layer = OrthoConv2d(8, 8, 3)
    w1 = layer.weight.detach().clone()
    layer.train()
    w2 = layer.weight.detach().clone()
    layer.eval()
    with torch.no_grad():
        w3 = layer.weight.clone()
    assert torch.equal(w1, w2) and torch.equal(w1, w3)


def test_tiny_network_bound_and_frozen_fused_model():
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=4)
    model.train()
    model(torch.rand(4, 3, 16, 16))  # move the running means off zero
    model.eval()
    fused = fuse_module(model)
    x = torch.rand(3, 3, 32, 32)
    y1 = fused(x)
    fused.train()
    y2 = fused(x)
    fused.eval()
    assert torch.equal(y1, y2), "a fused model must not change between train and eval"
    assert torch.equal(y1, fused(x)), "a fused model must not change between calls"
    assert torch.allclose(y1, model(x), atol=1e-5)

    bound = certified_lipschitz(fused)
    assert bound == pytest.approx(structural_lipschitz(model), rel=1e-3)
    f64 = fused.double()
    for i in range(3):
        est = jacobian_norm_estimate(f64, x[i : i + 1].double(), steps=100, seed=i)
        assert est <= bound
    # Empirical pairs never beat the bound either.
    a, b = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.rand(8, 3, 32, 32).double()
    b = a + 1e-2 * (b - a)
    ratio = (f64(a) - f64(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= bound


def test_centering_keeps_shapes_and_loads_back():
    layer = BatchCentering2d(6)
    layer.train()
    x = torch.randn(4, 6, 5, 5) + torch.arange(6.0).view(1, -1, 1, 1)
    out = layer(x)
    assert layer.running_mean.shape == (6,)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-5)
    clone = BatchCentering2d(6)
    clone.load_state_dict(layer.state_dict())
    clone.eval()
    layer.eval()
    assert torch.equal(clone(x), layer(x))
    assert torch.allclose(layer(x), x - layer.running_mean.view(1, -1, 1, 1))
    assert torch.allclose(fuse_module(layer)(x), layer(x))


def test_maxmin_is_a_pairwise_sort():
    x = torch.tensor([[[[1.0]], [[-2.0]], [[3.0]], [[5.0]]]])
    y = MaxMin()(x)
    assert y.flatten().tolist() == [3.0, 5.0, 1.0, -2.0]
    with pytest.raises(ValueError):
        MaxMin()(torch.zeros(1, 3, 2, 2))


def test_normalization_counts_its_factor():
    norm = InputNormalization((0.5, 0.4, 0.3), (0.2, 0.1, 0.4))
    assert structural_lipschitz(norm) == pytest.approx(10.0)
    est = linear_norm_estimate(norm.double(), (1, 3, 4, 4))
    assert est == pytest.approx(10.0, rel=1e-6)
    assert est <= certified_lipschitz(norm)


def test_joins_and_sampling():
    torch.manual_seed(0)
    concat = ParallelConcat(OrthoConv2d(4, 4, 3), OrthoConv2d(4, 4, 3, dilation=2))
    assert structural_lipschitz(concat) == pytest.approx(1.0)
    fused = fuse_module(concat).double()
    est = linear_norm_estimate(fused, (1, 4, 20, 20))
    assert est <= certified_lipschitz(fused) <= est + 1e-3
    unscaled = ParallelConcat(OrthoConv2d(4, 4, 3), OrthoConv2d(4, 4, 3), scale=1.0)
    assert structural_lipschitz(unscaled) == pytest.approx(math.sqrt(2))

    res = AveragedResidual(OrthoConv2d(4, 4, 3, scale=0.5))
    assert structural_lipschitz(res) == pytest.approx(0.75)

    down, up = InvertibleDownsample(2), InvertibleUpsample(2)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(up(down(x)), x)
    assert structural_lipschitz(LipSequential(down, up)) == 1.0


def test_unknown_modules_are_refused():
    with pytest.raises(TypeError, match="Lipschitz"):
        structural_lipschitz(LipSequential(nn.ReLU(), nn.Conv2d(3, 3, 3)))


def test_strided_polyphase_rewrite_is_exact():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    direct = torch.nn.functional.conv2d(x, w, stride=2)
    poly = torch.from_numpy(polyphase_kernel(w.numpy(), 2))
    via_poly = torch.nn.functional.conv2d(torch.nn.functional.pixel_unshuffle(x, 2), poly)
    assert torch.allclose(direct, via_poly)


@pytest.mark.parametrize("stride", [1, 2])
def test_bound_is_sound_for_arbitrary_kernels(stride):
    rng = np.random.default_rng(stride)
    for _ in range(4):
        w = rng.standard_normal((6, 5, 3, 3))
        bound = conv_norm_bound(w, stride=stride)
        conv = nn.Conv2d(5, 6, 3, stride=stride, padding=1, bias=False).double()
        conv.weight.data = torch.from_numpy(w)
        est = linear_norm_estimate(conv, (1, 5, 32, 32), steps=100)
        assert est <= bound.upper
        assert bound.lower <= bound.upper


def test_tampered_weight_is_caught():
    torch.manual_seed(0)
    fused = fuse_module(OrthoConv2d(8, 8, 3))
    with torch.no_grad():
        fused.weight.mul_(1.01)
    assert certified_lipschitz(fused) >= 1.01 > structural_lipschitz(fused) * (1 + 1e-3)


def test_position_bias_is_a_translation_at_any_size():
    """The bias depends on where a pixel is, never on its value: differences pass
    unchanged (exactly 1-Lipschitz), and the map follows the input's size."""
    torch.manual_seed(0)
    layer = PositionalBias(3, (4, 6))
    with torch.no_grad():
        layer.bias.normal_()
    for h, w in [(4, 6), (17, 29), (96, 192)]:
        a, b = torch.rand(2, 3, h, w), torch.rand(2, 3, h, w)
        offset = layer(a) - a
        assert offset.abs().max() > 0.1  # the map is really added
        assert torch.allclose(offset[0], offset[1], atol=1e-6)  # the same for every image
        assert torch.allclose(layer(a) - layer(b), a - b, atol=1e-6)
    assert layer.lipschitz() == 1.0
    assert torch.equal(layer.fused()(a), layer(a))
    with pytest.raises(ValueError, match="grid"):
        PositionalBias(3, (0, 2))


def test_centering_with_position_fuses_and_starts_as_plain_centering():
    plain, grown = BatchCentering2d(4), BatchCentering2d(4, position_grid=(3, 5))
    x = torch.randn(2, 4, 9, 11)
    for layer in (plain, grown):
        layer.train()
        layer(x)
        layer.eval()
    assert torch.equal(grown(x), plain(x))  # zero at init: the same function
    with torch.no_grad():
        grown.position.bias.normal_()
    assert not torch.allclose(grown(x), plain(x))
    assert torch.allclose(fuse_module(grown)(x), grown(x), atol=1e-6)
    assert structural_lipschitz(grown) == certified_lipschitz(fuse_module(grown)) == 1.0
