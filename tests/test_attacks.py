"""Tests of the l2 attacks: constraints, strength on a real net, exactness on a linear net.

Attacks are the evidence that certificates are sound and tight, so they are tested
for what they guarantee (budgets, box, honest success flags, monotone sweeps) and
for being strong: against a conv net trained for ~1 s they must flip what a
budget allows, and on a linear segmenter, where the minimum flip is known in
closed form, they must land within a few percent of it and never below it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from certseg.attacks import (
    l2_norms,
    min_norm_image,
    min_norm_pixel,
    pgd_image,
    pgd_image_sweep,
    pgd_pixel,
)
from certseg.attacks.losses import gather_pixel_logits

SIZE = 24
PROTOTYPES = torch.tensor([[0.5, 0.5, 0.5], [0.8, 0.3, 0.3], [0.3, 0.8, 0.3], [0.3, 0.3, 0.8]])


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny convs are dominated by threading overhead; one thread is ~10-100x faster here."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _synthetic(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Rectangles of 3 colour classes on a grey background, with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        for _ in range(3):
            c = int(torch.randint(1, 4, (1,), generator=g))
            r0, c0 = torch.randint(0, SIZE - 6, (2,), generator=g).tolist()
            h, w = torch.randint(5, 12, (2,), generator=g).tolist()
            lab[i, r0 : r0 + h, c0 : c0 + w] = c
    img = PROTOTYPES[lab].permute(0, 3, 1, 2) + 0.08 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return img.clamp(0, 1), lab


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    """An ordinary (unconstrained) conv segmenter, its test images and its predictions."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )
    x, y = _synthetic(64, seed=1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, 64, (16,), generator=g)
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    net.zero_grad(set_to_none=True)
    xt, yt = _synthetic(4, seed=2)
    with torch.no_grad():
        pred = net(xt).argmax(1)
    assert (pred == yt).float().mean() > 0.9, "the net must have learnt the task"
    return net, xt, pred


