"""Minimum-norm l2 attacks for segmentation: one pixel, or a target fraction of pixels.

Why: a fixed-budget attack answers "is there a flip within eps?"; comparing a
certified radius with the *smallest* flip an attack can find measures how tight the
certificate is, and any flip below the certified radius proves it unsound.

Algorithm: FMN, "Fast Minimum-norm Adversarial Attacks through Adaptive Norm
Constraints" (Pintor, Roli, Brendel, Biggio, NeurIPS 2021), which refines DDN,
"Decoupling Direction and Norm for Efficient Gradient-Based L2 Adversarial Attacks
and Defenses" (Rony et al., CVPR 2019). Direction and norm are updated separately:

* direction: ``delta += alpha_t * eps_t * g / ||g||``, with g the gradient of a loss
  that decreases as the target pixels flip; alpha_t is cosine-annealed from
  ``step_scale`` to 1% of it (relative to the current budget, so the attack is
  scale-free, unlike the absolute steps of the papers, which assume ImageNet norms);
* norm: ``eps_t`` shrinks by (1 - gamma_t) (never above the best norm found) while
  the iterate is adversarial, grows by (1 + gamma_t) once an adversarial point was
  seen and the iterate is not adversarial, and before any success jumps to
  ``||delta|| + L / ||grad L||``, the linearised distance to the decision boundary
  (FMN; exact in one step for a linear model). gamma_t is cosine-annealed from
  ``gamma`` to ``gamma_final`` so the norm settles to ~0.1% resolution;
* ``delta`` is projected onto the l2 ball of radius eps_t, then onto the [0, 1] box.

Adaptation to segmentation. One pixel: the loss is that pixel's margin
``z_y - max_{k != y} z_k`` (DDN's cross-entropy on one pixel would also do, but the
margin is what the Lipschitz certificate is stated in). Target fraction tau of the
valid pixels: the loss is the sum of the positive margins of the ceil(tau * n_valid)
pixels with the smallest margins, i.e. the pixels that are cheapest to win, so the
norm is not spent on pixels beyond the target (the same focusing idea as ALMA prox,
Rony et al., "Proximal Splitting Adversarial Attacks for Semantic Segmentation",
CVPR 2023, which uses per-pixel Lagrange multipliers instead).

Finally the best adversarial point is shrunk toward x by bisection on
``x + s * (adv - x)``, s in [0, 1], which only ever returns verified adversarial
points. Every reported success and norm is re-measured on the returned images:
norms are ``||adv - x||_2`` in float64 over the whole image tensor, inf on failure.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from certseg.attacks.losses import flipped_mask, gather_pixel_logits, image_loss, margin_map, pixel_margin
from certseg.attacks.pgd import Model, _bcast, _check_images, _cosine, _normalize, _project, l2_norms

__all__ = [
    "MinNormImageAttack",
    "MinNormPixelAttack",
    "min_norm_image",
    "min_norm_pixel",
]


class MinNormPixelAttack(NamedTuple):
    """Result of a minimum-norm one-pixel attack."""

    adv: Tensor  # (N, C, H, W); equals the clean image where the attack failed
    norms: Tensor  # (N,) float64 ||adv - x||_2; inf where the attack failed
    success: Tensor  # (N,) bool: argmax at the pixel != label on ``adv``


class MinNormImageAttack(NamedTuple):
    """Result of a minimum-norm whole-image attack."""

    adv: Tensor  # (N, C, H, W); on failure, the iterate that flipped the most pixels
    norms: Tensor  # (N,) float64 ||adv - x||_2; inf where the target was not reached
    fraction: Tensor  # (N,) float64 fraction of valid pixels flipped on ``adv``


def _fmn_loop(
    x: Tensor,
    evaluate,
    steps: int,
    gamma: float,
    gamma_final: float,
    step_scale: float,
    refine_steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Shared FMN/DDN loop.

    ``evaluate(adv, need_grad)`` returns ``(is_adv (N,) bool, loss (N,), grad or None)``
    where ``loss`` is >= 0 and decreases toward success. Returns the best adversarial
    images (x where none was found), a found mask, and the last iterate (for callers
    that want a fallback).
    """
    n = x.shape[0]
    adv = x.clone()
    eps = torch.zeros(n, device=x.device, dtype=x.dtype)
    best_norm = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    best_adv = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    diameter = math.sqrt(x[0].numel())

    for t in range(steps + 1):
        need_grad = t < steps
        is_adv, loss, g = evaluate(adv, need_grad)
        with torch.no_grad():
            d_norm = (adv - x).flatten(1).norm(dim=1)
            improve = is_adv & (d_norm < best_norm)
            best_adv[improve] = adv[improve]
            best_norm = torch.where(improve, d_norm, best_norm)
            found |= is_adv
            if not need_grad:
                break
            gam = gamma_final + (gamma - gamma_final) * 0.5 * (1 + math.cos(math.pi * t / steps))
            g_norm = g.flatten(1).norm(dim=1)
            dist = loss.abs() / g_norm.clamp_min(1e-30)
            eps = torch.where(
                is_adv,
                torch.minimum(eps * (1 - gam), best_norm),
                torch.where(found, eps * (1 + gam), d_norm + dist),
            )
            # No useful gradient gives an infinite boundary estimate; no point in the
            # box is farther than its diameter from x.
            eps = torch.where(torch.isfinite(eps), eps, d_norm).clamp_(max=diameter)
            alpha = step_scale * _cosine(t, steps) * eps
            adv = _project(x, adv - _normalize(g) * _bcast(alpha, x), eps)

    # Bisection toward x along the best adversarial direction.
    with torch.no_grad():
        delta = best_adv - x
        lo = torch.zeros(n, device=x.device, dtype=x.dtype)
        hi = torch.ones(n, device=x.device, dtype=x.dtype)
        active = found & (best_norm > 0)
        for _ in range(refine_steps if bool(active.any()) else 0):
            mid = 0.5 * (lo + hi)
            cand = (x + delta * _bcast(mid, x)).clamp_(0.0, 1.0)
            ok, _, _ = evaluate(cand, False)
            ok = ok & active
            hi = torch.where(ok, mid, hi)
            lo = torch.where(active & ~ok, mid, lo)
            best_adv[ok] = cand[ok]
    return best_adv, found, adv


