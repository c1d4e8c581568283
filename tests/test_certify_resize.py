"""Area resize: its matrix, its operator-norm bound, its fast path, the source grid.

The soundness of certificates through it is attacked in test_resize_soundness.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from certseg.certify import margins, max_flips, worst_case_iou
from certseg.certify.resize import AreaResize, area_weights
from certseg.sizes import padded_pixels

SIZES = [(45, 32), (7, 7), (100, 33), (5, 1), (64, 32), (97, 96)]


@pytest.mark.parametrize(("n_in", "n_out"), SIZES)
def test_area_matrix_rows_average_and_columns_share(n_in, n_out):
    r, _ = AreaResize((n_in, n_in), (n_out, n_out)).matrices()
    np.testing.assert_allclose(r.sum(1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.sum(0), n_out / n_in, rtol=0, atol=1e-12)
    assert (r >= 0).all()
    index, weight = area_weights(n_in, n_out)
    assert index.shape == weight.shape and index.max() < n_in


@pytest.mark.parametrize(("H", "h", "W", "w"), [(45, 32, 90, 64), (30, 10, 17, 16), (9, 4, 9, 9)])
def test_operator_norm_bounds_the_largest_singular_value(H, h, W, w):
    plan = AreaResize((H, W), (h, w))
    rh, rw = plan.matrices()
    largest = np.linalg.svd(np.kron(rh, rw), compute_uv=False)[0]
    assert largest <= plan.operator_norm
    # and the bound is tight: the constant image is its top singular vector
    assert plan.operator_norm - largest < 1e-9
    assert plan.operator_norm == pytest.approx(math.sqrt(h * w / (H * W)), rel=1e-9)


def test_fast_path_equals_the_dense_matrices_to_float32_rounding():
    plan = AreaResize((45, 90), (32, 64))
    rng = np.random.default_rng(0)
    x = rng.random((3, 45, 90)).astype(np.float32)
    rh, rw = plan.matrices()
    exact = np.einsum("ij,cjk,lk->cil", rh, x.astype(np.float64), rw)
    got = plan.apply(x)
    assert got.dtype == np.float32 and got.shape == (3, 32, 64)
    assert np.abs(got - exact).max() <= 2.0**-25 + 2.0**-40
    x8 = rng.integers(0, 256, (45, 90, 3), dtype=np.uint8)
    exact8 = np.einsum("ij,cjk,lk->cil", rh, x8.transpose(2, 0, 1) / 255.0, rw)
    assert np.abs(plan.apply(x8) - exact8).max() <= 2.0**-25 + 2.0**-40
    # rows processed in blocks give the same as one block
    tall = AreaResize((700, 20), (600, 10))
    img = rng.integers(0, 256, (700, 20, 3), dtype=np.uint8)
    th, tw = tall.matrices()
    ref = np.einsum("ij,cjk,lk->cil", th, img.transpose(2, 0, 1) / 255.0, tw)
    assert np.abs(tall.apply(img) - ref).max() <= 2.0**-25 + 2.0**-40


def test_integer_factors_are_block_means_and_edges_are_area_weighted():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    block = x.reshape(20, 2, 30, 2, 3).mean((1, 3)).transpose(2, 0, 1) / 255.0
    assert np.abs(AreaResize((40, 60), (20, 30)).apply(x) - block).max() <= 2.0**-25
    step = np.zeros((1, 45, 3), np.uint8)
    step[:, 20:] = 255  # output 14 covers [19.6875, 21.09375): 0.778 of it is white
    row = AreaResize((1, 45), (1, 32)).apply(step)[0, 0]
    np.testing.assert_allclose(row[12:17], [0, 0, (21.09375 - 20) / (45 / 32), 1, 1], atol=1e-7)


def test_fit_and_scale_pick_network_sizes():
    assert AreaResize.to_fit(48, 96, 48 * 96) is None
    plan = AreaResize.to_fit(2160, 3840, 2048 * 2048)
    h, w = plan.network
    assert h * w <= 2048 * 2048 and (h + 1) * (w + 1) > 2048 * 2048
    assert abs(w / h - 3840 / 2160) < 0.01
    assert AreaResize.to_fit(1, 10_000, 100).network == (1, 100)
    # padded sides count: 1x4194304 runs as 8x4194304 at multiple 8, 8 times the limit
    assert AreaResize.to_fit(1, 4194304, 2048 * 2048, 8).network == (1, 524288)
    assert AreaResize.to_fit(2041, 2048, 2048 * 2048, 8) is None  # pads to 2048x2048
    assert AreaResize.to_fit(2049, 2048, 2048 * 2048, 8).network == (2048, 2047)  # pads to 2048²
    with pytest.raises(ValueError, match="no shrink"):
        AreaResize.to_fit(10, 10, 63, 8)  # not even one 8x8 block fits


def test_fit_is_the_largest_same_aspect_size_whose_padded_pass_fits():
    """Against every scale k / side of either side, enumerated."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        H, W = (int(v) for v in rng.integers(1, 200, 2))
        m = int(rng.choice([1, 2, 8, 16]))
        limit = int(rng.integers(m * m, H * W + 2 * m * (H + W) + 1))
        plan = AreaResize.to_fit(H, W, limit, m)
        if plan is None:
            assert padded_pixels(H, W, m) <= limit
            continue
        h, w = plan.network
        assert padded_pixels(h, w, m) <= limit and h <= H and w <= W
        sizes = [
            (max(1, H * k // side), max(1, W * k // side))
            for side in (H, W)
            for k in range(1, side + 1)
        ]
        fitting = [a * b for a, b in sizes if padded_pixels(a, b, m) <= limit]
        assert h * w == max(fitting)


def test_each_source_pixel_takes_the_network_pixel_its_centre_is_in():
    plan = AreaResize((45, 91), (32, 64))
    ids = np.arange(32 * 64).reshape(32, 64)
    up = plan.upsample(ids)
    assert up.shape == (45, 91)
    rows, cols = np.divmod(up, 64)
    centre_r = (np.arange(45) + 0.5)[:, None] * 32 / 45  # in network units
    centre_c = (np.arange(91) + 0.5)[None, :] * 64 / 91
    assert ((rows <= centre_r) & (centre_r < rows + 1)).all()
    assert ((cols <= centre_c) & (centre_c < cols + 1)).all()
    # leading axes ride along
    assert plan.upsample(np.zeros((7, 32, 64))).shape == (7, 45, 91)


def test_source_fraction_counts_what_the_upsampled_region_holds():
    plan = AreaResize((45, 91), (32, 64))
    region = np.random.default_rng(3).random((32, 64)) > 0.6
    assert plan.source_fraction(region) == float(np.mean(plan.upsample(region)))


def _largest_blocks(plan: AreaResize, k: int) -> int:
    """Source pixels of the k largest blocks of a shrink (the bound with no costs)."""
    h, w = plan.network
    counts = np.bincount(plan.upsample(np.arange(h * w).reshape(h, w)).ravel())
    return int(np.sort(counts)[::-1][:k].sum())


def test_source_counts_by_class_count_the_upsampled_mask():
    plan = AreaResize((45, 91), (32, 64))
    rng = np.random.default_rng(5)
    mask = rng.integers(0, 4, (32, 64))
    region = rng.random((32, 64)) > 0.5
    up, up_region = plan.upsample(mask), plan.upsample(region)
    want = np.bincount(up.ravel(), minlength=5)
    np.testing.assert_array_equal(plan.source_counts_by_class(mask, 5), want)
    want_in = np.bincount(up[up_region], minlength=5)
    np.testing.assert_array_equal(plan.source_counts_by_class(mask, 5, region), want_in)


@pytest.mark.parametrize("seed", range(4))
def test_max_source_flips_bounds_every_affordable_set(seed):
    """Never below the exhaustive most source pixels of an affordable set of network
    pixels, never above the top-k blocks; exact for equal blocks. The same per class,
    over the affordable sets inside the class, never above the whole image's; and for
    the pixels one attack can turn into each class (from logits)."""
    rng = np.random.default_rng(seed)
    margin = rng.random((3, 4)).astype(np.float32)
    labels = rng.integers(0, 3, (3, 4))
    logits = rng.normal(0, 0.5, (3, 3, 4)).astype(np.float32)
    pred = logits.argmax(0)
    cost = margin.ravel().astype(np.float64) ** 2 / 2
    subsets = np.array(list(itertools.product((0, 1), repeat=12)), bool)
    for plan in (AreaResize((7, 9), (3, 4)), AreaResize((6, 8), (3, 4))):
        up = plan.upsample(np.arange(12).reshape(3, 4))
        worth = np.bincount(up.ravel(), minlength=12)
        for eps in (0.0, 0.02, 0.1, 0.3, 2.0):
            budget = (2.0 * plan.network_eps(eps)) ** 2 if eps else -1.0
            exact = int((subsets[(subsets * cost).sum(1) <= budget] @ worth).max(initial=0))
            got = plan.max_source_flips(margin, eps, 2.0)
            k = int(max_flips(margin, plan.network_eps(eps), 2.0))
            assert exact <= got <= _largest_blocks(plan, k)
            if worth.min() == worth.max():
                assert got == exact
            gains = plan.max_source_gains_by_class(logits, pred, eps, 2.0)
            for c in range(3):
                gap = (logits.max(0) - logits[c]).ravel().astype(np.float64)
                into = subsets[:, pred.ravel() == c].sum(1) == 0  # sets predicted otherwise
                ok = into & ((subsets * (gap * gap / 2)).sum(1) <= budget)
                exact_c = int((subsets[ok] @ worth).max(initial=0))
                assert exact_c <= gains[c]
                if worth.min() == worth.max():
                    assert gains[c] == exact_c
            by_class = plan.max_source_flips_by_class(margin, labels, 3, eps, 2.0)
            for c in range(3):
                mine = subsets[:, labels.ravel() != c].sum(1) == 0  # sets inside class c
                ok = mine & ((subsets * cost).sum(1) <= budget)
                exact_c = int((subsets[ok] @ worth).max(initial=0))
                assert exact_c <= by_class[c] <= got
                if worth.min() == worth.max():
                    assert by_class[c] == exact_c


@pytest.mark.parametrize("seed", range(3))
def test_source_stability_inverts_max_source_flips(seed):
    """Below the stability norm of k source pixels no affordable set of network pixels
    covers k of them (every subset of a 12-pixel net), and max_source_flips says fewer
    than k. Just above it max_source_flips reaches k for equal blocks and on a real
    shrink: there the two are one bound (on a 12-pixel net with unequal blocks the
    affordable pixels' own largest blocks, which max_source_flips uses, can make it
    the tighter one)."""
    rng = np.random.default_rng(seed)
    margin = rng.random((3, 4)).astype(np.float32)
    cost = margin.ravel().astype(np.float64) ** 2 / 2
    subsets = np.array(list(itertools.product((0, 1), repeat=12)), bool)
    fractions = (0.01, 0.1, 0.3, 0.6, 1.0)
    for plan in (AreaResize((7, 9), (3, 4)), AreaResize((6, 8), (3, 4))):
        worth = np.bincount(plan.upsample(np.arange(12).reshape(3, 4)).ravel(), minlength=12)
        norms = plan.source_stability(margin, fractions, 2.0)
        for a, s in zip(fractions, norms, strict=True):
            k = math.ceil(a * plan.source[0] * plan.source[1] - 1e-9)
            below = s * (1 - 1e-6)
            budget = (2.0 * plan.network_eps(below)) ** 2
            reach = int((subsets[(subsets * cost).sum(1) <= budget] @ worth).max(initial=0))
            assert reach < k
            assert plan.max_source_flips(margin, below, 2.0) < k
            if worth.min() == worth.max():
                assert plan.max_source_flips(margin, s * (1 + 1e-6), 2.0) >= k
    # a real shrink, 4 block sizes: the same inverse, and 0 for no pixels
    plan = AreaResize((45, 91), (32, 64))
    margin = rng.random((32, 64)).astype(np.float32)
    for a, s in zip(fractions, plan.source_stability(margin, fractions, 1.0), strict=True):
        k = math.ceil(a * 45 * 91 - 1e-9)
        assert plan.max_source_flips(margin, s * (1 - 1e-6), 1.0) < k
        assert plan.max_source_flips(margin, s * (1 + 1e-6), 1.0) >= k
    assert plan.source_stability(margin, (0.0,), 1.0).tolist() == [0.0]
    assert plan.source_stability(np.full((32, 64), np.inf, np.float32), (0.1,), 1.0)[0] == math.inf
    # margins nothing is known of (NaN logits) flip for free: 0, never "no attack can"
    unknown = margin.copy()
    unknown[0, :8] = np.nan
    assert plan.source_stability(unknown, (0.001,), 1.0)[0] == 0.0
    for bad in ((1.5,), (math.nan,)):
        with pytest.raises(ValueError):
            plan.source_stability(margin, bad, 1.0)
    with pytest.raises(ValueError):
        plan.source_stability(margin.T, (0.1,), 1.0)  # not the network grid
    with pytest.raises(ValueError):
        plan.source_stability(margin, (0.1,), 0.0)


def test_max_source_flips_is_tighter_than_the_largest_blocks():
    """Cheap pixels do not all sit in the largest blocks: the knapsack gains on a real
    shrink (4 block sizes)."""
    plan = AreaResize((45, 91), (32, 64))
    margin = np.random.default_rng(0).random((32, 64)).astype(np.float32)
    eps = 0.5
    k = int(max_flips(margin, plan.network_eps(eps), 1.0))
    assert 0 < plan.max_source_flips(margin, eps, 1.0) < _largest_blocks(plan, k)


def test_source_radius_and_budget_fold_in_the_norm_and_the_rounding():
    plan = AreaResize((90, 180), (45, 90))  # factor 2 a side: ||D|| = 1/2
    assert plan.operator_norm == pytest.approx(0.5)
    rho = plan.rounding()
    assert 0 < rho < 1e-4
    r = np.array([[0.0, rho / 2, 0.01, 1.0]], np.float32)
    got = plan.source_radius(r)
    exact = np.maximum(r.astype(np.float64) - rho, 0) / plan.operator_norm
    assert got.dtype == np.float32 and (got <= exact).all()
    np.testing.assert_allclose(got, exact, rtol=2e-6)
    # never above the exact value, over many radii
    many = np.random.default_rng(2).random(100_000).astype(np.float32)
    exact_many = np.maximum(many.astype(np.float64) - rho, 0) / plan.operator_norm
    assert (plan.source_radius(many) <= exact_many).all()
    assert plan.network_eps(0.0) == 0.0
    assert plan.network_eps(0.1) >= 0.5 * 0.1 + rho
    # a pixel guaranteed at eps on the source grid is guaranteed at network_eps
    eps = 0.004
    assert ((got > eps) <= (r > plan.network_eps(eps))).all()


def _brute_worst(plan, mask, margin, target, eps, L):
    """Worst accuracy over every set of network pixels one attack can afford."""
    up = plan.upsample(np.arange(mask.size).reshape(mask.shape))
    correct = (plan.upsample(mask) == target) & (target != 255)
    v = np.bincount(up[correct], minlength=mask.size)
    costs = margin.ravel().astype(np.float64) ** 2 / 2
    budget = (L * plan.network_eps(eps)) ** 2
    best = 0
    for r in range(mask.size + 1):
        for s in itertools.combinations(range(mask.size), r):
            if costs[list(s)].sum() <= budget:
                best = max(best, int(v[list(s)].sum()))
    return (int(correct.sum()) - best) / int((target != 255).sum())


@pytest.mark.parametrize("seed", range(4))
def test_worst_case_accuracy_never_above_the_exhaustive_worst(seed):
    rng = np.random.default_rng(seed)
    plan = AreaResize((7, 9), (3, 4))  # 12 network pixels: every subset is tried
    mask = rng.integers(0, 3, (3, 4))
    margin = rng.random((3, 4)).astype(np.float32)
    target = rng.integers(0, 3, (7, 9))
    target[0, :3] = 255
    for eps in (0.0, 0.02, 0.1, 0.3):
        worst, clean = plan.worst_case_accuracy(mask, margin, target, eps, 2.0)
        exact = _brute_worst(plan, mask, margin, target, eps, 2.0)
        assert worst <= exact + 1e-12
        valid = target != 255
        assert clean == ((plan.upsample(mask) == target) & valid).sum() / valid.sum()
        if eps == 0:
            assert worst == clean
    # equal whole blocks (factor 2, uniform targets per block): the bound is exact
    plan2 = AreaResize((6, 8), (3, 4))
    target2 = plan2.upsample(mask)
    for eps in (0.02, 0.1, 0.3):
        worst, _ = plan2.worst_case_accuracy(mask, margin, target2, eps, 2.0)
        assert worst == pytest.approx(_brute_worst(plan2, mask, margin, target2, eps, 2.0))


def _brute_iou(plan, logits, target, eps, L):
    """Exact worst IoU per class on the source grid over every affordable set of
    network pixels flipped in or out of the class (flips among other classes do not
    change it), with every effect on the source pixels counted."""
    K, n = logits.shape[0], logits[0].size
    z = logits.reshape(K, n).astype(np.float64)
    pred, top = z.argmax(0), z.max(0)
    margin = top - np.sort(z, 0)[-2]
    subsets = np.array(list(itertools.product((0, 1), repeat=n)), bool)  # (2^n, n)
    budget = (L * plan.network_eps(eps)) ** 2 if eps > 0 else -1.0
    up = plan.upsample(np.arange(n).reshape(logits.shape[1:]))
    valid = target != 255
    worst = np.full(K, np.nan)
    for c in range(K):
        g = np.bincount(up[valid & (target == c)], minlength=n)
        other = np.bincount(up[valid & (target != c)], minlength=n)
        if g.sum() == 0:
            continue
        cost = np.where(pred == c, margin, top - z[c]) ** 2 / 2
        ok = subsets[(subsets * cost).sum(1) <= budget] if budget >= 0 else subsets[:1]
        in_c = (pred == c)[None, :] ^ ok  # a flip toggles membership in c
        worst[c] = ((in_c @ g) / (g.sum() + in_c @ other)).min()
    return worst


@pytest.mark.parametrize("seed", range(4))
def test_worst_case_iou_never_above_the_exhaustive_worst(seed):
    rng = np.random.default_rng(10 + seed)
    plan = AreaResize((7, 9), (3, 4))  # 12 network pixels: every subset is tried
    logits = rng.normal(size=(3, 3, 4)).astype(np.float32)
    mask, margin = margins(logits)
    target = np.where(rng.random((7, 9)) < 0.6, plan.upsample(mask), rng.integers(0, 3, (7, 9)))
    target[0, :3] = 255
    tight = []
    for eps in (0.0, 0.05, 0.2, 0.5):
        worst, clean = plan.worst_case_iou(mask, margin, logits, target, eps, 1.5)
        exact = _brute_iou(plan, logits, target, eps, 1.5)
        present = ~np.isnan(exact)
        np.testing.assert_array_equal(np.isnan(worst), ~present)
        assert (worst[present] <= exact[present] + 1e-12).all()
        tight.append(exact[present] - worst[present])
        if eps == 0:
            np.testing.assert_allclose(worst[present], clean[present], rtol=0, atol=0)
            np.testing.assert_allclose(worst[present], exact[present], atol=1e-12)
    # the relaxation gives away little: at most a block or so of each side's pixels
    assert max(t.max() for t in tight) < 0.25
    # equal whole blocks (factor 2, targets uniform per block): the bound is exact
    plan2 = AreaResize((6, 8), (3, 4))
    target2 = plan2.upsample(np.where(rng.random((3, 4)) < 0.7, mask, (mask + 1) % 3))
    for eps in (0.05, 0.2, 0.5):
        worst, _ = plan2.worst_case_iou(mask, margin, logits, target2, eps, 1.5)
        exact = _brute_iou(plan2, logits, target2, eps, 1.5)
        present = ~np.isnan(exact)
        assert (worst[present] <= exact[present]).all()
        np.testing.assert_allclose(worst[present], exact[present], atol=1e-6)  # the slack


def test_worst_case_iou_with_identity_resize_stays_below_the_exact_frontier():
    """No shrink (every block one pixel): the knapsack bound never beats the integer
    frontier of `certseg.certify.worst_case_iou`, and equals it (unit values)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 12, 16)).astype(np.float32)
    mask, margin = margins(logits)
    target = np.where(rng.random((12, 16)) < 0.7, mask, rng.integers(0, 4, (12, 16)))
    plan = AreaResize((12, 16), (12, 16))
    for eps in (0.0, 0.05, 0.3):
        worst, _ = plan.worst_case_iou(mask, margin, logits, target, eps, 2.0)
        exact = worst_case_iou(logits, target, plan.network_eps(eps), 2.0)
        assert (worst <= exact + 1e-12).all()
        np.testing.assert_allclose(worst, exact, atol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 7, 500, 1000])
def test_largest_sum_counts_what_a_sort_gives(k):
    from certseg.certify.resize import _largest_sum

    values = np.random.default_rng(k).integers(0, 6, 1000)
    assert _largest_sum(values, k) == int(np.sort(values)[::-1][:k].sum())


@pytest.mark.parametrize(
    ("source", "network"), [((45, 32), (30, 20)), ((2160, 3840), (1536, 2730))]
)
def test_source_radius_never_exceeds_its_exact_value(source, network):
    """float32 radii against exact rationals: max(r - rounding, 0) / operator_norm. The
    2^-20 shrink is what covers the three float32 roundings (without it 3.5% of such
    radii came out above the exact value, by an ulp or so)."""
    from fractions import Fraction

    plan = AreaResize(source, network)
    rng = np.random.default_rng(1)
    near = np.float32(plan.rounding()) * (1 + rng.random(1000, dtype=np.float32))
    radius = np.concatenate([rng.random(3000, dtype=np.float32) * 3, near])
    got = plan.source_radius(radius.copy())
    rho, norm = Fraction(plan.rounding()), Fraction(plan.operator_norm)
    over = [
        r for r, g in zip(radius.tolist(), got.tolist(), strict=True)
        if Fraction(g) > max(Fraction(r) - rho, Fraction(0)) / norm
    ]  # fmt: skip
    assert not over, over[:5]
    assert (got > 0).mean() > 0.5  # and the radii are not all cut to nothing
