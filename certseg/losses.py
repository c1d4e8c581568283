"""Training losses for Lipschitz segmenters."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["tau_cross_entropy"]


def tau_cross_entropy(
    logits: Tensor, target: Tensor, tau: float, ignore_index: int = 255
) -> Tensor:
    """Cross-entropy on tau * logits, divided by tau.

    Why: a 1-Lipschitz net's logits are small; the temperature tau sets how far the
    loss keeps pushing margins (tau large: margin-greedy, close to a hinge; tau small:
    accuracy-greedy). The paper uses 20 for Cityscapes and 8 for small sets.
    """
    return F.cross_entropy(tau * logits, target, ignore_index=ignore_index) / tau
