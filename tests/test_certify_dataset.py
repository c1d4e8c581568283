"""Data-set bounds: exact micro IoU via Dinkelbach, not per-image worst ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest

from certseg.certify import (
    DatasetCertifier,
    dinkelbach_min_ratio,
    worst_case_iou,
    worst_case_miou,
    worst_case_pixel_accuracy,
)

SQRT2 = math.sqrt(2.0)


def two_images() -> tuple[np.ndarray, np.ndarray]:
    """K = 2, two 1x5 images, L = 1, eps = sqrt 2 (budget 2). Class 1:

    Image A: p0 is class 1, predicted 1 with margin 2 (removal cost 2); p1..p4 are
    class 0, predicted 0 with gap 1 (each can become class 1 for .5). The attacker
    either removes the TP -> (TP, union) = (0, 1), or adds 4 FPs -> (1, 5).
    Image B: two class-1 pixels with margin 10 (cost 50), the rest ignored: (2, 2).
    Per-image worst: A -> (0, 1) ratio 0, B -> 1. Micro: A's (0,1) gives 2/3, but
    A's (1,5) gives 3/7: the true minimum is NOT at A's own worst ratio.
    """
    za = np.array([[0, 1, 1, 1, 1], [2, 0, 0, 0, 0]], dtype=np.float64)[:, None, :]
    ta = np.array([[1, 0, 0, 0, 0]])
    zb = np.array([[0, 0, 0, 0, 0], [10, 10, 0, 0, 0]], dtype=np.float64)[:, None, :]
    tb = np.array([[1, 1, 255, 255, 255]])
    return np.stack([za, zb]), np.stack([ta, tb])


def test_micro_iou_is_not_naive_aggregation() -> None:
    z, t = two_images()
    acc = DatasetCertifier(2, 1.0)
    acc.update(z, t, SQRT2)
    res = acc.compute()
    assert res.iou[1] == 1.0
    assert res.worst_iou[1] == pytest.approx(3 / 7)
    per_image = worst_case_iou(z, t, SQRT2, 1.0)[:, 1]
    np.testing.assert_allclose(per_image, [0.0, 1.0])
    # naive: sum the per-image worst splits (0, 1) and (2, 2) -> 2/3; mean 1/2; min 0
    assert res.worst_iou[1] < 2 / 3 - 0.2
    assert res.worst_iou[1] < per_image.mean()
    assert res.worst_iou[1] > per_image.min()
    # class 0 only lives in A: all four TPs (.5 each) fit the budget
    assert res.worst_iou[0] == 0.0
    assert res.worst_miou == pytest.approx(3 / 14)
    np.testing.assert_allclose(res.image_worst_miou, worst_case_miou(z, t, SQRT2, 1.0))


def test_micro_pixel_accuracy_and_counts() -> None:
    z, t = two_images()
    acc = DatasetCertifier(2, 1.0)
    acc.update(z, t, np.array([SQRT2, 0.0]))
    res = acc.compute()
    assert res.num_images == 2
    assert res.num_valid == 7
    assert res.pixel_accuracy == 1.0
    # A: correct costs 2, .5 x 4 -> budget 2 flips the four cheap ones; B: eps 0
    assert res.worst_pixel_accuracy == pytest.approx(3 / 7)
    per_image = worst_case_pixel_accuracy(z, t, np.array([SQRT2, 0.0]), 1.0)
    np.testing.assert_allclose(per_image, [1 / 5, 1.0])
    # A: radius 2/sqrt2 = sqrt2 is not > sqrt2; 1/sqrt2 neither. B: eps 0, all certified
    assert res.certified_pixel_accuracy == pytest.approx(2 / 7)


def test_batching_does_not_matter() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 3, 4, 5))
    t = np.where(rng.random((6, 4, 5)) < 0.7, z.argmax(1), rng.integers(0, 3, (6, 4, 5)))
    t[0, 0, :] = 255
    eps = np.array([0.0, 0.1, 0.3, 0.5, 0.8, 2.0])
    whole = DatasetCertifier(3, 1.3)
    whole.update(z, t, eps)
    split = DatasetCertifier(3, 1.3)
    split.update(z[:1], t[:1], eps[:1])
    for i in range(1, 6):
        split.update(z[i], t[i], float(eps[i]))  # single images without batch dim
    a, b = whole.compute(), split.compute()
    for f in ("pixel_accuracy", "worst_pixel_accuracy", "certified_pixel_accuracy"):
        assert getattr(a, f) == pytest.approx(getattr(b, f))
    for f in ("iou", "worst_iou", "dice", "worst_dice", "image_worst_miou"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f))
    whole.reset()
    assert whole.compute().num_images == 0


def test_clean_at_eps_zero_and_single_image() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3, 3, 4, 4))
    t = np.where(rng.random((3, 4, 4)) < 0.7, z.argmax(1), rng.integers(0, 3, (3, 4, 4)))
    acc = DatasetCertifier(3, 1.0)
    acc.update(z, t, 0.0)
    res = acc.compute()
    np.testing.assert_array_equal(res.worst_iou, res.iou)
    np.testing.assert_array_equal(res.worst_dice, res.dice)
    assert res.worst_pixel_accuracy == res.pixel_accuracy == res.certified_pixel_accuracy
    one = DatasetCertifier(3, 1.0)
    one.update(z[0], t[0], 0.4)
    np.testing.assert_allclose(one.compute().worst_iou, worst_case_iou(z[0], t[0], 0.4, 1.0))


def test_absent_class_is_nan_and_excluded() -> None:
    z, t = two_images()
    acc = DatasetCertifier(3, 1.0)
    acc.update(np.concatenate([z, np.full((2, 1, 1, 5), -50.0)], axis=1), t, SQRT2)
    res = acc.compute()
    assert math.isnan(res.iou[2])
    assert math.isnan(res.worst_iou[2])
    assert res.worst_miou == pytest.approx(3 / 14)


def test_wrong_class_count_rejected() -> None:
    z, t = two_images()
    with pytest.raises(ValueError):
        DatasetCertifier(3, 1.0).update(z, t, 1.0)


def test_dinkelbach_by_hand() -> None:
    # image 0: (t, Z) = (1, 1) with frontier (m, n) in {(0, 4), (1, 0)}; image 1: (2, 2)
    val, idx = dinkelbach_min_ratio([1, 2], [1, 2], [0, 0, 1], [0, 1, 0], [4, 0, 0])
    assert val == pytest.approx(3 / 7)
    assert list(idx) == [0, 2]
    with pytest.raises(ValueError):
        dinkelbach_min_ratio([1, 2], [1, 2], [0, 0], [0, 1], [4, 0])  # image 1 missing
    with pytest.raises(ValueError):
        dinkelbach_min_ratio([1], [1], [0, 1], [0, 0], [0, 0])  # unknown image
    assert math.isnan(dinkelbach_min_ratio([], [], [], [], [])[0])