def min_norm_pixel(
    model: Model,
    images: Tensor,
    pixels: Tensor,
    labels: Tensor,
    steps: int = 200,
    gamma: float = 0.05,
    gamma_final: float = 0.001,
    step_scale: float = 1.0,
    refine_steps: int = 20,
) -> MinNormPixelAttack:
    """Smallest l2 perturbation found that changes the argmax at ``pixels[i]`` of sample i.

    ``pixels`` is (N, 2) (row, col), ``labels`` (N,) the class to move away from.
    Deterministic (no random start). See the module docstring for the algorithm.
    """
    _check_images(images)
    x = images.detach()
    n = x.shape[0]
    labels = labels.to(device=x.device, dtype=torch.long)
    pixels = pixels.to(device=x.device, dtype=torch.long)
    if pixels.shape != (n, 2) or labels.shape != (n,):
        raise ValueError("pixels must be (N, 2) and labels (N,)")

    def evaluate(adv: Tensor, need_grad: bool):
        with torch.enable_grad() if need_grad else torch.no_grad():
            a = adv.clone().requires_grad_(need_grad)
            z = gather_pixel_logits(model(a), pixels)
            m = pixel_margin(z, labels)
            is_adv = z.argmax(dim=1) != labels
            g = torch.autograd.grad(m.sum(), a)[0] if need_grad else None
        return is_adv.detach(), m.detach().clamp_min(0), g

    best_adv, _, _ = _fmn_loop(x, evaluate, steps, gamma, gamma_final, step_scale, refine_steps)
    with torch.no_grad():
        z = gather_pixel_logits(model(best_adv), pixels)
        success = z.argmax(dim=1) != labels
        best_adv = torch.where(_bcast(success, x), best_adv, x)
        norms = l2_norms(best_adv - x)
        norms = torch.where(success, norms, torch.full_like(norms, float("inf")))
    return MinNormPixelAttack(best_adv, norms, success)


