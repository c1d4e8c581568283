"""Upper bounds on what one attack can take when flips weigh differently.

On a shrunk image (`certseg.certify.resize`) flipping network pixel k flips every
source pixel mapped to it: the attacker buys items of cost c_k (the l2 budget the
flip needs, margin^2 / 2 or the like) and value v_k (source pixels won), within a
budget B. The most value any item set of cost <= x can hold is a 0/1 knapsack;
its fractional relaxation (cheapest cost per value first, the last item in part) is
an upper bound, concave and piecewise linear in x. When all values are equal the
cheapest whole prefix is the optimum itself: the bound is then exact.

Only items of cost <= B are kept (no set within the budget holds a dearer one),
which keeps the bound tighter than the relaxation over all items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .budget import _SUM_SLACK, _max_flips_select

__all__ = ["Knapsack", "worst_split_ratio"]

_FEW = 4096  # items sorted as they are; more are cut to those within reach first


@dataclass(frozen=True)
class Knapsack:
    """The items' breakpoints in the order the relaxation buys them.

    spent[j] / gained[j]: cost and value of the first j items (j = 0..n), float64.
    """

    spent: np.ndarray
    gained: np.ndarray
    equal: bool  # every value the same: the whole prefix is exact
    limit: float  # the budget the items were kept for: the scale of rounding slack

    @classmethod
    def of(cls, costs: np.ndarray, values: np.ndarray, budget: float) -> Knapsack:
        """Items (costs, values >= 0) that one attack of squared budget `budget` may
        buy; none when budget < 0 (nothing flips, not even a tie: eps == 0 with exact
        margins), those of cost 0 alone when it is 0."""
        costs = np.asarray(costs, np.float64).ravel()
        values = np.asarray(values, np.float64).ravel()
        keep = (values > 0) & (costs <= budget) if budget >= 0 else np.zeros(costs.shape, bool)
        c, v = costs[keep], values[keep]
        equal = bool(v.size == 0 or v.min() == v.max())  # of all items, before the cut
        if c.size > _FEW:
            c, v = _within_reach(c, v, float(budget))
        order = np.argsort(c / v, kind="stable")
        c, v = c[order], v[order]
        zero = np.zeros(1)
        spent, gained = np.concatenate([zero, np.cumsum(c)]), np.concatenate([zero, np.cumsum(v)])
        return cls(spent, gained, equal, max(float(budget), 0.0))

    @property
    def total(self) -> float:
        return float(self.gained[-1])

    def most(self, budget: np.ndarray | float) -> np.ndarray:
        """Upper bound of the value any item set of cost <= budget holds (vectorised;
        a budget < 0 holds nothing). Budgets are taken up by more than the float64
        sums' error (that of the prefix sums, and of budgets formed as differences of
        sums of the size of `limit`); the result is rounded up, never above what all
        the items hold."""
        asked = np.asarray(budget, np.float64)
        x = np.where(asked < 0, -1.0, asked + _SUM_SLACK * (asked + self.limit))
        j = np.maximum(np.searchsorted(self.spent, x, side="right") - 1, 0)
        out = self.gained[j]
        if not self.equal:  # the next item, in part
            nxt = np.minimum(j + 1, len(self.spent) - 1)
            step = self.spent[nxt] - self.spent[j]  # > 0 unless j is the last
            part = (x - self.spent[j]) / np.where(step > 0, step, 1.0)
            out = out + np.clip(part, 0.0, 1.0) * (self.gained[nxt] - self.gained[j])
        return np.where(asked < 0, 0.0, np.minimum(out * (1 + _SUM_SLACK) + 1e-6, self.total))


def _within_reach(c: np.ndarray, v: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """The items the relaxation can reach within the budget, in their order: the rest
    never changes `most(x)` for x up to the budget (and its slack).

    The k + 1 cheapest items (k: the longest cheapest prefix within budget (1 + 1e-6))
    cost q each at most and more than the budget together; their ratios are <= q /
    v_min, so the relaxation stops at a ratio lambda <= q / v_min, and every item it
    takes has cost <= lambda v <= q v_max / v_min. On a 4K frame this keeps ~10^4 of
    ~10^6 affordable pixels, and the sort by ratio shrinks with them."""
    k = _max_flips_select(c, budget * (1 + 1e-6))
    if k >= c.size:
        return c, v
    q = float(np.partition(c, k)[k])
    keep = c <= q * (float(v.max()) / float(v.min())) * (1 + 1e-9)
    return c[keep], v[keep]


def worst_split_ratio(
    remove: Knapsack, add: Knapsack, budget: float, num: float, den: float
) -> float:
    """min over splits b1 + b2 = budget of (num - remove.most(b1)) / (den + add.most(b2)),
    clipped at 0: a lower bound of every affordable attack's (num - m) / (den + n).

    For IoU of class c: num = TP, den = GT + FP, `remove` the true positives' flips
    away from c, `add` the other pixels' flips to c. Between consecutive breakpoints
    (of remove at b1, of add at budget - b1) both bounds are affine or constant, so
    the ratio is monotone there: its minimum is at one of them."""
    if den <= 0:
        return float("nan")
    if budget < 0:
        return num / den
    b1 = np.concatenate([[0.0, budget], remove.spent, budget - add.spent])
    b1 = b1[(b1 >= 0) & (b1 <= budget)]
    ratio = (num - remove.most(b1)) / (den + add.most(budget - b1))
    return float(max(ratio.min(), 0.0))
