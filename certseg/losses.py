"""Training losses for Lipschitz segmenters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["certified_offset", "tau_cross_entropy"]


def certified_offset(train_eps: float, lipschitz: float) -> float:
    """Logit offset that makes "margin > offset" mean "certified at train_eps".

    A pixel is certified at eps when its top-2 margin exceeds sqrt(2) * L * eps
    (DESIGN.md, pixel certificate), so that is the offset the loss must beat.
    """
    return math.sqrt(2.0) * lipschitz * train_eps


def tau_cross_entropy(
    logits: Tensor,
    target: Tensor,
    tau: float,
    ignore_index: int = 255,
    offset: float = 0.0,
) -> Tensor:
    """Cross-entropy on tau * (logits + offset on every wrong class), divided by tau.

    Why: a 1-Lipschitz net's logits are small; the temperature tau sets how far the
    loss keeps pushing margins (tau large: accuracy-greedy; tau small: margin-greedy).
    The paper uses 20 for Cityscapes and 8 for small sets. The offset (Lipschitz-margin
    training, Tsuzuku et al. 2018) shifts the wrong classes up so the loss only rests
    once the margin clears the certificate's threshold at the training eps.
    """
    if offset:
        valid = target != ignore_index
        onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1])
        logits = logits + offset * (1 - onehot.movedim(-1, 1).to(logits.dtype))
    return F.cross_entropy(tau * logits, target, ignore_index=ignore_index) / tau
