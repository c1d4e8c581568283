"""Hand-computed checks of the joint budget: costs, max flips, stability, splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from certseg.certify import (
    attack_budget,
    flip_costs,
    frontier_min_ratio,
    max_flips,
    split_frontier,
    stability,
    worst_ratio,
)
from certseg.certify.budget import _count_le, _keep_sorted, cheapest_flips, least_cover_cost

MARGIN = np.array([[0.0, 0.0, 1.0, 1.0, 2.0]])  # costs 0, 0, .5, .5, 2


def test_flip_costs_and_budget() -> None:
    np.testing.assert_array_equal(flip_costs(np.array([0.0, 1.0, 2.0])), [0.0, 0.5, 2.0])
    assert flip_costs(np.array([1.0], dtype=np.float32)).dtype == np.float64
    assert attack_budget(0.5, 2.0) == 1.0
    np.testing.assert_allclose(attack_budget(np.array([0.0, 1.0]), 3.0), [0.0, 9.0])


def test_max_flips_prefix_rule() -> None:
    assert max_flips(MARGIN, 0.0, 1.0) == 0  # eps 0: even zero-cost pixels stay
    assert max_flips(MARGIN, 1e-9, 1.0) == 2  # any eps > 0 flips the ties
    assert max_flips(MARGIN, 1.0, 1.0) == 4  # budget 1: 0 + 0 + .5 + .5 (<= is allowed)
    assert max_flips(MARGIN, 0.99, 1.0) == 3
    assert max_flips(MARGIN, 2.0, 1.0) == 5
    assert max_flips(MARGIN, 0.5, 2.0) == 4  # same budget (L eps)**2 = 1


def test_float32_margins_rounded_up_still_count_their_flips() -> None:
    """A float32 margin top1 - top2 rounded to nearest may lie above the exact
    difference: the budget takes up that rounding, so a flip the attacker can afford
    at the exact cost is counted (and stability is not overstated)."""
    top1, top2 = np.float32(1.0), np.float32(2.0**-25 * (1 - 2.0**-24))
    stored = top1 - top2  # what a float32 head writes
    exact = float(top1) - float(top2)
    assert float(stored) > exact  # rounded up: 1.0
    eps = exact / math.sqrt(2.0) * (1 + 1e-12)  # affords the exact cost, not the stored one
    assert max_flips(np.full((1, 1), stored, np.float32), eps, 1.0) == 1
    assert max_flips(np.full((1, 1), exact), eps, 1.0) == 1
    assert stability(np.full((1, 1), stored, np.float32), 1.0, 1.0) <= exact / math.sqrt(2.0)
    torch = pytest.importorskip("torch")
    assert int(max_flips(torch.full((1, 1), float(stored)), eps, 1.0)) == 1


def test_max_flips_valid_mask_and_batches() -> None:
    valid = np.array([[False, True, True, True, True]])
    assert max_flips(MARGIN, 1.0, 1.0, valid=valid) == 3
    batch = np.stack([MARGIN, MARGIN, MARGIN])  # (3, 1, 5)
    out = max_flips(batch, np.array([0.0, 1.0, 2.0]), 1.0)
    assert out.shape == (3,)
    assert out.tolist() == [0, 4, 5]
    assert max_flips(np.full((2, 2), np.inf), 100.0, 1.0) == 0  # K == 1 never flips


def test_stability() -> None:
    assert stability(MARGIN, 0.0, 1.0) == 0.0
    assert stability(MARGIN, 0.4, 1.0) == 0.0  # the two ties cost nothing
    assert stability(MARGIN, 0.6, 1.0) == pytest.approx(math.sqrt(0.5))
    assert stability(MARGIN, 0.8, 1.0) == pytest.approx(1.0)
    assert stability(MARGIN, 1.0, 1.0) == pytest.approx(math.sqrt(3.0))
    assert stability(MARGIN, 1.0, 2.0) == pytest.approx(math.sqrt(3.0) / 2)
    assert stability(MARGIN, 0.5, 1.0) == pytest.approx(math.sqrt(0.5))  # ceil(2.5) = 3
    valid = np.array([[False, False, True, True, True]])
    assert stability(MARGIN, 1 / 3, 1.0, valid=valid) == pytest.approx(math.sqrt(0.5))
    assert stability(np.full((1, 3), np.inf), 0.5, 1.0) == math.inf
    with pytest.raises(ValueError):
        stability(MARGIN, 1.5, 1.0)


def test_stability_no_float_overshoot() -> None:
    m = np.arange(1.0, 31.0)[None, :]  # 30 pixels; 0.1 * 30 != 3 in floating point
    assert stability(m, 0.1, 1.0) == pytest.approx(math.sqrt((1 + 4 + 9) / 2))


def test_stability_inverts_max_flips() -> None:
    rng = np.random.default_rng(1)
    m = rng.uniform(0.1, 3.0, size=(4, 6, 7))
    for alpha in (0.1, 0.37, 0.5, 1.0):
        s = stability(m, alpha, 1.5)
        k = math.ceil(alpha * 42 - 1e-9)
        assert np.all(max_flips(m, s * (1 + 1e-9), 1.5) >= k)
        assert np.all(max_flips(m, s * (1 - 1e-6), 1.5) < k)


def test_least_cover_cost_never_above_the_cheapest_cover() -> None:
    """Against every subset of up to 7 items: a lower bound of the cheapest 0/1 cover of
    each need, exact with unit values; 0 for no need, inf past what the items hold."""
    import itertools

    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        costs = rng.exponential(1.0, n) * (rng.random(n) > 0.1)  # some free items
        values = rng.integers(0, 4, n).astype(float)
        needs = np.arange(-1, values.sum() + 2)
        for vals in (values, None):
            worth = np.ones(n) if vals is None else vals
            got = least_cover_cost(costs, needs, vals)
            for k, bound in zip(needs, got, strict=True):
                best = min(
                    (
                        costs[list(s)].sum()
                        for r in range(n + 1)
                        for s in itertools.combinations(range(n), r)
                        if worth[list(s)].sum() >= k
                    ),
                    default=math.inf,
                )
                assert bound <= best * (1 + 1e-12)
                if vals is None or k <= 0 or best == math.inf:
                    assert bound == pytest.approx(best, rel=1e-8, abs=0)
    assert least_cover_cost(np.array([np.inf, 1.0]), [1, 2]).tolist() == [1 - 1e-9, math.inf]
    assert least_cover_cost(np.zeros(0), [0, 1]).tolist() == [0.0, math.inf]


def test_stability_of_several_fractions_at_once() -> None:
    """A large image (the selection path) against the sorted definition, each fraction
    as asked alone, batched and with a valid mask."""
    rng = np.random.default_rng(4)
    m = rng.normal(0, 1, (2, 300, 400)).astype(np.float32)
    fractions = (0.001, 0.01, 0.3, 1.0)
    got = stability(m, fractions, 2.0)
    assert got.shape == (2, 4)
    for i in range(2):
        costs = np.sort(flip_costs(m[i]).ravel())
        for j, a in enumerate(fractions):
            k = math.ceil(a * m[i].size - 1e-9)
            exact = math.sqrt(costs[:k].sum()) / 2.0  # less the float32 margins' rounding:
            assert exact * (1 - 2e-7) <= got[i, j] <= exact
            assert got[i, j] == stability(m[i], a, 2.0)
    valid = rng.random(m.shape) > 0.5
    got = stability(m, fractions, 2.0, valid=valid)
    for i in range(2):
        n = int(valid[i].sum())
        want = [cheapest_flips(m[i][valid[i]], [math.ceil(a * n - 1e-9)]) for a in fractions]
        np.testing.assert_allclose(got[i], np.sqrt(np.ravel(want)) / 2.0, rtol=1e-6)


def test_stability_never_overstates_at_the_edges_of_float64() -> None:
    """NaN margins flip for free (numpy and torch alike); float64 margins whose cost
    would be subnormal (rounded up by squaring) or overflow are taken lower, so the
    answer stays below the exact bound and max_flips agrees just below it."""
    import torch

    m = np.array([[np.nan, 1.0, 5.0]], np.float32)
    valid = np.array([[True, True, False]])
    for arr, v in ((m, valid), (torch.from_numpy(m), torch.from_numpy(valid))):
        got = np.asarray(stability(arr, [0.5, 1.0], 1.0, v))  # one image, two fractions
        assert got[0] == 0.0 and got[1] <= math.sqrt(0.5)  # the NaN is free
    tiny = np.array([[1.6 * 2.0**-537]])
    s = float(stability(tiny, 1.0, 1.0))
    assert s <= 1.6 * 2.0**-537 / math.sqrt(2.0)
    huge = np.array([[1e155, 1.0]])
    assert math.isfinite(float(stability(huge, 1.0, 1.0)))  # flippable, at some norm
    assert stability(np.array([[1.1774154985086248e-11]]), 1.0, 1.2833541929668298e307) <= (
        1.1774154985086248e-11 / math.sqrt(2.0) / 1.2833541929668298e307
    )
    with pytest.raises(ValueError):
        least_cover_cost(np.ones(3), [math.inf])
    # a value near 0 (its ratio overflows to inf) neither raises nor is taken: 3 of the 5
    assert least_cover_cost(np.ones(2), [3], np.array([1e-320, 5.0]))[0] == pytest.approx(0.6)


def test_count_le_matches_searchsorted() -> None:
    rng = np.random.default_rng(2)
    vals = np.sort(rng.integers(0, 6, size=(5, 9)).astype(float), axis=-1)
    vals[1, 5:] = np.inf
    q = rng.integers(-2, 8, size=(5, 7)).astype(float)
    q[0, 0] = -np.inf
    got = _count_le(vals, q)
    for r in range(5):
        np.testing.assert_array_equal(got[r], np.searchsorted(vals[r], q[r], side="right"))
    assert _count_le(np.zeros((3, 0)), q[:3]).tolist() == [[0] * 7] * 3


def test_keep_sorted_pads_with_inf() -> None:
    c = np.array([[3.0, 1.0, 2.0], [5.0, 4.0, 0.0]])
    keep = np.array([[True, False, True], [False, True, False]])
    np.testing.assert_array_equal(_keep_sorted(c, keep), [[2.0, 3.0], [4.0, np.inf]])
    assert _keep_sorted(c, keep & False).shape == (2, 0)


def test_split_frontier_by_hand() -> None:
    tp = np.array([[1.0, 2.0], [1.0, 2.0]])
    fp = np.array([[0.5, 0.5, 3.0], [0.5, 0.5, 3.0]])
    n_star, feasible = split_frontier(tp, fp, np.array([3.0, -1.0]))
    assert feasible.tolist() == [[True, True, True], [True, False, False]]
    # m = 0 leaves 3 (two FPs of .5, the third costs 3 more); m = 1 leaves 2; m = 2 leaves 0
    assert n_star.tolist() == [[2, 2, 0], [0, 0, 0]]


def test_worst_ratio_iou_by_hand() -> None:
    tp = np.array([[1.0, 2.0]])
    fp = np.array([[0.5, 0.5, 3.0]])
    # IoU with TP 2, GT 3, FP 1: (2 - m) / (4 + n)
    r = worst_ratio(tp, fp, np.array([3.0]), np.array([2]), 1.0, np.array([4]), 0.0)
    assert r.tolist() == [0.0]  # both TPs removed
    r = worst_ratio(tp, fp, np.array([2.5]), np.array([2]), 1.0, np.array([4]), 0.0)
    assert r[0] == pytest.approx(1 / 6)  # m = 1, n = 2
    r = worst_ratio(tp, fp, np.array([-1.0]), np.array([2]), 1.0, np.array([4]), 0.0)
    assert r[0] == pytest.approx(0.5)  # eps = 0: clean
    n_star, feasible = split_frontier(tp, fp, np.array([2.5]))
    r = frontier_min_ratio(n_star, feasible, np.array([0]), 1.0, np.array([0]), 0.0)
    assert math.isnan(r[0])  # undefined metric


def test_selection_path_equals_sort_and_cumsum():
    """The O(N) selection used for numpy rows gives the sort + cumsum answer exactly,
    with ties, zeros and budgets at exact prefix sums."""
    from certseg.certify.budget import _max_flips_select

    rng = np.random.default_rng(7)
    for trial in range(300):
        n = int(rng.integers(0, 60))
        costs = np.round(rng.exponential(1.0, n), int(rng.integers(0, 3)))
        prefix = np.cumsum(np.sort(costs))
        budgets = [0.0, float(rng.uniform(0, 2 * (prefix[-1] if n else 1)))]
        if n:
            budgets.append(float(prefix[int(rng.integers(0, n))]))
        for b in budgets:
            expected = int(np.sum(prefix <= b))
            assert _max_flips_select(costs, b) == expected, (trial, b)


@pytest.mark.parametrize("n", [40_000, 300_000])
def test_bucketed_selection_equals_sort_and_cumsum_on_large_rows(n):
    """Rows above the bucketing threshold (a counting pass over ordered cost buckets,
    then selection inside one bucket) give the sort + cumsum answer: ties, zeros,
    budgets at exact prefix sums, inside a bucket, and beyond the total."""
    from certseg.certify.budget import _BUCKET_MIN, _max_flips_select

    assert n > _BUCKET_MIN
    rng = np.random.default_rng(n)
    for decimals in (None, 3, 1):
        costs = rng.exponential(1e-3, n)
        if decimals is not None:
            costs = np.round(costs, decimals)  # many ties, many zeros
        prefix = np.cumsum(np.sort(costs))
        picks = [int(rng.integers(0, n)) for _ in range(4)] + [n // 2, n - 1]
        budgets = [float(prefix[i]) for i in picks]  # exact prefix sums
        budgets += [float(rng.uniform(0, prefix[-1])), float(prefix[-1]) * 2, 1e-12]
        for b in budgets:
            expected = int(np.sum(prefix <= b * (1 + 1e-9)))
            got = _max_flips_select(costs, b)
            # The slack may admit one more flip whose prefix exceeds b by < 1e-9 relative.
            assert got == expected, (decimals, b, got, expected)
            assert got >= int(np.sum(prefix <= b))


def test_max_flips_numpy_prefilter_matches_torch_path():
    """The numpy path's float32 margin pre-filter keeps every affordable pixel: same
    answers as the torch path (sort + cumsum) on float32 and float64 margins."""
    import torch

    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        margin = np.abs(rng.normal(0, 0.3, (2, 180, 200))).astype(dtype)
        valid = rng.random((2, 180, 200)) > 0.1
        for eps in (0.0, 0.01, 0.05, 0.2, 5.0):
            got = max_flips(margin, eps, 3.0, valid=valid)
            ref = max_flips(torch.from_numpy(margin), eps, 3.0, valid=torch.from_numpy(valid))
            np.testing.assert_array_equal(got, ref.numpy())


def test_max_flips_sampled_guess_on_large_images_changes_no_answer(monkeypatch):
    """Images above _SAMPLE_MIN pixels first try the candidates below a sampled guess:
    the answers equal those of every affordable pixel (the guess switched off) for
    float32/float64 margins, with a valid mask, ties and budgets from none to all, and
    are never below sort + cumsum (the torch path; above it only by the selection's
    1e-9 slack at exact ties). A row built so that the stride sees only its cheapest
    pixels (a guess too low) falls back, with the same answer."""
    import torch

    from certseg.certify import budget as budget_mod
    from certseg.certify.budget import _SAMPLE_MIN, _SAMPLE_STRIDE, _costs_below, _sampled_limit

    def without_guess(*args, **kw):
        with monkeypatch.context() as m:
            m.setattr(budget_mod, "_SAMPLE_MIN", 1 << 62)
            return max_flips(*args, **kw)

    rng = np.random.default_rng(5)
    shape = (2, 300, 400)
    assert shape[1] * shape[2] > _SAMPLE_MIN
    for dtype in (np.float32, np.float64):
        for decimals in (None, 2):  # 2: many ties
            margin = np.abs(rng.normal(0, 0.3, shape)).astype(dtype)
            if decimals is not None:
                margin = np.round(margin, decimals).astype(dtype)
            valid = rng.random(shape) > 0.2
            for eps in (0.0, 1e-4, 0.01, 0.05, 0.2, 1.0, 50.0):
                for v in (None, valid):
                    got = max_flips(margin, eps, 3.0, valid=v)
                    np.testing.assert_array_equal(got, without_guess(margin, eps, 3.0, valid=v))
                    tv = None if v is None else torch.from_numpy(v)
                    ref = max_flips(torch.from_numpy(margin), eps, 3.0, valid=tv).numpy()
                    assert np.all(got >= ref) and np.all(got <= ref + 1), (dtype, eps, got, ref)
    # The guess does its job on a photo-like row: far fewer candidates than affordable.
    row = np.abs(rng.normal(0, 0.3, 300 * 400)).astype(np.float32)
    budget = (3.0 * 0.05) ** 2
    guess = _sampled_limit(row, None, budget)
    assert guess is not None
    few = _costs_below(row, row, None, guess, np.float32)
    every = _costs_below(row, row, None, float(np.sqrt(2 * budget)), np.float32)
    assert few.sum() > budget and few.size < every.size / 4
    # A row whose strided pixels are its cheapest: the guess is too low, the answer exact.
    tricky = np.full((300, 400), 0.3, np.float32)
    tricky.reshape(-1)[::_SAMPLE_STRIDE] = 1e-3
    low = _sampled_limit(tricky.reshape(-1), None, budget)
    assert (
        _costs_below(tricky.reshape(-1), tricky.reshape(-1), None, low, np.float32).sum() < budget
    )
    assert max_flips(tricky, 0.05, 3.0) == without_guess(tricky, 0.05, 3.0)
    assert max_flips(tricky, 0.05, 3.0) == int(max_flips(torch.from_numpy(tricky), 0.05, 3.0))


@pytest.mark.parametrize("shape", [(7, 9), (300, 400)])  # small, and above _SAMPLE_MIN
def test_max_flips_by_class_equals_one_max_flips_per_class(shape):
    """Every class's figure equals max_flips over that class's pixels, in one or two
    passes: float32/float64 margins, ties, labels outside [0, K) (never counted),
    classes absent, budgets from none to all; a class whose strided pixels are its
    cheapest (the sampled guess too low) is taken again and comes out the same."""
    from certseg.certify.budget import _SAMPLE_STRIDE, max_flips_by_class

    rng = np.random.default_rng(11)
    K = 6
    for dtype in (np.float32, np.float64):
        for decimals in (None, 2):
            margin = np.abs(rng.normal(0, 0.3, shape)).astype(dtype)
            if decimals is not None:
                margin = np.round(margin, decimals).astype(dtype)
            labels = rng.integers(-1, K, shape)  # -1: outside, class 5 made absent below
            labels[labels == 5] = 0
            if shape[0] * shape[1] > 1 << 16:  # class 4: strided pixels its cheapest
                flat = labels.reshape(-1)
                flat[flat == 4] = 3
                flat[::_SAMPLE_STRIDE] = 4
                margin.reshape(-1)[::_SAMPLE_STRIDE] = dtype(1e-3)
            for eps in (0.0, 1e-4, 0.01, 0.05, 0.2, 50.0):
                got = max_flips_by_class(margin, labels, K, eps, 3.0)
                want = [int(max_flips(margin, eps, 3.0, valid=labels == c)) for c in range(K)]
                assert got.tolist() == want, (dtype, decimals, eps)
                assert got[5] == 0 and got.sum() >= max_flips(margin, eps, 3.0, valid=labels >= 0)
    with pytest.raises(ValueError, match="shape"):
        max_flips_by_class(np.zeros((2, 3)), np.zeros((3, 2), int), 2, 0.1, 1.0)


def test_max_gains_by_class_is_the_prefix_of_the_gaps_into_each_class():
    """By definition: the longest prefix of sorted max(z_top - z_c - e, 0)^2 / 2 over the
    pixels predicted otherwise that fits (L eps)^2; ties give gap 0 (flippable at any
    eps > 0, never at 0 without a margin error: with one, the gaps it closes are
    gains at eps 0 too); the margin error only ever adds gains."""
    from certseg.certify import max_gains_by_class

    rng = np.random.default_rng(4)
    K, H, W = 5, 9, 11
    logits = np.round(rng.normal(0, 1, (K, H, W)), 1).astype(np.float32)  # ties
    mask = logits.argmax(0)
    top = logits.max(0).astype(np.float64)
    for e in (0.0, 0.05):
        for eps in (0.0, 0.01, 0.1, 0.5, 5.0):
            got = max_gains_by_class(logits, mask, eps, 2.0, margin_error=e)
            for c in range(K):
                gap = (top - logits[c].astype(np.float64))[mask != c]
                costs = np.sort(np.maximum(gap - e, 0) ** 2 / 2)
                budget = (2.0 * eps) ** 2
                none = eps == 0 and e == 0  # nothing flips: exact margins, no attack
                want = 0 if none else int(np.sum(np.cumsum(costs) <= budget))
                # a prefix that fits only within the selection's 1e-9 slack (sums of tenths
                # hit the budget exactly) counts as flippable: the sound side
                most = 0 if none else int(np.sum(np.cumsum(costs) <= budget * (1 + 1e-9)))
                assert want <= got[c] <= most, (e, eps, c)
                if eps == 0 and e:
                    assert got[c] == int(np.sum(gap <= e)), c  # the gaps the error closes
            if e:
                assert (got >= max_gains_by_class(logits, mask, eps, 2.0)).all()
    with pytest.raises(ValueError, match="shape"):
        max_gains_by_class(logits, mask[:, :5], 0.1, 1.0)


@pytest.mark.parametrize("spoil", ["nan", "inf-tie", "all--inf"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_nan_pixel_counts_as_unknown_in_every_figure(backend, spoil):
    """A pixel whose margin is NaN (a NaN logit, or a tie of infinite ones) is one
    nothing is known of: every figure treats it as the pixel of all-zero logits
    (class 0, margin 0, flippable for free into any class), as the server does. NaN
    compares false: the numpy figures had counted a NaN logit's pixel as one no attack
    can flip (max_flips 0 where stability said 0), and the worst-case accuracy and IoU
    an (inf, inf) tie's, found on a max that was infinite, not NaN (1.0 where
    max_flips said one pixel flips)."""
    from certseg.certify import (
        DatasetCertifier,
        margins,
        max_flips_by_class,
        max_gains_by_class,
        stability,
        worst_case_iou,
        worst_case_pixel_accuracy,
    )

    rng = np.random.default_rng(4)
    known = rng.normal(size=(3, 6, 7)).astype(np.float32) * 4
    known[:, 2, 3] = 0.0  # what the rule makes of the pixel below
    bad = known.copy()
    if spoil == "nan":
        bad[1, 2, 3] = np.nan  # one class of that pixel unknown
    elif spoil == "inf-tie":
        bad[0, 2, 3] = bad[2, 2, 3] = np.inf  # overflowed twice: inf - inf
    else:
        bad[:, 2, 3] = -np.inf
    target = known.argmax(0)
    eps, L = 0.05, 1.0
    if backend == "torch":
        torch = pytest.importorskip("torch")
        bad, known, target = (torch.from_numpy(a) for a in (bad, known, target))

    def figures(z) -> dict:
        mask, margin = margins(z)  # a NaN pixel's margin stays NaN: its radius certifies nothing
        row = {
            "flips": int(max_flips(margin, eps, L)),
            "stability": float(stability(margin, 0.05, L)),
            "wc_acc": float(worst_case_pixel_accuracy(z, target, eps, L)),
            "wc_iou": np.asarray(worst_case_iou(z, target, eps, L), np.float64).tolist(),
        }
        data = DatasetCertifier(3, L)
        data.update(z[None], target[None], eps)
        got = data.compute()
        row["data"] = [got.worst_pixel_accuracy, np.asarray(got.worst_iou).tolist()]
        if backend == "numpy":  # the per-class figures are numpy only
            mask = np.asarray(target)
            row["by_class"] = max_flips_by_class(margin, mask, 3, eps, L).tolist()
            row["gains"] = max_gains_by_class(z, mask, eps, L).tolist()
        return row

    assert figures(bad) == figures(known)
    assert figures(known)["flips"] >= 1  # the unknown pixel is among the flipped


def test_stability_never_exceeds_its_exact_value():
    """stability(k) against exact rationals: (L s)^2 <= the sum of the k smallest
    m^2 / 2 of the float32 margins as given (the sum is taken down past its rounding,
    then sqrt and / L one step down), at margins of 1e-3 to 50 and several L."""
    from fractions import Fraction

    from certseg.certify import fraction_counts

    rng = np.random.default_rng(8)
    over = checked = 0
    for _ in range(60):
        margin = np.abs(rng.normal(size=(9, 11)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
        L = float(rng.choice([1.0, 3.7, 5.050515]))
        alphas = [0.01, 0.05, 0.1, 0.5]
        got = stability(margin, alphas, L)
        costs = sorted(Fraction(float(m)) ** 2 / 2 for m in margin.ravel())
        for s, k in zip(got.tolist(), fraction_counts(alphas, margin.size), strict=True):
            checked += 1
            over += (Fraction(s) * Fraction(L)) ** 2 > sum(costs[:k])
    assert over == 0 and checked == 240
