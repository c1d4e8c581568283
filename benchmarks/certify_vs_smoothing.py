"""Lipschitz certificates vs randomized smoothing (SegCertify), same images, same machine.

Times one certified answer per image for each method in one process, on the same
inputs: the Lipschitz net needs one forward pass plus the certificate; smoothing needs
n0 + n noisy passes of its base model plus per-pixel tests with Holm's correction.
Fair timing: the device is synchronised before clocks are read, both methods upload
the image and bring their answer back, noise passes are batched, the tests
vectorised; ratio_over_n0_plus_n shows how close it comes to its limit, n0 + n. The
paper's protocol (clocks read without synchronising) is reported beside it, since on
a GPU it times kernel launches and flatters the ratio. Also reports certified pixel
accuracy of both at the same eps. With no --twin, a noise-trained unconstrained twin
of the same architecture is trained briefly (its accuracy is then low; the time ratio
is what this measures).

    python benchmarks/certify_vs_smoothing.py certseg/weights/street/model.pt --images 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import print_table, write_result

from certseg.certify import certified_radius, guaranteed_region, margins
from certseg.certify.smoothing import SmoothingCertifier
from certseg.data import SyntheticScenes
from certseg.inference import exact_fp32, padded_forward
from certseg.models import load_checkpoint


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quick_twin(card, out: Path, device: str) -> Path:
    from certseg.train import Recipe, TrainConfig, train

    cfg = TrainConfig(
        out=str(out),
        arch=card.arch,
        # the same architecture as the certified net (width, position biases), unconstrained
        arch_kwargs={**card.arch_kwargs, "constrained": False},
        num_images=64,
        val_images=8,
        size=tuple(card.input_size),
        recipe=Recipe(epochs=2, lr=3e-3, tau=1.0),
        noise_sigma=0.25,
        device=device,
        progress=False,
    )
    return train(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--twin", help="noise-trained unconstrained checkpoint")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.17])
    ap.add_argument("--settings", default="0.2:120,0.3:60", help="sigma:n pairs (paper's)")
    ap.add_argument("--n0", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="result path (default: results/)")
    args = ap.parse_args()
    device = torch.device(args.device)

    model, card = load_checkpoint(args.checkpoint)
    model = model.to(device)
    twin_path = args.twin or _quick_twin(card, Path(tempfile.mkdtemp()), args.device)
    twin, _ = load_checkpoint(twin_path)
    twin = twin.to(device)
    data = SyntheticScenes(args.images, card.input_size, seed=10_000)
    images = np.stack([data[i][0] for i in range(args.images)])
    labels = np.stack([data[i][1] for i in range(args.images)])

    lip = card.certified_lipschitz

    def lipschitz_pass(i: int, sync: bool):
        """One image: upload, one pass, margins, radii and regions on the device; with
        `sync` the answer is brought back (the clock then sees the work)."""
        x = torch.as_tensor(images[i : i + 1], device=device)
        with torch.no_grad(), exact_fp32():
            pred, margin = margins(padded_forward(model, x, card.pad_multiple))
            regions = [guaranteed_region(certified_radius(margin, lip), e) for e in args.eps]
        if not sync:
            return None
        return pred.cpu().numpy(), [g.cpu().numpy() for g in regions]

    lipschitz_pass(0, True)  # warm-up
    outs = []
    _sync(device)
    t0 = time.perf_counter()
    for i in range(args.images):  # the timed part: one pass + per-pixel certificates
        outs.append(lipschitz_pass(i, True))
    _sync(device)
    lip_s = (time.perf_counter() - t0) / args.images
    # The paper's protocol: clocks read without synchronising the device (on a GPU this
    # times kernel launches, not the work); smoothing's tests ran on the CPU there too.
    t0 = time.perf_counter()
    for i in range(args.images):
        lipschitz_pass(i, False)
    paper_lip_s = (time.perf_counter() - t0) / args.images
    _sync(device)
    valid = labels != card.ignore_index
    lip_acc = [
        float(
            sum(
                ((p == labels[i : i + 1]) & g[k] & valid[i : i + 1]).sum()
                for i, (p, g) in enumerate(outs)
            )
            / valid.sum()
        )
        for k in range(len(args.eps))
    ]

    rows, payload = [], []
    for setting in args.settings.split(","):
        sigma, n = float(setting.split(":")[0]), int(setting.split(":")[1])
        smooth = SmoothingCertifier(card.num_classes, sigma, args.n0, n, args.alpha, args.eps)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(args.images):
            smooth.update(twin, images[i : i + 1], labels[i : i + 1], device, card.pad_multiple)
        _sync(device)
        sm_s = (time.perf_counter() - t0) / args.images
        for e, r, la in zip(args.eps, smooth.rows(), lip_acc, strict=True):
            row = {
                "sigma": sigma,
                "n": n,
                "n0": args.n0,
                "eps": e,
                "lipschitz_s": lip_s,
                "smoothing_s": sm_s,
                "ratio": sm_s / lip_s,
                "ratio_over_n": sm_s / lip_s / n,  # issue #10 asks >= 0.9
                "ratio_over_n0_plus_n": sm_s / lip_s / (n + args.n0),
                "lipschitz_s_paper_protocol": paper_lip_s,
                "ratio_paper_protocol": sm_s / paper_lip_s,
                "lipschitz_certified_acc": la,
                "smoothing_certified_acc": r["certified_pixel_accuracy"],
                "smoothing_abstain": r["abstain"],
            }
            payload.append(row)
            rows.append(list(row.values()))
    print_table(
        f"Certify vs smoothing on {device} ({args.images} images, "
        f"{card.input_size[0]}x{card.input_size[1]})",
        list(payload[0].keys()),
        rows,
    )
    payload_all = {"rows": payload, "model": card.name, "device": str(device)}
    print(f"wrote {write_result('certify_vs_smoothing', payload_all, args.out)}")


if __name__ == "__main__":
    main()
