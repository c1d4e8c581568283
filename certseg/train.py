"""Training: the paper's recipe (tau-scaled cross-entropy, AdamW, cosine schedule)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from certseg.losses import tau_cross_entropy

__all__ = ["Recipe", "fit", "make_optimizer"]


@dataclass
class Recipe:
    """Optimisation settings; defaults are the paper's (AdamW, betas 0.95, cosine to 1e-6)."""

    epochs: int = 10
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.95)
    tau: float = 8.0
    ignore_index: int = 255


def make_optimizer(
    model: nn.Module, recipe: Recipe, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(total_steps, 1), eta_min=recipe.lr_min
    )
    return opt, sched


def fit(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    recipe: Recipe,
    steps_per_epoch: int | None = None,
) -> list[float]:
    """Plain single-process loop over a re-iterable of (images, labels); returns the mean
    loss of each epoch. The full CLI trainer builds on this."""
    steps = steps_per_epoch or len(batches)  # type: ignore[arg-type]
    opt, sched = make_optimizer(model, recipe, recipe.epochs * steps)
    history = []
    model.train()
    for _ in range(recipe.epochs):
        total, count = 0.0, 0
        for images, labels in batches:
            loss = tau_cross_entropy(model(images), labels, recipe.tau, recipe.ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + float(loss), count + 1
        history.append(total / max(count, 1) if count else math.nan)
    model.eval()
    return history
