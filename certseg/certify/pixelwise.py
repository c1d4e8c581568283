"""Per-pixel certificates: margins, certified radii and the guaranteed region.

Every function here is written once against the array API (``array_api_compat``):
numpy arrays in give numpy arrays out (the server has no torch), torch tensors in
give torch tensors out (training). torch is never imported by this package.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace, is_torch_array
from array_api_compat import device as _device

from .numerics import radius_scale_for

__all__ = ["certified_radius", "guaranteed_region", "margins"]

Array = Any  # a numpy array or a torch tensor (anything array_api_compat knows)

#: float32's least normal number: radii below it round by an absolute step
_LEAST_NORMAL32 = 2.0**-126


def _detach(x: Array) -> Array:
    """Drop the autograd graph: the combinatorial bounds are counts, not losses."""
    return x.detach() if is_torch_array(x) else x


def _check_lipschitz(L: float) -> float:
    """L must be a finite positive number; a wrong L silently voids every certificate."""
    L = float(L)
    if not (math.isfinite(L) and L > 0.0):
        raise ValueError(f"Lipschitz bound L must be finite and > 0, got {L}")
    return L


def _eps_array(eps: float | Array, xp: Any, dev: Any) -> Array:
    """eps as a float64 array on the right device, rejecting negative or NaN values."""
    e = xp.asarray(eps, dtype=xp.float64, device=dev)
    if bool(xp.any(xp.isnan(e) | (e < 0))):
        raise ValueError("eps must be >= 0 (and not NaN)")
    return e


def _eps_rows(eps: float | Array, lead: tuple[int, ...], xp: Any, dev: Any) -> Array:
    """Per-image eps, broadcast over the leading (batch) dims and flattened to (R,)."""
    e = xp.broadcast_to(_eps_array(eps, xp, dev), lead)
    return xp.reshape(e, (math.prod(lead),))


def _top2(logits: Array) -> tuple[Array, Array, Array]:
    """(pred, top1, top2) along the class axis -3; top2 is -inf when K == 1.

    pred is the first maximal index (ties go to the lowest class, as argmax does in
    both numpy and torch); top2 is the best logit among the *other* classes, so a
    tie gives top1 == top2 and a zero margin.
    """
    xp = array_namespace(logits)
    if logits.ndim < 3:
        raise ValueError(f"logits must have shape (..., K, H, W), got {tuple(logits.shape)}")
    K = logits.shape[-3]
    if K < 1:
        raise ValueError("logits need at least one class")
    pred = xp.argmax(logits, axis=-3)
    top1 = xp.max(logits, axis=-3)
    classes = xp.reshape(xp.arange(K, device=_device(logits)), (K, 1, 1))
    neg_inf = xp.asarray(-math.inf, dtype=logits.dtype, device=_device(logits))
    others = xp.where(classes == xp.expand_dims(pred, axis=-3), neg_inf, logits)
    top2 = xp.max(others, axis=-3)
    return pred, top1, top2


def unknown_where_margin_nan(logits: Array) -> Array:
    """`logits` (..., K, H, W) with every logit of a pixel whose margin is NaN (a NaN
    logit, or a tie of infinite ones: inf - inf) set to 0: a pixel nothing is known
    of, class 0 and margin 0, flippable for free into any class. Without it a NaN
    compares false everywhere, and the joint figures counted such a pixel as one no
    attack can flip. (An infinite logit alone is a float32 overflow: a value past
    3.4e38, its gaps to finite ones truly past any budget, so it stays.) The server
    applies the same rule to an engine's outputs, infinities included
    (server.backends.base.unknown_where_not_finite). Callers test first for a
    non-finite max over classes or a NaN margin, which they compute anyway: a min over
    all logits cost 17 ms at 7x1024x2048."""
    xp = array_namespace(logits)
    _, top1, top2 = _top2(logits)
    bad = xp.expand_dims(xp.isnan(top1 - top2), axis=-3)
    return xp.where(bad, xp.zeros_like(logits), logits)


def margins(logits: Array) -> tuple[Array, Array]:
    """Predicted class and top1 - top2 margin per pixel, over the class axis -3.

    The margin is what every certificate is built from: a pixel keeps its class
    until the logit map moves by margin / sqrt(2) at that pixel. With K == 1 no
    other class exists, so the margin is +inf. The margin keeps the logits' dtype
    (and autograd graph), so it can also serve as a training signal.
    """
    pred, top1, top2 = _top2(logits)
    return pred, top1 - top2


def _margins64(logits: Array) -> tuple[Array, Array, Array]:
    """(pred, margin, top1) with margin and top1 in float64, for the budget math.

    The subtraction is done in float64 so rounding cannot enlarge a float32 margin.
    """
    xp = array_namespace(logits)
    pred, top1, top2 = _top2(_detach(logits))
    top1 = xp.astype(top1, xp.float64)
    return pred, top1 - xp.astype(top2, xp.float64), top1


def certified_radius(margin: Array, L: float) -> Array:
    """l2 radius r = margin / (sqrt(2) L) within which the pixel's class cannot change,
    never above it: formed as margin * `radius_scale_for(L)`, as the exported head and
    the engines do (margin / (sqrt(2) L) in float32 rounds to nearest, up half the time).

    Changing the argmax needs the two top logits to meet, i.e. a logit change of
    norm >= margin / sqrt(2); an L-Lipschitz net needs an input change of that / L.
    """
    return margin * radius_scale_for(_check_lipschitz(L))


def _unperturbed(eps: Array, exact: bool = True) -> Array:
    """Where (per eps) no pixel can change class whatever its margin: eps == 0 with
    `exact` margins. The one place of that rule; every figure's eps == 0 case is it.

    `exact`: the margins are the float32 network's own. An engine's margins shrunk by
    a margin error e > 0 (`certified_margins`) are not: a pixel of certified margin 0
    may show another class than the float32 net's even unperturbed, so at eps == 0 it
    is flippable for free (cost 0 within a budget of 0), as at any eps, and is never
    guaranteed; only pixels of certified margin > 0 are.
    """
    return (eps == 0) & bool(exact)


def guaranteed_region(radius: Array, eps: float | Array, exact: bool = True) -> Array:
    """Boolean mask of pixels whose class no perturbation of norm <= eps can change.

    radius > eps strictly (at radius == eps a perturbation of norm eps reaches the
    tie); at eps == 0 no perturbation exists, so every pixel is guaranteed, when the
    margins are `exact` (`_unperturbed`); radii shrunk by a margin error guarantee
    only radius > 0 at eps == 0. eps is a float or a per-image array broadcastable
    over the leading dims of radius.

    At eps > 0 a radius must also exceed float32's least normal number (1.2e-38):
    below it, margin * c rounds by an absolute 2^-150, which the relative slack of
    `radius_scale_for` does not cover, so such a radius may be above the exact one.
    """
    xp = array_namespace(radius)
    e = _eps_array(eps, xp, _device(radius))
    e = xp.reshape(e, (*e.shape, 1, 1))
    floor = xp.where(e > 0, xp.clip(e, min=_LEAST_NORMAL32), e)
    return (xp.astype(_detach(radius), xp.float64) > floor) | _unperturbed(e, exact)
