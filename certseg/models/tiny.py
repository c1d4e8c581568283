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
) -> LipSequential:
    """About 23k parameters at width 16; output stride 1 (pad inputs to even sizes)."""
    w, c = width, constrained
    return LipSequential(
        InputNormalization(mean, std),
        *conv_block(in_channels, w, c),
        *conv_block(w, 2 * w, c, stride=2),
        *conv_block(2 * w, 2 * w, c, dilation=2),
        *up_block(2 * w, w, c),
        conv(w, num_classes, 1, constrained=c),
    )
