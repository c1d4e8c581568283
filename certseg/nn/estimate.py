"""Power-iteration estimates: LOWER bounds of operator norms, to check upper bounds against.

Never use these as a certificate's constant: an estimate can only undershoot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["jacobian_norm_estimate", "linear_norm_estimate"]


def _iterate(fn: Callable[[Tensor], Tensor], x0: Tensor, steps: int) -> float:
    """Power iteration on J^T J of `fn` at x0 (J through vjp/jvp by double backward)."""
    v = torch.randn_like(x0)
    best = 0.0
    for _ in range(steps):
        v = v / v.norm()
        x = x0.detach().requires_grad_(True)
        y = fn(x)
        # J v by the double-vjp trick, J^T (J v) by one more vjp.
        u = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, x, u, create_graph=True)
        (jv,) = torch.autograd.grad(g, u, v, retain_graph=True)
        best = max(best, float(jv.norm()))
        (v,) = torch.autograd.grad(y, x, jv)
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
