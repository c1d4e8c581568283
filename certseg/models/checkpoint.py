"""Checkpoints: weights + ModelCard in one file, loaded into fused (frozen) models."""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certseg.errors import UserError
from certseg.models.card import ModelCard
from certseg.models.registry import create_model
from certseg.nn import certified_lipschitz, fuse_module, structural_lipschitz
from certseg.nn.position import position_bias_names

__all__ = [
    "build_from_card",
    "is_lipschitz",
    "load_checkpoint",
    "load_grown",
    "read_checkpoint",
    "require_lipschitz",
    "save_checkpoint",
]


def build_from_card(card: ModelCard) -> nn.Module:
    """A fresh (parametrized, trainable) model of the card's architecture."""
    return create_model(
        card.arch, num_classes=card.num_classes, mean=card.mean, std=card.std, **card.arch_kwargs
    )


def require_lipschitz(card: ModelCard, path: str | Path) -> float:
    """The card's certified L, or a UserError for an unconstrained twin (L infinite):
    one pass of it certifies nothing, and float(inf) reached users as tracebacks."""
    lipschitz = card.certified_lipschitz
    if not math.isfinite(lipschitz):
        raise UserError(
            f"{path}: an unconstrained twin (no Lipschitz bound), which certifies nothing "
            "from one pass; evaluate it with `certseg evaluate --method smoothing`"
        )
    return lipschitz


def save_checkpoint(path: str | Path, model: nn.Module, card: ModelCard, **extra) -> None:
    """Save weights and card; the card's structural constant is derived from the model
    (infinite for an unconstrained twin, which certifies nothing)."""
    card.lipschitz = structural_lipschitz(model) if is_lipschitz(model) else math.inf
    torch.save({"card": card.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def read_checkpoint(
    path: str | Path,
    keys: Sequence[str] = ("card", "state_dict"),
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """torch.load of a file the user named, holding `keys` (a training state's, for
    last.pt); a missing, unreadable or foreign file is a UserError that names it."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    except OSError as exc:  # a folder, no permission
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a certseg checkpoint (torch.load: {exc})") from None
    missing = [k for k in keys if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise UserError(f"{path} is not a certseg checkpoint (no {', '.join(missing)})")
    return blob


def load_checkpoint(path: str | Path, fused: bool = True) -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint. With `fused`, return the frozen plain-weight model in eval
    mode and set the card's audited constant from those exact weights."""
    blob = read_checkpoint(path)
    try:
        card = ModelCard.from_dict(blob["card"])
        model = build_from_card(card)
        model.load_state_dict(blob["state_dict"])
    except KeyError as exc:  # an architecture this install does not register
        raise UserError(f"{path}: {exc.args[0]}") from None
    except TypeError as exc:  # card fields or model arguments of another certseg
        raise UserError(f"{path}: its card does not fit this certseg ({exc})") from None
    except RuntimeError as exc:  # weights of another shape than the card's architecture
        raise UserError(f"{path}: the weights do not fit the card ({_first_line(exc)})") from None
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
        raise RuntimeError(f"checkpoint does not fit the model: {_first_line(err)}") from err
    names = position_bias_names(model)
    grown = [k for k in result.missing_keys if k in names]
    problems = sorted(set(result.missing_keys) - set(grown)) + sorted(result.unexpected_keys)
    if problems:
        raise RuntimeError(f"checkpoint does not fit the model: {', '.join(problems[:8])}")
    params = dict(model.named_parameters())
    if any(params[k].detach().abs().max() > 0 for k in grown):
        raise RuntimeError("grown position biases must start at zero")
    return grown


def _first_line(err: RuntimeError) -> str:
    """The first problem load_state_dict names (its message opens with a header line)."""
    lines = str(err).splitlines()
    return (lines[1:2] or lines[:1] or [""])[0].strip()


def is_lipschitz(model: nn.Module) -> bool:
    """Whether every part of `model` declares its Lipschitz constant."""
    try:
        structural_lipschitz(model)
    except TypeError:
        return False
    return True
