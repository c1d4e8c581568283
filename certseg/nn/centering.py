"""Batch centering: BatchNorm without the (non-Lipschitz) division.

Why our own: orthogonium's BatchCentering2D changes the shape of running_mean after
one step (checkpoints then fail to load) and subtracts the running mean while
training. Here training subtracts the batch mean and tracks a (C,)-shaped running
mean; eval and the fused form subtract the running mean: a translation, 1-Lipschitz.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from certseg.nn.base import LipschitzModule

__all__ = ["BatchCentering2d", "Shift2d"]


class Shift2d(LipschitzModule):
    """Adds a fixed per-channel shift (the fused form of centering)."""

    def __init__(self, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().clone().reshape(-1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift.view(1, -1, 1, 1)

    def lipschitz(self) -> float:
        return 1.0


class BatchCentering2d(LipschitzModule):
    """x - mean_c + bias_c, mean from the batch in training and a running mean in eval."""

    def __init__(self, num_features: int, momentum: float = 0.05) -> None:
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
        else:
            mean = self.running_mean
        return x - mean.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def lipschitz(self) -> float:
        return 1.0

    def fused(self) -> Shift2d:
        return Shift2d(self.bias.detach() - self.running_mean)
