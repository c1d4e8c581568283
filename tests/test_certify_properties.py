"""Property tests: bounds equal the clean metric at eps = 0, never exceed it, and
fall monotonically as eps grows."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from certseg.certify import (
    DatasetCertifier,
    certified_pixel_accuracy,
    margins,
    max_flips,
    stability,
    worst_case_dice,
    worst_case_fnr,
    worst_case_fwiou,
    worst_case_iou,
    worst_case_miou,
    worst_case_pixel_accuracy,
)

IGN = 255
TOL = 1e-12
PROPS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Random (R, K, H, W) logits (sometimes quantized, so with ties), targets, e1 <= e2, L."""
    seed = draw(st.integers(0, 2**32 - 1))
    R, K = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    H, W = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        z = rng.integers(-2, 3, size=(R, K, H, W)).astype(np.float32) / 2
    else:
        z = rng.normal(size=(R, K, H, W)).astype(np.float32)
    pred = z.argmax(1)
    t = np.where(rng.random((R, H, W)) < 0.6, pred, rng.integers(0, K, size=(R, H, W)))
    t = np.where(rng.random((R, H, W)) < 0.15, IGN, t)
    e1, e2 = sorted(draw(st.lists(st.floats(0, 3), min_size=2, max_size=2)))
    L = draw(st.sampled_from([0.5, 1.0, 2.0, 3.7]))
    return z, t, e1, e2, L


def clean(z: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Clean metrics per image, computed directly from the confusion counts."""
    K = z.shape[1]
    pred = z.argmax(1)
    valid = t != IGN
    nv = valid.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = ((pred == t) & valid).sum((1, 2)) / nv
        gt = np.stack([(t == c).sum((1, 2)) for c in range(K)], 1)
        tp = np.stack([((t == c) & (pred == c)).sum((1, 2)) for c in range(K)], 1)
        fp = np.stack([((t != c) & valid & (pred == c)).sum((1, 2)) for c in range(K)], 1)
        iou = np.where(gt > 0, tp / (gt + fp), np.nan)
        dice = np.where(gt > 0, 2 * tp / (gt + tp + fp), np.nan)
        ok = ~np.isnan(iou)
        miou = np.where(ok.any(1), np.nansum(iou, 1) / ok.sum(1), np.nan)
        fwiou = np.where(nv > 0, np.nansum(gt * iou, 1) / nv, np.nan)
        fnr = np.where(gt[:, 1] > 0, 1 - tp[:, 1] / gt[:, 1], np.nan) if K > 1 else None
    out = {"acc": acc, "cert": acc, "iou": iou, "dice": dice, "miou": miou, "fwiou": fwiou}
    if fnr is not None:
        out["fnr"] = fnr
    return out


def bounds(z: np.ndarray, t: np.ndarray, eps: float, L: float) -> dict[str, np.ndarray]:
    out = {
        "acc": worst_case_pixel_accuracy(z, t, eps, L),
        "cert": certified_pixel_accuracy(z, t, eps, L),
        "iou": worst_case_iou(z, t, eps, L),
        "dice": worst_case_dice(z, t, eps, L),
        "miou": worst_case_miou(z, t, eps, L),
        "fwiou": worst_case_fwiou(z, t, eps, L),
    }
    if z.shape[1] > 1:
        out["fnr"] = -worst_case_fnr(z, t, eps, L)  # negated: an error rate only rises
    return out


def le(a: np.ndarray, b: np.ndarray) -> None:
    """a <= b entrywise, NaN exactly where the other is NaN."""
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    assert np.all(a[ok] <= b[ok] + TOL), (a, b)


@PROPS
@given(batches())
def test_per_image_bounds_clean_at_zero_and_monotone(case: tuple) -> None:
    z, t, e1, e2, L = case
    ref = clean(z, t)
    b0, b1, b2 = bounds(z, t, 0.0, L), bounds(z, t, e1, L), bounds(z, t, e2, L)
    for key, want in ref.items():
        want = -want if key == "fnr" else want
        np.testing.assert_allclose(b0[key], want, atol=TOL, err_msg=key)
        le(b1[key], b0[key])
        le(b2[key], b1[key])
    # every pixel flipped jointly is also individually uncertified
    le(b2["cert"], b2["acc"])


@PROPS
@given(batches())
def test_budget_monotone(case: tuple) -> None:
    z, t, e1, e2, L = case
    _, m = margins(z)
    valid = t != IGN
    assert np.all(max_flips(m, 0.0, L, valid=valid) == 0)
    assert np.all(max_flips(m, e1, L, valid=valid) <= max_flips(m, e2, L, valid=valid))
    s = [stability(m, a, L, valid=valid) for a in (0.0, 0.25, 0.5, 1.0)]
    assert np.all(s[0] == 0)
    for lo, hi in itertools.pairwise(s):
        assert np.all(lo <= hi)


@PROPS
@given(batches())
def test_dataset_bounds_clean_at_zero_and_monotone(case: tuple) -> None:
    z, t, e1, e2, L = case
    K = z.shape[1]
    res = []
    for eps in (0.0, e1, e2):
        acc = DatasetCertifier(K, L)
        acc.update(z, t, eps)
        res.append(acc.compute())
    r0, r1, r2 = res
    for key in ("iou", "dice"):
        np.testing.assert_allclose(getattr(r0, "worst_" + key), getattr(r0, key), atol=TOL)
        le(getattr(r1, "worst_" + key), getattr(r0, "worst_" + key))
        le(getattr(r2, "worst_" + key), getattr(r1, "worst_" + key))
    a = [r.worst_pixel_accuracy for r in res]
    if not np.isnan(a[0]):
        assert a[0] == r0.pixel_accuracy
        assert a[2] <= a[1] + TOL <= a[0] + 2 * TOL
        assert r2.certified_pixel_accuracy <= a[2] + TOL
