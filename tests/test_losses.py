"""The training loss: tau scaling and the certified-margin offset."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from certseg.certify import certified_radius
from certseg.losses import certified_offset, tau_cross_entropy


def test_offset_is_the_certificate_threshold():
    """A margin just above the offset certifies at train_eps; just below does not."""
    L, eps = 5.0, 0.05
    off = certified_offset(eps, L)
    assert math.isclose(off, math.sqrt(2) * L * eps)
    assert certified_radius(off * 1.001, L) > eps > certified_radius(off * 0.999, L)


def test_offset_shifts_only_wrong_classes_and_respects_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    target[0, 0, 0] = 255
    tau, off = 3.0, 0.7
    shifted = logits + off
    keep = target.clamp(max=3)
    shifted.scatter_(1, keep[:, None], logits.gather(1, keep[:, None]))
    want = F.cross_entropy(tau * shifted, target, ignore_index=255) / tau
    got = tau_cross_entropy(logits, target, tau, 255, offset=off)
    assert torch.allclose(got, want, atol=1e-6)
    assert got > tau_cross_entropy(logits, target, tau, 255)


def test_offset_loss_vanishes_only_past_the_offset():
    """With two classes the loss is softplus(tau (offset - margin)) / tau."""
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    for margin in (0.1, 0.5, 2.0):
        logits = torch.tensor([margin, 0.0]).view(1, 2, 1, 1)
        got = tau_cross_entropy(logits, target, 8.0, offset=0.5)
        want = F.softplus(torch.tensor(8.0 * (0.5 - margin))).item() / 8
        assert math.isclose(got.item(), want, rel_tol=1e-5, abs_tol=1e-6)