def _random_pixels(x: Tensor, pred: Tensor, n: int, seed: int = 0):
    """A batch of (image copy, pixel, clean label) triples for one-pixel attacks."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n,), generator=g)
    pix = torch.randint(0, SIZE, (n, 2), generator=g)
    return x[idx], pix, pred[idx, pix[:, 0], pix[:, 1]]


def _pixel_argmax(model, adv: Tensor, pix: Tensor) -> Tensor:
    with torch.no_grad():
        return gather_pixel_logits(model(adv), pix).argmax(1)


# --------------------------------------------------------------------------- constraints


def test_projection_never_exceeds_eps_measured_exactly():
    """The projected image's distance, measured exactly (float64 differences of the
    float32 images) against eps as given (0.05, not float32's 0.0500000007): rounding
    x + delta lifted about two thirds of these rows past it (a float32 norm missed it)."""
    from certseg.attacks.pgd import _per_sample, _project

    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.rand(4, 3, 64, 64, generator=gen)
        adv = (x + torch.randn(x.shape, generator=gen) * 0.3).clamp(0, 1)
        for eps in (0.05, 0.3, 1e-3):
            out = _project(x, adv, _per_sample(eps, 4, x))
            assert (l2_norms(out.double() - x.double()) <= eps).all(), eps
            assert out.min() >= 0 and out.max() <= 1
            # and it is still a projection: on the ball's surface but for float32 steps
            assert (l2_norms(out.double() - x.double()) >= eps * (1 - 1e-6) - 1e-5).all()
    # saturated pixels: a point inside the ball but outside the box comes back in it
    x = torch.full((2, 3, 8, 8), 0.99)
    x[:, :, :4] = 1.0
    adv = x.clone()
    adv[:, 0, 0, 0] = 1.005
    out = _project(x, adv, _per_sample(0.05, 2, x))
    assert out.max() == 1.0 and (l2_norms(out.double() - x.double()) <= 0.05).all()


def test_pgd_pixel_constraints(trained):
    net, x, pred = trained
    xi, pix, lab = _random_pixels(x, pred, 16)
    eps = torch.linspace(0.0, 1.0, 16)  # per-sample budgets, including 0
    res = pgd_pixel(net, xi, pix, lab, eps, steps=20, restarts=3)
    assert res.adv.shape == xi.shape and res.success.shape == (16,)
    assert (l2_norms(res.adv.double() - xi.double()) <= eps.double()).all()  # exactly
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    assert torch.equal(res.success, _pixel_argmax(net, res.adv, pix) != lab)
    assert not res.success[0] and torch.equal(res.adv[0], xi[0])  # eps = 0: nothing moves


def test_pgd_image_constraints_and_ignore_index(trained):
    net, x, pred = trained
    labels = pred.clone()
    labels[:, :4] = 255  # ignored rows never count as flipped
    eps = torch.tensor([0.5, 1.0, 2.0, 4.0])
    res = pgd_image(net, x, labels, eps, steps=20, restarts=2)
    assert (l2_norms(res.adv.double() - x.double()) <= eps.double()).all()  # exactly
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    with torch.no_grad():
        again = (net(res.adv).argmax(1) != labels) & (labels != 255)
    assert torch.equal(res.flipped, again)
    assert not res.flipped[:, :4].any()
    none = pgd_image(net, x, pred, 0.0, steps=5, restarts=2)
    assert not none.flipped.any() and torch.equal(none.adv, x)


def test_min_norm_constraints(trained):
    net, x, pred = trained
    xi, pix, lab = _random_pixels(x, pred, 8, seed=1)
    res = min_norm_pixel(net, xi, pix, lab, steps=40, targets=1)
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    assert torch.equal(res.success, _pixel_argmax(net, res.adv, pix) != lab)
    measured = l2_norms(res.adv - xi)
    assert torch.equal(res.norms[res.success], measured[res.success])
    assert torch.isinf(res.norms[~res.success]).all()

    img = min_norm_image(net, x, pred, 0.2, search_steps=4, pgd_steps=20)
    assert img.adv.min() >= 0 and img.adv.max() <= 1
    ok = torch.isfinite(img.norms)
    assert ok.all() and (img.fraction >= 0.2).all()
    assert torch.allclose(img.norms, l2_norms(img.adv - x))
    with torch.no_grad():
        frac = (net(img.adv).argmax(1) != pred).flatten(1).double().mean(1)
    assert torch.allclose(frac, img.fraction)


def test_no_parameter_gradients(trained):
    net, x, pred = trained
    assert all(p.requires_grad for p in net.parameters())
    xi, pix, lab = _random_pixels(x, pred, 4)
    pgd_pixel(net, xi, pix, lab, 0.3, steps=3, restarts=2)
    pgd_image(net, x, pred, 0.3, steps=3, restarts=2)
    min_norm_pixel(net, xi, pix, lab, steps=3, targets=1, refine_steps=2)
    min_norm_image(net, x, pred, 0.1, search_steps=1, pgd_steps=3)
    assert all(p.grad is None for p in net.parameters())


def test_bad_inputs(trained):
    net, x, pred = trained
    xi, pix, lab = _random_pixels(x, pred, 4)
    with pytest.raises(ValueError):
        pgd_pixel(net, xi, pix, lab, -0.1)
    with pytest.raises(ValueError):
        pgd_pixel(net, xi, pix, lab, torch.ones(3))
    with pytest.raises(ValueError):
        pgd_image(net, x, pred[:, :, :-1], 0.1)
    with pytest.raises(ValueError):
        min_norm_image(net, x, pred, 0.0)


# --------------------------------------------------------------------------- strength


def test_pgd_image_flips_many_pixels(trained):
    net, x, pred = trained
    res = pgd_image(net, x, pred, 4.0, steps=100, restarts=1)
    # eps = 4 is ~10x the median one-pixel minimum norm (~0.4) on this net.
    assert res.flipped.float().mean() > 0.5


def test_pixel_attacks_are_strong_and_agree(trained):
    net, x, pred = trained
    xi, pix, lab = _random_pixels(x, pred, 32)
    eps = 0.6
    pgd = pgd_pixel(net, xi, pix, lab, eps, steps=50, restarts=3)
    assert pgd.success.float().mean() >= 0.8
    mn = min_norm_pixel(net, xi, pix, lab, steps=100, targets=2)
    assert mn.success.all()
    # Wherever PGD found a flip within eps, the min-norm attack found one as small.
    assert (mn.norms[pgd.success] <= eps * 1.01).all()
    assert (mn.norms <= eps).float().mean() >= pgd.success.float().mean()
    assert mn.norms.median() < eps
    # ... and it is tight: a budget 2% above its norm lets PGD flip (nearly) every pixel.
    tight = pgd_pixel(net, xi, pix, lab, (mn.norms * 1.02).float(), steps=50, restarts=3)
    assert tight.success.float().mean() >= 0.9


def test_sweep_is_monotone(trained):
    net, x, pred = trained
    results = pgd_image_sweep(net, x, pred, [0.5, 1.0, 2.0, 3.0], steps=30, restarts=1)
    counts = torch.stack([r.flipped.flatten(1).sum(1) for r in results])
    assert (counts[1:] >= counts[:-1]).all()
    assert counts[-1].sum() > counts[0].sum()


def test_min_norm_image_beats_fixed_budget(trained):
    net, x, pred = trained
    target = 0.3
    mn = min_norm_image(net, x, pred, target, search_steps=6, pgd_steps=50)
    assert (mn.fraction >= target).all()
    # The smallest budget of a grid at which PGD reaches the target, per image.
    grid = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    results = pgd_image_sweep(net, x, pred, grid, steps=50, restarts=1)
    reached = torch.stack([r.flipped.flatten(1).double().mean(1) >= target for r in results])
    assert reached[-1].all()
    first = torch.tensor(grid, dtype=torch.float64)[reached.double().argmax(0)]
    assert (mn.norms <= first * 1.05).all()


# --------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A 1x1-conv 2-class segmenter z = W x_p + b; pixel p's exact minimum l2 flip is
    |z_0 - z_1| / ||w_1 - w_0|| (pixels are independent, the box is not reached)."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.5, 1.0, 2.0]])[:, :, None, None])
        conv.bias.copy_(torch.tensor([0.3, -0.2]))
    conv.requires_grad_(False)
    x = 0.4 + 0.2 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = conv(x).double()
    w = conv.weight[:, :, 0, 0].double()
    dist = (z[:, 0] - z[:, 1]).abs() / (w[1] - w[0]).norm()
    # The optimal step moves each channel by at most dist; it must stay inside [0, 1].
    assert dist.max() < 0.35 and dist.min() > 1e-3
    return conv, x, z.argmax(1), dist


def test_linear_pixel_exact(linear):
    conv, x, pred, dist = linear
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    pix = torch.stack([rows.flatten(), cols.flatten()], 1)
    xi = x[0].expand(64, -1, -1, -1).contiguous()
    lab = pred[0].flatten()
    exact = dist[0].flatten()

    mn = min_norm_pixel(conv, xi, pix, lab)
    assert mn.success.all()
    assert (mn.norms >= exact * (1 - 1e-4)).all()  # never below the true minimum
    assert (mn.norms <= exact * 1.03).all()  # and within a few percent of it

    below = pgd_pixel(conv, xi, pix, lab, (exact * 0.98).float(), steps=50, restarts=3)
    assert not below.success.any()
    above = pgd_pixel(conv, xi, pix, lab, (exact * 1.05).float(), steps=50, restarts=3)
    assert above.success.all()


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_linear_image_exact(linear, fraction):
    conv, x, pred, dist = linear
    k = math.ceil(64 * fraction)
    # Cheapest way to flip k independent pixels: the k smallest distances.
    exact = dist.flatten(1).sort(1).values[:, :k].pow(2).sum(1).sqrt()

    below = pgd_image(conv, x, pred, (exact * 0.98).float())
    assert (below.flipped.flatten(1).sum(1) < k).all()
    above = pgd_image(conv, x, pred, (exact * 1.05).float())
    assert (above.flipped.flatten(1).sum(1) >= k).all()

    mn = min_norm_image(conv, x, pred, fraction, search_steps=8, pgd_steps=100, restarts=3)
    assert (mn.fraction >= k / 64).all()
    assert (mn.norms >= exact * (1 - 1e-4)).all()
    assert (mn.norms <= exact * 1.1).all()


# --------------------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_device(linear):
    conv, x, pred, _ = linear
    conv, x, pred = conv.cuda(), x.cuda(), pred.cuda()
    pix = torch.tensor([[1, 2], [3, 4]], device="cuda")
    lab = pred[torch.arange(2), pix[:, 0], pix[:, 1]]
    assert pgd_pixel(conv, x, pix, lab, 0.2, steps=5).adv.device == x.device
    assert pgd_image(conv, x, pred, 0.2, steps=5).flipped.device == x.device
    assert min_norm_pixel(conv, x, pix, lab, steps=5).norms.device == x.device
    assert min_norm_image(conv, x, pred, 0.1, search_steps=2, pgd_steps=5).adv.device == x.device
