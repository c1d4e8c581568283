"""A tiny 1-Lipschitz segmenter: a few layers, for tests and smoke runs.

Normalize -> conv 3x3 -> stride-2 conv -> dilated conv -> 2x2 transposed conv ->
1x1 classifier, each conv followed by centering and MaxMin.
"""

from __future__ import annotations

from collections.abc import Sequence

from certseg.models.blocks import conv, conv_block, up_block
from certseg.models.registry import register_model
from certseg.nn import InputNormalization, LipSequential

__all__ = ["tiny"]


@register_model
def tiny(
    num_classes: int,
    width: int = 16,
    in_channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    constrained: bool = True,
    position_grid: Sequence[int] | None = None,
) -> LipSequential:
    """About 23k parameters at width 16; output stride 1 (pad inputs to even sizes).
    `position_grid`: position-dependent centering biases (certseg.nn.position)."""
    w, c, p = width, constrained, position_grid
    return LipSequential(
        InputNormalization(mean, std),
        *conv_block(in_channels, w, c, p),
        *conv_block(w, 2 * w, c, p, stride=2),
        *conv_block(2 * w, 2 * w, c, p, dilation=2),
        *up_block(2 * w, w, c, position_grid=p),
        conv(w, num_classes, 1, constrained=c),
    )
