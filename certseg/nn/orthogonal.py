"""Exact orthogonal parametrizations: matrices, BCOP kernels, strided and transposed forms.

Why our own and not orthogonium's: its weights are rebuilt with power iteration and
Björck steps whose state changes between calls, land at norms 1 + a few 1e-6 and,
for square stride-2 layers, far from orthogonal. Here orthogonality is exact up to
float rounding by construction and the map from parameters to weight is a pure
function (no state, identical on every call, in train and eval):

- an orthogonal matrix is exp(A - A^T) (matrix exponential of a skew matrix);
- a k x k orthogonal convolution is BCOP (Li et al., 2019): an orthogonal 1x1 kernel
  followed by k-1 two-tap blocks [P, I - P] along each axis, P a symmetric projector;
  each block is paraunitary (P(I - P) = 0), so the composition is too, i.e. the
  convolution is orthogonal on the infinite grid and its zero-padded restriction has
  norm <= 1 (== 1 once the image is larger than the kernel);
- a stride-s convolution is an orthogonal stride-1 kernel on the pixel-unshuffled input
  (its polyphase form), rewritten as an ordinary strided kernel of size s * kp;
- a transposed convolution is the adjoint of such a strided convolution.
Rectangular layers take the leading block of a square construction, which keeps
rows or columns orthonormal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "BCOPKernel",
    "OrthogonalMatrix",
    "bcop_kernel",
    "orthogonal_from_skew",
    "strided_from_polyphase",
]


def orthogonal_from_skew(raw: Tensor) -> Tensor:
    """exp(A - A^T) for a batch of square matrices: exactly orthogonal up to rounding."""
    upper = raw.triu(1)
    return torch.linalg.matrix_exp(upper - upper.mT)


def _compose(second: Tensor, first: Tensor) -> Tensor:
    """Kernel of `second` applied after `first` (both cross-correlations, n x n channels)."""
    n, _, a1, b1 = first.shape
    _, _, a2, b2 = second.shape
    out = first.new_zeros(n, n, a1 + a2 - 1, b1 + b2 - 1)
    for i in range(a2):
        for j in range(b2):
            out[:, :, i : i + a1, j : j + b1] += torch.einsum(
                "oc,cdxy->odxy", second[:, :, i, j], first
            )
    return out


def bcop_kernel(mats: Tensor, kernel_size: int) -> Tensor:
    """Orthogonal (n, n, k, k) kernel from 1 + 2(k-1) orthogonal n x n matrices."""
    n = mats.shape[-1]
    k = kernel_size
    if mats.shape[0] != 1 + 2 * (k - 1):
        raise ValueError(f"need {1 + 2 * (k - 1)} matrices for k={k}, got {mats.shape[0]}")
    kernel = mats[0][:, :, None, None]
    eye = torch.eye(n, dtype=mats.dtype, device=mats.device)
    rank = n // 2
    for idx, q in enumerate(mats[1:]):
        basis = q[:, :rank]
        proj = basis @ basis.mT
        if idx < k - 1:  # block along height: taps (0, 0) and (1, 0)
            block = torch.stack([proj, eye - proj], dim=-1)[:, :, :, None]
        else:  # block along width: taps (0, 0) and (0, 1)
            block = torch.stack([proj, eye - proj], dim=-1)[:, :, None, :]
        kernel = _compose(block, kernel)
    return kernel


def strided_from_polyphase(poly: Tensor, stride: int) -> Tensor:
    """Inverse of the polyphase rewrite: (cout, cin*s*s, kp, kp) -> (cout, cin, s*kp, s*kp)."""
    if stride == 1:
        return poly
    cout, cin_ss, kp, kq = poly.shape
    cin = cin_ss // (stride * stride)
    six = poly.reshape(cout, cin, stride, stride, kp, kq).permute(0, 1, 4, 2, 5, 3)
    return six.reshape(cout, cin, kp * stride, kq * stride)


def _init_raw(count: int, n: int) -> Tensor:
    # Skew entries of scale 1/sqrt(n) spread the rotation angles over most of (-pi, pi).
    return torch.randn(count, n, n) / math.sqrt(max(n, 1))


class OrthogonalMatrix(nn.Module):
    """Parametrization: raw (1, n, n) -> the leading (rows, cols) block of exp(skew), scaled."""

    def __init__(self, rows: int, cols: int, scale: float = 1.0) -> None:
        super().__init__()
        self.rows, self.cols, self.scale = rows, cols, scale
        self.n = max(rows, cols)

    def initial(self) -> Tensor:
        return _init_raw(1, self.n)

    def forward(self, raw: Tensor) -> Tensor:
        return self.scale * orthogonal_from_skew(raw)[0, : self.rows, : self.cols]


class BCOPKernel(nn.Module):
    """Parametrization: raw (1 + 2(kp-1), n, n) -> conv kernel (cout, cin, s*kp, s*kp).

    For stride 1 the kernel is BCOP of size kp; for stride s it is the strided kernel
    whose polyphase form (cout, cin*s*s, kp, kp) is BCOP.
    """

    def __init__(self, cout: int, cin: int, kp: int, stride: int = 1, scale: float = 1.0) -> None:
        super().__init__()
        self.cout, self.cin, self.kp, self.stride, self.scale = cout, cin, kp, stride, scale
        self.n = max(cout, cin * stride * stride)

    def initial(self) -> Tensor:
        return _init_raw(1 + 2 * (self.kp - 1), self.n)

    def forward(self, raw: Tensor) -> Tensor:
        mats = orthogonal_from_skew(raw)
        poly = bcop_kernel(mats, self.kp)[: self.cout, : self.cin * self.stride**2]
        return self.scale * strided_from_polyphase(poly, self.stride)
