"""Lipschitz bookkeeping: every layer states its own constant, containers compose them.

Two numbers per module, both derived, never typed in:

- `lipschitz()`: the structural bound, what the construction promises (1 for an
  orthogonal conv, 1/min(std) for input normalization, products and root-sum-squares
  for containers). It is what the architecture is designed to have.
- `lipschitz_bound()`: a guaranteed fp64 upper bound computed from the weights that
  are there now (see certseg.certify.operator_norm). This is what certificates use.

A module we do not know is an error, not a guess.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

from torch import nn

__all__ = [
    "LipSequential",
    "LipschitzModule",
    "certified_lipschitz",
    "fuse_module",
    "structural_lipschitz",
]

#: Modules that are exactly 1-Lipschitz and carry no weights.
_UNIT_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle)


class LipschitzModule(nn.Module):
    """Mixin for modules that know their Lipschitz constant."""

    def lipschitz(self) -> float:
        """Structural (nominal) bound of this module."""
        raise NotImplementedError

    def lipschitz_bound(self) -> float:
        """Guaranteed upper bound from the current weights (fp64). Defaults to structural
        for weight-free modules whose constant is exact by construction."""
        return self.lipschitz()

    def fused(self) -> nn.Module:
        """A frozen, parametrization-free equivalent (eval semantics): a copy, never the
        module itself (a fused model's .double() or edited buffers changed its source)."""
        return copy.deepcopy(self)


def _constant(module: nn.Module, pick: Callable[[LipschitzModule], float]) -> float:
    if isinstance(module, LipschitzModule):
        return pick(module)
    if isinstance(module, _UNIT_MODULES):
        return 1.0
    raise TypeError(
        f"{type(module).__name__} does not declare a Lipschitz constant; wrap it in a "
        "LipschitzModule or use a certseg.nn layer"
    )


def structural_lipschitz(module: nn.Module) -> float:
    """Structural bound of any supported module."""
    return _constant(module, lambda m: m.lipschitz())


def certified_lipschitz(module: nn.Module) -> float:
    """Guaranteed fp64 bound of any supported module, from its current weights."""
    return _constant(module, lambda m: m.lipschitz_bound())


def fuse_module(module: nn.Module) -> nn.Module:
    """Fused twin of any supported module (weight-free unit modules copied)."""
    if isinstance(module, LipschitzModule):
        return module.fused()
    if isinstance(module, _UNIT_MODULES):
        return copy.deepcopy(module)
    raise TypeError(f"cannot fuse {type(module).__name__}")


def compose(constants: Iterable[float]) -> float:
    return math.prod(constants)


class LipSequential(nn.Sequential, LipschitzModule):
    """Sequential whose bound is the product of its children's."""

    def lipschitz(self) -> float:
        return compose(structural_lipschitz(m) for m in self)

    def lipschitz_bound(self) -> float:
        return compose(certified_lipschitz(m) for m in self)

    def fused(self) -> LipSequential:
        return LipSequential(*(fuse_module(m) for m in self))
