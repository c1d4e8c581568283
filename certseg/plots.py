"""Plots people would rather see than read: certified accuracy vs eps, per-class
worst-case IoU, and an example overlay (image, prediction, radius, guaranteed region)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.bounds import pct_down

__all__ = ["plot_certified_vs_eps", "plot_example", "plot_worst_iou"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_certified_vs_eps(results: Sequence[dict[str, Any]], path: Path) -> None:
    """One curve per result and metric: certified / worst-case accuracy against eps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        eps = [r["eps"] for r in res["rows"]]
        tag = f"{res['model']} ({res['method']})"
        ax.plot(
            eps,
            [r["certified_pixel_accuracy"] for r in res["rows"]],
            "o-",
            label=f"{tag}: certified per pixel",
        )
        if res["method"] != "smoothing":
            ax.plot(
                eps,
                [r["worst_pixel_accuracy"] for r in res["rows"]],
                "s--",
                label=f"{tag}: worst case (joint budget)",
            )
            ax.plot(
                eps, [r["worst_miou"] for r in res["rows"]], "^:", label=f"{tag}: worst-case mIoU"
            )
    ax.set(
        xlabel="eps (l2, image in [0,1])",
        ylabel="fraction",
        ylim=(0, 1.02),
        title="Certified accuracy vs attack budget",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_worst_iou(result: dict[str, Any], path: Path) -> None:
    """Clean vs worst-case IoU per class at each eps."""
    plt = _plt()
    classes = result["classes"]
    rows = [r for r in result["rows"] if r["eps"] > 0] or result["rows"]
    x = np.arange(len(classes))
    width = 0.8 / (len(rows) + 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes)), 4))
    clean = [v if v is not None else 0 for v in result["rows"][0]["iou"]]
    ax.bar(x, clean, width, label="clean")
    for i, r in enumerate(rows, start=1):
        vals = [v if v is not None else 0 for v in r["worst_iou"]]
        ax.bar(x + i * width, vals, width, label=f"worst case, eps={r['eps']:g}")
    ax.set_xticks(x + 0.4 - width / 2, classes, rotation=45, ha="right")
    ax.set(ylabel="IoU", ylim=(0, 1), title="Per-class IoU: clean and guaranteed worst case")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_example(
    example: dict[str, np.ndarray], lipschitz: float, card, eps_grid: Sequence[float], path: Path
) -> None:
    """Image, prediction in the palette, radius heat map, guaranteed region at the card's eps."""
    plt = _plt()
    from certseg.certify import certified_radius, guaranteed_region

    image = example["image"].transpose(1, 2, 0)
    palette = np.asarray(card.palette, dtype=np.uint8)
    pred = palette[example["pred"]]
    radius = certified_radius(example["margin"], lipschitz)
    eps = card.default_eps
    region = guaranteed_region(radius, eps)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(pred)
    axes[1].set_title("prediction")
    im = axes[2].imshow(radius, cmap="magma")
    axes[2].set_title("certified radius")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    shown = (0.35 * image + 0.65 * pred / 255.0) * region[..., None]
    shown += 0.25 * image * (~region)[..., None]
    axes[3].imshow(np.clip(shown, 0, 1))
    axes[3].set_title(f"guaranteed at eps={eps:g} ({pct_down(float(region.mean()))})")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
