"""Randomized smoothing for segmentation (SegCertify, Fischer et al. 2021): the baseline.

Per image: n0 noisy passes pick each pixel's class (the mode), n more count its votes;
a one-sided binomial test per pixel (H0: p <= tau) with Holm's correction over the
image's pixels at level alpha decides which pixels are certified, all with radius
sigma * Phi^-1(tau); the rest abstain. For an eps grid, tau = Phi(eps / sigma).

The statistics are vectorised and array-API generic (one tail table per (n, tau),
looked up for every pixel; Holm's procedure by sort and running test): they run where
the votes are, on the GPU when sampling ran there. Sampling runs the model on batches
of noisy copies on its device. Timing is fair: the caller synchronises the device
before reading clocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

__all__ = ["SmoothingCertifier", "binomial_tail", "holm_reject", "sample_votes"]


def binomial_tail(n: int, p: float) -> np.ndarray:
    """tail[k] = P[X >= k] for X ~ Binomial(n, p), k = 0..n+1, computed in log space."""
    k = np.arange(n + 1)
    if p <= 0.0:
        pmf = (k == 0).astype(float)
    elif p >= 1.0:
        pmf = (k == n).astype(float)
    else:
        lg = np.array([math.lgamma(i + 1) for i in range(n + 1)])
        logpmf = lg[n] - lg - lg[::-1] + k * math.log(p) + (n - k) * math.log1p(-p)
        pmf = np.exp(logpmf)
    tail = np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]])
    return np.minimum(tail, 1.0)


def holm_reject(pvalues: Any, alpha: float) -> Any:
    """Holm's step-down procedure over the last axis: which null hypotheses to reject.

    Array-API generic: numpy in, numpy out; torch (CUDA) in, torch out, so the fair
    timing runs the tests where the votes are. The step-down "every sorted p-value up
    to here passed" is a running count of failures along the sorted axis being zero.
    """
    xp = array_namespace(pvalues)
    dev = _device(pvalues)
    p = xp.astype(xp.asarray(pvalues), xp.float64)
    m = p.shape[-1]
    order = xp.argsort(p, axis=-1, stable=True)
    sorted_p = xp.take_along_axis(p, order, axis=-1)
    thresholds = alpha / xp.astype(m - xp.arange(m, device=dev), xp.float64)
    passed = xp.astype(sorted_p <= thresholds, xp.int64)
    ok = xp.cumulative_sum(1 - passed, axis=-1) == 0  # no failure up to here
    inverse = xp.argsort(order, axis=-1, stable=True)
    return xp.take_along_axis(ok, inverse, axis=-1)


def sample_votes(
    model, images, num: int, sigma: float, num_classes: int, pad_multiple: int, chunk: int = 16
):
    """Per-pixel vote counts (N, K, H, W) of `num` Gaussian-noise passes (torch, batched)."""
    import torch

    from certseg.inference import padded_forward

    n_img, _, h, w = images.shape
    counts = torch.zeros(n_img, num_classes, h, w, dtype=torch.int32, device=images.device)
    with torch.no_grad():
        for i in range(n_img):
            done = 0
            while done < num:
                b = min(chunk, num - done)
                noisy = images[i : i + 1] + sigma * torch.randn(
                    b, *images.shape[1:], device=images.device
                )
                pred = padded_forward(model, noisy, pad_multiple).argmax(1)
                counts[i] += (
                    torch.nn.functional.one_hot(pred, num_classes)
                    .sum(0)
                    .permute(2, 0, 1)
                    .to(torch.int32)
                )
                done += b
    return counts


class SmoothingCertifier:
    """Accumulates SegCertify results over a data set, for every eps of a grid at once."""

    def __init__(
        self,
        num_classes: int,
        sigma: float,
        n0: int,
        n: int,
        alpha: float,
        eps_grid: Sequence[float],
        ignore_index: int = 255,
    ) -> None:
        self.num_classes, self.sigma, self.n0, self.n, self.alpha = num_classes, sigma, n0, n, alpha
        self.eps_grid = [float(e) for e in eps_grid]
        self.ignore_index = ignore_index
        self.taus = [NormalDist().cdf(e / sigma) for e in self.eps_grid]
        self.tails = [binomial_tail(n, t) for t in self.taus]
        self.correct = np.zeros(len(self.eps_grid))
        self.abstain = np.zeros(len(self.eps_grid))
        self.valid = 0

    def hopeless(self, pixels: int) -> list[float]:
        """The eps of the grid at which no pixel of an image of `pixels` can be certified:
        even a unanimous pixel's p-value, tau^n, is above Holm's first threshold
        alpha / pixels. Every pixel abstains there, which looked like a weak model."""
        pairs = zip(self.eps_grid, self.tails, strict=True)
        return [e for e, tail in pairs if tail[self.n] > self.alpha / pixels]

    def certify_counts(self, guess: Any, votes: Any) -> list[Any]:
        """Certified masks (one per eps) for guesses (N, H, W) and their n-sample votes,
        on the votes' device (numpy or torch)."""
        xp = array_namespace(votes)
        flat = xp.reshape(votes, (votes.shape[0], -1))
        index = xp.astype(flat, xp.int64)
        masks = []
        for tail in self.tails:
            table = xp.asarray(tail, device=_device(votes))
            pvalues = xp.reshape(xp.take(table, xp.reshape(index, (-1,))), flat.shape)
            masks.append(xp.reshape(holm_reject(pvalues, self.alpha), guess.shape))
        return masks

    def update(self, model, images: np.ndarray, labels: np.ndarray, device, pad_multiple) -> None:
        import torch

        x = torch.as_tensor(images, dtype=torch.float32, device=device)
        sel = sample_votes(model, x, self.n0, self.sigma, self.num_classes, pad_multiple)
        guess = sel.argmax(1)
        counts = sample_votes(model, x, self.n, self.sigma, self.num_classes, pad_multiple)
        votes = counts.gather(1, guess[:, None])[:, 0]
        masks = [m.cpu().numpy() for m in self.certify_counts(guess, votes)]  # on the device
        guess_np = guess.cpu().numpy()
        valid = labels != self.ignore_index
        self.valid += int(valid.sum())
        for i, mask in enumerate(masks):
            self.correct[i] += int((mask & (guess_np == labels) & valid).sum())
            self.abstain[i] += int((~mask & valid).sum())

    def rows(self) -> list[dict[str, Any]]:
        v = max(self.valid, 1)
        return [
            {
                "eps": e,
                "tau": t,
                "certified_pixel_accuracy": float(c / v),
                "abstain": float(a / v),
            }
            for e, t, c, a in zip(self.eps_grid, self.taus, self.correct, self.abstain, strict=True)
        ]
