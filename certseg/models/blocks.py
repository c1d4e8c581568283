"""Building blocks shared by architectures, constrained or as an unconstrained twin.

The twin has the same shapes (plain Conv2d/ConvTranspose2d, BatchNorm, same MaxMin)
and no Lipschitz guarantee: it is the smoothing baseline's base model and the proof
that our attacks are real.
"""

from __future__ import annotations

import math

from torch import nn

from certseg.nn import BatchCentering2d, MaxMin, OrthoConv2d, OrthoConvTranspose2d
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


def conv_block(cin: int, cout: int, constrained: bool = True, **kw) -> list[nn.Module]:
    """conv -> centering (BatchNorm in the twin) -> MaxMin."""
    norm = BatchCentering2d(cout) if constrained else nn.BatchNorm2d(cout)
    return [conv(cin, cout, constrained=constrained, **kw), norm, MaxMin()]


def up_block(cin: int, cout: int, constrained: bool = True, klip: bool = False) -> list[nn.Module]:
    """2x2 stride-2 transposed conv -> centering -> MaxMin."""
    if constrained:
        up = OrthoConvTranspose2d(cin, cout, 2, 2, scale=klip_scale(cin, cout, klip))
        norm: nn.Module = BatchCentering2d(cout)
    else:
        up, norm = nn.ConvTranspose2d(cin, cout, 2, 2), nn.BatchNorm2d(cout)
    return [up, norm, MaxMin()]
