"""Lipschitz U-Net: small and sharp, the architecture of the shipped default model.

Why besides LipDeepLab: at CPU-trainable sizes the DeepLab family's output stride 8
and lack of skips blur thin and small objects (people, poles). Here every level joins
its skip path and its upsampled deeper path with a 1/sqrt(2)-scaled concatenation of
two 1-Lipschitz maps of the same input, so the whole net stays 1-Lipschitz (times
1/min(std)) by construction, with full-resolution detail.

    level(c) = conv c -> ParallelConcat(identity, down 2c -> level(2c) -> up c) -> conv 2c->c
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certseg.models.blocks import conv, conv_block, up_block
from certseg.models.registry import preset_of, register_model
from certseg.nn import InputNormalization, LipSequential, ParallelConcat

__all__ = ["lipunet", "lipunet_s", "lipunet_xs"]


def _level(c: int, depth: int, constrained: bool, pos: Sequence[int] | None) -> LipSequential:
    body = conv_block(c, c, constrained, pos)
    if depth == 0:
        return LipSequential(*body, *conv_block(c, c, constrained, pos, dilation=2))
    deeper = LipSequential(
        *conv_block(c, 2 * c, constrained, pos, stride=2),
        _level(2 * c, depth - 1, constrained, pos),
        *up_block(2 * c, c, constrained, position_grid=pos),
    )
    skip = nn.Identity()
    merge = conv_block(2 * c, c, constrained, pos)
    return LipSequential(*body, ParallelConcat(skip, deeper), *merge)


def lipunet(
    num_classes: int,
    width: int = 16,
    depth: int = 3,
    in_channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    constrained: bool = True,
    position_grid: Sequence[int] | None = None,
) -> LipSequential:
    """Output stride 1; inputs are padded to a multiple of 2**depth.

    `position_grid` (gh, gw) gives every centering a learned position-dependent bias
    (certseg.nn.position): layout priors at no cost to the Lipschitz constant.
    """
    return LipSequential(
        InputNormalization(mean, std),
        *conv_block(in_channels, width, constrained, position_grid),
        _level(width, depth, constrained, position_grid),
        conv(width, num_classes, 1, constrained=constrained),
    )


@register_model
@preset_of(lipunet, width=16, depth=3)
def lipunet_xs(num_classes: int, **kw) -> LipSequential:
    """About 0.65M parameters (width 16, depth 3)."""
    return lipunet(num_classes, **kw)


@register_model
@preset_of(lipunet, width=32, depth=3)
def lipunet_s(num_classes: int, **kw) -> LipSequential:
    """About 2.6M parameters (width 32, depth 3)."""
    return lipunet(num_classes, **kw)
