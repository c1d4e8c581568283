"""Guaranteed upper bounds of the l2 operator norm of deployed weights (numpy, fp64).

Why this exists: a certificate is only as sound as its Lipschitz constant, and a
nominal "this layer is orthogonal" is not a proof once weights have been trained,
rounded to float32, exported or tampered with. These bounds are computed from the
weights that actually run, in float64, and are rigorous for zero padding of any
image size (they bound the convolution on the infinite grid, of which every
zero-padded, cropped or strided-and-padded version is a restriction).

Math. A stride-1 convolution with kernel K (cout, cin, kh, kw) acts on the
infinite grid with norm sup_w sigma_max(K^(w)), K^(w) = sum_t K_t e^{-i<w,t>}.
With G(w) = K^(w)^H K^(w) = sum_t G_t e^{-i<w,t>} (G_t the kernel's
autocorrelation, Hermitian-paired G_{-t} = G_t^T), for every w

    lambda_max(G(w)) <= lambda_max(G_0) + sum_{t != 0} ||G_t||       (defect bound)

which is exact (1 + rounding) for orthogonal and scaled-orthogonal kernels, the
ones our layers produce. For kernels far from orthogonal a frequency-grid bound
is tighter: u^H G(w) u is a non-negative trigonometric polynomial of degree
(kh-1, kw-1), so by Bernstein's inequality its sup M satisfies
M <= max_grid + (pi/N)(kh-1 + kw-1) M on an N x N grid. We return the minimum of
the two (both are upper bounds). The grid maximum itself is a lower bound of the
true norm, reported to show how tight the upper bound is.

A stride-s convolution is a stride-1 convolution of its polyphase kernel
(cout, cin*s*s, ceil(kh/s), ceil(kw/s)) applied to the pixel-unshuffled input (a
permutation), so it has the same norm. A dilated convolution acts independently
on interleaved sub-grids with the undilated kernel: same norm. A transposed
convolution is the adjoint of the convolution with the same weight and stride:
same norm. A dense matrix gets its exact largest singular value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ROUNDING_SLACK",
    "NormBound",
    "conv_norm_bound",
    "conv_transpose_norm_bound",
    "matrix_norm_bound",
    "polyphase_kernel",
]

#: Relative slack added to every fp64 result: covers the rounding of the fp64
#: eigen/singular value solvers (relative error ~1e-13 at our sizes) with room.
ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class NormBound:
    """An operator-norm bound: `upper` is guaranteed; `lower` is a true lower bound."""

    upper: float
    lower: float
    method: str

    @property
    def gap(self) -> float:
        """Relative distance between the guaranteed bound and a norm actually attained."""
        return self.upper / self.lower - 1.0 if self.lower > 0 else math.inf


def matrix_norm_bound(weight: np.ndarray) -> NormBound:
    """Exact largest singular value of a dense matrix (Linear/Gemm, 1x1 conv)."""
    w = np.asarray(weight, dtype=np.float64).reshape(weight.shape[0], -1)
    s = float(np.linalg.norm(w, ord=2)) if w.size else 0.0
    return NormBound(upper=s * (1 + ROUNDING_SLACK), lower=s, method="svd")


def polyphase_kernel(kernel: np.ndarray, stride: int) -> np.ndarray:
    """Rewrite a stride-s kernel as the stride-1 kernel acting on pixel-unshuffled input.

    Channel order matches torch's PixelUnshuffle: c * s * s + i * s + j for phase (i, j).
    """
    k = np.asarray(kernel, dtype=np.float64)
    if stride == 1:
        return k
    cout, cin, kh, kw = k.shape
    ph, pw = -(-kh // stride), -(-kw // stride)
    padded = np.zeros((cout, cin, ph * stride, pw * stride), dtype=np.float64)
    padded[:, :, :kh, :kw] = k
    # [o, c, a*s + i, b*s + j] -> [o, c, i, j, a, b] -> [o, (c, i, j), a, b]
    six = padded.reshape(cout, cin, ph, stride, pw, stride).transpose(0, 1, 3, 5, 2, 4)
    return six.reshape(cout, cin * stride * stride, ph, pw)


def _gram_blocks(kernel: np.ndarray) -> np.ndarray:
    """Autocorrelation G_t of a stride-1 kernel on its smaller channel side.

    Returns an array (2kh-1, 2kw-1, n, n), n = min(cin, cout), index [dy + kh-1, dx + kw-1].
    sigma_max(K^) = sigma_max(K^^H), so the smaller Gram is as good and cheaper.
    """
    cout, cin, kh, kw = kernel.shape
    # Work on taps as matrices acting on the smaller side: A_t is (m, n) with n the small side.
    taps = kernel.transpose(2, 3, 0, 1) if cin <= cout else kernel.transpose(2, 3, 1, 0)
    n = taps.shape[-1]
    out = np.zeros((2 * kh - 1, 2 * kw - 1, n, n), dtype=np.float64)
    for dy in range(-(kh - 1), kh):
        for dx in range(-(kw - 1), kw):
            a = taps[max(0, -dy) : kh - max(0, dy), max(0, -dx) : kw - max(0, dx)]
            b = taps[max(0, dy) : kh + min(0, dy), max(0, dx) : kw + min(0, dx)]
            m = a.shape[-2]
            out[dy + kh - 1, dx + kw - 1] = a.reshape(-1, m, n).transpose(1, 0, 2).reshape(
                -1, n
            ).T @ b.reshape(-1, m, n).transpose(1, 0, 2).reshape(-1, n)
    return out


def _defect_bound_sq(gram: np.ndarray) -> float:
    """lambda_max(G_0) + sum_{t != 0} ||G_t||_F: a bound on sup_w lambda_max(G(w))."""
    ch, cw = gram.shape[0] // 2, gram.shape[1] // 2
    centre = gram[ch, cw]
    lam0 = float(np.linalg.eigvalsh((centre + centre.T) / 2)[-1])
    off = 0.0
    for y in range(gram.shape[0]):
        for x in range(gram.shape[1]):
            if (y, x) != (ch, cw):
                block = gram[y, x]
                # Frobenius >= spectral norm; for near-orthogonal kernels these blocks
                # are rounding noise, so the cheaper norm costs nothing in tightness.
                off += float(np.sqrt(np.sum(block * block)))
    return lam0 + off


def _spectrum(kernel: np.ndarray, grid: int) -> np.ndarray:
    """K^(w) on an N x N frequency grid, as (N*N, cout, cin) complex matrices."""
    cout, cin, kh, kw = kernel.shape
    if grid < max(kh, kw):
        raise ValueError("the frequency grid must be at least the kernel size (no cropping)")
    spec = np.fft.fft2(kernel, s=(grid, grid), axes=(2, 3))
    return spec.transpose(2, 3, 0, 1).reshape(grid * grid, cout, cin)


def _grid_max_sq(kernel: np.ndarray, grid: int) -> float:
    """max over an N x N frequency grid of sigma_max(K^(w))^2, exactly (eigvalsh)."""
    spec = _spectrum(kernel, grid)
    small_in = spec.shape[2] <= spec.shape[1]
    gram = spec.conj().swapaxes(1, 2) @ spec if small_in else spec @ spec.conj().swapaxes(1, 2)
    return float(np.linalg.eigvalsh(gram)[:, -1].max())


def conv_norm_bound(
    kernel: np.ndarray, stride: int = 1, dilation: int = 1, grid: int = 32
) -> NormBound:
    """Guaranteed l2 operator-norm bound of a (zero-padded, strided, dilated) Conv2d.

    `grid` sets the frequency grid used for the lower bound and the Bernstein bound.
    """
    k = np.asarray(kernel, dtype=np.float64)
    if k.ndim != 4:
        raise ValueError(f"expected a (cout, cin, kh, kw) kernel, got shape {k.shape}")
    if stride > 1 and dilation > 1:
        raise ValueError("strided and dilated at once is not supported by the audit")
    k = polyphase_kernel(k, stride)
    if k.shape[2] == 1 and k.shape[3] == 1:
        return matrix_norm_bound(k[:, :, 0, 0])
    upper_sq, method = _defect_bound_sq(_gram_blocks(k)), "gram-defect"
    lower_sq = _grid_max_sq(k, max(4, *k.shape[2:]))
    if upper_sq > lower_sq * (1 + 1e-5):
        # Not (scaled-)orthogonal: the exact grid maximum with Bernstein's error term
        # may be tighter, and is a better lower bound.
        grid = max(grid, 4 * max(k.shape[2:]))
        grid_sq = _grid_max_sq(k, grid)
        shrink = math.pi * ((k.shape[2] - 1) + (k.shape[3] - 1)) / grid
        if shrink < 1 and grid_sq / (1.0 - shrink) < upper_sq:
            upper_sq, method = grid_sq / (1.0 - shrink), "freq-grid"
        lower_sq = max(lower_sq, grid_sq)
    lower = math.sqrt(max(lower_sq, 0.0))
    upper = math.sqrt(max(upper_sq, 0.0)) * (1 + ROUNDING_SLACK)
    return NormBound(upper=max(upper, lower), lower=lower, method=method)


def conv_transpose_norm_bound(kernel: np.ndarray, stride: int = 1, grid: int = 32) -> NormBound:
    """Bound of a ConvTranspose2d with weight (cin, cout, kh, kw): the adjoint of the
    Conv2d with that weight read as (out=cin, in=cout), hence the same norm."""
    return conv_norm_bound(kernel, stride=stride, grid=grid)
