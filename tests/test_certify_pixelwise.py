"""Hand-computed checks of margins, certified radii and the guaranteed region."""

from __future__ import annotations

import math

import numpy as np
import pytest

from certseg.certify import certified_radius, float16_down, guaranteed_region, margins


def _logits(*pixels: list[float]) -> np.ndarray:
    """(K, 1, P) logits from per-pixel class scores."""
    return np.asarray(pixels, dtype=np.float32).T[:, None, :]


def test_margins_basic_and_ties() -> None:
    z = _logits([1, 3, 2], [2, 2, 0], [0, 0, 0], [-1, 5, 5])
    pred, margin = margins(z)
    assert pred.tolist() == [[1, 0, 0, 1]]  # ties go to the first class
    assert margin.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert margin.dtype == np.float32


def test_margins_single_class_is_infinite() -> None:
    z = np.zeros((1, 2, 3), dtype=np.float32)
    pred, margin = margins(z)
    assert np.all(pred == 0)
    assert np.all(np.isposinf(margin))


def test_margins_batch_dims() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 4, 5, 6))
    pred, margin = margins(z)
    assert pred.shape == margin.shape == (2, 3, 5, 6)
    srt = np.sort(z, axis=-3)
    np.testing.assert_allclose(margin, srt[..., -1, :, :] - srt[..., -2, :, :])
    np.testing.assert_array_equal(pred, z.argmax(axis=-3))


def test_margins_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        margins(np.zeros((3, 4)))


def test_certified_radius() -> None:
    r = certified_radius(np.array([0.0, 2.0, np.inf]), 1.0)
    assert r.tolist() == [0.0, pytest.approx(math.sqrt(2.0)), math.inf]
    assert certified_radius(np.array([2.0]), 2.0)[0] == pytest.approx(1 / math.sqrt(2.0))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            certified_radius(np.array([1.0]), bad)


def test_certified_radius_never_rounds_above_the_exact_radius() -> None:
    """margin / (sqrt(2) L) in float32 rounds to nearest, up half the time: the
    `certseg certify` fractions at an eps between the two were too high."""
    from decimal import Decimal, localcontext

    rng = np.random.default_rng(0)
    with localcontext() as ctx:
        ctx.prec = 50
        for L in (1.0, 4.000002597771408, 5.050515273576036):
            m = rng.uniform(0, 2, size=2000).astype(np.float32)
            r = certified_radius(m, L)
            assert r.dtype == np.float32
            denom = Decimal(2).sqrt() * Decimal(L)
            pairs = zip(m.tolist(), r.tolist(), strict=True)
            assert all(Decimal(ri) <= Decimal(mi) / denom for mi, ri in pairs)
            assert np.all(r >= m / (math.sqrt(2.0) * L) * (1 - 2**-20))  # and barely below


def test_guaranteed_region_strict_and_eps_zero() -> None:
    r = np.array([[0.0, 0.5, 1.0, 1.5]])
    assert guaranteed_region(r, 1.0).tolist() == [[False, False, False, True]]
    assert guaranteed_region(r, 0.0).all()  # no perturbation exists at eps == 0
    assert guaranteed_region(r, 0.25).tolist() == [[False, True, True, True]]


def test_guaranteed_region_per_image_eps() -> None:
    r = np.array([[[0.0, 0.5, 1.0]], [[0.0, 0.5, 1.0]], [[0.0, 0.5, 1.0]]])  # (3, 1, 3)
    g = guaranteed_region(r, np.array([0.0, 0.5, 2.0]))
    assert g.tolist() == [[[True, True, True]], [[False, False, True]], [[False, False, False]]]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_subnormal_radius_certifies_nothing_at_eps_above_zero(backend) -> None:
    """Below float32's least normal number margin * c rounds by an absolute 2^-150,
    past the relative slack: a margin of 1e-40 came out at radius 7.07109e-41 over the
    exact 7.07103e-41, and an eps between the two was certified. Such radii certify
    eps == 0 alone; a normal radius keeps its strict test."""
    m = np.array([[1e-40, 1e-30, 1.0]], np.float32)
    r = certified_radius(m, 1.0)
    exact = float(m[0, 0]) / math.sqrt(2.0)
    assert float(r[0, 0]) > exact  # the rounding the floor guards against
    eps_between = (float(r[0, 0]) + exact) / 2
    if backend == "torch":
        torch = pytest.importorskip("torch")
        r = torch.from_numpy(r)
    got = np.asarray(guaranteed_region(r, eps_between)).tolist()
    assert got == [[False, True, True]]
    assert np.asarray(guaranteed_region(r, 0.0)).all()
    assert np.asarray(guaranteed_region(r, 1e-31)).tolist() == [[False, True, True]]


def test_guaranteed_region_rejects_negative_eps() -> None:
    with pytest.raises(ValueError):
        guaranteed_region(np.zeros((2, 2)), -0.1)
    with pytest.raises(ValueError):
        guaranteed_region(np.zeros((2, 2, 2)), np.array([0.1, math.nan]))


def test_float16_down_never_rounds_a_radius_up() -> None:
    """The REST answer's radius map is float16. Rounded to nearest, about half the
    values would grow (by up to half a float16 step), and a client testing radius > eps
    would certify pixels the float32 radius does not: rounded down, none is."""
    rng = np.random.default_rng(3)
    r = np.concatenate(
        [
            rng.random(100_000, dtype=np.float32) * 0.2,  # around typical eps
            rng.random(1000, dtype=np.float32) * 1e-6,  # float16 subnormals
            np.float32([0.0, 0.05, 65504.0, 65519.0, 70000.0, 3e38, np.inf]),
        ]
    )
    with np.errstate(over="ignore"):
        nearest = r.astype(np.float16).astype(np.float32)
    assert np.mean(nearest > r) > 0.3  # the fault is real: nearest often rounds up
    down = float16_down(r)
    assert down.dtype == np.float16
    wide = down.astype(np.float32)
    assert np.all(wide <= r)
    # the largest float16 not above r: one step up is above r (or r is beyond range)
    with np.errstate(over="ignore"):
        step_up = np.nextafter(down, np.float16(np.inf)).astype(np.float32)
    assert np.all((step_up > r) | (r >= 65504))
    assert wide[-5:-1].tolist() == [65504.0] * 4 and wide[-1] == np.inf  # inf is exact
    eps = np.float32(0.05)
    assert np.all(guaranteed_region(wide, eps) <= guaranteed_region(r, eps))
    assert np.isnan(float16_down(np.float32([np.nan]))[0])
