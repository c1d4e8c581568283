"""Orthogonal convolutions for training, and the plain layers they fuse into.

Each constrained layer subclasses the torch layer it constrains; the constraint lives
in a parametrization, so `.weight` is always the constrained kernel and fusing is
"copy .weight (computed once, in fp64) into a plain layer".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from certseg.certify.operator_norm import (
    conv_norm_bound,
    conv_transpose_norm_bound,
    matrix_norm_bound,
)
from certseg.nn.base import LipschitzModule
from certseg.nn.orthogonal import BCOPKernel, OrthogonalMatrix

__all__ = [
    "FusedConv2d",
    "FusedConvTranspose2d",
    "FusedLinear",
    "OrthoConv2d",
    "OrthoConvTranspose2d",
    "OrthoLinear",
    "ortho_conv_geometry",
]


def _install(module: nn.Module, parametrization: nn.Module) -> None:
    """Replace `module.weight` by raw parameters behind `parametrization`."""
    del module.weight
    module.weight = nn.Parameter(parametrization.initial())
    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)


@torch.no_grad()
def _weight_fp64(module: nn.Module) -> Tensor:
    """The parametrized weight evaluated once in float64, then rounded to float32."""
    raw = module.parametrizations.weight.original
    param = module.parametrizations.weight[0]
    return param(raw.double()).float()


def weight_bound(module: nn.Module) -> float:
    """Guaranteed fp64 operator-norm bound of a conv / transposed conv / linear weight."""
    w = module.weight.detach().cpu().double().numpy()
    if isinstance(module, nn.ConvTranspose2d):
        return conv_transpose_norm_bound(w, module.stride[0]).upper
    if isinstance(module, nn.Conv2d):
        return conv_norm_bound(w, module.stride[0], module.dilation[0]).upper
    return matrix_norm_bound(w).upper


class _Audited(LipschitzModule):
    """Nominal constant `scale`; guaranteed bound from the weight actually held."""

    scale: float = 1.0

    def lipschitz(self) -> float:
        return self.scale

    def lipschitz_bound(self) -> float:
        return weight_bound(self)


def _fuse(src: nn.Module, plain_cls: type, **geometry) -> nn.Module:
    """A plain, frozen layer holding `src`'s parametrized weight (computed in fp64)."""
    plain = plain_cls(**geometry, bias=src.bias is not None)
    plain.scale = src.scale
    plain.weight.data.copy_(_weight_fp64(src))
    if src.bias is not None:
        plain.bias.data.copy_(src.bias.detach())
    plain.requires_grad_(False)
    return plain


def ortho_conv_geometry(kernel_size: int, stride: int = 1, dilation: int = 1):
    """(polyphase kernel size kp, real kernel size, padding) of an OrthoConv2d.

    One place for the geometry, so the unconstrained twin gets exactly the same shapes.
    """
    if stride > 1 and dilation > 1:
        raise ValueError("OrthoConv2d: strided and dilated at once is not supported")
    if stride == 1 and kernel_size % 2 == 0:
        raise ValueError("OrthoConv2d: stride-1 kernels must have odd size for 'same' output")
    kp = math.ceil(kernel_size / stride)
    if stride > 1 and (stride * (kp - 1)) % 2:
        raise ValueError(f"stride {stride} with kernel {kernel_size} cannot keep H/s output")
    padding = dilation * (kp - 1) // 2 if stride == 1 else stride * (kp - 1) // 2
    return kp, kp * stride, padding


class FusedConv2d(nn.Conv2d, _Audited):
    """A plain Conv2d that remembers its nominal constant and audits its weight."""


class FusedConvTranspose2d(nn.ConvTranspose2d, _Audited):
    """A plain ConvTranspose2d that remembers its nominal constant and audits its weight."""


class FusedLinear(nn.Linear, _Audited):
    """A plain Linear that remembers its nominal constant and audits its weight."""


class OrthoConv2d(nn.Conv2d, _Audited):
    """Orthogonal convolution with 'same'-style zero padding.

    stride 1: BCOP kernel of odd size k, padding dilation*(k-1)/2.
    stride s > 1: kernel of size s*ceil(k/s) whose polyphase form is BCOP of size
    ceil(k/s), padding s*(kp-1)/2, so an H x W input gives H/s x W/s. With k == s this
    is an orthogonal matrix on each s x s patch (pixel-unshuffle + orthogonal 1x1).
    Rows (cout <= cin*s*s) or columns (cout >= cin*s*s) are orthonormal: norm exactly
    `scale`. `scale` != 1 gives the KLip-style scaled variant.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        scale: float = 1.0,
    ) -> None:
        kp, size, padding = ortho_conv_geometry(kernel_size, stride, dilation)
        super().__init__(
            in_channels,
            out_channels,
            size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias,
        )
        if bias:
            nn.init.zeros_(self.bias)
        self.scale = scale
        _install(self, BCOPKernel(out_channels, in_channels, kp, stride, scale))

    def fused(self) -> FusedConv2d:
        return _fuse(
            self,
            FusedConv2d,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )


class OrthoConvTranspose2d(nn.ConvTranspose2d, _Audited):
    """Orthogonal transposed convolution (upsampling by `stride`): the adjoint of an
    OrthoConv2d-style strided kernel. kernel_size == stride (default 2, 2) makes each
    input pixel write an orthonormal s x s patch; larger kernels use BCOP polyphase."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 2,
        stride: int = 2,
        bias: bool = True,
        scale: float = 1.0,
    ) -> None:
        kp = math.ceil(kernel_size / stride)
        if (stride * (kp - 1)) % 2:
            raise ValueError(f"stride {stride} with kernel {kernel_size} cannot give s*H output")
        super().__init__(
            in_channels,
            out_channels,
            kp * stride,
            stride=stride,
            padding=stride * (kp - 1) // 2,
            bias=bias,
        )
        if bias:
            nn.init.zeros_(self.bias)
        self.scale = scale
        # Weight (cin, cout, k, k) is a strided Conv2d kernel from cout to cin channels.
        _install(self, BCOPKernel(in_channels, out_channels, kp, stride, scale))

    def fused(self) -> FusedConvTranspose2d:
        return _fuse(
            self,
            FusedConvTranspose2d,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
        )


class OrthoLinear(nn.Linear, _Audited):
    """Linear layer with orthonormal rows or columns (times `scale`)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if bias:
            nn.init.zeros_(self.bias)
        self.scale = scale
        _install(self, OrthogonalMatrix(out_features, in_features, scale))

    def fused(self) -> FusedLinear:
        return _fuse(
            self, FusedLinear, in_features=self.in_features, out_features=self.out_features
        )