def _fraction(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(flipped fraction of valid pixels (N,) float64, number of valid pixels (N,))."""
    valid = (labels != ignore_index).flatten(1).sum(dim=1)
    count = flipped_mask(logits, labels, ignore_index).flatten(1).sum(dim=1)
    return count.double() / valid.clamp_min(1).double(), valid


def min_norm_image(
    model: Model,
    images: Tensor,
    labels: Tensor,
    target_fraction: float = 0.5,
    steps: int = 300,
    gamma: float = 0.05,
    gamma_final: float = 0.001,
    step_scale: float = 1.0,
    refine_steps: int = 20,
    ignore_index: int = 255,
    direction: str = "focus",
) -> MinNormImageAttack:
    """Smallest l2 perturbation found that flips >= ``target_fraction`` of the valid pixels.

    ``labels`` is (N, H, W) with ``ignore_index`` pixels excluded from the count. An
    image with no valid pixels meets any target at norm 0. Deterministic.
    """
    _check_images(images)
    if not 0.0 < target_fraction <= 1.0:
        raise ValueError("target_fraction must be in (0, 1]")
    x = images.detach()
    n = x.shape[0]
    labels = labels.to(device=x.device, dtype=torch.long)
    if labels.shape != (n, *x.shape[2:]):
        raise ValueError(f"labels must be (N, H, W), got {tuple(labels.shape)}")
    valid_mask = labels != ignore_index
    n_valid = valid_mask.flatten(1).sum(dim=1)
    k_target = torch.ceil(n_valid.double() * target_fraction - 1e-9).long().clamp_min(0)
    # Fallback record: the iterate with the largest flipped fraction, for failures.
    most = {"adv": x.clone(), "frac": torch.full((n,), -1.0, device=x.device).double()}

    def evaluate(adv: Tensor, need_grad: bool):
        with torch.enable_grad() if need_grad else torch.no_grad():
            a = adv.clone().requires_grad_(need_grad)
            logits = model(a)
            frac, _ = _fraction(logits, labels, ignore_index)
            count = flipped_mask(logits, labels, ignore_index).flatten(1).sum(dim=1)
            is_adv = count >= k_target
            m = margin_map(logits, labels, ignore_index)
            with torch.no_grad():
                # The k_target cheapest pixels (smallest margins) are the ones to win.
                key = torch.where(valid_mask, m, torch.full_like(m, float("inf"))).flatten(1)
                srt = key.sort(dim=1).values
                idx = (k_target - 1).clamp_min(0)[:, None]
                thr = srt.gather(1, idx).squeeze(1)
                sel = valid_mask & (m <= _bcast(thr, m)) & (m > 0)
                sel &= _bcast(k_target > 0, m)
            loss = (m.clamp_min(0) * sel).flatten(1).sum(dim=1)
            if need_grad:
                if direction == "focus":
                    g = torch.autograd.grad(loss.sum(), a)[0]
                else:
                    dl = image_loss(logits, labels, direction, ignore_index)
                    g = -torch.autograd.grad(dl.sum(), a)[0]
                    g0 = torch.autograd.grad(loss.sum(), a, retain_graph=False)[0] if False else None
            else:
                g = None
        with torch.no_grad():
            up = frac > most["frac"]
            most["adv"][up] = adv[up]
            most["frac"] = torch.where(up, frac, most["frac"])
        return is_adv.detach(), loss.detach(), g

    best_adv, found, _ = _fmn_loop(x, evaluate, steps, gamma, gamma_final, step_scale, refine_steps)
    with torch.no_grad():
        adv = torch.where(_bcast(found, x), best_adv, most["adv"])
        logits = model(adv)
        frac, _ = _fraction(logits, labels, ignore_index)
        count = flipped_mask(logits, labels, ignore_index).flatten(1).sum(dim=1)
        success = count >= k_target
        norms = l2_norms(adv - x)
        norms = torch.where(success, norms, torch.full_like(norms, float("inf")))
    return MinNormImageAttack(adv, norms, frac)
