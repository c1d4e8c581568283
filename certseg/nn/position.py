"""Position-dependent bias: a learned, smooth offset map over the image.

Why: street scenes have strong layout priors (sky above, road below, sidewalks at the
sides) that a small 1-Lipschitz net can only learn from local texture. A bias that
depends on where a pixel is, but not on the pixel values, is a translation: it adds
capacity without touching the Lipschitz constant, so every certificate still holds.

The map is a (C, gh, gw) grid, bilinearly resized to the feature map it is added to,
so it is defined relative to the (padded) image and works at any input size. Zero at
init: adding it to a trained net changes nothing until it is trained (model growth).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from certseg.nn.base import LipschitzModule

__all__ = ["PositionalBias", "position_bias_names"]


class PositionalBias(LipschitzModule):
    """x + resize(bias grid (C, gh, gw) -> x's H, W): a translation, 1-Lipschitz."""

    def __init__(self, channels: int, grid: Sequence[int]) -> None:
        super().__init__()
        gh, gw = (int(g) for g in grid)
        if gh < 1 or gw < 1:
            raise ValueError(f"position grid must be at least 1x1, got {tuple(grid)}")
        self.bias = nn.Parameter(torch.zeros(1, channels, gh, gw))

    def offset(self, height: int, width: int) -> Tensor:
        """The bias map at (height, width): (1, C, height, width)."""
        return F.interpolate(self.bias, size=(height, width), mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.offset(x.shape[-2], x.shape[-1]).to(x.dtype)

    def lipschitz(self) -> float:
        return 1.0

    def fused(self) -> PositionalBias:
        twin = PositionalBias(self.bias.shape[1], self.bias.shape[-2:])
        twin.bias.data.copy_(self.bias.detach())
        return twin.requires_grad_(False)


def position_bias_names(model: nn.Module) -> set[str]:
    """Parameter names of every PositionalBias in `model`, wherever it sits (inside a
    centering layer, or on its own in the unconstrained twin)."""
    return {
        f"{name}.bias" if name else "bias"
        for name, module in model.named_modules()
        if isinstance(module, PositionalBias)
    }
