"""Power-iteration estimates: LOWER bounds of operator norms, to check upper bounds against.

Never use these as a certificate's constant: an estimate can only undershoot.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["jacobian_norm_estimate", "linear_norm_estimate"]


def _iterate(fn: Callable[[Tensor], Tensor], x0: Tensor, steps: int) -> float:
    """Power iteration on J^T J of `fn` at x0, with J and J^T linearised once (torch.func)."""
    x0 = x0.detach()
    with warnings.catch_warnings():  # linearize's const-folding warns about our buffers
        warnings.simplefilter("ignore", UserWarning)
        _, jvp = torch.func.linearize(fn, x0)
    _, vjp = torch.func.vjp(fn, x0)
    v = torch.randn_like(x0)
    best = 0.0
    with torch.no_grad():
        for _ in range(steps):
            v = v / v.norm()
            jv = jvp(v)
            best = max(best, float(jv.norm()))
            (v,) = vjp(jv)
    return best


def linear_norm_estimate(
    fn: Callable[[Tensor], Tensor], shape: tuple[int, ...], steps: int = 100, seed: int = 0
) -> float:
    """Largest gain ||fn(v) - fn(0)|| / ||v|| found by `steps` of power iteration (fp64 if
    the module is). For an affine map the Jacobian is the same everywhere."""
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        x0 = torch.zeros(shape, dtype=torch.float64)
        return _iterate(fn, x0, steps)


def jacobian_norm_estimate(
    fn: Callable[[Tensor], Tensor], x0: Tensor, steps: int = 100, seed: int = 0
) -> float:
    """Norm of the Jacobian of a nonlinear `fn` at x0: a lower bound of its Lipschitz constant."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _iterate(fn, x0, steps)
