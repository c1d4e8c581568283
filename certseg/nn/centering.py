"""Batch centering: BatchNorm without the (non-Lipschitz) division.

Why our own: orthogonium's BatchCentering2D changes the shape of running_mean after
one step (checkpoints then fail to load) and subtracts the running mean while
training. Here training subtracts the batch mean and tracks a (C,)-shaped running
mean; eval and the fused form subtract the running mean: a translation, 1-Lipschitz.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from certseg.nn.base import LipschitzModule
from certseg.nn.position import PositionalBias

__all__ = ["BatchCentering2d", "Shift2d"]


class Shift2d(LipschitzModule):
    """Adds a fixed per-channel shift, and optionally a position map (fused centering)."""

    def __init__(self, shift: Tensor, position: PositionalBias | None = None) -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().clone().reshape(-1))
        self.position = position

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.shift.view(1, -1, 1, 1)
        return x if self.position is None else self.position(x)

    def lipschitz(self) -> float:
        return 1.0


class BatchCentering2d(LipschitzModule):
    """x - mean_c + bias_c, mean from the batch in training and a running mean in eval.

    With `position_grid`, the bias may also vary smoothly over the image
    (certseg.nn.position): still a translation, still 1-Lipschitz.
    """

    def __init__(
        self, num_features: int, momentum: float = 0.05, position_grid: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.position = (
            None if position_grid is None else PositionalBias(num_features, position_grid)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
        else:
            mean = self.running_mean
        x = x - mean.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return x if self.position is None else self.position(x)

    def lipschitz(self) -> float:
        return 1.0

    def fused(self) -> Shift2d:
        position = None if self.position is None else self.position.fused()
        return Shift2d(self.bias.detach() - self.running_mean, position)
