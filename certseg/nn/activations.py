"""Norm-preserving activations."""

from __future__ import annotations

import torch
from torch import Tensor

from certseg.nn.base import LipschitzModule

__all__ = ["MaxMin"]


class MaxMin(LipschitzModule):
    """GroupSort-2 over channel halves: (max(a, b), min(a, b)).

    Why: it sorts pairs, a piecewise permutation, so it is 1-Lipschitz and keeps the
    gradient norm (ReLU halves it and starves 1-Lipschitz nets of margin). Exports as
    Split/Max/Min/Concat.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"MaxMin needs an even channel count, got {x.shape[1]}")
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def lipschitz(self) -> float:
        return 1.0
