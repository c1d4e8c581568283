"""Invertible down/upsampling: pixel (un)shuffle is a permutation, norm exactly 1."""

from __future__ import annotations

from torch import nn

from certseg.nn.base import LipschitzModule

__all__ = ["InvertibleDownsample", "InvertibleUpsample"]


class InvertibleDownsample(nn.PixelUnshuffle, LipschitzModule):
    """(C, H, W) -> (C*s*s, H/s, W/s) without losing or scaling anything."""

    def lipschitz(self) -> float:
        return 1.0


class InvertibleUpsample(nn.PixelShuffle, LipschitzModule):
    """(C*s*s, H, W) -> (C, H*s, W*s), the inverse of InvertibleDownsample."""

    def lipschitz(self) -> float:
        return 1.0
