"""Hand-computed worst-case metrics of single images (see the pixel table below)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from certseg.certify import (
    certified_pixel_accuracy,
    margins,
    max_flips,
    worst_case_dice,
    worst_case_fnr,
    worst_case_fwiou,
    worst_case_iou,
    worst_case_miou,
    worst_case_pixel_accuracy,
)

# One 1x5 image, K = 3, L = 1. Columns: logits (class 0, 1, 2), target.
#   p0 [0, 2, -9]  t 1: pred 1, margin 2 (cost 2),   TP of class 1
#   p1 [0, 1, -9]  t 1: pred 1, margin 1 (cost .5),  TP of class 1
#   p2 [1, 0, -9]  t 0: pred 0, margin 1 (cost .5),  TP of class 0; class 1 FP for .5
#   p3 [3, 0, -9]  t 1: pred 0, margin 3 (cost 4.5), FN of class 1, FP of class 0
#   p4 [1, 1, -9]  t 255: ignored (a zero-cost tie that must not count anywhere)
# Class 2 is absent from the labels (NaN). Class 0 FP candidates: p0 (cost 2), p1 (.5).
Z = np.array([[0, 2, -9], [0, 1, -9], [1, 0, -9], [3, 0, -9], [1, 1, -9]], dtype=np.float32).T[
    :, None, :
]
T = np.array([[1, 1, 0, 1, 255]])


def test_clean_at_eps_zero() -> None:
    assert worst_case_pixel_accuracy(Z, T, 0.0, 1.0) == 0.75
    assert certified_pixel_accuracy(Z, T, 0.0, 1.0) == 0.75
    np.testing.assert_allclose(worst_case_iou(Z, T, 0.0, 1.0), [1 / 2, 2 / 3, np.nan])
    np.testing.assert_allclose(worst_case_dice(Z, T, 0.0, 1.0), [2 / 3, 4 / 5, np.nan])
    assert worst_case_miou(Z, T, 0.0, 1.0) == pytest.approx(7 / 12)
    assert worst_case_fwiou(Z, T, 0.0, 1.0) == pytest.approx(0.25 * 0.5 + 0.75 * 2 / 3)
    assert worst_case_fnr(Z, T, 0.0, 1.0, positive=1) == pytest.approx(1 / 3)


def test_budget_one() -> None:  # eps = 1, L = 1: budget 1
    # correct costs .5, .5, 2: two flips fit
    assert worst_case_pixel_accuracy(Z, T, 1.0, 1.0) == 0.25
    # radii 2/sqrt2 > 1 only for p0
    assert certified_pixel_accuracy(Z, T, 1.0, 1.0) == 0.25
    # class 1: m=0,n=1 -> 2/4; m=1,n=1 -> 1/4. class 0: m=1 -> 0.
    np.testing.assert_allclose(worst_case_iou(Z, T, 1.0, 1.0), [0.0, 0.25, np.nan])
    # dice class 1: m=1,n=1 -> 2/(3+1+1)
    np.testing.assert_allclose(worst_case_dice(Z, T, 1.0, 1.0), [0.0, 0.4, np.nan])
    assert worst_case_miou(Z, T, 1.0, 1.0) == pytest.approx(0.125)
    assert worst_case_fwiou(Z, T, 1.0, 1.0) == pytest.approx(0.75 * 0.25)
    assert worst_case_fnr(Z, T, 1.0, 1.0, positive=1) == pytest.approx(2 / 3)
    _, m = margins(Z)
    assert max_flips(m, 1.0, 1.0, valid=T != 255) == 2


def test_budget_four() -> None:  # eps = 2: every correct pixel (total 3) can go
    assert worst_case_pixel_accuracy(Z, T, 2.0, 1.0) == 0.0
    assert worst_case_iou(Z, T, 2.0, 1.0)[1] == 0.0
    assert worst_case_fnr(Z, T, 2.0, 1.0, positive=1) == 1.0


def test_same_budget_through_L() -> None:
    for f in (worst_case_pixel_accuracy, worst_case_miou, worst_case_fwiou):
        assert f(Z, T, 0.5, 2.0) == pytest.approx(f(Z, T, 1.0, 1.0))


def test_per_image_eps_and_batch_dims() -> None:
    Zb = np.stack([Z, Z, Z])  # (3, K, 1, 5)
    Tb = np.stack([T, T, T])
    eps = np.array([0.0, 1.0, 2.0])
    np.testing.assert_allclose(worst_case_pixel_accuracy(Zb, Tb, eps, 1.0), [0.75, 0.25, 0.0])
    iou = worst_case_iou(Zb, Tb, eps, 1.0)
    assert iou.shape == (3, 3)
    np.testing.assert_allclose(iou[:, 1], [2 / 3, 0.25, 0.0])
    Zbb = np.stack([Zb, Zb])  # (2, 3, K, 1, 5)
    out = worst_case_miou(Zbb, np.stack([Tb, Tb]), eps, 1.0)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[0], out[1])


def test_tie_on_correct_pixel_only_flips_when_eps_positive() -> None:
    z = np.array([[[1.0, 4.0]], [[1.0, 0.0]]])  # pixel 0 tied (pred 0), pixel 1 margin 4
    t = np.array([[0, 0]])
    assert worst_case_pixel_accuracy(z, t, 0.0, 1.0) == 1.0
    assert certified_pixel_accuracy(z, t, 0.0, 1.0) == 1.0
    assert worst_case_iou(z, t, 0.0, 1.0)[0] == 1.0
    assert worst_case_pixel_accuracy(z, t, 1e-6, 1.0) == 0.5
    assert certified_pixel_accuracy(z, t, 1e-6, 1.0) == 0.5
    assert worst_case_iou(z, t, 1e-6, 1.0)[0] == 0.5


def test_single_class() -> None:
    z = np.zeros((1, 2, 3))
    t = np.array([[0, 0, 0], [0, 255, 0]])
    for eps in (0.0, 10.0):
        assert worst_case_pixel_accuracy(z, t, eps, 1.0) == 1.0
        assert certified_pixel_accuracy(z, t, eps, 1.0) == 1.0
        assert worst_case_iou(z, t, eps, 1.0).tolist() == [1.0]
        assert worst_case_dice(z, t, eps, 1.0).tolist() == [1.0]
        assert worst_case_miou(z, t, eps, 1.0) == 1.0
        assert worst_case_fnr(z, t, eps, 1.0, positive=0) == 0.0


def test_empty_image_and_absent_classes() -> None:
    t = np.full((1, 5), 255)
    assert math.isnan(worst_case_pixel_accuracy(Z, t, 1.0, 1.0))
    assert np.isnan(worst_case_iou(Z, t, 1.0, 1.0)).all()
    assert math.isnan(worst_case_miou(Z, t, 1.0, 1.0))
    assert math.isnan(worst_case_fwiou(Z, t, 1.0, 1.0))
    t = np.array([[0, 0, 0, 0, 255]])
    assert math.isnan(worst_case_fnr(Z, t, 1.0, 1.0, positive=1))


def test_fp_of_absent_class_still_counts_for_others() -> None:
    # class 1 absent from labels but predicted at p0: IoU_1 NaN, IoU_0 = 1/2 clean
    z = np.array([[[0.0, 3.0]], [[1.0, 0.0]]])
    t = np.array([[0, 0]])
    np.testing.assert_allclose(worst_case_iou(z, t, 0.0, 1.0), [0.5, np.nan])


def test_argument_checks() -> None:
    with pytest.raises(ValueError):
        worst_case_iou(Z, T[:, :4], 1.0, 1.0)
    with pytest.raises(ValueError):
        worst_case_iou(Z, T, -1.0, 1.0)
    with pytest.raises(ValueError):
        worst_case_iou(Z, T, 1.0, 0.0)
    with pytest.raises(ValueError):
        worst_case_fnr(Z, T, 1.0, 1.0, positive=3)


#: Margins whose exact total cost rounds above the rounded budget (the audit's case;
#: such draws are rare: 6 in 20 000 of those below).
_ROUNDED_OUT = [
    3.269559144973755,
    1.497725248336792,
    0.008360718376934528,
    1.0205360651016235,
    3.9322803020477295,
]


def _exactly_affordable(seed: int, draws: int = 300) -> list[tuple[np.ndarray, float]]:
    """Margins and the least float64 eps whose square is >= the exact total cost: an
    attack that moves both logits of each pixel to their midpoint (exact in float32)
    spends exactly that cost, within eps, and flips every pixel (ties go to class 0)."""
    rng = np.random.default_rng(seed)
    drawn = [(rng.random(int(rng.integers(2, 6))) * 4) for _ in range(draws)]
    out = []
    for a in (np.float32(_ROUNDED_OUT), *(np.float32(d) for d in drawn)):
        exact = sum(Fraction(float(v)) ** 2 / 2 for v in a)
        eps = math.sqrt(float(exact))
        while Fraction(eps) ** 2 < exact:
            eps = math.nextafter(eps, math.inf)
        out.append((a, eps))
    return out


def test_a_set_of_flips_that_exactly_fits_the_budget_is_affordable() -> None:
    """Sums of costs are rounded: a set whose exact cost is the budget once counted as
    unaffordable, and the worst case (0 correct) was reported as 0.2 (found by an
    audit). max_flips and the metrics now share one slack."""
    from certseg.certify import DatasetCertifier

    for a, eps in _exactly_affordable(1):
        logits = np.zeros((1, 2, 1, a.size), np.float32)
        logits[0, 1, 0] = a
        target = np.ones((1, 1, a.size), np.int64)
        attacked = logits.copy()
        attacked[0, :, 0] = a / 2  # both logits at the midpoint: exact
        spent = sum(Fraction(float(d)) ** 2 for d in (attacked - logits).reshape(-1))
        assert spent <= Fraction(eps) ** 2 and (attacked[0].argmax(0) == 1).sum() == 0
        assert worst_case_pixel_accuracy(logits, target, eps, 1.0)[0] == 0.0
        assert worst_case_iou(logits, target, eps, 1.0)[0, 1] == 0.0
        assert worst_case_fnr(logits, target, eps, 1.0, positive=1)[0] == 1.0
        _, m = margins(logits)
        assert max_flips(m, eps, 1.0)[0] == a.size
        certifier = DatasetCertifier(num_classes=2, L=1.0)
        certifier.update(logits, target, eps)
        got = certifier.compute()
        assert got.worst_pixel_accuracy == 0.0 and got.worst_iou[1] == 0.0
