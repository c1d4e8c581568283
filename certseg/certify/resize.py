"""Area downscaling with a known operator norm, so certificates speak of the image sent.

A frame larger than one pass can take (a 4K camera frame, a 12 MP photo) can be
shrunk by area averaging D before the net sees it: each network pixel is the mean of
the source area it covers. D is linear, so a perturbation delta of the source image
moves the network input by D delta, of l2 norm at most ||D|| ||delta||, and

    ||D|| <= sqrt(h w / (H W))

(Schur's test on each axis: every row of a 1-D area matrix sums to 1, every column
to n_out / n_in; D is the Kronecker product of the two axes' matrices). Storing D x
in float32 moves it by at most `rounding` in l2, for the image sent and for an
attacker's alike (pixel values in [0, 1]). Hence, for the upscaled answer:

- a source pixel takes the class of the network pixel its centre falls in; that
  class holds under every source perturbation of norm < (r - rounding) / ||D||,
  r the network pixel's radius;
- an eps-attack on the source is at most an (||D|| eps + rounding)-attack on the
  network input, so the joint budget at that eps bounds the network pixels one
  attack can flip, and each flips the source pixels mapped to it.

DESIGN.md: "If a resize is ever applied, fold its operator norm into L so the radius
still speaks of the image the user sent, and say so in the answer."
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..sizes import padded_pixels
from .budget import (
    _effective_budget,
    _fractions,
    _max_flips_select,
    affordable_by_class,
    cheapest_flips,
    flip_costs,
    fraction_counts,
    gain_candidates_by_class,
    gains_within,
    least_cover_cost,
    margin_rounding_slack,
)
from .knapsack import Knapsack, worst_split_ratio
from .pixelwise import _check_lipschitz

__all__ = ["AreaResize", "area_weights"]

#: Bound on |fl32(y) - y| for the computed y in [0, 1]: half an ulp of float32 below 1
#: (2**-25) plus a generous allowance for the float64 sums of a few weighted terms.
_ELEMENT_ERROR = 2.0**-25 + 2.0**-40
_ROWS_PER_BLOCK = 256  # network rows per step: bounds the float64 temporaries


def area_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D area matrix, banded: (index, weight), each (n_out, taps).

    Output k averages the source interval [k s, (k + 1) s), s = n_in / n_out; the
    weight of source pixel i is |[i, i + 1) n [k s, (k + 1) s)| / s. Interval ends are
    exact rationals (k n_in / n_out), so every row sums to 1 and every source pixel's
    weights sum to n_out / n_in. Unused taps have weight 0 (and index 0).
    """
    if not 1 <= n_out <= n_in:
        raise ValueError(f"area resize shrinks: need 1 <= {n_out} <= {n_in}")
    k = np.arange(n_out, dtype=np.int64)
    first = (k * n_in) // n_out  # source pixel holding the interval's start
    last = ((k + 1) * n_in - 1) // n_out  # ... and its end
    taps = int((last - first).max()) + 1
    index = first[:, None] + np.arange(taps, dtype=np.int64)[None, :]
    # overlap of [i, i + 1) with [k n_in / n_out, (k + 1) n_in / n_out), in units of 1/n_out
    lo = np.maximum(index * n_out, (k * n_in)[:, None])
    hi = np.minimum((index + 1) * n_out, ((k + 1) * n_in)[:, None])
    weight = np.clip(hi - lo, 0, None).astype(np.float64) / n_in
    index = np.where(weight > 0, index, 0)
    return index, weight


def _largest_sum(values: np.ndarray, k: int) -> int:
    """Sum of the k largest of small non-negative integers (block sizes: a few distinct
    values), by counting: one pass, where a partition of 10^6 of them took 20 ms."""
    counts = np.bincount(values)
    total, left = 0, k
    for value in np.flatnonzero(counts)[::-1].tolist():
        take = min(left, int(counts[value]))
        total, left = total + take * value, left - take
        if not left:
            break
    return total


def _run_sums(x: np.ndarray, starts: np.ndarray, counts: np.ndarray, axis: int) -> np.ndarray:
    """Sums of runs of `counts` consecutive slices from `starts` along `axis` (0 or 1
    of a 2-D array), int32: the r-th slice of every run at once, for r < max count."""
    out = x.take(starts, axis=axis).astype(np.int32)
    last = x.shape[axis] - 1
    for r in range(1, int(counts.max())):
        part = x.take(np.minimum(starts + r, last), axis=axis)
        has = counts > r
        out += part * (has[:, None] if axis == 0 else has[None, :])
    return out


