"""1-Lipschitz ways to join branches."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from certseg.nn.base import (
    LipschitzModule,
    certified_lipschitz,
    fuse_module,
    structural_lipschitz,
)

__all__ = ["AveragedResidual", "ParallelConcat"]


class ParallelConcat(LipschitzModule):
    """scale * concat(b_1(x), ..., b_n(x)) along channels.

    The concatenation of maps with constants L_i has constant sqrt(sum L_i^2); the
    default scale 1/sqrt(n) brings n 1-Lipschitz branches back to 1 (ASPP, U-Net joins).
    """

    def __init__(self, *branches: nn.Module, scale: float | None = None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.scale = 1.0 / math.sqrt(len(branches)) if scale is None else scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.cat([b(x) for b in self.branches], dim=1)

    def _join(self, constants: list[float]) -> float:
        return self.scale * math.sqrt(sum(c * c for c in constants))

    def lipschitz(self) -> float:
        return self._join([structural_lipschitz(b) for b in self.branches])

    def lipschitz_bound(self) -> float:
        return self._join([certified_lipschitz(b) for b in self.branches])

    def fused(self) -> ParallelConcat:
        return ParallelConcat(*(fuse_module(b) for b in self.branches), scale=self.scale)


class AveragedResidual(LipschitzModule):
    """(x + f(x)) / 2, with constant (1 + L_f) / 2."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (x + self.body(x))

    def lipschitz(self) -> float:
        return 0.5 * (1.0 + structural_lipschitz(self.body))

    def lipschitz_bound(self) -> float:
        return 0.5 * (1.0 + certified_lipschitz(self.body))

    def fused(self) -> AveragedResidual:
        return AveragedResidual(fuse_module(self.body))
