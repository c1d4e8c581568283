"""Input normalization, whose factor 1/min(std) is part of the network's constant."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from certseg.nn.base import LipschitzModule

__all__ = ["InputNormalization"]


class InputNormalization(LipschitzModule):
    """(x - mean) / std per channel. Certificates speak of x in [0, 1], so this layer
    scales every distance by up to 1/min(std) and says so."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError("mean and std need one positive std per channel")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def lipschitz(self) -> float:
        return 1.0 / float(self.std.double().min())

    def lipschitz_bound(self) -> float:
        # float32 division rounds by <= 2^-24 relative; count it.
        return self.lipschitz() * (1 + 2.0**-23)