def _shrink(x: np.ndarray, index: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """sum over taps of weight * x[index] along `axis` (0 or 1 of a 2-D plane; float64)."""
    if axis == 0:
        out = weight[:, 0, None] * x[index[:, 0]]
        for t in range(1, index.shape[1]):
            out += weight[:, t, None] * x[index[:, t]]
        return out
    out = x[:, index[:, 0]] * weight[None, :, 0]
    for t in range(1, index.shape[1]):
        out += x[:, index[:, t]] * weight[None, :, t]
    return out


@dataclass(frozen=True)
class AreaResize:
    """Area downscaling of (H, W) images to (h, w), with what the certificate needs."""

    source: tuple[int, int]  # (H, W) of the image sent
    network: tuple[int, int]  # (h, w) the net sees

    def __post_init__(self) -> None:
        (H, W), (h, w) = self.source, self.network
        if not (1 <= h <= H and 1 <= w <= W):
            raise ValueError(f"area resize shrinks: {H}x{W} -> {h}x{w}")

    @classmethod
    def to_fit(
        cls, height: int, width: int, max_pixels: int, pad_multiple: int = 1
    ) -> AreaResize | None:
        """The largest same-aspect shrink that runs on at most `max_pixels` once each
        side is padded to `pad_multiple` (`certseg.sizes.padded_pixels`); None if the
        image fits as it is. Sizes are floor(side x s), at least 1, for a scale s set by
        either side (s = k / side): exact integers, each side's k found by bisection."""
        if padded_pixels(height, width, pad_multiple) <= max_pixels:
            return None
        best: tuple[int, int] | None = None
        for side in (height, width):

            def size(k: int, side: int = side) -> tuple[int, int]:
                return max(1, height * k // side), max(1, width * k // side)

            lo, hi = 0, side  # size(lo) fits (or lo == 0), size(side) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if padded_pixels(*size(mid), pad_multiple) <= max_pixels:
                    lo = mid
                else:
                    hi = mid
            if lo and (best is None or math.prod(size(lo)) > math.prod(best)):
                best = size(lo)
        if best is None:
            raise ValueError(
                f"no shrink of {height}x{width} runs on {max_pixels} pixels "
                f"(each side padded to a multiple of {pad_multiple})"
            )
        return cls((height, width), best)

    @classmethod
    def by_scale(cls, height: int, width: int, scale: float) -> AreaResize | None:
        """Both sides times `scale` in (0, 1], rounded, at least 1; None if unchanged."""
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        return None if (h, w) == (height, width) else cls((height, width), (h, w))

    # the certificate's side ------------------------------------------------------------
    @cached_property
    def operator_norm(self) -> float:
        """An upper bound of ||D||_2 (rounded up)."""
        (H, W), (h, w) = self.source, self.network
        return math.nextafter(math.sqrt((h * w) / (H * W)), math.inf) * (1 + 1e-12)

    def rounding(self, channels: int = 3) -> float:
        """l2 bound of the float32 rounding of D x, for x and an attacker's image both."""
        h, w = self.network
        return 2.0 * _ELEMENT_ERROR * math.sqrt(channels * h * w) * (1 + 1e-9)

    def network_eps(self, eps: float, channels: int = 3) -> float:
        """The network-input budget an eps-attack on the source image stays within."""
        if eps == 0:
            return 0.0  # no perturbation: the network sees exactly what it saw
        return (self.operator_norm * eps + self.rounding(channels)) * (1 + 1e-9)

    def source_radius(self, radius: np.ndarray, channels: int = 3) -> np.ndarray:
        """Network radii -> radii against source perturbations: max(r - rounding, 0) /
        operator_norm, never above it.

        In float32, in place (a 4K frame's 4 Mpx: ~10 ms, 89 in float64): rounding taken
        up, 1 / norm taken down, and the result shrunk by 2^-20, which covers the
        (1 + 2^-24)^3 of the three roundings."""
        rho = np.nextafter(np.float32(self.rounding(channels)), np.float32(np.inf))
        inv = np.nextafter(np.float32(1.0 / self.operator_norm), np.float32(0))
        out = np.subtract(radius, rho, dtype=np.float32)
        out *= inv * np.float32(1 - 2.0**-20)
        return np.maximum(out, np.float32(0), out=out)

    def source_fraction(self, region: np.ndarray) -> float:
        """Fraction of source pixels whose network pixel is in `region` (h, w), exactly:
        each network pixel counts the source pixels mapped to it."""
        hits = int(self._row_counts @ (region.astype(np.int64) @ self._col_counts))
        return hits / (self.source[0] * self.source[1])

    def source_counts_by_class(
        self, mask: np.ndarray, num_classes: int, region: np.ndarray | None = None
    ) -> np.ndarray:
        """Source pixels of each class of a network-grid mask (h, w), those of network
        pixels in `region` (h, w, bool) alone if given: int64 (num_classes,)."""
        worth = self._worth if region is None else np.where(region, self._worth, 0)
        labels = np.clip(mask.reshape(-1), 0, num_classes - 1)
        sums = np.bincount(labels, weights=worth.reshape(-1), minlength=num_classes)
        return np.rint(sums).astype(np.int64)  # integers below 2^53: float64 sums are exact

    def max_source_flips(
        self, margin: np.ndarray, eps: float, lipschitz: float, exact: bool = True
    ) -> int:
        """Most source pixels one source attack of norm <= eps can flip (`exact`: as in
        `attack_budget`)."""
        one = np.zeros(margin.shape, np.uint8)
        return int(self.max_source_flips_by_class(margin, one, 1, eps, lipschitz, exact)[0])

    def max_source_flips_by_class(
        self,
        margin: np.ndarray,
        mask: np.ndarray,
        num_classes: int,
        eps: float,
        lipschitz: float,
        exact: bool = True,
    ) -> np.ndarray:
        """Per class c of the network-grid mask: the most source pixels of class c one
        source attack of norm <= eps can flip, int64 (num_classes,) (`_source_bounds`
        over c's affordable network pixels)."""
        budget = self.attack_budget(eps, lipschitz, margin, exact)
        groups = affordable_by_class(margin, mask, num_classes, budget)
        return self._source_bounds(groups, budget, num_classes)

    def max_source_gains_by_class(
        self,
        logits: np.ndarray,
        mask: np.ndarray,
        eps: float,
        lipschitz: float,
        margin_error: float = 0.0,
    ) -> np.ndarray:
        """Per class c: the most source pixels predicted otherwise that one source attack
        of norm <= eps can turn into c, int64 (K,), from the network's logits (K, h, w)
        (`_source_bounds` over `gain_candidates_by_class`)."""
        budget = self.attack_budget(eps, lipschitz, logits, exact=margin_error == 0)
        groups = gain_candidates_by_class(logits, mask, budget, margin_error)
        return self._source_bounds(groups, budget, logits.shape[0])

    def _source_bounds(
        self, groups: list[tuple[int, np.ndarray, np.ndarray]], budget: float, num_classes: int
    ) -> np.ndarray:
        """Per class, the most source pixels one attack within `budget` can change, from
        (class, costs, flat network indices) of a superset of its affordable network
        pixels. Two upper bounds, the smaller taken: the k network pixels the budget
        allows covering the k largest of their blocks; and the fractional knapsack of
        their costs, each worth its block's source pixels (cheap pixels seldom all sit
        in the largest blocks)."""
        out = np.zeros(num_classes, dtype=np.int64)
        worth = self._worth.reshape(-1)
        for c, costs, idx in groups:
            k = _max_flips_select(costs, budget)
            if k:
                w = worth[idx]
                most = float(Knapsack.of(costs, w, budget).most(budget))
                out[c] = min(_largest_sum(w, k), math.floor(most))
        return out

    def source_stability(
        self, margin: np.ndarray, fractions: Sequence[float], lipschitz: float
    ) -> np.ndarray:
        """Per fraction a: the least norm of a source perturbation that may flip a share a
        of the source pixels (k = ceil(a H W)), float64 (A,); none of smaller norm can.

        The inverse of `max_source_flips`, bound by bound: flipping k source pixels
        costs at least the fractional cover of k by blocks (`least_cover_cost`, each
        network pixel worth its block), and at least the m cheapest network pixels, m
        the fewest of the largest blocks that hold k. That squared logit norm, over the
        margins' rounding, is the network budget (L network_eps)^2 it takes; the source
        norm follows from network_eps = (||D|| eps + rounding)(1 + 1e-9), taken down."""
        (H, W) = self.source
        alphas = _fractions(fractions)
        if margin.shape != self.network:
            raise ValueError(f"margins {margin.shape} are not on the network grid {self.network}")
        lipschitz = _check_lipschitz(lipschitz)
        ks = np.asarray(fraction_counts(alphas, H * W), np.float64)
        by_value = least_cover_cost(flip_costs(margin), ks, self._worth)
        by_count = cheapest_flips(margin, [self._fewest_blocks(int(k)) for k in ks])
        least = np.maximum(by_value, by_count) / margin_rounding_slack(margin)
        network = np.sqrt(least) / lipschitz / (1 + 1e-9)
        eps = (network - self.rounding()) / self.operator_norm * (1 - 1e-9)
        return np.where(ks > 0, np.maximum(eps, 0.0), 0.0)

    def attack_budget(
        self, eps: float, lipschitz: float, margin: np.ndarray, exact: bool = True
    ) -> float:
        """Squared logit budget of an eps-attack on the source: (L network_eps)^2, taken
        up by the rounding of the stored margins; at eps == 0 (network_eps 0) -1 for
        `exact` margins (nothing flips), 0 for margins shrunk by a margin error (their
        zero-cost pixels flip: `certseg.certify.budget._effective_budget`)."""
        network = np.asarray([self.network_eps(eps)], np.float64)
        slack = margin_rounding_slack(margin)
        return float(_effective_budget(network, _check_lipschitz(lipschitz), slack, exact)[0])

    def block_sums(self, plane: np.ndarray) -> np.ndarray:
        """(H, W) bool -> (h, w) int32: how many of each network pixel's source pixels
        are set. One gather per source row (column) of the largest block, not
        np.add.reduceat: 6 ms instead of 64 at 4K -> 1930x1086."""
        rows = _run_sums(plane, self._starts(self.row_map), self._row_counts, axis=0)
        return _run_sums(rows, self._starts(self.col_map), self._col_counts, axis=1)

    def worst_case_accuracy(
        self,
        mask: np.ndarray,
        margin: np.ndarray,
        target: np.ndarray,
        eps: float,
        lipschitz: float,
        ignore_index: int = 255,
        exact: bool = True,
    ) -> tuple[float, float]:
        """(worst-case, clean) pixel accuracy on the source grid under every source
        perturbation of norm <= eps, against a source-size `target`.

        Flipping network pixel k costs margin_k^2 / 2 of the budget and loses the v_k
        correct source pixels mapped to it: the most one attack can take is bounded by
        the fractional knapsack (`Knapsack`; exact when every v_k is the same: an
        integer shrink, a target uniform per block). `exact`: as in `attack_budget`."""
        valid = target != ignore_index
        n_valid = int(valid.sum())
        if n_valid == 0:
            return math.nan, math.nan
        v = self.block_sums(valid & (self.upsample(mask) == target))
        correct = int(v.sum())
        budget = self.attack_budget(eps, lipschitz, margin, exact)
        items = Knapsack.of(flip_costs(margin), v, budget)
        lost = min(correct, math.floor(float(items.most(budget))))
        return (correct - lost) / n_valid, correct / n_valid

    def worst_case_iou(
        self,
        mask: np.ndarray,
        margin: np.ndarray,
        logits: np.ndarray,
        target: np.ndarray,
        eps: float,
        lipschitz: float,
        ignore_index: int = 255,
        margin_error: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(worst-case, clean) IoU per class on the source grid, (K,) each, NaN for
        classes the target lacks. `mask` and `logits` (K, h, w) are the network's.

        For class c the attacker removes true positives (network pixel k predicted c:
        cost margin_k^2 / 2, loses its g_kc source pixels labelled c) and adds false
        ones (k predicted otherwise: cost (z_top - z_c)^2 / 2, each difference shrunk
        by `margin_error` as in `certseg.certify.metrics`, gains its valid source
        pixels labelled otherwise). Either flip also helps c a little (fewer false
        positives, more true ones), which the bound forgoes. The worst split of the
        budget between the two (`worst_split_ratio`) bounds (TP - m) / (GT + FP + n)
        from below. `margin` is the engine's (already shrunk by its error)."""
        K = logits.shape[0]
        valid = target != ignore_index
        n_valid = self.block_sums(valid)
        top = np.max(logits, axis=0)
        budget = self.attack_budget(eps, lipschitz, margin, exact=margin_error == 0)
        # what one flip may cost at most, taken up past the float32 differences' rounding:
        # only pixels below it are candidates (a superset of the affordable ones)
        reach = math.sqrt(2.0 * budget) * (1 + 1e-6) if budget >= 0 else -1.0
        worst, clean = np.full(K, math.nan), np.full(K, math.nan)
        for c in range(K):
            g = self.block_sums(valid & (target == c))
            gt = int(g.sum())
            if gt == 0:
                continue
            is_c = mask == c
            tp, fp = int(g[is_c].sum()), int((n_valid - g)[is_c].sum())
            clean[c] = tp / (gt + fp)
            out = is_c & (margin <= reach)
            remove = Knapsack.of(flip_costs(margin[out]), g[out], budget)
            into, costs = gains_within(
                top.reshape(-1), logits[c].reshape(-1), ~is_c.reshape(-1), reach, margin_error
            )
            add = Knapsack.of(costs, (n_valid - g).reshape(-1)[into], budget)
            worst[c] = worst_split_ratio(remove, add, budget, tp, gt + fp)
        return worst, clean

    # the image's side -------------------------------------------------------------------
    @cached_property
    def _weights(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        (H, W), (h, w) = self.source, self.network
        return area_weights(H, h), area_weights(W, w)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(3, H, W) float in [0, 1], or (H, W, 3) uint8 (v / 255) -> (3, h, w) float32."""
        if image.dtype == np.uint8:
            planes, scale = [image[..., c] for c in range(image.shape[-1])], 1.0 / 255.0
        else:
            planes, scale = list(image), 1.0
        (ri, rw), (ci, cw) = self._weights
        h, w = self.network
        out = np.empty((len(planes), h, w), np.float32)
        for c, plane in enumerate(planes):
            for k0 in range(0, h, _ROWS_PER_BLOCK):
                block = slice(k0, min(h, k0 + _ROWS_PER_BLOCK))
                rows = _shrink(plane, ri[block], rw[block], axis=0)  # (b, W) float64
                out[c, block] = _shrink(rows, ci, cw, axis=1) * scale
        return out

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """The dense (h, H) and (w, W) float64 area matrices (D x = R_h x R_w^T): for
        tests and attacks through the resize."""
        dense = []
        for (index, weight), n_in in zip(self._weights, self.source, strict=True):
            m = np.zeros((index.shape[0], n_in))
            np.add.at(m, (np.arange(index.shape[0])[:, None], index), weight)
            dense.append(m)
        return dense[0], dense[1]

    # back to the source grid ------------------------------------------------------------
    @cached_property
    def row_map(self) -> np.ndarray:
        """Network row of each source row: the one its centre falls in."""
        (H, _), (h, _) = self.source, self.network
        return ((2 * np.arange(H) + 1) * h) // (2 * H)

    @cached_property
    def col_map(self) -> np.ndarray:
        """Network column of each source column (as `row_map`)."""
        (_, W), (_, w) = self.source, self.network
        return ((2 * np.arange(W) + 1) * w) // (2 * W)

    @cached_property
    def _row_counts(self) -> np.ndarray:
        """Source rows mapped to each network row (each at least 1: h <= H)."""
        return np.bincount(self.row_map, minlength=self.network[0])

    @cached_property
    def _col_counts(self) -> np.ndarray:
        return np.bincount(self.col_map, minlength=self.network[1])

    @cached_property
    def _worth(self) -> np.ndarray:
        """(h, w) int64: the source pixels mapped to each network pixel."""
        return np.multiply.outer(self._row_counts, self._col_counts)

    @cached_property
    def _worth_counts(self) -> np.ndarray:
        """How many network pixels have each block size (a few distinct ones)."""
        return np.bincount(self._worth.reshape(-1))

    def _fewest_blocks(self, k: int) -> float:
        """The fewest network pixels whose blocks hold k source pixels: the largest
        blocks first (inf past the image)."""
        taken, left = 0, k
        for value in np.flatnonzero(self._worth_counts)[::-1].tolist():
            if left <= 0:
                break
            take = min(int(self._worth_counts[value]), -(-left // value))
            taken, left = taken + take, left - take * value
        return float(taken) if left <= 0 else math.inf

    @staticmethod
    def _starts(index_map: np.ndarray) -> np.ndarray:
        """Where each network index's run of source indices starts (the map is
        non-decreasing and hits every network index)."""
        return np.flatnonzero(np.diff(index_map, prepend=-1))

    def upsample(self, plane: np.ndarray) -> np.ndarray:
        """(..., h, w) -> (..., H, W): each source pixel gets its network pixel's value."""
        return plane.take(self.row_map, axis=-2).take(self.col_map, axis=-1)

    def describe(self, eps: float) -> dict[str, object]:
        """What the answer says of the resize."""
        return {
            "source": list(self.source),
            "network": list(self.network),
            "method": "area",
            "operator_norm": self.operator_norm,
            "rounding": self.rounding(),
            "network_eps": self.network_eps(eps),
        }
