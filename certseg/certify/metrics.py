"""Worst-case segmentation metrics of one image under a joint l2 attack of norm eps.

Each function returns a lower bound (an upper bound for error rates) that holds for
every perturbation of norm <= eps, computed from a single forward pass. Inputs:
logits (..., K, H, W), integer target (..., H, W) with ``ignore_index`` marking
unlabelled pixels, eps a float or per-image array over the leading dims, L the
network's l2 Lipschitz bound. Results are float64 of the leading shape (per image),
or leading shape + (K,) for per-class metrics. At eps == 0 every bound equals the
clean metric (with margin_error 0; see below). Class-wise bounds come from each
class's own worst attack; their mean is a valid (not necessarily tight) bound on
the mean.

``margin_error`` e: logits from an engine that differs from the float32 evaluation
the certificate speaks of (fp16, TensorRT) by at most e / 2 per logit, so that every
difference of two logits is off by at most e (the bound `certified_margins` takes
off margins). Every flip cost is then formed from the difference shrunk by e,
max(d - e, 0)^2 / 2: a lower bound of the float32 net's cost to move from the
engine's prediction, so the bounds hold for the float32 net. A pixel whose class
the two disagree on has margin <= e: it flips for free, at eps == 0 too (the
engine's answer is not known to be the float32 net's there: the bounds at eps == 0
are then the worst the error allows, below the engine's clean metric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as _device

from .budget import (
    _effective_budget,
    _keep_sorted,
    _max_flips_rows,
    summed_budget_slack,
    worst_ratio,
)
from .pixelwise import (
    _check_lipschitz,
    _detach,
    _eps_rows,
    _margins64,
    certified_radius,
    guaranteed_region,
    unknown_where_margin_nan,
)

__all__ = [
    "certified_pixel_accuracy",
    "worst_case_dice",
    "worst_case_fnr",
    "worst_case_fwiou",
    "worst_case_iou",
    "worst_case_miou",
    "worst_case_pixel_accuracy",
]

Array = Any
IGNORE_INDEX = 255


@dataclass
class _Prepared:
    """One batch flattened to rows (R images x N pixels), with everything in float64."""

    xp: Any
    dev: Any
    lead: tuple[int, ...]
    hw: tuple[int, int]
    K: int
    L: float
    logits: Array  # (R, K, N), input dtype, detached
    pred: Array  # (R, N) int64
    target: Array  # (R, N)
    valid: Array  # (R, N) bool
    margin: Array  # (R, N) float64
    top1: Array  # (R, N) float64
    cost: Array  # (R, N) float64, margin**2 / 2
    eps: Array  # (R,) float64
    budget: Array  # (R,) float64, -1 where eps == 0 and margin_error == 0
    error: float  # margin_error: shrinks every logit difference a cost is formed from

    def count(self, mask: Array) -> Array:
        """Per-row count of a boolean (R, N) mask, int64."""
        return self.xp.sum(self.xp.astype(mask, self.xp.int64), axis=-1)

    def unflatten(self, x: Array, *trailing: int) -> Array:
        """Restore the leading (batch) dims of a per-row result."""
        return self.xp.reshape(x, (*self.lead, *trailing))


def _prepare(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    ignore_index: int,
    margin_error: float = 0.0,
) -> _Prepared:
    xp = array_namespace(logits, target)
    L = _check_lipschitz(L)
    if not (math.isfinite(margin_error) and margin_error >= 0):
        raise ValueError(f"margin_error must be finite and >= 0, got {margin_error}")
    if logits.ndim < 3:
        raise ValueError(f"logits must have shape (..., K, H, W), got {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-3])
    K, H, W = (int(s) for s in logits.shape[-3:])
    if tuple(target.shape) != (*lead, H, W):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    R, N = math.prod(lead), H * W
    dev = _device(logits)
    logits = _detach(logits)
    pred, margin, top1 = _margins64(logits)
    if bool(xp.any(xp.isnan(margin))):  # a NaN logit or an infinite tie: nothing known
        logits = unknown_where_margin_nan(logits)
        pred, margin, top1 = _margins64(logits)
    target = xp.reshape(_detach(target), (R, N))
    margin = _shrunk(xp.reshape(margin, (R, N)), margin_error)
    eps_rows = _eps_rows(eps, lead, xp, dev)
    return _Prepared(
        xp=xp,
        dev=dev,
        lead=lead,
        hw=(H, W),
        K=K,
        L=L,
        logits=xp.reshape(logits, (R, K, N)),
        pred=xp.reshape(pred, (R, N)),
        target=target,
        valid=target != ignore_index,
        margin=margin,
        top1=xp.reshape(top1, (R, N)),
        cost=margin * margin / 2.0,
        eps=eps_rows,
        # its costs are summed in float64: a set that just fits stays affordable
        budget=_effective_budget(eps_rows, L, summed_budget_slack(margin), margin_error == 0),
        error=float(margin_error),
    )


def _shrunk(d: Array, error: float) -> Array:
    """max(d - error, 0): a logit difference's lower bound for the float32 net."""
    if error == 0:
        return d
    xp = array_namespace(d)
    return xp.maximum(d - error, xp.zeros_like(d))


