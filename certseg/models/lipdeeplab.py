"""Lipschitz DeepLabV3 (the paper's reference family), read top-down.

Normalization, encoder stages (each opened by a stride-2 orthogonal conv, then
stride-1 ones), ASPP (1x1 + dilated 3x3 at rates 6, 12, 18, concatenated and scaled
by 1/sqrt(4), then 1x1), a 3x3 decoder conv, one 2x2 stride-2 orthogonal transposed
conv per stage halving channels, and a 1x1 classifier. Every conv is followed by
centering and MaxMin. No skip connections, no pretrained backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certseg.models.blocks import conv, conv_block, up_block
from certseg.models.registry import preset_of, register_model
from certseg.nn import InputNormalization, LipSequential, ParallelConcat

__all__ = [
    "LIPDEEPLAB_STAGES",
    "lipdeeplab",
    "lipdeeplab_m1",
    "lipdeeplab_m2",
    "lipdeeplab_s",
    "lipdeeplab_s_klip",
    "lipdeeplab_xs",
]

#: (channels, depth) per encoder stage; depth counts the opening stride-2 conv.
LIPDEEPLAB_STAGES: dict[str, tuple[tuple[int, int], ...]] = {
    "xs": ((16, 2), (32, 2), (64, 2)),
    "s": ((32, 3), (64, 3), (128, 3)),
    "m1": ((64, 5), (128, 5), (256, 5)),
    "m2": ((64, 5), (128, 5), (256, 5), (512, 5)),
}


def _encoder(cin: int, stages, constrained: bool, klip: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for channels, depth in stages:
        layers += conv_block(cin, channels, constrained, stride=2, klip=klip)
        for _ in range(depth - 1):
            layers += conv_block(channels, channels, constrained, klip=klip)
        cin = channels
    return layers


def _aspp(channels: int, rates: Sequence[int], constrained: bool, klip: bool) -> list[nn.Module]:
    branches = [LipSequential(*conv_block(channels, channels, constrained, k=1, klip=klip))]
    branches += [
        LipSequential(*conv_block(channels, channels, constrained, dilation=r, klip=klip))
        for r in rates
    ]
    join = ParallelConcat(*branches)  # scale 1/sqrt(len(branches))
    width = channels * len(branches)
    return [join, *conv_block(width, channels, constrained, k=1, klip=klip)]


def _decoder(channels: int, num_stages: int, constrained: bool, klip: bool) -> list[nn.Module]:
    layers = conv_block(channels, channels, constrained, klip=klip)
    for _ in range(num_stages):
        layers += up_block(channels, channels // 2, constrained, klip)
        channels //= 2
    return layers


def lipdeeplab(
    num_classes: int,
    size: str = "s",
    in_channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    rates: Sequence[int] = (6, 12, 18),
    klip: bool = False,
    constrained: bool = True,
) -> LipSequential:
    """Build a LipDeepLab; the output stride is 2**num_stages (pad inputs to it)."""
    stages = LIPDEEPLAB_STAGES[size]
    top = stages[-1][0]
    head = conv(top // 2 ** len(stages), num_classes, 1, constrained=constrained)
    return LipSequential(
        InputNormalization(mean, std),
        *_encoder(in_channels, stages, constrained, klip),
        *_aspp(top, rates, constrained, klip),
        *_decoder(top, len(stages), constrained, klip),
        head,
    )


@register_model
@preset_of(lipdeeplab, "size")
def lipdeeplab_xs(num_classes: int, **kw) -> LipSequential:
    """A small member (about 0.2M parameters) for CPU training and the shipped model."""
    return lipdeeplab(num_classes, size="xs", **kw)


@register_model
@preset_of(lipdeeplab, "size")
def lipdeeplab_s(num_classes: int, **kw) -> LipSequential:
    return lipdeeplab(num_classes, size="s", **kw)


@register_model
@preset_of(lipdeeplab, "size")
def lipdeeplab_m1(num_classes: int, **kw) -> LipSequential:
    return lipdeeplab(num_classes, size="m1", **kw)


@register_model
@preset_of(lipdeeplab, "size")
def lipdeeplab_m2(num_classes: int, **kw) -> LipSequential:
    return lipdeeplab(num_classes, size="m2", **kw)


@register_model
@preset_of(lipdeeplab, "size", "klip")
def lipdeeplab_s_klip(num_classes: int, **kw) -> LipSequential:
    """KLip variant: layers scaled by sqrt(fan_out / fan_in), L the product of scales."""
    return lipdeeplab(num_classes, size="s", klip=True, **kw)
