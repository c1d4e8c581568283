"""Worst-case metrics over a data set, each image attacked with its own budget.

Micro pixel accuracy separates per image, so it is exact by summing. A micro IoU
(sum of TP over sum of unions) does not: the worst attack on one image depends on
the others' totals, and each image's own worst ratio is NOT the right choice. With
lambda the current ratio, min over joint attacks of sum_i (N_i - lambda D_i)
separates per image; Dinkelbach's iteration lambda <- ratio of the minimisers
decreases strictly until it stops at the exact minimum. Each image only needs its
frontier of splits (m TPs removed, the most FPs n*(m) added with what is left),
so the accumulator stores a few integers per image and class, never logits.

Results are numpy (the accumulator may be fed torch tensors; only small integer
arrays are moved to the host).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from array_api_compat import is_torch_array

from .budget import frontier_min_ratio, split_frontier
from .metrics import (
    IGNORE_INDEX,
    _certified_correct,
    _class_terms,
    _correct_and_flips,
    _nan_where,
    _nanmean,
    _prepare,
)
from .pixelwise import _check_lipschitz

__all__ = ["DatasetCertificate", "DatasetCertifier", "dinkelbach_min_ratio"]

Array = Any
_INT64_SAFE = 2**62


def _to_numpy(x: Array) -> np.ndarray:
    """Host copy of a numpy array or torch tensor (without importing torch)."""
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _first_per_segment(mask: np.ndarray, seg: np.ndarray, n_seg: int) -> np.ndarray:
    """Index of the first True of ``mask`` in each segment (every segment has one)."""
    hit = np.flatnonzero(mask)
    return hit[np.searchsorted(seg[hit], np.arange(n_seg))]


def dinkelbach_min_ratio(
    p0: npt.ArrayLike,
    q0: npt.ArrayLike,
    seg: npt.ArrayLike,
    m: npt.ArrayLike,
    n: npt.ArrayLike,
    *,
    p1: int = 1,
    q1: int = 0,
    max_iter: int = 10_000,
) -> tuple[float, np.ndarray]:
    """Exact min of sum_i (p0_i - p1 m_i) / sum_i (q0_i + q1 m_i + n_i), one choice per image.

    Candidates (m, n) of image i are the entries with ``seg == i`` (seg sorted,
    images 0..I-1 all present). n must enter with a positive sign (more FPs never
    help the metric). All terms are integers and the iteration is done in exact
    integer arithmetic (lambda = num / den as Python ints; per-candidate scores in
    int64 while they provably fit, float64 beyond), so the result is the exact
    minimum, not an approximation. Every candidate denominator must be > 0.
    Returns (minimum ratio, index of the chosen candidate for each image).
    """
    p0 = np.asarray(p0, dtype=np.int64)
    q0 = np.asarray(q0, dtype=np.int64)
    seg = np.asarray(seg, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    n_img = p0.shape[0]
    if n_img == 0:
        return math.nan, np.zeros(0, dtype=np.int64)
    bad = seg.size == 0 or seg[0] < 0 or seg[-1] >= n_img or np.any(np.diff(seg) < 0)
    if bad or np.any(np.bincount(seg, minlength=n_img) == 0):
        raise ValueError("seg must be sorted and give every image at least one candidate")
    starts = np.searchsorted(seg, np.arange(n_img))
    P0, Q0 = int(p0.sum()), int(q0.sum())
    m_max, n_max = int(m.max()), int(n.max())

    def totals(idx: np.ndarray) -> tuple[int, int]:
        sm, sn = int(m[idx].sum()), int(n[idx].sum())
        return P0 - p1 * sm, Q0 + q1 * sm + sn

    best = starts
    num, den = totals(best)
    if den <= 0:
        raise ValueError("denominator must be positive")
    for _ in range(max_iter):
        g = math.gcd(num, den)
        num, den = num // g, den // g
        # minimise sum N - (num/den) D  <=>  maximise m (p1 den + q1 num) + n num
        alpha, beta = p1 * den + q1 * num, num
        if abs(alpha) * m_max + abs(beta) * n_max < _INT64_SAFE:
            score = m * alpha + n * beta
        else:  # astronomically large data sets only
            score = m.astype(np.float64) * float(alpha) + n.astype(np.float64) * float(beta)
        top = np.maximum.reduceat(score, starts)
        idx = _first_per_segment(score == top[seg], seg, n_img)
        new_num, new_den = totals(idx)
        if new_den <= 0:
            raise ValueError("denominator must be positive")
        if new_num * den >= num * new_den:  # no strict decrease: lambda is optimal
            break
        num, den, best = new_num, new_den, idx
    return num / den, best


@dataclass(frozen=True, eq=False)
class DatasetCertificate:
    """Clean and worst-case metrics of a data set (micro-averaged over pixels).

    worst_* are lower bounds valid for every choice of per-image perturbations with
    norms <= each image's eps. Per-class arrays are NaN for classes without labelled
    pixels; the means skip them. image_worst_miou holds each image's own mIoU bound
    (for a macro average), a different quantity from worst_miou.
    """

    num_images: int
    num_valid: int
    pixel_accuracy: float
    worst_pixel_accuracy: float
    certified_pixel_accuracy: float
    iou: np.ndarray
    worst_iou: np.ndarray
    miou: float
    worst_miou: float
    dice: np.ndarray
    worst_dice: np.ndarray
    mdice: float
    worst_mdice: float
    image_worst_miou: np.ndarray = field(repr=False)


def _nanmean_np(x: np.ndarray) -> float:
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


@dataclass
class _ClassStore:
    gt: list[np.ndarray] = field(default_factory=list)
    tp: list[np.ndarray] = field(default_factory=list)
    fp: list[np.ndarray] = field(default_factory=list)
    seg: list[np.ndarray] = field(default_factory=list)
    m: list[np.ndarray] = field(default_factory=list)
    n: list[np.ndarray] = field(default_factory=list)


class DatasetCertifier:
    """Accumulates per-image certificate data batch by batch; ``compute`` gives totals.

    Feed ``update(logits, target, eps)`` with logits (..., K, H, W) (numpy or torch),
    target (..., H, W) and eps a float or per-image array. Only integers per image
    and class are kept: clean counts and the (m, n*(m)) frontier of affordable splits.
    """

    def __init__(self, num_classes: int, L: float, *, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = int(num_classes)
        self.L = _check_lipschitz(L)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far."""
        self._num_images = 0
        self._valid: list[np.ndarray] = []
        self._correct: list[np.ndarray] = []
        self._flips: list[np.ndarray] = []
        self._certified: list[np.ndarray] = []
        self._image_miou: list[np.ndarray] = []
        self._classes = [_ClassStore() for _ in range(self.num_classes)]

    def update(self, logits: Array, target: Array, eps: float | Array) -> None:
        """Add a batch of images (any leading dims; each is one image)."""
        p = _prepare(logits, target, eps, self.L, self.ignore_index)
        if self.num_classes != p.K:
            raise ValueError(f"logits have {p.K} classes, expected {self.num_classes}")
        xp = p.xp
        n_correct, k = _correct_and_flips(p)
        self._valid.append(_to_numpy(p.count(p.valid)))
        self._correct.append(_to_numpy(n_correct))
        self._flips.append(_to_numpy(k))
        self._certified.append(_to_numpy(_certified_correct(p)))
        ious = []
        for c, store in enumerate(self._classes):
            t = _class_terms(p, c)
            n_star, feasible = split_frontier(t.tp_costs, t.fp_costs, p.budget)
            iou = frontier_min_ratio(n_star, feasible, t.tp, 1.0, t.gt + t.fp, 0.0)
            ious.append(_nan_where(t.gt == 0, iou))
            rows, ms = xp.nonzero(feasible)  # row-major: images in order, m ascending
            store.gt.append(_to_numpy(t.gt))
            store.tp.append(_to_numpy(t.tp))
            store.fp.append(_to_numpy(t.fp))
            store.seg.append(_to_numpy(rows) + self._num_images)
            store.m.append(_to_numpy(ms))
            store.n.append(_to_numpy(n_star[rows, ms]))
        self._image_miou.append(_to_numpy(_nanmean(xp.stack(ious, axis=-1))))
        self._num_images += int(p.valid.shape[0])

    def compute(self) -> DatasetCertificate:
        """Exact micro-averaged clean and worst-case metrics of everything fed so far."""
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
        K = self.num_classes
        n_valid = int(cat(self._valid).sum())
        n_correct = int(cat(self._correct).sum())
        acc = n_correct / n_valid if n_valid else math.nan
        worst_acc = (n_correct - int(cat(self._flips).sum())) / n_valid if n_valid else math.nan
        cert_acc = int(cat(self._certified).sum()) / n_valid if n_valid else math.nan
        iou, worst_iou = np.full(K, math.nan), np.full(K, math.nan)
        dice, worst_dice = np.full(K, math.nan), np.full(K, math.nan)
        for c, s in enumerate(self._classes):
            gt, tp, fp = cat(s.gt), cat(s.tp), cat(s.fp)
            if gt.sum() == 0:
                continue
            seg, m, n = cat(s.seg), cat(s.m), cat(s.n)
            iou[c] = tp.sum() / (gt.sum() + fp.sum())
            dice[c] = 2 * tp.sum() / (gt.sum() + tp.sum() + fp.sum())
            worst_iou[c] = dinkelbach_min_ratio(tp, gt + fp, seg, m, n, p1=1, q1=0)[0]
            worst_dice[c] = dinkelbach_min_ratio(2 * tp, gt + tp + fp, seg, m, n, p1=2, q1=-1)[0]
        return DatasetCertificate(
            num_images=self._num_images,
            num_valid=n_valid,
            pixel_accuracy=acc,
            worst_pixel_accuracy=worst_acc,
            certified_pixel_accuracy=cert_acc,
            iou=iou,
            worst_iou=worst_iou,
            miou=_nanmean_np(iou),
            worst_miou=_nanmean_np(worst_iou),
            dice=dice,
            worst_dice=worst_dice,
            mdice=_nanmean_np(dice),
            worst_mdice=_nanmean_np(worst_dice),
            image_worst_miou=np.asarray(cat(self._image_miou), dtype=np.float64),
        )
