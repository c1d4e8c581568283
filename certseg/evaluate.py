"""Evaluation: clean and certified metrics over an eps grid, as JSON, markdown and plots.

Two methods on the same images and eps grid:
- `lipschitz`: one forward pass of the fused model; per-pixel radii and the joint
  budget give certified pixel accuracy, worst-case accuracy and mIoU (exact data-set
  aggregation, DatasetCertifier), per-class worst-case IoU, stability@alpha.
- `smoothing`: SegCertify on an (unconstrained, noise-trained) model; see
  certseg.certify.smoothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from certseg.errors import UserError
from clients.bounds import fixed_down

__all__ = ["EvalConfig", "evaluate", "markdown_table"]

DEFAULT_EPS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)
METHODS = ("lipschitz", "smoothing")


@dataclass
class EvalConfig:
    checkpoint: str
    out: str
    data: str = "synthetic"
    root: str | None = None
    split: str = "val"
    num_images: int = 64  # synthetic held-out scenes
    seed: int = 10_000  # synthetic: held-out seed (training uses seed 0 by default)
    size: tuple[int, int] | None = None  # default: the card's input size
    eps: Sequence[float] = DEFAULT_EPS
    method: str = "lipschitz"  # lipschitz | smoothing
    batch_size: int = 4
    sigma: float = 0.25  # smoothing
    n0: int = 10
    n: int = 100
    alpha: float = 0.001
    device: str = "auto"
    plots: bool = True
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _batches(dataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        try:
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        except ValueError as exc:  # a pair the set refuses (label ids, sizes), by name
            raise UserError(str(exc)) from None
        yield np.stack([a for a, _ in items]), np.stack([b for _, b in items])


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation, write result.json, table.md and plots; return the result."""
    from tqdm.auto import tqdm

    from certseg.certify import (
        STABILITY_FRACTIONS,
        DatasetCertifier,
        margins,
        stability,
        stability_rows,
    )
    from certseg.inference import pick_device, predict_logits
    from certseg.models import load_checkpoint, require_lipschitz

    if cfg.method not in METHODS:  # before a model is loaded; else it ran lipschitz
        raise UserError(f"method must be {' or '.join(METHODS)}, got {cfg.method!r}")
    device = pick_device(cfg.device)
    model, card = load_checkpoint(cfg.checkpoint)
    model = model.to(device)
    size = tuple(cfg.size or card.input_size)
    from certseg.data import open_split
    from certseg.data.sources import refuse_other_classes

    dataset = open_split(cfg.data, cfg.split, size, root=cfg.root, num_images=cfg.num_images,
                         seed=cfg.seed, num_classes=card.num_classes,
                         ignore_index=card.ignore_index)  # fmt: skip
    refuse_other_classes(cfg.checkpoint, card.classes, cfg.data, dataset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    eps_grid = [float(e) for e in cfg.eps]
    smoothing = cfg.method == "smoothing"  # an unconstrained twin's L (inf) is not used
    lip = card.certified_lipschitz if smoothing else require_lipschitz(card, cfg.checkpoint)
    example: dict[str, np.ndarray] = {}

    if smoothing:
        from certseg.certify.smoothing import SmoothingCertifier

        certifier = SmoothingCertifier(
            card.num_classes, cfg.sigma, cfg.n0, cfg.n, cfg.alpha, eps_grid
        )
        if hopeless := certifier.hopeless(size[0] * size[1]):  # every image is of `size`
            tqdm.write(
                f"warning: with --n {cfg.n} no pixel can be certified at eps "
                f"{', '.join(f'{e:g}' for e in hopeless)}: a unanimous pixel's p-value is "
                f"above alpha / pixels; raise --n (or --alpha)"
            )
    else:
        certifiers = [DatasetCertifier(card.num_classes, lip) for _ in eps_grid]
        stab: list[np.ndarray] = []

    seconds = 0.0
    bar = tqdm(total=len(dataset), desc=f"evaluate ({cfg.method})", disable=not cfg.progress)
    for images, labels in _batches(dataset, cfg.batch_size):
        t0 = time.perf_counter()
        if smoothing:
            certifier.update(model, images, labels, device, card.pad_multiple)
        else:
            logits = predict_logits(model, images, card.pad_multiple, device=device)
            for e, cert in zip(eps_grid, certifiers, strict=True):
                cert.update(logits, labels, e)
            pred, margin = margins(logits)
            valid = labels != card.ignore_index
            stab.append(np.asarray(stability(margin, STABILITY_FRACTIONS, lip, valid)))
            if not example:
                example = {"image": images[0], "pred": pred[0], "margin": margin[0]}
        seconds += time.perf_counter() - t0
        bar.update(len(images))
    bar.close()

    result: dict[str, Any] = {
        "method": cfg.method,
        "model": card.name,
        "checkpoint": str(cfg.checkpoint),
        "data": cfg.data,
        "num_images": len(dataset),
        "size": list(size),
        "lipschitz": lip,
        "classes": list(card.classes),
        "seconds_per_image": seconds / max(len(dataset), 1),
        "device": str(device),
    }
    if smoothing:
        result |= {"sigma": cfg.sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha}
        result["rows"] = certifier.rows()
    else:
        rows = []
        for e, cert in zip(eps_grid, certifiers, strict=True):
            res = cert.compute()
            rows.append(
                {
                    "eps": e,
                    "pixel_accuracy": res.pixel_accuracy,
                    "certified_pixel_accuracy": res.certified_pixel_accuracy,
                    "worst_pixel_accuracy": res.worst_pixel_accuracy,
                    "miou": res.miou,
                    "worst_miou": res.worst_miou,
                    "worst_iou": _nan_to_none(res.worst_iou),
                    "iou": _nan_to_none(res.iou),
                }
            )
        result["rows"] = rows
        # the median over images of each one's least norm, as the REST answer's rows
        result["stability"] = stability_rows(np.median(np.concatenate(stab), axis=0).tolist())
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(markdown_table(result))
    if cfg.plots:
        from certseg.plots import plot_certified_vs_eps, plot_example, plot_worst_iou

        plot_certified_vs_eps([result], out / "certified_vs_eps.png")
        if cfg.method != "smoothing":
            plot_worst_iou(result, out / "worst_iou.png")
            plot_example(example, lip, card, eps_grid, out / "example.png")
    return result


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, dtype=float)]


def markdown_table(result: dict[str, Any]) -> str:
    """One row per eps; columns depend on the method. Every figure is rounded down, the
    clean ones too, so that at eps 0 a bound equal to its clean figure reads equal."""
    head = f"**{result['model']}** ({result['method']}, {result['num_images']} images, "
    head += f"{result['size'][0]}x{result['size'][1]}, L = {result['lipschitz']:.4g})\n\n"
    if result["method"] == "smoothing":
        lines = ["| eps | certified pixel acc | abstain |", "|---|---|---|"]
        for r in result["rows"]:
            lines.append(
                f"| {r['eps']:g} | {fixed_down(r['certified_pixel_accuracy'])} "
                f"| {r['abstain']:.3f} |"
            )
    else:
        lines = [
            "| eps | clean acc | certified acc (per pixel) | worst-case acc (joint) "
            "| clean mIoU | worst-case mIoU |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['eps']:g} | {fixed_down(r['pixel_accuracy'])} "
                f"| {fixed_down(r['certified_pixel_accuracy'])} "
                f"| {fixed_down(r['worst_pixel_accuracy'])} | {fixed_down(r['miou'])} "
                f"| {fixed_down(r['worst_miou'])} |"
            )
    return head + "\n".join(lines) + "\n"
