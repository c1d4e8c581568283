"""Certificates from margins that were computed in finite precision.

Two facts every backend needs, kept in one place so that the ONNX graph, the
TensorRT and torch engines and the server apply the same arithmetic:

- `radius_scale_for(L)`: the float32 factor c such that margin * c, rounded to
  float32, never exceeds margin / (sqrt(2) L). The exported graph and every engine
  that rescales margins use it, so no radius is ever one rounding step too large.
- `certified_margins(margin, error, L)`: an engine whose logits differ from the
  fp32 evaluation the certificate speaks of (fp16, bf16, TF32, another kernel
  order) certifies with margin - error, where error bounds |its margin - the fp32
  margin| (and a pixel whose class differs between the two has margin <= error).
  max(margin - error, 0) is then a sound margin and the radius follows from it.
- `float16_down(radius)`: radii narrowed to float16 for the wire, each rounded down,
  so that a client testing radius > eps never certifies a pixel the float32 radius
  does not (rounding to nearest moves up to half a float16 step, 2^-11 relative, up).

Written against the array API, like the rest of this package: numpy in, numpy
out (the server); torch in, torch out (a GPU engine shrinks margins on the device).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace

__all__ = ["certified_margins", "float16_down", "radius_scale_for"]

Array = Any


def radius_scale_for(lipschitz: float) -> float:
    """The float32 factor c with margin * c <= margin / (sqrt(2) L) after fp32 rounding.

    1/(sqrt(2) L) is shrunk by 2^-22 (covers the rounding of the product, <= 2^-24
    relative) and then rounded down to float32, so the radius computed with it is
    never larger than the exact one (it is smaller by ~3e-7 relative).
    """
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"Lipschitz bound must be finite and > 0, got {lipschitz}")
    exact = 1.0 / (math.sqrt(2.0) * lipschitz) * (1.0 - 2.0**-22)
    c = np.float32(exact)
    if float(c) > exact:
        c = np.nextafter(c, np.float32(0.0))
    return float(c)


def certified_margins(
    margin: Array, error: float, lipschitz: float, xp: Any = None
) -> tuple[Array, Array]:
    """(max(margin - error, 0), its radius) in float32, for margins off by at most error.

    The float32 error is rounded up, never down. The subtraction rounds to nearest
    (at most 2^-24 relative above the exact difference), which the 2^-22 slack of
    `radius_scale_for` covers for the radius. With error == 0 the margins pass
    through unchanged and only the radius is formed. `xp`, the array namespace, may
    be given by a caller that knows it: a compiled torch graph traces this function,
    and the namespace lookup (cached by type) stays out of it.
    """
    if not (math.isfinite(error) and error >= 0):
        raise ValueError(f"margin error bound must be finite and >= 0, got {error}")
    scale = radius_scale_for(lipschitz)
    if xp is None:
        xp = array_namespace(margin)
    m = xp.astype(margin, xp.float32)
    # The constants go in as Python floats, exact in float32 (the scale is one, e32
    # too): an array made of them on a CUDA device is a blocking host copy, which a
    # CUDA graph's capture refuses ("operation not permitted when stream is capturing").
    if error > 0:
        e32 = np.float32(error)
        if float(e32) < error:
            e32 = np.nextafter(e32, np.float32(math.inf))
        shrunk = m - float(e32)
        m = xp.where(shrunk > 0.0, shrunk, xp.zeros_like(shrunk))
    return m, m * scale


def float16_down(values: np.ndarray) -> np.ndarray:
    """`values` as float16, each the largest float16 not above it (NaN stays NaN).

    A radius past float16's range becomes 65504, not inf. Numpy only: it serves the
    REST answer, whose radius map travels as float16 (half the bytes of float32).
    """
    a = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    up = h.astype(np.float32) > a
    h[up] = np.nextafter(h[up], np.float16(-np.inf))
    return h
