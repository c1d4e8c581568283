"""Building blocks shared by architectures, constrained or as an unconstrained twin.

The twin has the same shapes (plain Conv2d/ConvTranspose2d, BatchNorm, same MaxMin)
and no Lipschitz guarantee: it is the smoothing baseline's base model and the proof
that our attacks are real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from certseg.nn import BatchCentering2d, MaxMin, OrthoConv2d, OrthoConvTranspose2d, PositionalBias
from certseg.nn.conv import ortho_conv_geometry

__all__ = ["conv", "conv_block", "klip_scale", "up_block"]


def klip_scale(cin: int, cout: int, klip: bool) -> float:
    """KLip variant: each layer scaled by sqrt(fan_out / fan_in)."""
    return math.sqrt(cout / cin) if klip else 1.0


def conv(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    dilation: int = 1,
    constrained: bool = True,
    klip: bool = False,
) -> nn.Module:
    if constrained:
        return OrthoConv2d(cin, cout, k, stride, dilation, scale=klip_scale(cin, cout, klip))
    _, size, pad = ortho_conv_geometry(k, stride, dilation)  # same shapes as OrthoConv2d
    return nn.Conv2d(cin, cout, size, stride, pad, dilation)


def _centering(c: int, constrained: bool, position_grid: Sequence[int] | None) -> list[nn.Module]:
    """Centering with its (optionally position-dependent) bias; BatchNorm in the twin."""
    if constrained:
        return [BatchCentering2d(c, position_grid=position_grid)]
    extra = [] if position_grid is None else [PositionalBias(c, position_grid)]
    return [nn.BatchNorm2d(c), *extra]


def conv_block(
    cin: int,
    cout: int,
    constrained: bool = True,
    position_grid: Sequence[int] | None = None,
    **kw,
) -> list[nn.Module]:
    """conv -> centering (BatchNorm in the twin) -> MaxMin."""
    conv_ = conv(cin, cout, constrained=constrained, **kw)
    return [conv_, *_centering(cout, constrained, position_grid), MaxMin()]


def up_block(
    cin: int,
    cout: int,
    constrained: bool = True,
    klip: bool = False,
    position_grid: Sequence[int] | None = None,
) -> list[nn.Module]:
    """2x2 stride-2 transposed conv -> centering -> MaxMin."""
    if constrained:
        up: nn.Module = OrthoConvTranspose2d(cin, cout, 2, 2, scale=klip_scale(cin, cout, klip))
    else:
        up = nn.ConvTranspose2d(cin, cout, 2, 2)
    return [up, *_centering(cout, constrained, position_grid), MaxMin()]
