"""Checkpoints: weights + ModelCard in one file, loaded into fused (frozen) models."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from certseg.models.card import ModelCard
from certseg.models.registry import create_model
from certseg.nn import certified_lipschitz, fuse_module, structural_lipschitz
from certseg.nn.position import position_bias_names

__all__ = [
    "build_from_card",
    "is_lipschitz",
    "load_checkpoint",
    "load_grown",
    "save_checkpoint",
]


def build_from_card(card: ModelCard) -> nn.Module:
    """A fresh (parametrized, trainable) model of the card's architecture."""
    return create_model(
        card.arch, num_classes=card.num_classes, mean=card.mean, std=card.std, **card.arch_kwargs
    )


def save_checkpoint(path: str | Path, model: nn.Module, card: ModelCard, **extra) -> None:
    """Save weights and card; the card's structural constant is derived from the model
    (infinite for an unconstrained twin, which certifies nothing)."""
    card.lipschitz = structural_lipschitz(model) if is_lipschitz(model) else math.inf
    torch.save({"card": card.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: str | Path, fused: bool = True) -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint. With `fused`, return the frozen plain-weight model in eval
    mode and set the card's audited constant from those exact weights."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    card = ModelCard.from_dict(blob["card"])
    model = build_from_card(card)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    if fused and is_lipschitz(model):
        model = fuse_module(model).eval()
        card.lipschitz_audited = certified_lipschitz(model)
    return model, card


def load_grown(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a smaller model's weights into `model`, which may add zero-initialised
    position biases (certseg.nn.position): the grown model starts as the same function.

    Every saved tensor must land; the only tensors allowed to be missing are position
    biases, which are zero at init. Returns the names of those left at init.
    """
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches are raised even when not strict
        first = str(err).splitlines()[1:2] or [str(err)]
        raise RuntimeError(f"checkpoint does not fit the model: {first[0].strip()}") from err
    names = position_bias_names(model)
    grown = [k for k in result.missing_keys if k in names]
    problems = sorted(set(result.missing_keys) - set(grown)) + sorted(result.unexpected_keys)
    if problems:
        raise RuntimeError(f"checkpoint does not fit the model: {', '.join(problems[:8])}")
    params = dict(model.named_parameters())
    if any(params[k].detach().abs().max() > 0 for k in grown):
        raise RuntimeError("grown position biases must start at zero")
    return grown


def is_lipschitz(model: nn.Module) -> bool:
    """Whether every part of `model` declares its Lipschitz constant."""
    try:
        structural_lipschitz(model)
    except TypeError:
        return False
    return True
