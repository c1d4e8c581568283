"""The fast bounds against exhaustive search on tiny images.

The attack model (the relaxation every certificate here rests on): a perturbation
of norm eps moves the logit map by at most L eps in l2, and relabelling pixel p from
its prediction a to class d needs ||dz_p||**2 >= (z_a - z_d)**2 / 2. So an attack
is any relabelling (every pixel to any class, the class matters) with
sum of (z_a - z_d)**2 / 2 <= (L eps)**2, and none but the identity at eps = 0.
We enumerate all K**N relabellings and take the exact minimum of each metric.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from certseg.certify import (
    DatasetCertifier,
    dinkelbach_min_ratio,
    worst_case_dice,
    worst_case_fnr,
    worst_case_fwiou,
    worst_case_iou,
    worst_case_miou,
    worst_case_pixel_accuracy,
)

IGN = 255


def attacks(z: np.ndarray, eps: float, L: float) -> np.ndarray:
    """Every affordable relabelling of one image: (A, N) class per pixel; z is (K, H, W)."""
    K = z.shape[0]
    zf = z.reshape(K, -1).astype(np.float64)
    N = zf.shape[1]
    pred, top = zf.argmax(0), zf.max(0)
    lab = np.array(list(itertools.product(range(K), repeat=N)), dtype=np.int64)
    cost = (top[None, :] - zf[lab, np.arange(N)[None, :]]) ** 2 / 2
    cost = np.where(lab == pred[None, :], 0.0, cost)
    ident = np.all(lab == pred[None, :], axis=1)
    ok = ident | ((eps > 0) & (cost.sum(1) <= (L * eps) ** 2))
    return lab[ok]


def counts(lab: np.ndarray, t: np.ndarray, c: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(TP', GT, FP') of class c for each relabelling."""
    t = t.reshape(-1)
    valid = t != IGN
    tp = ((lab == c) & (t == c)).sum(1)
    fp = ((lab == c) & (t != c) & valid).sum(1)
    return tp, int((t == c).sum()), fp


def brute_image(z: np.ndarray, t: np.ndarray, eps: float, L: float) -> dict[str, np.ndarray]:
    lab = attacks(z, eps, L)
    K = z.shape[0]
    tf = t.reshape(-1)
    valid = tf != IGN
    out: dict[str, np.ndarray] = {}
    out["acc"] = np.array(((lab == tf) & valid).sum(1).min() / valid.sum())
    ious, dices, joint = [], [], []
    fnr = np.nan
    for c in range(K):
        tp, gt, fp = counts(lab, t, c)
        if gt == 0:
            ious.append(np.nan)
            dices.append(np.nan)
            joint.append(np.full(len(lab), np.nan))
            continue
        iou = tp / (gt + fp)
        joint.append(iou)
        ious.append(iou.min())
        dices.append((2 * tp / (gt + tp + fp)).min())
        if c == 1:
            fnr = ((gt - tp) / gt).max()
    out["iou"], out["dice"], out["fnr"] = np.array(ious), np.array(dices), np.array(fnr)
    j = np.stack(joint, 1)  # (A, K): one attack for all classes at once
    with np.errstate(invalid="ignore"):
        out["joint_miou"] = np.array(np.nanmean(j, 1).min()) if np.isfinite(j).any() else np.nan
        gts = np.array([(tf == c).sum() for c in range(K)])
        w = np.where(gts > 0, gts / valid.sum(), 0.0)
        out["joint_fwiou"] = np.array((np.nan_to_num(j) * w).sum(1).min())
    return out