@dataclass
class _ClassTerms:
    """What the attack on class c needs: clean counts and affordable sorted costs."""

    gt: Array  # (R,) int64, #(target == c)
    tp: Array  # (R,) int64, #(target == c & pred == c)
    fp: Array  # (R,) int64, #(pred == c & target != c & valid)
    tp_costs: Array  # (R, M) sorted costs of removing a TP, +inf padded
    fp_costs: Array  # (R, F) sorted costs of adding an FP, +inf padded


def _class_terms(p: _Prepared, c: int, with_fp: bool = True) -> _ClassTerms:
    """Clean counts of class c and the costs of its cheapest TP removals / FP additions.

    Removing a TP costs margin**2 / 2 (go to the runner-up). Turning a valid pixel q
    with target != c and prediction c' != c into c costs (z_c' - z_c)**2 / 2.
    Only costs within the image's budget are kept: dearer ones can never be paid.
    """
    xp = p.xp
    gt_c = p.valid & (p.target == c)
    pred_c = p.pred == c
    other = p.valid & (p.target != c)
    tp = gt_c & pred_c
    b = p.budget[:, None]
    tp_costs = _keep_sorted(p.cost, tp & (p.cost <= b))
    if with_fp:
        d = _shrunk(p.top1 - xp.astype(p.logits[:, c, :], xp.float64), p.error)
        fp_cost = d * d / 2.0
        fp_costs = _keep_sorted(fp_cost, other & ~pred_c & (fp_cost <= b))
    else:
        fp_costs = xp.zeros((p.target.shape[0], 0), dtype=xp.float64, device=p.dev)
    fp = p.count(other & pred_c)
    return _ClassTerms(
        gt=p.count(gt_c), tp=p.count(tp), fp=fp, tp_costs=tp_costs, fp_costs=fp_costs
    )


def _nan_where(cond: Array, x: Array) -> Array:
    xp = array_namespace(x)
    return xp.where(cond, xp.asarray(math.nan, dtype=xp.float64, device=_device(x)), x)


def _safe_ratio(num: Array, den: Array) -> Array:
    """num / den in float64, NaN where den == 0 (metric undefined, e.g. no labels)."""
    xp = array_namespace(num)
    num = xp.astype(num, xp.float64)
    den = xp.astype(den, xp.float64)
    return _nan_where(den == 0, num / xp.where(den == 0, xp.ones_like(den), den))


def _nanmean(x: Array, axis: int = -1) -> Array:
    """Mean over non-NaN entries (NaN if none): classes absent from the image are skipped."""
    xp = array_namespace(x)
    ok = ~xp.isnan(x)
    total = xp.sum(xp.where(ok, x, xp.zeros_like(x)), axis=axis)
    return _safe_ratio(total, xp.sum(xp.astype(ok, xp.int64), axis=axis))


def _iou_dice_rows(p: _Prepared, dice: bool) -> tuple[Array, Array]:
    """Per-class worst IoU (or Dice) and GT counts, both (R, K)."""
    xp = p.xp
    out, gts = [], []
    for c in range(p.K):
        t = _class_terms(p, c)
        if dice:  # 2 (TP - m) / (GT + TP + FP - m + n)
            p0, p1, q0, q1 = 2 * t.tp, 2.0, t.gt + t.tp + t.fp, -1.0
        else:  # (TP - m) / (GT + FP + n)
            p0, p1, q0, q1 = t.tp, 1.0, t.gt + t.fp, 0.0
        r = worst_ratio(t.tp_costs, t.fp_costs, p.budget, p0, p1, q0, q1)
        out.append(_nan_where(t.gt == 0, r))
        gts.append(t.gt)
    return xp.stack(out, axis=-1), xp.stack(gts, axis=-1)


def _correct_and_flips(p: _Prepared) -> tuple[Array, Array]:
    """(n_correct, k) per row: k = most correct pixels one attack can flip."""
    correct = p.valid & (p.pred == p.target)
    return p.count(correct), _max_flips_rows(p.cost, correct, p.budget)


