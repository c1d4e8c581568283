"""The knapsack bounds of weighted flips (certseg.certify.knapsack) against exact
optima: dynamic programming on integer costs, every split of the budget, and the
uncut relaxation for the cut to the items within reach."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from certseg.certify import knapsack
from certseg.certify.knapsack import Knapsack, worst_split_ratio


def _best_integer(costs: np.ndarray, values: np.ndarray, budget: int) -> np.ndarray:
    """0/1 knapsack optimum for every budget 0..budget (integer costs), by DP."""
    best = np.zeros(budget + 1)
    for c, v in zip(costs.astype(int), values, strict=True):
        if c <= budget:
            best[c:] = np.maximum(best[c:], best[: budget + 1 - c] + v)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_most_bounds_the_integer_optimum_and_is_exact_for_equal_values(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(0, 12, 40).astype(np.float64)
    for values in (rng.integers(0, 5, 40).astype(np.float64), np.full(40, 3.0)):
        budget = 30
        items = Knapsack.of(costs, values, float(budget))
        exact = _best_integer(costs, values, budget)
        got = items.most(np.arange(budget + 1, dtype=np.float64))
        assert (got >= exact - 1e-9).all()
        if values.min() == values.max():
            np.testing.assert_allclose(got, exact, atol=1e-5)
        assert items.most(-1.0) == 0 and items.most(float(budget)) <= values.sum()
    # eps 0 with exact margins (budget -1): nothing flips, not even a zero cost; with
    # margins shrunk by an error (budget 0): the zero costs alone
    assert Knapsack.of(costs, np.ones(40), -1.0).most(10.0) == 0
    zero = Knapsack.of(costs, np.ones(40), 0.0)
    assert zero.most(0.0) == zero.most(10.0) == np.sum(costs == 0) > 0


def test_the_cut_to_items_within_reach_changes_nothing(monkeypatch):
    rng = np.random.default_rng(0)
    n = 50_000
    costs = rng.exponential(1.0, n) ** 2
    values = rng.choice([1.0, 2.0, 4.0], n)
    budget = 40.0
    cut = Knapsack.of(costs, values, budget)
    monkeypatch.setattr(knapsack, "_FEW", 10**9)
    whole = Knapsack.of(costs, values, budget)
    assert len(cut.spent) < len(whole.spent) / 2  # it does cut
    x = np.linspace(0, budget * (1 + 1e-7), 101)
    np.testing.assert_array_equal(cut.most(x), whole.most(x))


def test_worst_split_ratio_never_beats_any_affordable_pair_of_sets():
    rng = np.random.default_rng(4)
    for _ in range(20):
        rc, rv = rng.integers(1, 6, 6).astype(float), rng.integers(0, 4, 6).astype(float)
        ac, av = rng.integers(1, 6, 6).astype(float), rng.integers(0, 4, 6).astype(float)
        budget, num, den = 8.0, rv.sum() + 3, rv.sum() + 7
        bound = worst_split_ratio(
            Knapsack.of(rc, rv, budget), Knapsack.of(ac, av, budget), budget, num, den
        )
        worst = min(
            (num - rv[list(r)].sum()) / (den + av[list(a)].sum())
            for i in range(7)
            for r in itertools.combinations(range(6), i)
            for j in range(7)
            for a in itertools.combinations(range(6), j)
            if rc[list(r)].sum() + ac[list(a)].sum() <= budget
        )
        assert bound <= worst + 1e-12
        assert bound >= 0
    assert worst_split_ratio(Knapsack.of(rc, rv, 0), Knapsack.of(ac, av, 0), 0.0, 3, 4) == 0.75