def instance(
    rng: np.random.Generator, K: int, H: int, W: int, quantized: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Random logits (K, H, W) and targets mostly agreeing with the prediction."""
    if quantized:  # ties and exact budget boundaries (costs are multiples of 1/8)
        z = rng.integers(-2, 3, size=(K, H, W)).astype(np.float64) / 2
    else:
        z = rng.normal(size=(K, H, W))
    pred = z.argmax(0)
    t = np.where(rng.random((H, W)) < 0.6, pred, rng.integers(0, K, size=(H, W)))
    t = np.where(rng.random((H, W)) < 0.15, IGN, t)
    return z, t


CASES = [(s, K, H, W, q) for s in range(12) for (K, H, W) in [(3, 2, 3), (2, 3, 3)] for q in (0, 1)]
EPS = [0.0, 0.2, 0.5, 1.0, 1.5]


@pytest.mark.parametrize(("seed", "K", "H", "W", "quantized"), CASES)
def test_single_image_bounds_equal_bruteforce(
    seed: int, K: int, H: int, W: int, quantized: int
) -> None:
    rng = np.random.default_rng(seed)
    z, t = instance(rng, K, H, W, bool(quantized))
    L = [1.0, 0.5][seed % 2]
    for eps in EPS:
        b = brute_image(z, t, eps, L)
        assert worst_case_pixel_accuracy(z, t, eps, L) == pytest.approx(float(b["acc"]))
        np.testing.assert_allclose(worst_case_iou(z, t, eps, L), b["iou"], atol=1e-12)
        np.testing.assert_allclose(worst_case_dice(z, t, eps, L), b["dice"], atol=1e-12)
        np.testing.assert_allclose(worst_case_fnr(z, t, eps, L), b["fnr"], atol=1e-12)
        # per-class minima, each from its own attack: a bound on the one joint attack
        if not math.isnan(b["joint_miou"]):
            assert worst_case_miou(z, t, eps, L) <= b["joint_miou"] + 1e-12
            assert worst_case_fwiou(z, t, eps, L) <= b["joint_fwiou"] + 1e-12


def achievable(z: np.ndarray, t: np.ndarray, eps: float, L: float, c: int) -> np.ndarray:
    """Distinct (TP', FP') pairs of class c that some affordable attack reaches."""
    tp, _, fp = counts(attacks(z, eps, L), t, c)
    return np.unique(np.stack([tp, fp], 1), axis=0)


def brute_micro(images: list, eps: list[float], L: float, c: int, dice: bool) -> float:
    """Exact min of the micro IoU / Dice of class c over joint per-image attacks."""
    gt = sum(int((t == c).sum()) for _, t in images)
    opts = [achievable(z, t, e, L, c) for (z, t), e in zip(images, eps, strict=True)]
    best = math.inf
    for combo in itertools.product(*opts):
        tp = sum(int(o[0]) for o in combo)
        fp = sum(int(o[1]) for o in combo)
        best = min(best, 2 * tp / (gt + tp + fp) if dice else tp / (gt + fp))
    return best


@pytest.mark.parametrize("seed", range(10))
def test_dataset_bounds_equal_bruteforce(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_img = 2 + seed % 3
    K, L = 3, 1.0
    images = [instance(rng, K, 2, 3, bool(seed % 2)) for _ in range(n_img)]
    eps = [float(rng.choice([0.0, 0.3, 0.7, 1.2])) for _ in range(n_img)]
    acc = DatasetCertifier(K, L)
    for (z, t), e in zip(images, eps, strict=True):
        acc.update(z, t, e)
    res = acc.compute()
    # micro pixel accuracy separates per image: sum of per-image worst correct counts
    n_valid = sum(int((t != IGN).sum()) for _, t in images)
    worst_correct = sum(
        brute_image(z, t, e, L)["acc"] * (t != IGN).sum()
        for (z, t), e in zip(images, eps, strict=True)
    )
    assert res.worst_pixel_accuracy == pytest.approx(worst_correct / n_valid)
    for c in range(K):
        if sum(int((t == c).sum()) for _, t in images) == 0:
            assert math.isnan(res.worst_iou[c])
            continue
        assert res.worst_iou[c] == pytest.approx(brute_micro(images, eps, L, c, False), abs=1e-12)
        assert res.worst_dice[c] == pytest.approx(brute_micro(images, eps, L, c, True), abs=1e-12)


def test_dinkelbach_equals_bruteforce_on_random_frontiers() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        n_img = int(rng.integers(1, 5))
        p0, q0, seg, m, n = [], [], [], [], []
        for i in range(n_img):
            tp = int(rng.integers(0, 6))
            gt = tp + int(rng.integers(0 if tp else 1, 4))
            fp = int(rng.integers(0, 4))
            k = int(rng.integers(0, tp + 1))
            ns = np.sort(rng.integers(0, 8, size=k + 1))[::-1]  # n*(m) falls with m
            p0.append(tp)
            q0.append(gt + fp)
            seg += [i] * (k + 1)
            m += list(range(k + 1))
            n += list(ns)
        val, idx = dinkelbach_min_ratio(np.array(p0), np.array(q0), seg, m, n)
        seg_a, m_a, n_a = np.array(seg), np.array(m), np.array(n)
        best = math.inf
        groups = [np.flatnonzero(seg_a == i) for i in range(n_img)]
        for combo in itertools.product(*groups):
            ci = np.array(combo)
            best = min(best, (sum(p0) - m_a[ci].sum()) / (sum(q0) + n_a[ci].sum()))
        assert val == pytest.approx(best, abs=1e-12)
        ci = np.asarray(idx)
        assert (sum(p0) - m_a[ci].sum()) / (sum(q0) + n_a[ci].sum()) == pytest.approx(val)


@pytest.mark.parametrize("seed", range(8))
def test_bounds_from_engine_logits_hold_for_the_float32_net(seed: int) -> None:
    """An engine (fp16, TensorRT) whose logits are off by at most e / 2 each: its
    bounds with margin_error = e never beat the float32 net's exhaustive worst, even
    when the engine's prediction differs from the float32 one, at eps = 0 too (where
    the float32 net's worst is its clean metric, which the engine's may exceed)."""
    rng = np.random.default_rng(100 + seed)
    K, H, W, e, L = 3, 2, 3, 0.3, 1.0
    z32, t = instance(rng, K, H, W, quantized=False)
    if seed % 2:  # random offsets: some pixels change class
        off = rng.uniform(-e / 2, e / 2, size=z32.shape)
    else:  # the offset that flatters most: every margin grows by e
        off = np.where(z32 == z32.max(0, keepdims=True), e / 2, -e / 2)
    z = z32 + off
    flattered = False
    for eps in EPS:
        b = brute_image(z32, t, eps, L)
        acc = worst_case_pixel_accuracy(z, t, eps, L, margin_error=e)
        assert acc <= float(b["acc"]) + 1e-12
        iou = worst_case_iou(z, t, eps, L, margin_error=e)
        ok = ~np.isnan(b["iou"])
        assert (iou[ok] <= b["iou"][ok] + 1e-12).all()
        fnr = worst_case_fnr(z, t, eps, L, margin_error=e)
        assert np.isnan(b["fnr"]) or fnr >= float(b["fnr"]) - 1e-12
        # without the error bound the engine's logits may claim more than holds
        flattered |= worst_case_pixel_accuracy(z, t, eps, L) > float(b["acc"]) + 1e-12
        flattered |= bool((worst_case_iou(z, t, eps, L)[ok] > b["iou"][ok] + 1e-12).any())
    if seed % 2 == 0:
        assert flattered, "this case should need the margin error to stay sound"
