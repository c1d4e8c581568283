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


def _copy_bias(src: nn.Module, dst: nn.Module) -> None:
    if src.bias is not None:
        dst.bias.data.copy_(src.bias.detach())


class FusedConv2d(nn.Conv2d, LipschitzModule):
    """A plain Conv2d that remembers its nominal constant and audits its weight."""

    def __init__(self, *args, nominal: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nominal = nominal
        self.requires_grad_(False)

    def lipschitz(self) -> float:
        return self.nominal

    def lipschitz_bound(self) -> float:
        return conv_norm_bound(
            self.weight.detach().cpu().numpy(), stride=self.stride[0], dilation=self.dilation[0]
        ).upper


class FusedConvTranspose2d(nn.ConvTranspose2d, LipschitzModule):
    """A plain ConvTranspose2d that remembers its nominal constant and audits its weight."""

    def __init__(self, *args, nominal: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nominal = nominal
        self.requires_grad_(False)

    def lipschitz(self) -> float:
        return self.nominal

    def lipschitz_bound(self) -> float:
        return conv_transpose_norm_bound(self.weight.detach().cpu().numpy(), self.stride[0]).upper


class FusedLinear(nn.Linear, LipschitzModule):
    """A plain Linear that remembers its nominal constant and audits its weight."""

    def __init__(self, *args, nominal: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nominal = nominal
        self.requires_grad_(False)

    def lipschitz(self) -> float:
        return self.nominal

    def lipschitz_bound(self) -> float:
        return matrix_norm_bound(self.weight.detach().cpu().numpy()).upper


class OrthoConv2d(nn.Conv2d, LipschitzModule):
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
        if stride > 1 and dilation > 1:
            raise ValueError("OrthoConv2d: strided and dilated at once is not supported")
        if stride == 1 and kernel_size % 2 == 0:
            raise ValueError("OrthoConv2d: stride-1 kernels must have odd size for 'same' output")
        kp = math.ceil(kernel_size / stride)
        size = kp * stride
        padding = dilation * (kp - 1) // 2 if stride == 1 else stride * (kp - 1) // 2
        if stride > 1 and (stride * (kp - 1)) % 2:
            raise ValueError(f"stride {stride} with kernel {kernel_size} cannot keep H/s output")
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

    def lipschitz(self) -> float:
        return self.scale

    def lipschitz_bound(self) -> float:
        return conv_norm_bound(
            self.weight.detach().cpu().double().numpy(), self.stride[0], self.dilation[0]
        ).upper

    def fused(self) -> FusedConv2d:
        plain = FusedConv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            nominal=self.scale,
        )
        plain.weight.data.copy_(_weight_fp64(self))
        _copy_bias(self, plain)
        return plain


class OrthoConvTranspose2d(nn.ConvTranspose2d, LipschitzModule):
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

    def lipschitz(self) -> float:
        return self.scale

    def lipschitz_bound(self) -> float:
        return conv_transpose_norm_bound(
            self.weight.detach().cpu().double().numpy(), self.stride[0]
        ).upper

    def fused(self) -> FusedConvTranspose2d:
        plain = FusedConvTranspose2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            bias=self.bias is not None,
            nominal=self.scale,
        )
        plain.weight.data.copy_(_weight_fp64(self))
        _copy_bias(self, plain)
        return plain


class OrthoLinear(nn.Linear, LipschitzModule):
    """Linear layer with orthonormal rows or columns (times `scale`)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if bias:
            nn.init.zeros_(self.bias)
        self.scale = scale
        _install(self, OrthogonalMatrix(out_features, in_features, scale))

    def lipschitz(self) -> float:
        return self.scale

    def lipschitz_bound(self) -> float:
        return matrix_norm_bound(self.weight.detach().cpu().double().numpy()).upper

    def fused(self) -> FusedLinear:
        plain = FusedLinear(
            self.in_features, self.out_features, bias=self.bias is not None, nominal=self.scale
        )
        plain.weight.data.copy_(_weight_fp64(self))
        _copy_bias(self, plain)
        return plain
