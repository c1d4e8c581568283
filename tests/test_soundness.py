"""Soundness: no attack beats a certificate, and the attacks are shown to be real.

On a trained tiny 1-Lipschitz net (conftest.trained_tiny):
- one-pixel attacks below a pixel's certified radius never flip it, and the
  minimum-norm attack never finds a flip below the radius (>= 200 pixels);
- whole-image attacks at 3 eps values on 20 images never flip a pixel certified at
  eps, never flip more pixels than the joint budget allows, and never push accuracy
  or any class IoU below its worst-case bound; attacks on one predicted class never
  flip more of it than that class's joint-budget figure, nor attacks into a class
  turn more pixels into it than its gain bound, nor any attack below a stability
  norm flip the share of pixels it speaks of;
- the same attacks do flip uncertified pixels and do break an unconstrained twin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from certseg.attacks import min_norm_pixel, pgd_image, pgd_image_sweep, pgd_pixel
from certseg.certify import (
    certified_radius,
    margins,
    max_flips,
    max_flips_by_class,
    max_gains_by_class,
    stability,
    worst_case_iou,
    worst_case_pixel_accuracy,
)

N_IMAGES = 20


def _clean(model, images):
    with torch.no_grad():
        logits = model(images).numpy()
    pred, margin = margins(logits)
    return logits, pred, margin


def _pick_pixels(radius: np.ndarray, count: int, seed: int = 0):
    """(image, row, col) of `count` pixels with positive radius, spread over images."""
    rng = np.random.default_rng(seed)
    idx = np.argwhere(radius > 1e-3)
    return idx[rng.choice(len(idx), size=count, replace=False)]


@pytest.fixture(scope="module")
def clean(trained_tiny):
    model, lip, images, _labels = trained_tiny
    logits, pred, margin = _clean(model, images)
    return logits, pred, margin, certified_radius(margin, lip)


def test_pixel_attacks_never_beat_the_radius(trained_tiny, clean):
    model, _, images, _ = trained_tiny
    _, pred, _, radius = clean
    picks = _pick_pixels(radius, 200)
    n, r, c = picks.T
    x = images[n]
    pixels = torch.from_numpy(np.stack([r, c], 1))
    labels = torch.from_numpy(pred[n, r, c])
    rad = torch.from_numpy(radius[n, r, c]).float()
    below = pgd_pixel(model, x, pixels, labels, 0.99 * rad, steps=30, restarts=1)
    assert not bool(below.success.any()), "a pixel flipped below its certified radius"
    found = min_norm_pixel(model, x, pixels, labels, steps=40)
    ok = found.success
    assert int(ok.sum()) >= 180, "the minimum-norm attack should find a flip for most pixels"
    assert bool((found.norms[ok] >= rad.double()[ok] * (1 - 1e-5)).all())
    # Tightness on record: how far the attack stays above the certificate.
    ratio = (found.norms[ok] / rad.double()[ok]).numpy()
    assert np.median(ratio) < 50


def test_pixel_attacks_are_real(trained_tiny, clean):
    """Above the attack's own minimum norm, PGD does flip: it is not a weak attack."""
    model, _, images, _ = trained_tiny
    _, pred, _, radius = clean
    picks = _pick_pixels(radius, 32, seed=1)
    n, r, c = picks.T
    x = images[n]
    pixels = torch.from_numpy(np.stack([r, c], 1))
    labels = torch.from_numpy(pred[n, r, c])
    found = min_norm_pixel(model, x, pixels, labels, steps=40)
    ok = found.success
    above = pgd_pixel(
        model, x[ok], pixels[ok], labels[ok], 1.05 * found.norms[ok].float(), steps=40, restarts=2
    )
    assert above.success.float().mean() >= 0.9


@pytest.fixture(scope="module")
def eps_values(clean):
    radius = clean[3][:N_IMAGES]
    med = float(np.median(radius))
    return [0.5 * med, 2 * med, 8 * med]


@pytest.fixture(scope="module")
def image_attacks(trained_tiny, eps_values):
    model, _, images, labels = trained_tiny
    x, y = images[:N_IMAGES], labels[:N_IMAGES]
    return pgd_image_sweep(model, x, y, eps_values, steps=60, restarts=1)