def _certified_correct(p: _Prepared) -> Array:
    """Per row, how many valid pixels are correct and inside the guaranteed region."""
    radius = p.unflatten(certified_radius(p.margin, p.L), *p.hw)
    safe = guaranteed_region(radius, p.unflatten(p.eps), exact=p.error == 0)
    safe = p.xp.reshape(safe, p.valid.shape)
    return p.count(p.valid & (p.pred == p.target) & safe)


def worst_case_pixel_accuracy(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    *,
    ignore_index: int = IGNORE_INDEX,
    margin_error: float = 0.0,
) -> Array:
    """Lowest pixel accuracy any perturbation of norm <= eps can force, per image.

    The attacker flips the cheapest correct pixels: (n_correct - k) / n_valid with k
    the max flips among correct pixels. NaN for an image without valid pixels.
    """
    p = _prepare(logits, target, eps, L, ignore_index, margin_error)
    n_correct, k = _correct_and_flips(p)
    return p.unflatten(_safe_ratio(n_correct - k, p.count(p.valid)))


def certified_pixel_accuracy(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    *,
    ignore_index: int = IGNORE_INDEX,
    margin_error: float = 0.0,
) -> Array:
    """Fraction of valid pixels that are correct AND individually certified at eps.

    Weaker than the joint bound (each pixel is attacked alone), but it is the number
    the guaranteed-region overlay shows.
    """
    p = _prepare(logits, target, eps, L, ignore_index, margin_error)
    return p.unflatten(_safe_ratio(_certified_correct(p), p.count(p.valid)))


def worst_case_iou(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    *,
    ignore_index: int = IGNORE_INDEX,
    margin_error: float = 0.0,
) -> Array:
    """Per-class worst IoU = min (TP - m) / (GT + FP + n) over affordable attacks.

    Shape (..., K); NaN for classes absent from the image's labels (GT == 0).
    """
    p = _prepare(logits, target, eps, L, ignore_index, margin_error)
    return p.unflatten(_iou_dice_rows(p, dice=False)[0], p.K)


def worst_case_dice(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    *,
    ignore_index: int = IGNORE_INDEX,
    margin_error: float = 0.0,
) -> Array:
    """Per-class worst Dice = min 2 TP' / (GT + TP' + FP'), shape (..., K), NaN if GT == 0."""
    p = _prepare(logits, target, eps, L, ignore_index, margin_error)
    return p.unflatten(_iou_dice_rows(p, dice=True)[0], p.K)


def worst_case_miou(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    *,
    ignore_index: int = IGNORE_INDEX,
    margin_error: float = 0.0,
) -> Array:
    """Per-image mIoU bound: mean of per-class bounds over classes present in the labels."""
    iou = worst_case_iou(
        logits, target, eps, L, ignore_index=ignore_index, margin_error=margin_error
    )
    return _nanmean(iou)


def worst_case_fwiou(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    *,
    ignore_index: int = IGNORE_INDEX,
    margin_error: float = 0.0,
) -> Array:
    """Frequency-weighted IoU bound: sum_c (GT_c / n_valid) * worst IoU_c, per image.

    The weights depend on the labels only, so a weighted sum of bounds is a bound.
    """
    p = _prepare(logits, target, eps, L, ignore_index, margin_error)
    xp = p.xp
    iou, gt = _iou_dice_rows(p, dice=False)
    weighted = xp.where(gt > 0, xp.astype(gt, xp.float64) * iou, xp.zeros_like(iou))
    return p.unflatten(_safe_ratio(xp.sum(weighted, axis=-1), p.count(p.valid)))


def worst_case_fnr(
    logits: Array,
    target: Array,
    eps: float | Array,
    L: float,
    *,
    positive: int = 1,
    ignore_index: int = IGNORE_INDEX,
    margin_error: float = 0.0,
) -> Array:
    """Highest false-negative rate of class ``positive`` any attack can force, per image.

    1 - min (TP - m) / GT: the attacker removes true positives, cheapest first
    (adding false positives does not change the FNR). NaN if the image has no
    positive pixels. Meant for binary tasks but valid for any K.
    """
    p = _prepare(logits, target, eps, L, ignore_index, margin_error)
    if not 0 <= positive < p.K:
        raise ValueError(f"positive class {positive} out of range for K = {p.K}")
    t = _class_terms(p, positive, with_fp=False)
    recall = worst_ratio(t.tp_costs, t.fp_costs, p.budget, t.tp, 1.0, t.gt, 0.0)
    return p.unflatten(_nan_where(t.gt == 0, 1.0 - recall))
