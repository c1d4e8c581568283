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
    "first_problem",
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
    last.pt); a run folder stands for its model.pt. A missing, unreadable or foreign
    file (an ONNX export named by mistake, too) is a UserError that names it."""
    path = _checkpoint_in(Path(path))
    try:
        blob = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    except OSError as exc:  # no permission
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        if _is_onnx(path):
            raise UserError(f"{path}: {_ONNX_NOT_CHECKPOINT}") from None
        raise UserError(f"{path} is not a certseg checkpoint (torch.load: {exc})") from None
    missing = [k for k in keys if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise UserError(f"{path} is not a certseg checkpoint (no {', '.join(missing)})")
    return blob


_ONNX_NOT_CHECKPOINT = (
    "this is an ONNX export, not a training checkpoint: name the run's model.pt (the "
    "file it was exported from)"
)


def _checkpoint_in(path: Path) -> Path:
    """`path`, or the model.pt of the run folder it names; an export folder (model.onnx,
    no model.pt) or another folder is a UserError saying what to name instead."""
    if not path.is_dir():
        return path
    if (path / "model.pt").is_file():
        return path / "model.pt"
    if (path / "model.onnx").is_file():
        raise UserError(f"{path}: {_ONNX_NOT_CHECKPOINT}")
    raise UserError(f"{path} is a folder without model.pt: name a checkpoint or a run folder")


def _is_onnx(path: Path) -> bool:
    """Whether a file torch cannot load is ONNX: by name, or by its first byte (a
    ModelProto opens with field 1, ir_version, as a varint: 0x08); torch's files open
    with a zip or pickle header, never that."""
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with path.open("rb") as f:
            return f.read(1) == b"\x08"
    except OSError:
        return False


def load_checkpoint(path: str | Path, fused: bool = True) -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint. With `fused`, return the frozen plain-weight model in eval
    mode and set the card's audited constant from those exact weights.

    No constant is taken from the file: the structural one is derived from the model
    built (infinite for an unconstrained twin, whatever its card claims: a hand-edited
    card of L 1.0 on such a net had a pixel certified at radius 882 flipped by a
    perturbation of norm 1.01), the audited one from the fused weights or none."""
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
        raise UserError(f"{path}: the weights do not fit the card ({first_problem(exc)})") from None
    model.eval()
    card.lipschitz_audited = None
    if not is_lipschitz(model):
        card.lipschitz = math.inf
        return model, card
    card.lipschitz = structural_lipschitz(model)
    if fused:
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
        raise RuntimeError(f"checkpoint does not fit the model: {first_problem(err)}") from err
    names = position_bias_names(model)
    grown = [k for k in result.missing_keys if k in names]
    problems = sorted(set(result.missing_keys) - set(grown)) + sorted(result.unexpected_keys)
    if problems:
        raise RuntimeError(f"checkpoint does not fit the model: {', '.join(problems[:8])}")
    params = dict(model.named_parameters())
    if any(params[k].detach().abs().max() > 0 for k in grown):
        raise RuntimeError("grown position biases must start at zero")
    return grown


def first_problem(err: RuntimeError) -> str:
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