def test_image_attacks_never_beat_worst_case_bounds(trained_tiny, clean, eps_values, image_attacks):
    model, lip, _images, labels = trained_tiny
    logits, pred, margin, radius = (a[:N_IMAGES] for a in clean)
    y = labels[:N_IMAGES].numpy()
    valid = y != 255
    bites = 0  # attacks below a stability norm that flipped pixels: the check is live
    for eps, res in zip(eps_values, image_attacks, strict=True):
        _adv_logits, adv_pred, _ = _clean(model, res.adv)
        changed = adv_pred != pred
        # No pixel certified at eps changes class.
        assert not bool((changed & (radius > eps)).any())
        # Never more flips than the joint budget allows, in the image and in each class.
        assert (changed.reshape(N_IMAGES, -1).sum(1) <= max_flips(margin, eps, lip)).all()
        K = logits.shape[1]
        for i in range(N_IMAGES):
            per_class = max_flips_by_class(margin[i], pred[i], K, eps, lip)
            lost = np.bincount(pred[i][changed[i]], minlength=K)
            assert (lost <= per_class).all()
        # Below the stability norm of a share of the pixels, fewer than that many flip.
        fractions = (0.001, 0.01, 0.05, 0.1)
        norms = stability(margin, fractions, lip)  # (N_IMAGES, 4)
        flipped = changed.reshape(N_IMAGES, -1).sum(1)
        for j, a in enumerate(fractions):
            below = norms[:, j] > eps
            assert (flipped[below] < np.ceil(a * changed[0].size)).all()
            bites += int((below & (flipped > 0)).sum())
        # Attacked accuracy and IoU never below the bound.
        attacked_acc = ((adv_pred == y) & valid).reshape(N_IMAGES, -1).sum(1) / valid.reshape(
            N_IMAGES, -1
        ).sum(1)
        bound_acc = worst_case_pixel_accuracy(logits, y, eps, lip)
        assert (attacked_acc >= bound_acc - 1e-12).all()
        bound_iou = worst_case_iou(logits, y, eps, lip)
        for c in range(logits.shape[1]):
            gt, pc = (y == c), (adv_pred == c) & valid
            union = (gt | pc).reshape(N_IMAGES, -1).sum(1)
            inter = (gt & pc).reshape(N_IMAGES, -1).sum(1)
            has = gt.reshape(N_IMAGES, -1).any(1)
            iou = inter[has] / union[has]
            assert (iou >= bound_iou[has, c] - 1e-12).all()
    assert bites > 0


def test_image_attacks_are_real(trained_tiny, clean, eps_values, image_attacks):
    """At the largest eps the attack flips a real share of what the joint budget allows
    and takes a real share of the accuracy the bound says could be lost."""
    model, lip, _, labels = trained_tiny
    logits, pred, margin, _ = (a[:N_IMAGES] for a in clean)
    y = labels[:N_IMAGES].numpy()
    eps = eps_values[-1]
    _, adv_pred, _ = _clean(model, image_attacks[-1].adv)
    assert (adv_pred != pred).sum() >= 0.1 * max_flips(margin, eps, lip).sum()
    clean_acc = float((pred == y).mean())
    adv_acc = float((adv_pred == y).mean())
    bound = float(worst_case_pixel_accuracy(logits, y, eps, lip).mean())
    assert clean_acc - adv_acc >= 0.25 * (clean_acc - bound) > 0


def test_attacks_on_one_class_never_beat_its_bound(trained_tiny, clean, eps_values):
    """PGD told to flip only the pixels of one predicted class (the rest ignored) never
    flips more of them than `max_flips_by_class` allows, and flips a real share."""
    model, lip, images, _ = trained_tiny
    logits, pred, margin, _ = (a[:N_IMAGES] for a in clean)
    K = logits.shape[1]
    eps = eps_values[-1]
    bounds = np.stack(
        [max_flips_by_class(margin[i], pred[i], K, eps, lip) for i in range(N_IMAGES)]
    )
    flipped_total = bound_total = 0
    for c in range(K):
        target = np.where(pred == c, pred, 255)
        if not (target == c).any():
            continue
        res = pgd_image(
            model, images[:N_IMAGES], torch.from_numpy(target), eps, steps=60, restarts=1
        )
        _, adv_pred, _ = _clean(model, res.adv)
        flipped = ((adv_pred != pred) & (pred == c)).reshape(N_IMAGES, -1).sum(1)
        assert (flipped <= bounds[:, c]).all(), (c, flipped, bounds[:, c])
        flipped_total += int(flipped.sum())
        bound_total += int(bounds[:, c].sum())
    assert flipped_total >= 0.1 * bound_total > 0


