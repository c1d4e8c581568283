"""Tightness and soundness at scale: attacked vs certified accuracy and mIoU.

On held-out images of a checkpoint's data, for each eps: the joint-budget worst-case
bounds (certificates) against what a strong PGD attack (whole image, warm-started
sweep over eps) actually achieves. Fails loudly if any attack beats a bound or flips
a pixel certified at eps. Prints a table, writes benchmarks/results/tightness.json.

    python benchmarks/tightness.py certseg/weights/street/model.pt --images 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import print_table, write_result

from certseg.attacks import pgd_image_sweep
from certseg.certify import (
    certified_pixel_accuracy,
    certified_radius,
    margins,
    worst_case_miou,
    worst_case_pixel_accuracy,
)
from certseg.data import SyntheticScenes
from certseg.inference import padded_forward
from certseg.models import load_checkpoint


def miou(pred: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Per-image mean IoU over classes present in the ground truth."""
    out = []
    for p, t in zip(pred, y, strict=True):
        valid = t != 255
        ious = [
            ((p == c) & (t == c)).sum() / (((p == c) & valid) | (t == c)).sum()
            for c in range(k)
            if (t == c).any()
        ]
        out.append(np.mean(ious))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=10_000)
    args = ap.parse_args()

    model, card = load_checkpoint(args.checkpoint)
    lip = card.certified_lipschitz
    data = SyntheticScenes(args.images, card.input_size, seed=args.seed)
    net = lambda x: padded_forward(model, x, card.pad_multiple)  # noqa: E731
    stats = {
        e: {
            "attacked_acc": [],
            "attacked_miou": [],
            "worst_acc": [],
            "worst_miou": [],
            "certified_acc": [],
            "violations": 0,
        }
        for e in args.eps
    }
    clean_acc, clean_miou = [], []
    t0 = time.perf_counter()
    for start in range(0, args.images, args.batch):
        items = [data[i] for i in range(start, min(start + args.batch, args.images))]
        x = torch.from_numpy(np.stack([a for a, _ in items]))
        y = np.stack([b for _, b in items])
        with torch.no_grad():
            logits = net(x).numpy()
        pred, margin = margins(logits)
        radius = certified_radius(margin, lip)
        valid = y != 255
        clean_acc += list(((pred == y) & valid).sum((1, 2)) / valid.sum((1, 2)))
        clean_miou += list(miou(pred, y, card.num_classes))
        attacks = pgd_image_sweep(
            net, x, torch.from_numpy(y), args.eps, steps=args.steps, restarts=1
        )
        for e, res in zip(args.eps, attacks, strict=True):
            with torch.no_grad():
                adv = net(res.adv).argmax(1).numpy()
            s = stats[e]
            acc = ((adv == y) & valid).sum((1, 2)) / valid.sum((1, 2))
            w_acc = worst_case_pixel_accuracy(logits, y, e, lip)
            w_miou = worst_case_miou(logits, y, e, lip)
            a_miou = miou(adv, y, card.num_classes)
            s["violations"] += int(((adv != pred) & (radius > e)).sum())
            s["violations"] += int((acc < w_acc - 1e-12).sum() + (a_miou < w_miou - 1e-12).sum())
            s["attacked_acc"] += list(acc)
            s["worst_acc"] += list(w_acc)
            s["attacked_miou"] += list(a_miou)
            s["worst_miou"] += list(w_miou)
            s["certified_acc"] += list(certified_pixel_accuracy(logits, y, e, lip))
    rows, payload = [], []
    for e in args.eps:
        s = stats[e]
        row = {
            "eps": e,
            "clean_acc": float(np.mean(clean_acc)),
            "attacked_acc": float(np.mean(s["attacked_acc"])),
            "worst_case_acc": float(np.mean(s["worst_acc"])),
            "certified_acc_per_pixel": float(np.mean(s["certified_acc"])),
            "clean_miou": float(np.mean(clean_miou)),
            "attacked_miou": float(np.mean(s["attacked_miou"])),
            "worst_case_miou": float(np.mean(s["worst_miou"])),
            "violations": s["violations"],
        }
        payload.append(row)
        rows.append(list(row.values()))
    print_table(
        f"Tightness: {card.name}, {args.images} images, {time.perf_counter() - t0:.0f} s",
        list(payload[0].keys()),
        rows,
    )
    path = write_result(
        "tightness",
        {"checkpoint": args.checkpoint, "lipschitz": lip, "steps": args.steps, "rows": payload},
    )
    print(f"wrote {path}")
    if any(r["violations"] for r in payload):
        raise SystemExit("SOUNDNESS VIOLATION: an attack beat a certificate")


if __name__ == "__main__":
    main()
