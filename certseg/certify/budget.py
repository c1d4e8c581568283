"""The joint attack budget: what an attacker of norm eps can flip in one image.

Any input change of l2 norm <= eps moves the whole logit map by at most L eps in l2.
Flipping pixel p needs its two top logits to meet, which costs margin_p**2 / 2 of
squared logit norm, so a set S of pixels can be flipped only if the sum over S of
those costs is <= (L eps)**2. At eps == 0 nothing can be flipped, not even pixels
whose margin is 0: every bound here equals the clean metric at eps == 0. That is
enforced by an *effective* budget of -1 at eps == 0 (all costs are >= 0), for exact
margins only (`_unperturbed`): margins shrunk by an engine's margin error
(`exact=False`, or `margin_error` > 0) get a budget of 0 there, so their zero-cost
pixels (the ones the engine may have given another class than the float32 net) flip.

All combinatorial math is done in float64; images are rows of shape (R, N) with
N = H * W pixels, padded with +inf costs where a row has fewer candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

from .pixelwise import _check_lipschitz, _detach, _eps_rows, _unperturbed, unknown_where_margin_nan

__all__ = [
    "STABILITY_FRACTIONS",
    "affordable_by_class",
    "attack_budget",
    "cheapest_flips",
    "flip_costs",
    "fraction_counts",
    "frontier_min_ratio",
    "gain_candidates_by_class",
    "gains_within",
    "least_cover_cost",
    "margin_rounding_slack",
    "max_flips",
    "max_flips_by_class",
    "max_gains_by_class",
    "split_frontier",
    "stability",
    "stability_rows",
    "summed_budget_slack",
    "worst_ratio",
]

Array = Any


#: float64 margins are capped here before squaring (their cost stays finite: 5e299),
#: and costs below _TINY_COST taken as 0 (subnormal squares round up by up to 60%).
#: Both only lower costs, the sound side; float32 margins never reach either.
_MARGIN_CAP = 1e150
_TINY_COST = 2.0**-1000


def flip_costs(margin: Array) -> Array:
    """Squared logit-norm cost margin**2 / 2 of flipping each pixel (float64), a lower
    bound: finite float64 margins past 1e150 are capped, and costs in the subnormal
    range (where squaring rounds up) taken as 0."""
    xp = array_namespace(margin)
    wide = xp.isdtype(margin.dtype, xp.float64)
    m = xp.astype(_detach(margin), xp.float64)
    m = xp.where(xp.isnan(m), xp.zeros_like(m), m)  # nothing known: flips for free
    if wide:  # inf stays inf: a pixel that can never flip (a single class)
        m = xp.where(xp.isfinite(m), xp.clip(m, -_MARGIN_CAP, _MARGIN_CAP), m)
    cost = m * m / 2.0
    if wide:
        cost = xp.where(cost < _TINY_COST, xp.zeros_like(cost), cost)
    return cost


def _known(margin: np.ndarray) -> np.ndarray:
    """numpy margins with NaN as 0 (a pixel nothing is known of flips for free), for the
    threshold tests that would skip a NaN (it compares false). One min when none is."""
    if margin.size == 0 or not np.isnan(margin.min()):
        return margin
    return np.where(np.isnan(margin), margin.dtype.type(0), margin)


def attack_budget(eps: float | Array, L: float) -> float | Array:
    """Squared logit-norm budget (L eps)**2 of an attacker of input norm eps."""
    return (_check_lipschitz(L) * eps) ** 2


def _effective_budget(eps_rows: Array, L: float, slack: float = 1.0, exact: bool = True) -> Array:
    """(L eps)**2 * slack per row, or -1 where nothing flips (`_unperturbed`: eps == 0
    with exact margins) so that even zero-cost flips fail; 0 at eps == 0 otherwise.

    L eps is capped at 1e150 first: past that every finite cost is affordable anyway,
    and the square stays finite (no overflow for an absurd eps)."""
    xp = array_namespace(eps_rows)
    dev = _device(eps_rows)
    le = L * xp.minimum(eps_rows, xp.asarray(1e150 / L, dtype=xp.float64, device=dev))
    b = le * le * slack
    none = xp.asarray(-1.0, dtype=xp.float64, device=dev)
    return xp.where(_unperturbed(eps_rows, exact), none, b)


#: Relative rounding a sum of many float64 costs may carry (millions of terms: far less):
#: budgets compared with such sums are taken that much up, bounds made of them down.
_SUM_SLACK = 1e-9


def summed_budget_slack(margin: Array) -> float:
    """The slack of a budget compared with float64 sums of costs of these margins: the
    margins' rounding (`margin_rounding_slack`) and the sums' (so a set of flips whose
    exact cost just fits is never declared unaffordable)."""
    return margin_rounding_slack(margin) * (1.0 + _SUM_SLACK)


def margin_rounding_slack(margin: Array) -> float:
    """1 + a bound on how far margin**2 / 2 may lie above the exact cost of a margin
    stored in a float type: top1 - top2 rounded to nearest is at most eps / 2 relative
    above the exact difference, its square about eps above; 2 eps is taken. Budgets are
    multiplied by it (float32: 1 + 2.4e-7; float64, exact differences: 1 + 4.4e-16)."""
    xp = array_namespace(margin)
    if not xp.isdtype(margin.dtype, "real floating"):
        return 1.0
    return 1.0 + 2.0 * float(xp.finfo(margin.dtype).eps)


def _keep_sorted(costs: Array, keep: Array) -> Array:
    """Sorted (ascending) kept costs per row, +inf padded to the longest row's count.

    Candidates beyond the budget are dropped by the callers before this, so the
    sort runs on the few affordable costs, not on every pixel. Compaction is a
    scatter at cumulative-count positions (integer-array assignment works the
    same on numpy arrays and torch tensors).
    """
    xp = array_namespace(costs)
    dev = _device(costs)
    R, N = costs.shape
    keep_i = xp.astype(keep, xp.int64)
    width = int(xp.max(xp.sum(keep_i, axis=-1))) if R > 0 and N > 0 else 0
    out = xp.full((R, width), math.inf, dtype=xp.float64, device=dev)
    if width == 0:
        return out
    rows, cols = xp.nonzero(keep)
    pos = xp.cumulative_sum(keep_i, axis=-1) - 1
    out[rows, pos[rows, cols]] = costs[rows, cols]
    return xp.sort(out, axis=-1)


def _count_le(values: Array, queries: Array) -> Array:
    """For each query, how many entries of its row of sorted ``values`` are <= it.

    A batched ``searchsorted(side='right')``: numpy's searchsorted is 1-D only, so
    merge instead. A stable argsort of [values, queries] puts equal values before
    queries; the running count of values at each query's sorted slot is the answer.
    """
    xp = array_namespace(values)
    R, F = values.shape
    Q = queries.shape[-1]
    if F == 0 or Q == 0:
        return xp.zeros((R, Q), dtype=xp.int64, device=_device(values))
    merged = xp.concat([values, queries], axis=-1)
    order = xp.argsort(merged, axis=-1, stable=True)
    running = xp.cumulative_sum(xp.astype(order < F, xp.int64), axis=-1)
    slot = xp.argsort(order, axis=-1, stable=True)  # inverse permutation
    return xp.take_along_axis(running, slot[:, F:], axis=-1)


def _max_flips_rows(costs: Array, keep: Array, budget: Array) -> Array:
    """Longest prefix of the sorted kept costs whose sum fits the budget, per row."""
    xp = array_namespace(costs)
    b = budget[:, None]
    cs = xp.cumulative_sum(_keep_sorted(costs, keep & (costs <= b)), axis=-1)
    return xp.sum(xp.astype(cs <= b, xp.int64), axis=-1)


_BUCKETS = 4096
_BUCKET_MIN = 1 << 15  # below this many candidates selection alone is as fast


def _max_flips_select(costs: np.ndarray, budget: float) -> int:
    """Exact longest affordable prefix of one row's sorted costs, in O(N) by selection.

    Why: the server certifies one image per request, and a full sort of every pixel's
    cost dominated its certify stage. Only the multiset of the m smallest costs matters
    for a prefix sum, which np.partition gives without sorting: halve the candidate
    range until it is empty. Its sums add in another order than a sorted cumsum, so
    the budget gets a relative slack of 1e-9 (far above float64 summation error over
    any image): a prefix that fits only within that slack counts as flippable, the
    conservative (sound) side; otherwise the answer equals sort + cumsum (tested).
    """
    slack_budget = float(budget) * (1.0 + _SUM_SLACK)
    arr = costs[costs <= slack_budget]
    count, remaining = 0, slack_budget
    if arr.size > _BUCKET_MIN and slack_budget > 0:
        # One counting pass first: cost buckets are ordered, so the prefix takes whole
        # buckets up to the one where the budget runs out; only that one is selected in.
        idx = np.minimum((arr * (_BUCKETS / slack_budget)).astype(np.intp), _BUCKETS - 1)
        sums = np.cumsum(np.bincount(idx, weights=arr, minlength=_BUCKETS))
        full = int(np.searchsorted(sums, remaining, side="right"))
        if full == _BUCKETS:
            return int(arr.size)
        if full > 0:
            count = int(np.count_nonzero(idx < full))
            remaining -= float(sums[full - 1])
        arr = arr[idx == full]
    while arr.size:
        total = float(arr.sum())
        if total <= remaining:
            return count + int(arr.size)
        m = arr.size // 2
        if m == 0:
            return count
        part = np.partition(arr, m - 1)
        low = float(part[:m].sum())
        if low <= remaining:
            count, remaining, arr = count + m, remaining - low, part[m:]
        else:
            arr = part[:m]
    return count


def _rows(x: Array, trailing: int) -> tuple[Array, tuple[int, ...]]:
    """Flatten the leading dims to one row axis; returns (rows, leading shape)."""
    xp = array_namespace(x)
    lead = tuple(x.shape[: x.ndim - trailing])
    return xp.reshape(x, (math.prod(lead), math.prod(x.shape[x.ndim - trailing :]))), lead


def max_flips(
    margin: Array,
    eps: float | Array,
    L: float,
    valid: Array | None = None,
    exact: bool = True,
) -> Array:
    """Most pixels (among ``valid``) that any perturbation of norm <= eps can flip.

    The longest prefix of sorted costs margin**2 / 2 whose sum is <= (L eps)**2,
    per image over the last two (H, W) axes; 0 at eps == 0, unless the margins are
    not `exact` (shrunk by a margin error: the pixels of margin 0 then count, see
    `_unperturbed`). eps: float or per-image array over the leading dims. Returns
    int64 of the leading shape.
    """
    xp = array_namespace(margin)
    L = _check_lipschitz(L)
    if isinstance(margin, np.ndarray):
        return _max_flips_numpy(_known(margin), eps, L, valid, exact)
    costs, lead = _rows(flip_costs(margin), 2)
    keep = xp.ones(costs.shape, dtype=xp.bool, device=_device(costs))
    if valid is not None:
        keep, _ = _rows(xp.broadcast_to(xp.asarray(_detach(valid), dtype=xp.bool), margin.shape), 2)
    eps_rows = _eps_rows(eps, lead, xp, _device(costs))
    budget = _effective_budget(eps_rows, L, summed_budget_slack(margin), exact)  # cumsum below
    return xp.reshape(_max_flips_rows(costs, keep, budget), lead)


def _max_flips_numpy(
    margin: np.ndarray, eps: float | Array, L: float, valid: np.ndarray | None, exact: bool
) -> np.ndarray:
    """max_flips on numpy, one image at a time, touching only affordable pixels.

    Why: the server certifies every answer, and forming float64 costs of all pixels
    (2M at 1024x2048) dominated that stage. A pixel is affordable only if its margin
    is <= sqrt(2 budget); that test runs on the margins as they are (a float32
    threshold rounded up two steps, so the candidates are a superset), and the
    exact float64 costs are formed for the candidates alone. On large images a
    sampled guess (`_sampled_limit`) first narrows the candidates to the cheapest few
    percent, kept only when an exact check shows the answer lies among them.
    """
    rows, lead = _rows(margin, 2)
    keep = None
    if valid is not None:
        keep, _ = _rows(np.broadcast_to(np.asarray(valid, dtype=bool), margin.shape), 2)
    eps_rows = _eps_rows(eps, lead, np, None)
    budget = _effective_budget(eps_rows, L, margin_rounding_slack(margin), exact)
    flips = np.zeros(rows.shape[0], dtype=np.int64)
    ftype = _float_type(rows)
    for r in range(rows.shape[0]):
        if budget[r] < 0:
            continue
        b = float(budget[r])
        size, kept = np.abs(rows[r]), None if keep is None else keep[r]
        affordable = _affordable_limit(b)  # the most one pixel may cost
        costs = None
        guess = _sampled_limit(size, kept, b)
        if guess is not None and guess < affordable:
            costs = _costs_below(rows[r], size, kept, guess, ftype)
            # Exact: these are every kept pixel of cost <= some threshold, a prefix of the
            # sorted costs; when their total is past the budget (with the selection's
            # slack, and room for its rounding) the longest affordable prefix lies inside.
            if not _settles(costs, b):
                costs = None  # a guess too low: take every affordable pixel
        if costs is None:
            costs = _costs_below(rows[r], size, kept, affordable, ftype)
        flips[r] = _max_flips_select(costs, b)
    return flips.reshape(lead)


def _margin_threshold(limit: float, ftype: Any) -> Any:
    """`limit` in the margins' own float type, rounded up two steps: comparing |margin|
    with it keeps a superset of the margins <= limit, never fewer."""
    if limit >= float(np.finfo(ftype).max):  # every finite margin is below it
        return ftype(np.inf)
    up = ftype(limit)
    return np.nextafter(np.nextafter(up, ftype(np.inf)), ftype(np.inf))


def _costs_below(row: np.ndarray, size: np.ndarray, kept, limit: float, ftype) -> np.ndarray:
    """float64 costs of the (kept) pixels whose |margin| is <= limit (a superset)."""
    cand = size <= _margin_threshold(limit, ftype)
    if kept is not None:
        cand &= kept
    return flip_costs(row[cand])


def _settles(costs: np.ndarray, budget: float) -> bool:
    """Whether candidates below a guessed threshold cost more than the budget (with the
    selection's slack, and room for its rounding): the longest affordable prefix of
    the sorted costs then lies among them, and the guess gave the exact answer."""
    return float(costs.sum()) > budget * (1.0 + _SUM_SLACK) * (1.0 + 1e-10)


def _float_type(margin: np.ndarray) -> Any:
    return np.float32 if margin.dtype.kind == "f" and margin.dtype.itemsize <= 4 else np.float64


def _affordable_limit(budget: float) -> float:
    """The largest |margin| a single flip within `budget` may have (with the select's slack)."""
    return math.sqrt(2.0 * budget * (1.0 + _SUM_SLACK))


def _class_groups(
    margin: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    limit: float | np.ndarray,
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class, float64 costs, flat indices) of the pixels with |margin| <= limit (a
    superset), grouped by label, for labels in [0, num_classes). `limit`: one for all,
    or one per class (num_classes,); a NaN or negative one leaves its class out.

    One pass over the image whatever the number of classes: the threshold test, then a
    stable sort of the candidates by label (a radix sort: labels become uint8/uint16).
    """
    if margin.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and margins {margin.shape} differ in shape")
    flat, lab_all = _known(margin).reshape(-1), labels.reshape(-1)
    ftype = _float_type(margin)
    if np.ndim(limit) == 0:
        idx = np.flatnonzero(np.abs(flat) <= _margin_threshold(float(limit), ftype))
    else:  # a threshold per class, gathered per pixel (outside labels: below every margin)
        per = [_margin_threshold(x, ftype) if x >= 0 else ftype(-1) for x in limit.tolist()]
        thr = np.asarray([*per, ftype(-1)], dtype=ftype)
        if lab_all.size and (lab_all.min() < 0 or lab_all.max() >= num_classes):
            lab_all = np.where((lab_all >= 0) & (lab_all < num_classes), lab_all, num_classes)
        idx = np.flatnonzero(np.abs(flat) <= thr[lab_all])  # a model's mask: in range
    lab = lab_all[idx]
    inside = (lab >= 0) & (lab < num_classes)
    idx, lab = idx[inside], lab[inside].astype(np.min_scalar_type(max(num_classes - 1, 0)))
    order = np.argsort(lab, kind="stable")
    idx, lab = idx[order], lab[order]
    starts = np.searchsorted(lab, np.arange(num_classes + 1))
    groups = []
    for c in range(num_classes):
        members = idx[starts[c] : starts[c + 1]]
        if members.size:
            groups.append((c, flip_costs(flat[members]), members))
    return groups


def affordable_by_class(
    margin: np.ndarray, labels: np.ndarray, num_classes: int, budget: float
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class, float64 costs, flat pixel indices) of a superset of the pixels of each
    label whose flip cost is <= `budget` (none when budget < 0), for the classes in
    [0, num_classes) that have any."""
    if budget < 0:
        return []
    return _class_groups(margin, labels, num_classes, _affordable_limit(budget))


def _class_guesses(
    margin: np.ndarray, labels: np.ndarray, num_classes: int, budget: float, limit: float
) -> np.ndarray:
    """Per class, `_sampled_limit` of its own pixels (from every 64th pixel): a margin
    threshold whose pixels cost about twice the budget; `limit` where the image is
    small or the sample does not get there."""
    guesses = np.full(num_classes, limit)
    if margin.size < _SAMPLE_MIN:
        return guesses
    sample = np.ascontiguousarray(margin.reshape(-1)[::_SAMPLE_STRIDE])
    sample_labels = labels.reshape(-1)[::_SAMPLE_STRIDE]
    for c, costs, _ in _class_groups(sample, sample_labels, num_classes, limit):
        costs.sort()
        reach = int(np.searchsorted(np.cumsum(costs) * _SAMPLE_STRIDE, 2.0 * budget))
        if reach < costs.size:
            guesses[c] = min(limit, math.sqrt(2.0 * float(costs[reach])))
    return guesses


def max_flips_by_class(
    margin: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    eps: float,
    L: float,
    exact: bool = True,
) -> np.ndarray:
    """Per label c of one image (H, W): the most pixels labelled c that one perturbation
    of norm <= eps can flip, int64 (num_classes,).

    Each equals `max_flips(margin, eps, L, valid=labels == c, exact=exact)`, all from
    one pass or two, whatever the number of classes. Every class has its own worst attack, so they
    do not add up to `max_flips`: an attack that reaches one class's figure spends its
    budget there.

    As in `max_flips`, a sampled guess per class first keeps its cheapest pixels; a
    class whose kept pixels cost more than the budget has its answer among them, the
    others are taken again with every affordable pixel.
    """
    L = _check_lipschitz(L)
    margin, labels = np.asarray(margin), np.asarray(labels)
    eps_row = _eps_rows(eps, (), np, None)
    budget = float(_effective_budget(eps_row, L, margin_rounding_slack(margin), exact)[0])
    out = np.zeros(num_classes, dtype=np.int64)
    if budget < 0:
        return out
    limit = _affordable_limit(budget)
    guesses = _class_guesses(margin, labels, num_classes, budget, limit)
    again = np.full(num_classes, -1.0)  # the classes the guess did not settle
    for c, costs, _ in _class_groups(margin, labels, num_classes, guesses):
        out[c] = _max_flips_select(costs, budget)
        if guesses[c] < limit and not _settles(costs, budget):
            again[c] = limit
    if (again >= 0).any():
        for c, costs, _ in _class_groups(margin, labels, num_classes, again):
            out[c] = _max_flips_select(costs, budget)
    return out


def _logits_and_top(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, flat max over classes), a pixel with a NaN margin made unknown
    (`unknown_where_margin_nan`): looked for where the max is not finite (NaN where a
    logit is, infinite at a tie of infinities)."""
    top = logits.max(axis=0).reshape(-1)
    if not np.isfinite(top).all():
        logits = unknown_where_margin_nan(logits)
        top = logits.max(axis=0).reshape(-1)
    return logits, top


def gain_candidates_by_class(
    logits: np.ndarray, mask: np.ndarray, budget: float, margin_error: float = 0.0
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class c, float64 costs, flat pixel indices): a superset of the pixels predicted
    otherwise that one attack within `budget` could turn into c, for one image's logits
    (K, H, W) and mask (H, W).

    Turning pixel q into c needs its logits to move by at least (z_top - z_c) / sqrt(2)
    in l2 (the step that puts z_c level with the top), so it costs
    max(z_top - z_c - margin_error, 0)^2 / 2, the gap shrunk by the engine's error
    bound as margins are (`gains_within`).
    """
    if budget < 0:
        return []
    _check_logits(logits, mask)
    logits, top = _logits_and_top(logits)
    labels = mask.reshape(-1)
    limit = _affordable_limit(budget)
    groups = []
    for c in range(logits.shape[0]):
        idx, costs = gains_within(top, logits[c].reshape(-1), labels != c, limit, margin_error)
        if idx.size:
            groups.append((c, costs, idx))
    return groups


def gains_within(
    top: np.ndarray,
    z: np.ndarray,
    others: np.ndarray,
    limit: float,
    margin_error: float,
    gap: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, float64 costs max(top - z - margin_error, 0)^2 / 2) of the `others`
    pixels (flat arrays) whose gap top - z, shrunk by the error, may be <= `limit`.

    The gaps in the logits' own precision (`gap`, if the caller has them) only
    preselect: rounding is monotone, so a gap within the limit stays within it, the
    limit rounded up; the costs are formed in float64."""
    bound = _margin_threshold(limit + margin_error, _float_type(z))
    gap = top - z if gap is None else gap
    idx = np.flatnonzero((gap <= bound) & others)
    exact = top[idx].astype(np.float64) - z[idx].astype(np.float64)
    return idx, flip_costs(np.maximum(exact - margin_error, 0.0))


def _check_logits(logits: np.ndarray, mask: np.ndarray) -> None:
    if logits.shape[1:] != mask.shape:
        raise ValueError(f"logits {logits.shape} and mask {mask.shape} differ in shape")


def max_gains_by_class(
    logits: np.ndarray, mask: np.ndarray, eps: float, L: float, margin_error: float = 0.0
) -> np.ndarray:
    """Per class c of one image: the most pixels predicted otherwise that one
    perturbation of norm <= eps can turn into c, int64 (K,). With `max_flips_by_class`
    it brackets c's area under every such attack: at least pixels_c - max_flips_c, at
    most pixels_c + max_gains_c (each bound with its own worst attack). With
    `margin_error` > 0 the gaps it closes count at eps == 0 too (`_unperturbed`)."""
    L = _check_lipschitz(L)
    eps_row = _eps_rows(eps, (), np, None)
    # float64 costs of float32 gaps: the slack of a float64 margin covers their rounding;
    # gaps shrunk by an error are not exact: those it closes flip even at eps == 0
    slack = margin_rounding_slack(np.zeros(1))
    budget = float(_effective_budget(eps_row, L, slack, exact=margin_error == 0)[0])
    K = logits.shape[0]
    out = np.zeros(K, dtype=np.int64)
    if budget < 0:
        return out
    _check_logits(logits, mask)
    limit = _affordable_limit(budget)
    logits, top = _logits_and_top(logits)
    labels = mask.reshape(-1)
    for c in range(K):
        z, others = logits[c].reshape(-1), labels != c
        gap = top - z
        # As in max_flips: the pixels below a sampled guess of the gap first; exact when
        # they cost more than the budget, else every pixel within reach.
        guess = _sampled_limit(gap, others, budget)
        if guess is not None and guess < limit:
            _, costs = gains_within(top, z, others, guess, margin_error, gap)
            if _settles(costs, budget):
                out[c] = _max_flips_select(costs, budget)
                continue
        _, costs = gains_within(top, z, others, limit, margin_error, gap)
        out[c] = _max_flips_select(costs, budget)
    return out


_SAMPLE_STRIDE = 64
_SAMPLE_MIN = 1 << 16  # below this many pixels the plain pre-filter is as fast


def _sampled_limit(size: np.ndarray, kept: np.ndarray | None, budget: float) -> float | None:
    """A guess at a margin threshold whose pixels' costs add up to about twice the
    budget, from every 64th pixel (None: the row is small, or the guess is everything).

    Why: at 1024x2048 most pixels are individually affordable (margin <= sqrt(2 budget))
    while an attacker can flip about 1% of them, and forming and selecting the costs of
    all the affordable ones was the certify stage's cost. The guess need not be right:
    the caller checks exactly that the pixels below it cost more than the budget, and
    takes every affordable pixel otherwise.
    """
    if size.size < _SAMPLE_MIN or budget <= 0:
        return None
    sample = size[::_SAMPLE_STRIDE]
    if kept is not None:
        sample = sample[kept[::_SAMPLE_STRIDE]]
    costs = np.sort(flip_costs(sample))
    # Each sampled pixel stands for _SAMPLE_STRIDE of the row.
    reach = int(np.searchsorted(np.cumsum(costs) * _SAMPLE_STRIDE, 2.0 * budget))
    if reach >= costs.size or not math.isfinite(costs[reach]):
        return None
    return math.sqrt(2.0 * float(costs[reach]))


#: Fractions of pixels `stability` is reported at by default (evaluation, the server).
STABILITY_FRACTIONS = (0.01, 0.05, 0.1)


def least_cover_cost(
    costs: np.ndarray, needs: np.ndarray | Sequence[float], values: np.ndarray | None = None
) -> np.ndarray:
    """For each need k: a lower bound of the least total cost of items whose values sum
    to at least k, float64 like `needs` (0 where k <= 0, +inf where all items together
    hold less, or the cover needs an infinite cost).

    The fractional relaxation: cheapest cost per value first, the last item in part,
    so the bound of any 0/1 cover; with unit values (`values` None) it is the sum of
    the k cheapest costs, exact. Only the m items of least ratio that surely reach the
    largest need (m = its value over the least value) are sorted. The sums are taken
    down by 1e-9 relative, past their float64 rounding.
    """
    costs = np.asarray(costs, np.float64).reshape(-1)
    needs = np.asarray(needs, np.float64)
    if not np.isfinite(needs).all():
        raise ValueError(f"needs must be finite, got {needs}")
    if np.isnan(costs).any():  # a cost nothing is known of: free (the sound side)
        costs = np.where(np.isnan(costs), 0.0, costs)
    if values is not None:
        values = np.asarray(values, np.float64).reshape(-1)
        if values.size and not values.min() > 0:
            costs, values = costs[values > 0], values[values > 0]
    # what all items hold (taken up past its float64 sum's rounding: a need it reaches
    # is never declared out of reach)
    total = float(costs.size) if values is None else float(values.sum()) * (1 + 1e-12)
    top = float(needs.max(initial=0.0))
    least = 1.0 if values is None or not values.size else float(values.min())
    m = costs.size if top >= least * costs.size else min(costs.size, math.ceil(top / least))
    with np.errstate(over="ignore", divide="ignore"):  # a value near 0: an inf ratio
        ratio = costs if values is None else costs / values
    if 0 < m < costs.size and values is None:
        ratio = np.partition(ratio, m - 1)[:m]
    elif 0 < m < costs.size:
        pick = np.argpartition(ratio, m - 1)[:m]
        ratio, values = ratio[pick], values[pick]
    if values is None:
        ratio = np.sort(ratio)
        values = np.ones_like(ratio)
    else:  # ties in ratio cost the same whichever goes first
        order = np.argsort(ratio)
        ratio, values = ratio[order], values[order]
    if not ratio.size:
        return np.where(needs <= 0, 0.0, math.inf)
    zero = np.zeros(1)
    got = np.concatenate([zero, np.cumsum(values)])  # value of the first j items
    paid = np.concatenate([zero, np.cumsum(ratio * values)])
    # j: how many items the need takes, the j-th in part (clipped; beyond `total` is inf)
    j = np.clip(np.searchsorted(got, needs, side="left"), 1, ratio.size)
    with np.errstate(invalid="ignore"):  # 0 x inf where a need is met before an inf item
        part = np.where(needs > got[j - 1], (needs - got[j - 1]) * ratio[j - 1], 0.0)
    cost = np.where(needs > total, math.inf, (paid[j - 1] + part) * (1.0 - _SUM_SLACK))
    return np.where(needs <= 0, 0.0, cost)


def stability(
    margin: Array, alpha: float | Sequence[float], L: float, valid: Array | None = None
) -> Array:
    """Smallest eps at which an attacker can flip a fraction alpha of the valid pixels:
    no perturbation of smaller norm flips that many.

    The inverse of max_flips: sqrt(sum of the k = ceil(alpha N) smallest costs) / L,
    with N the number of valid pixels of the image; 0 if alpha == 0 or that sum is 0
    (+inf if some of those pixels can never flip, e.g. K == 1). ceil ignores a
    relative error of 1e-9 in alpha * N so that e.g. 0.1 * 30 gives k = 3. The sum is
    taken down past the rounding of the margins and of its float64 terms. `alpha`: one
    fraction (leading shape out) or several (leading shape + (A,) out).
    """
    xp = array_namespace(margin)
    L = _check_lipschitz(L)
    alphas = _fractions(alpha)
    if isinstance(margin, np.ndarray):
        total, lead = _least_costs_numpy(margin, alphas, valid)
    else:
        total, lead = _least_costs(margin, alphas, valid)
    total = total / margin_rounding_slack(margin)  # the exact costs may be that much lower
    zero = xp.zeros_like(total)
    out = xp.where(total > 0, xp.sqrt(total) / L, zero)
    # sqrt and / each rounded: one step down (inf, never flippable, stays inf)
    out = xp.where((out > 0) & xp.isfinite(out), xp.nextafter(out, zero), out)
    return xp.reshape(out, lead) if np.ndim(alpha) == 0 else xp.reshape(out, (*lead, len(alphas)))


def fraction_counts(alphas: Sequence[float], n: int) -> list[int]:
    """k = ceil(alpha n) per fraction, ignoring a relative error of 1e-9 in alpha n (so
    that 0.1 x 30 gives 3): the pixel counts stability speaks of."""
    return [math.ceil(a * n * (1.0 - 1e-9)) for a in alphas]


def stability_rows(norms: Sequence[float], n: int | None = None) -> list[dict[str, Any]]:
    """Stability as every answer gives it (REST, `certseg certify --json`, result.json):
    per share a of STABILITY_FRACTIONS, {fraction, pixels, eps}. `norms`: `stability`'s
    per share (inf, no attack can flip that many, and NaN become null); `pixels`, the
    k = ceil(a n) of one image of n pixels, is left out without n (a data set's median
    norm, over images of different valid pixel counts)."""
    counts = fraction_counts(STABILITY_FRACTIONS, n) if n is not None else None
    return [
        {
            "fraction": a,
            **({} if counts is None else {"pixels": counts[i]}),
            "eps": float(e) if math.isfinite(e) else None,
        }
        for i, (a, e) in enumerate(zip(STABILITY_FRACTIONS, norms, strict=True))
    ]


def _fractions(alpha: float | Sequence[float]) -> list[float]:
    """One fraction or several, as floats, each in [0, 1] (else a ValueError)."""
    alphas = [float(a) for a in ([alpha] if np.ndim(alpha) == 0 else alpha)]
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"fractions must lie in [0, 1], got {alpha}")
    return alphas


def _least_costs(margin: Array, alphas: list[float], valid: Array | None) -> tuple[Array, tuple]:
    """(R, A) sums of the k smallest costs per row and fraction, any array namespace."""
    xp = array_namespace(margin)
    costs, lead = _rows(flip_costs(margin), 2)
    dev = _device(costs)
    R, N = costs.shape
    if valid is not None:
        keep, _ = _rows(xp.broadcast_to(xp.asarray(_detach(valid), dtype=xp.bool), margin.shape), 2)
        costs = xp.where(keep, costs, xp.asarray(math.inf, dtype=xp.float64, device=dev))
        n_valid = xp.sum(xp.astype(keep, xp.float64), axis=-1)
    else:
        n_valid = xp.full((R,), float(N), dtype=xp.float64, device=dev)
    if N == 0 or not alphas:
        return xp.zeros((R, len(alphas)), dtype=xp.float64, device=dev), lead
    k = [xp.astype(xp.ceil(a * n_valid * (1.0 - 1e-9)), xp.int64) for a in alphas]
    k = xp.stack(k, axis=-1)
    cs = xp.cumulative_sum(xp.sort(costs, axis=-1), axis=-1, include_initial=True)
    return xp.take_along_axis(cs, k, axis=-1) * (1.0 - _SUM_SLACK), lead


def _least_costs_numpy(
    margin: np.ndarray, alphas: list[float], valid: np.ndarray | None
) -> tuple[np.ndarray, tuple]:
    """`_least_costs` on numpy, one image at a time (`cheapest_flips`)."""
    rows, lead = _rows(margin, 2)
    keep = None
    if valid is not None:
        keep, _ = _rows(np.broadcast_to(np.asarray(valid, dtype=bool), margin.shape), 2)
    out = np.zeros((rows.shape[0], len(alphas)))
    for r in range(rows.shape[0]):
        row = rows[r] if keep is None else rows[r][keep[r]]
        out[r] = cheapest_flips(row, fraction_counts(alphas, row.size))
    return out, lead


def cheapest_flips(margin: np.ndarray, counts: Sequence[float]) -> np.ndarray:
    """Per count k: the sum of the k cheapest flip costs of these margins (taken down
    as `least_cover_cost`; +inf past their number). The k smallest |margins| are
    selected in their own precision (cost is monotone in |margin|) and only those made
    float64 costs (1024x2048: 7 ms, against 70 for sorting every cost)."""
    size = np.abs(_known(margin).reshape(-1))
    top = max(counts, default=0)
    m = size.size if top >= size.size else math.ceil(top)
    if 0 < m < size.size:
        size = np.partition(size, m - 1)[:m]
    return least_cover_cost(flip_costs(size), counts)


def split_frontier(tp_costs: Array, fp_costs: Array, budget: Array) -> tuple[Array, Array]:
    """Every budget split between removing m true positives and adding n false ones.

    tp_costs (R, M) and fp_costs (R, F): sorted ascending, +inf padded; budget (R,)
    effective budgets (negative: nothing flips). Taking the cheapest m TPs leaves
    the most budget for FPs, so for each m = 0..M the attacker's best n is the
    largest n whose prefix of FP costs fits the rest: n_star (R, M + 1) int64.
    feasible (R, M + 1) marks the m whose removal cost fits (m = 0 always does).
    Any ratio that falls with m and with n is minimised on this frontier.
    """
    xp = array_namespace(tp_costs)
    M = tp_costs.shape[-1]
    b = budget[:, None]
    A = xp.cumulative_sum(tp_costs, axis=-1, include_initial=True)  # (R, M + 1)
    first = xp.reshape(xp.arange(M + 1, device=_device(A)) == 0, (1, M + 1))
    feasible = first | (b >= A)
    n_star = _count_le(xp.cumulative_sum(fp_costs, axis=-1), b - A)
    return xp.where(feasible, n_star, xp.zeros_like(n_star)), feasible


def frontier_min_ratio(
    n_star: Array,
    feasible: Array,
    p0: Array,
    p1: float,
    q0: Array,
    q1: float,
) -> Array:
    """min over the frontier of (p0 - p1 m) / (q0 + q1 m + n_star(m)), per row.

    One form for every metric: IoU (TP, 1, GT + FP, 0), Dice (2 TP, 2,
    GT + TP + FP, -1), recall (TP, 1, GT, 0, no FP candidates). Rows whose clean
    denominator q0 is <= 0 give NaN (the metric is undefined there).
    """
    xp = array_namespace(n_star)
    dev = _device(n_star)
    M1 = n_star.shape[-1]
    m = xp.reshape(xp.astype(xp.arange(M1, device=dev), xp.float64), (1, M1))
    p0 = xp.reshape(xp.astype(p0, xp.float64), (-1, 1))
    q0 = xp.reshape(xp.astype(q0, xp.float64), (-1, 1))
    num = p0 - p1 * m
    den = q0 + q1 * m + xp.astype(n_star, xp.float64)
    one = xp.ones_like(den)
    ratio = xp.where(feasible & (den > 0), num / xp.where(den > 0, den, one), math.inf)
    out = xp.min(ratio, axis=-1)
    return xp.where(q0[:, 0] > 0, out, xp.asarray(math.nan, dtype=xp.float64, device=dev))


def worst_ratio(
    tp_costs: Array,
    fp_costs: Array,
    budget: Array,
    p0: Array,
    p1: float,
    q0: Array,
    q1: float,
) -> Array:
    """Worst case of (p0 - p1 m) / (q0 + q1 m + n) over all affordable budget splits."""
    n_star, feasible = split_frontier(tp_costs, fp_costs, budget)
    return frontier_min_ratio(n_star, feasible, p0, p1, q0, q1)
