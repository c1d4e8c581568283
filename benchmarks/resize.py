"""Frames over the pixel limit (resize=fit): what the shrink costs and what it certifies.

For a 4K street scene (3840x2160 JPEG), for each pixel limit: the server's path
stage by stage (decode, area shrink, one engine pass on the shrunk frame, the
certificate brought back to the source grid, the overlay PNG at source size), the
shrink timed beside Pillow's BOX filter on float planes (the fast formulation the
server does not use: its weights and rounding are Pillow's, so no operator norm is
proven for it), and what the certificate gives at eps: the guaranteed fraction with
the shrink's operator norm folded in beside the network radius alone (also sound,
since ||D|| <= 1, but it leaves the norm's factor unused). With the scene's own
labels as a source-size target: the worst-case pixel accuracy and mIoU on the source
grid, and what computing them costs.

    python benchmarks/resize.py --source 2160x3840 --max-pixels 4194304,2097152
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from _common import median_ms, parse_sizes, print_table, write_result
from PIL import Image
from tqdm import tqdm

from certseg.certify.resize import AreaResize
from certseg.data.synthetic import render_scene
from server.backends import ModelSpec, create_engine
from server.decode import Limits, decode_image
from server.pipeline import certify, stability_figures
from server.settings import Settings, default_model_path


def pillow_box(rgb8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's BOX resize of each float plane (the unproven baseline)."""
    h, w = size
    planes = [
        np.asarray(
            Image.fromarray(rgb8[..., c].astype(np.float32) / 255.0, "F").resize(
                (w, h), Image.Resampling.BOX
            )
        )
        for c in range(3)
    ]
    return np.stack(planes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="2160x3840", help="HxW of the frame sent.")
    ap.add_argument("--max-pixels", default="4194304,2097152", help="Pixel limits to fit.")
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ((H, W),) = parse_sizes(args.source)
    limits_list = [int(v) for v in args.max_pixels.split(",")]

    engine = create_engine(ModelSpec(None, default_model_path()), Settings())
    engine.load()
    info = engine.metadata()
    img, label = render_scene(np.random.default_rng(0), (H, W))
    target = np.asarray(label, np.uint8)
    rgb8 = np.ascontiguousarray((img.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, format="JPEG", quality=90)
    body = buf.getvalue()

    rows, payload = [], []
    for max_pixels in tqdm(limits_list, desc="pixel limits"):
        # as the server counts them: each side padded to the model's multiple
        multiple = info.card.pad_multiple
        limits = Limits(1 << 28, max_pixels, H * W, pad_multiple=multiple)
        plan = AreaResize.to_fit(H, W, max_pixels, multiple)
        decoded = decode_image(body, limits, "fit")
        shrunk = decoded.array
        box = pillow_box(decoded.rgb8, plan.network)
        src, whole = decoded.rgb8, Limits(1 << 28, H * W)
        t0 = time.perf_counter()
        names = ["mask", "logits"] if info.has_logits else ["mask"]
        outputs = {k: v[0] for k, v in engine.infer(shrunk[None], names).items()}
        infer_ms = (time.perf_counter() - t0) * 1000
        cert = certify(info, outputs, args.eps, None, 1, plan)
        scored = certify(info, outputs, args.eps, target, 1, plan).metrics
        stages = {
            "decode JPEG (no shrink)": median_ms(
                lambda lim=whole: decode_image(body, lim), args.repeats
            ),
            "area shrink (server)": median_ms(lambda p=plan, x=src: p.apply(x), args.repeats),
            "Pillow BOX on float planes (unproven)": median_ms(
                lambda s=plan.network, x=src: pillow_box(x, s), args.repeats
            ),
            "engine pass on the shrunk frame (first, cold)": infer_ms,
            "certificate on the source grid": median_ms(
                lambda o=outputs, p=plan: certify(info, o, args.eps, None, 1, p), args.repeats
            ),
            "certificate with a target (accuracy + mIoU)": median_ms(
                lambda o=outputs, p=plan: certify(info, o, args.eps, target, 1, p), args.repeats
            ),
            "stability (1/5/10% of the source pixels)": median_ms(
                lambda m=outputs["margin"], p=plan: stability_figures(info, m, p), args.repeats
            ),
            "overlay PNG at source size": median_ms(
                lambda c=cert, x=src: c.overlay_png(x, "hatch"), args.repeats
            ),
        }
        net_only = float(np.mean(outputs["radius"] > args.eps))
        figures = {
            "source": [H, W],
            "network": list(plan.network),
            "max_pixels": max_pixels,
            "operator_norm": plan.operator_norm,
            "rounding": plan.rounding(),
            "network_eps": plan.network_eps(args.eps),
            "eps": args.eps,
            "guaranteed_fraction": cert.guaranteed_fraction,
            "guaranteed_fraction_network_radius_only": net_only,
            "max_flips": cert.max_flips,
            "max_flips_fraction": cert.max_flips / (H * W),
            "stability": stability_figures(info, outputs["margin"], plan),
            "metrics_with_target": scored,
            "shrink_vs_pillow_max_abs_diff": float(np.abs(shrunk - box).max()),
            "stages_ms": stages,
        }
        payload.append(figures)
        size = f"{plan.network[0]}x{plan.network[1]}"
        for stage, ms in stages.items():
            rows.append([f"{H}x{W} -> {size}", stage, ms])
        rows.append(
            [
                f"{H}x{W} -> {size}",
                f"guaranteed at eps {args.eps}: folded norm / network radius only",
                f"{cert.guaranteed_fraction:.3f} / {net_only:.3f}",
            ]
        )
        rows.append(
            [
                f"{H}x{W} -> {size}",
                f"pixel acc / mIoU at eps {args.eps}: worst case (clean)",
                f"{scored['worst_case_pixel_accuracy']:.3f} ({scored['clean_pixel_accuracy']:.3f})"
                f" / {scored['worst_case_miou']:.3f} ({scored['clean_miou']:.3f})",
            ]
        )
    print_table("resize=fit, shipped model, CPU", ["frame", "stage", "ms"], rows)
    print(f"wrote {write_result('resize_cpu', {'rows': payload, 'model': info.name})}")


if __name__ == "__main__":
    main()