def _pgd_into(model, x, pred, c, eps, steps=40):
    """l2 PGD that turns as many pixels as it can into class c (the test's own: the
    library's attacks are untargeted). Loss: the softplus of z_c - max_other over the
    pixels not predicted c and not yet turned past a small gap, each pixel's gap scaled
    by its clean one, so cheap pixels weigh most; the kept iterate is the one with the
    most pixels turned (measured: 32% of the bound, against 6% pushing every pixel)."""
    n = x.shape[0]
    pred_t = torch.from_numpy(pred)
    others = pred_t != c
    with torch.no_grad():
        z0 = model(x)
        gap0 = (z0.max(1).values - z0[:, c]).clamp_min(1e-3)
    delta = torch.zeros_like(x, requires_grad=True)
    best = torch.zeros(n, dtype=torch.long)
    best_x = x.clone()
    step = 2.5 * eps / steps
    for _ in range(steps):
        z = model(x + delta)
        rest = z.clone()
        rest[:, c] = -torch.inf
        gap = (z[:, c] - rest.max(1).values) / gap0
        pushing = others & (gap < 0.05)  # pixels turned with room to spare cost no more
        loss = (torch.nn.functional.softplus(4 * gap) * pushing).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            turned = ((z.argmax(1) == c) & others).flatten(1).sum(1)
            better = turned > best
            best[better], best_x[better] = turned[better], (x + delta)[better]
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(n, 1, 1, 1)
            d = delta + step * g
            d = (x + d).clamp(0, 1) - x
            scale = (eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            delta.copy_(d * scale.view(n, 1, 1, 1))
    with torch.no_grad():
        final = ((model(best_x).argmax(1) == c) & others).flatten(1).sum(1)
    assert ((best_x - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
    return final.numpy()


def test_attacks_into_one_class_never_beat_its_gain_bound(trained_tiny, clean, eps_values):
    """A targeted PGD turning pixels into one class never turns more than
    `max_gains_by_class` allows, and turns a real share of it."""
    model, lip, images, _ = trained_tiny
    logits, pred, _, _ = (a[:N_IMAGES] for a in clean)
    K = logits.shape[1]
    eps = eps_values[-1]
    bounds = np.stack([max_gains_by_class(logits[i], pred[i], eps, lip) for i in range(N_IMAGES)])
    turned_total = 0
    for c in range(K):
        turned = _pgd_into(model, images[:N_IMAGES], pred, c, eps)
        assert (turned <= bounds[:, c]).all(), (c, turned, bounds[:, c])
        turned_total += int(turned.sum())
    assert turned_total >= 0.1 * bounds.sum() > 0, (turned_total, bounds.sum())


def test_unconstrained_twin_breaks(trained_tiny):
    """The attack breaks an unconstrained twin (same shapes, plain convs + BatchNorm):
    at l2 eps = 1 over a 3x32x64 image its accuracy falls by more than a quarter.
    (Measured when written: 0.74 -> 0.46; the tiny Lipschitz net: 0.65 -> 0.45, with
    every one of its certificates intact, checked above.)"""
    from certseg.data import SyntheticScenes
    from certseg.models import create_model
    from certseg.train import Recipe, fit

    _, _, images, labels = trained_tiny
    train = SyntheticScenes(192, (32, 64), seed=1)
    xs = torch.from_numpy(np.stack([train[i][0] for i in range(len(train))]))
    ys = torch.from_numpy(np.stack([train[i][1] for i in range(len(train))]))
    torch.manual_seed(0)
    twin = create_model("tiny", num_classes=7, width=16, constrained=False)
    batches = [(xs[i : i + 16], ys[i : i + 16]) for i in range(0, 192, 16)]
    fit(twin, batches, Recipe(epochs=12, lr=3e-3, tau=1.0))
    x, y = images[:N_IMAGES], labels[:N_IMAGES]
    (res,) = pgd_image_sweep(twin, x, y, [1.0], steps=60, restarts=1)
    with torch.no_grad():
        clean_acc = float((twin(x).argmax(1) == y).float().mean())
        adv_acc = float((twin(res.adv).argmax(1) == y).float().mean())
    assert clean_acc > 0.5
    assert adv_acc < 0.75 * clean_acc
