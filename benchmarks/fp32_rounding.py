"""How far fp32 margins are from exact ones: the served model.onnx (fp32 ONNX Runtime,
CPU) against the same fused weights run in float64 by torch, on the same images.

A certificate speaks of the fp32 evaluation (DESIGN.md); this measures what that
assumption costs. Rounding is not Lipschitz, so near a class boundary it can move a
pixel by more than its radius allows; the figure to compare is the largest margin
difference, which `--margin-error` (applied twice: at the image and at the attacked
image) must exceed to cover it. Prints a table, writes benchmarks/results/fp32_rounding.json.

    python benchmarks/fp32_rounding.py                      # the shipped model
    python benchmarks/fp32_rounding.py --size 512x1024 --images 8
    python benchmarks/fp32_rounding.py --model runs/mine --onnx runs/mine/onnx/model.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import print_table, write_result
from tqdm import tqdm

from certseg.certify import margins
from certseg.data.synthetic import render_scene
from certseg.inference import padded_forward
from certseg.models import load_checkpoint
from certseg.sizes import parse_size

SHIPPED = Path(__file__).resolve().parents[1] / "certseg" / "weights" / "street"


def images(size: tuple[int, int], count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Half synthetic street scenes, half uniform noise (the calibration set's mix)."""
    rng = np.random.default_rng(seed)
    out = [("scene", render_scene(rng, size)[0][None]) for _ in range((count + 1) // 2)]
    out += [("noise", rng.random((1, 3, *size), dtype=np.float32)) for _ in range(count // 2)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHIPPED, help="folder with model.pt")
    ap.add_argument("--onnx", type=Path, default=None, help="its export (default: beside it)")
    ap.add_argument("--size", default="256x512", help="HxW of the test images")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None, help="default: beside --model's")
    args = ap.parse_args()

    net, card = load_checkpoint(args.model / "model.pt", fused=True)
    net = net.double()
    onnx_path = args.onnx or args.model / "model.onnx"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rows, per_image = [], []
    for kind, x in tqdm(images(parse_size(args.size), args.images), desc="images"):
        mask32, margin32 = sess.run(["mask", "margin"], {"image": x})
        with torch.no_grad():
            logits = padded_forward(net, torch.from_numpy(x).double(), card.pad_multiple)
        pred64, margin64 = (t.numpy() for t in margins(logits))
        diff = np.abs(margin32.astype(np.float64) - margin64)
        differ = mask32 != pred64
        item = {
            "kind": kind,
            "max_margin_diff": float(diff.max()),
            "median_margin_diff": float(np.median(diff)),
            "max_relative_diff": float((diff / np.maximum(np.abs(margin64), 1e-12)).max()),
            "mask_disagreements": int(differ.sum()),
            "max_margin64_where_masks_differ": float(margin64[differ].max())
            if differ.any()
            else 0.0,
            "min_margin64": float(margin64.min()),
        }
        per_image.append(item)
        rows.append(
            [
                kind,
                item["max_margin_diff"],
                item["median_margin_diff"],
                item["mask_disagreements"],
                item["min_margin64"],
            ]
        )
    worst = max(i["max_margin_diff"] for i in per_image)
    print_table(
        f"fp32 ONNX Runtime vs float64 torch, {card.name}, {args.size}",
        ["image", "max |dmargin|", "median |dmargin|", "masks differ", "min margin (f64)"],
        rows,
    )
    print(f"largest margin difference {worst:.3g}: covered by --margin-error >= {2 * worst:.3g}")
    path = write_result(
        "fp32_rounding",
        {
            "model": card.name,
            "size": args.size,
            "lipschitz": card.lipschitz_audited,
            "max_margin_diff": worst,
            "images": per_image,
        },
        # your own model's figures go beside it: the committed file is the shipped one's
        args.out
        or (None if args.model.resolve() == SHIPPED else args.model / "fp32_rounding.json"),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
