"""A tiny 1-Lipschitz segmenter: a few layers, for tests and smoke runs.

Normalize -> conv 3x3 -> stride-2 conv -> dilated conv -> 2x2 transposed conv ->
1x1 classifier, each conv followed by centering and MaxMin.
"""

from __future__ import annotations

from collections.abc import Sequence

from certseg.models.registry import register_model
from certseg.nn import (
    BatchCentering2d,
    InputNormalization,
    LipSequential,
    MaxMin,
    OrthoConv2d,
    OrthoConvTranspose2d,
)

__all__ = ["tiny"]


def _block(conv) -> list:
    return [conv, BatchCentering2d(conv.out_channels), MaxMin()]


@register_model
def tiny(
    num_classes: int,
    width: int = 16,
    in_channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
) -> LipSequential:
    """About 30k parameters at width 16; output stride 1 (input H, W must be even)."""
    w = width
    return LipSequential(
        InputNormalization(mean, std),
        *_block(OrthoConv2d(in_channels, w, 3)),
        *_block(OrthoConv2d(w, 2 * w, 3, stride=2)),
        *_block(OrthoConv2d(2 * w, 2 * w, 3, dilation=2)),
        *_block(OrthoConvTranspose2d(2 * w, w, 2, stride=2)),
        OrthoConv2d(w, num_classes, 1),
    )
