"""eps = 0 with margins shrunk by an engine's margin error e > 0.

Exact margins (the float32 net's own) at eps = 0: nothing flips, every figure is the
clean one. Margins shrunk by e (`certified_margins`: max(raw - e, 0)) are not: a pixel
of certified margin 0 may show another class than the float32 net's even unperturbed,
so at eps = 0 it is flippable for free and never guaranteed, every figure agreeing
with the one just above eps = 0 (no jump between eps = 0 and eps = 1e-300).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certseg.certify import (
    certified_margins,
    certified_pixel_accuracy,
    guaranteed_region,
    max_flips,
    max_flips_by_class,
    max_gains_by_class,
    worst_case_fnr,
    worst_case_iou,
    worst_case_miou,
    worst_case_pixel_accuracy,
)
from certseg.certify.resize import AreaResize

L, E = 1.5, 0.2
TINY = 1e-300  # an eps > 0 whose budget (L eps)^2 is 0 in float64


def _margins() -> np.ndarray:
    """Certified margins with exact zeros (raw margins <= E) among positive ones."""
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 2, size=(12, 16)).astype(np.float32)
    raw[rng.random((12, 16)) < 0.2] = 0.1  # under the error bound
    margin, _ = certified_margins(raw, E, L)
    assert (margin == 0).sum() > 10 and (margin > 0).sum() > 100
    return margin


def test_exact_margins_at_eps_zero_flip_nothing():
    margin = _margins()  # zeros here are ties of the float32 net: its own class wins
    radius = margin / (math.sqrt(2) * L)
    labels = (np.arange(margin.size) % 3).reshape(margin.shape)
    assert guaranteed_region(radius, 0.0).all()
    assert max_flips(margin, 0.0, L) == 0
    assert (max_flips_by_class(margin, labels, 3, 0.0, L) == 0).all()
    t = torch.from_numpy(margin)
    assert bool(guaranteed_region(t, 0.0).all()) and int(max_flips(t, 0.0, L)) == 0


def test_shrunk_margins_at_eps_zero_flip_their_zeros():
    """The old code certified every pixel at eps = 0 whatever `exact` said (there was
    no way to say it): guaranteed 1.0 and max_flips 0, then a jump at eps = 1e-300."""
    margin = _margins()
    radius = margin / (math.sqrt(2) * L)
    labels = (np.arange(margin.size) % 3).reshape(margin.shape)
    zeros = margin == 0
    region = guaranteed_region(radius, 0.0, exact=False)
    np.testing.assert_array_equal(region, ~zeros)
    np.testing.assert_array_equal(region, guaranteed_region(radius, TINY))
    assert max_flips(margin, 0.0, L, exact=False) == zeros.sum() == max_flips(margin, TINY, L)
    by_class = max_flips_by_class(margin, labels, 3, 0.0, L, exact=False)
    want = [int((zeros & (labels == c)).sum()) for c in range(3)]
    assert by_class.tolist() == want == max_flips_by_class(margin, labels, 3, TINY, L).tolist()
    correct = labels == 1
    assert max_flips(margin, 0.0, L, valid=correct, exact=False) == (zeros & correct).sum()
    # the array-API path (torch), per image eps too
    t = torch.from_numpy(margin)
    assert int(max_flips(t, 0.0, L, exact=False)) == zeros.sum()
    both = torch.stack([t, t])
    flips = max_flips(both, torch.tensor([0.0, 0.0], dtype=torch.float64), L, exact=False)
    assert flips.tolist() == [zeros.sum()] * 2
    got = guaranteed_region(torch.from_numpy(radius), 0.0, exact=False).numpy()
    np.testing.assert_array_equal(got, ~zeros)


def _engine_logits(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(engine logits, their mask, a target equal to the mask but for a few pixels)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(4, 10, 14)).astype(np.float32)
    z[1, :3] = z[0, :3] + np.float32(0.05)  # class 1 just ahead of 0: margins < E
    mask = z.argmax(0)
    target = mask.copy()
    target[-1] = (target[-1] + 1) % 4
    return z, mask, target


def test_metrics_at_eps_zero_count_the_pixels_the_error_may_flip():
    """worst-case accuracy, IoU, FNR and certified accuracy with margin_error > 0 at
    eps = 0: those of eps = 1e-300 (the zero-cost flips taken), below the clean ones.
    The old code gave the clean metric at eps = 0 and the lower one just above it."""
    z, mask, target = _engine_logits()
    for f in (worst_case_pixel_accuracy, certified_pixel_accuracy, worst_case_miou):
        clean = float(f(z, target, 0.0, L))
        at0 = float(f(z, target, 0.0, L, margin_error=E))
        assert at0 == pytest.approx(float(f(z, target, TINY, L, margin_error=E)))
        assert at0 < clean, f.__name__
    iou0 = worst_case_iou(z, target, 0.0, L, margin_error=E)
    np.testing.assert_allclose(iou0, worst_case_iou(z, target, TINY, L, margin_error=E))
    fnr0 = float(worst_case_fnr(z, target, 0.0, L, positive=1, margin_error=E))
    assert fnr0 > float(worst_case_fnr(z, target, 0.0, L, positive=1))
    # the accuracy bound: the correct pixels of raw margin <= E are lost
    top2 = np.sort(z.astype(np.float64), axis=0)[-2:]
    lost = ((top2[1] - top2[0] <= E) & (mask == target)).sum()
    want = ((mask == target).sum() - lost) / mask.size
    assert float(worst_case_pixel_accuracy(z, target, 0.0, L, margin_error=E)) == want
    # gains: every pixel predicted otherwise whose gap to c is <= E
    gains = max_gains_by_class(z, mask, 0.0, L, margin_error=E)
    top = z.max(0).astype(np.float64)
    for c in range(4):
        assert gains[c] == ((top - z[c].astype(np.float64) <= E) & (mask != c)).sum()
    assert gains[0] > 0 and (max_gains_by_class(z, mask, 0.0, L) == 0).all()


def test_resized_figures_at_eps_zero_count_the_pixels_the_error_may_flip():
    """A 2x shrink: each network pixel stands for 4 source pixels. With shrunk margins
    at eps = 0, the source pixels of zero-margin network pixels flip; exact margins
    keep every figure clean (the old code kept them clean in both cases)."""
    z, mask, _ = _engine_logits()
    h, w = mask.shape
    plan = AreaResize((2 * h, 2 * w), (h, w))
    top2 = np.sort(z, axis=0)[-2:]
    margin, radius = certified_margins(top2[1] - top2[0], E, L)
    zeros = margin == 0
    assert zeros.sum() > 10
    target = plan.upsample(mask)
    assert plan.max_source_flips(margin, 0.0, L) == 0
    assert plan.max_source_flips(margin, 0.0, L, exact=False) == 4 * zeros.sum()
    by_class = plan.max_source_flips_by_class(margin, mask, 4, 0.0, L, exact=False)
    assert by_class.tolist() == [4 * int((zeros & (mask == c)).sum()) for c in range(4)]
    src = plan.source_radius(radius)
    assert plan.source_fraction(guaranteed_region(src, 0.0)) == 1.0
    assert plan.source_fraction(guaranteed_region(src, 0.0, exact=False)) == pytest.approx(
        1.0 - zeros.mean()
    )
    assert plan.worst_case_accuracy(mask, margin, target, 0.0, L) == (1.0, 1.0)
    acc, clean = plan.worst_case_accuracy(mask, margin, target, 0.0, L, exact=False)
    assert clean == 1.0 and acc == pytest.approx(1.0 - zeros.mean())
    iou, clean_iou = plan.worst_case_iou(mask, margin, z, target, 0.0, L, margin_error=E)
    exact_iou, _ = plan.worst_case_iou(mask, margin, z, target, 0.0, L)
    present = ~np.isnan(clean_iou)
    np.testing.assert_array_equal(exact_iou[present], clean_iou[present])
    assert (iou[present] <= clean_iou[present]).all() and (iou[present] < 1).any()
    gains = plan.max_source_gains_by_class(z, mask, 0.0, L, margin_error=E)
    assert gains.sum() > 0 and (plan.max_source_gains_by_class(z, mask, 0.0, L) == 0).all()
