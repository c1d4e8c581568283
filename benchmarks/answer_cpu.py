"""The CPU side of one answer, stage by stage: what caps fps once the GPU is fast.

A GPU engine segments a 1024x2048 frame in milliseconds; the server's answer also
needs the frame decoded, the certificate figures, and the overlay and mask encoded,
all on the CPU. This times each stage on the shipped model's real outputs for a
street scene, with the straightforward formulation it replaced side by side (same
process, same input, same result checked):

    stage     now                                   baseline
    decode    transpose, then divide                (rgb8 / 255).transpose
    certify   margin pre-filter + cost buckets      costs of all pixels + selection
    classes   max_flips_by_class (one or two passes) max_flips per class (K passes)
    gains     max_gains_by_class (sampled guess)      float64 gaps of every pixel, sorted
    stability margins selected, k smallest costed       float64 costs of every pixel, sorted
    overlay   indexed PNG (server.png)              RGB render + RGB PNG (Pillow)
    mask      8-bit PNG, unfiltered (server.png)    8-bit PNG, Pillow (all filters tried)

    python benchmarks/answer_cpu.py --sizes 512x1024,1024x2048
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from _common import median_ms, print_table, write_result
from PIL import Image

from certseg.certify import (
    STABILITY_FRACTIONS,
    max_flips,
    max_flips_by_class,
    max_gains_by_class,
    stability,
)
from certseg.certify import budget as budget_mod
from certseg.certify.budget import flip_costs
from certseg.data.synthetic import render_scene
from server.backends import ModelSpec, create_engine
from server.decode import Limits, decode_image
from server.overlay import encode_mask_png, encode_png, overlay_png, render_overlay
from server.settings import Settings, default_model_path


def flips_by_sort(margin: np.ndarray, eps: float, L: float) -> int:
    """The definition: longest prefix of the sorted costs within the budget."""
    budget = (L * eps) ** 2
    return int(np.sum(np.cumsum(np.sort(flip_costs(margin).ravel())) <= budget * (1 + 1e-9)))


def flips_by_selection(margin: np.ndarray, eps: float, L: float) -> int:
    """What the server ran before: float64 costs of every pixel, then selection alone."""
    saved, budget_mod._BUCKET_MIN = budget_mod._BUCKET_MIN, 1 << 62
    try:
        return budget_mod._max_flips_select(flip_costs(margin).ravel(), (L * eps) ** 2)
    finally:
        budget_mod._BUCKET_MIN = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512x1024,1024x2048")
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    engine = create_engine(ModelSpec(None, default_model_path()), Settings())
    engine.load()
    info = engine.metadata()
    L, palette = info.lipschitz, info.card.palette
    K = len(palette)
    rows, payload = [], []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        img, _ = render_scene(np.random.default_rng(0), (h, w))
        rgb8 = np.ascontiguousarray((img.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))
        jpeg = io.BytesIO()
        Image.fromarray(rgb8).save(jpeg, format="JPEG", quality=90)
        out = engine.infer(img[None], ["mask", "logits"])
        mask, margin, radius = out["mask"][0], out["margin"][0], out["radius"][0]
        logits = out["logits"][0]
        limits = Limits(max_bytes=1 << 28, max_pixels=1 << 26)
        body = jpeg.getvalue()
        decoded = decode_image(body, limits)

        def old_convert(rgb8=decoded.rgb8):
            return np.ascontiguousarray((rgb8.astype(np.float32) / 255.0).transpose(2, 0, 1))

        def new_convert(rgb8=decoded.rgb8):
            a = np.ascontiguousarray(rgb8.transpose(2, 0, 1)).astype(np.float32)
            a /= np.float32(255.0)
            return a

        def old_overlay(mask=mask, radius=radius):
            return encode_png(render_overlay(mask, radius, args.eps, palette, None, "hatch"))

        def new_overlay(mask=mask, radius=radius):
            return overlay_png(mask, radius, args.eps, palette, None, "hatch")

        def flips_per_class_calls(m=margin, labels=mask):
            return [int(max_flips(m, args.eps, L, valid=labels == c)) for c in range(K)]

        assert max_flips_by_class(margin, mask, K, args.eps, L).tolist() == flips_per_class_calls()

        def gains_by_sort(z=logits, labels=mask):
            top = z.max(axis=0).astype(np.float64)
            budget = (L * args.eps) ** 2
            out = []
            for c in range(K):
                gap = (top - z[c].astype(np.float64))[labels != c]
                out.append(int(np.sum(np.cumsum(np.sort(gap * gap / 2)) <= budget)))
            return out

        def gains_now(z=logits, labels=mask):
            return max_gains_by_class(z, labels, args.eps, L)

        def stability_by_sort(m=margin):
            costs = np.cumsum(np.sort(flip_costs(m).ravel()))
            ks = [int(np.ceil(a * m.size)) for a in STABILITY_FRACTIONS]
            return np.sqrt(costs[np.asarray(ks) - 1]) / L

        def stability_now(m=margin):
            return stability(m, STABILITY_FRACTIONS, L)

        assert np.allclose(stability_now(), stability_by_sort(), rtol=3e-7, atol=0)
        assert (stability_now() <= stability_by_sort()).all()
        fast, exact = gains_now().tolist(), gains_by_sort()
        assert all(e <= f <= e + 1 for f, e in zip(fast, exact, strict=True)), (fast, exact)
        assert np.array_equal(old_convert(), new_convert())
        exact = flips_by_sort(margin, args.eps, L)
        assert max_flips(margin, args.eps, L) == flips_by_selection(margin, args.eps, L) == exact
        ov = np.asarray(Image.open(io.BytesIO(new_overlay())).convert("RGB"))
        assert np.array_equal(ov, render_overlay(mask, radius, args.eps, palette, None, "hatch"))
        png, _ = encode_mask_png(mask, len(palette))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), mask)
        stages = {
            "decode (JPEG + float)": (
                median_ms(lambda b=body, lim=limits: decode_image(b, lim), args.repeats),
                None,
            ),
            "float conversion": (
                median_ms(new_convert, args.repeats),
                median_ms(old_convert, args.repeats),
            ),
            "certify max_flips": (
                median_ms(lambda m=margin: max_flips(m, args.eps, L), args.repeats),
                median_ms(lambda m=margin: flips_by_selection(m, args.eps, L), args.repeats),
            ),
            "classes (per-class max_flips)": (
                median_ms(
                    lambda m=margin, lab=mask: max_flips_by_class(m, lab, K, args.eps, L),
                    args.repeats,
                ),
                median_ms(flips_per_class_calls, args.repeats),
            ),
            "gains (output gains, logits)": (
                median_ms(gains_now, args.repeats),
                median_ms(gains_by_sort, args.repeats),
            ),
            "stability (1/5/10%)": (
                median_ms(stability_now, args.repeats),
                median_ms(stability_by_sort, args.repeats),
            ),
            "overlay PNG": (
                median_ms(new_overlay, args.repeats),
                median_ms(old_overlay, args.repeats),
            ),
            "mask PNG": (
                median_ms(lambda m=mask: encode_mask_png(m, len(palette)), args.repeats),
                median_ms(lambda m=mask: encode_png(m.astype(np.uint8)), args.repeats),
            ),
        }
        # decode includes the conversion; classes, gains and stability are their own
        # outputs (classes and stability REST defaults, stream options): rows of their own
        optional = ("float conversion", "classes (per-class max_flips)", "stability (1/5/10%)")
        total = sum(
            v[0] for k, v in stages.items() if k not in optional and not k.startswith("gains")
        )
        for stage, (now, before) in stages.items():
            ratio = before / now if before else float("nan")
            rows.append([size, stage, now, before if before else "-", ratio])
            payload.append(
                {"size": size, "stage": stage, "ms": now, "baseline_ms": before, "speedup": ratio}
            )
        rows.append([size, "answer total (decode+certify+overlay+mask)", total, "-", "-"])
        payload.append({"size": size, "stage": "total", "ms": total})
    print_table(
        f"CPU stages of one answer ({info.name}, eps {args.eps}, 1 thread each)",
        ["size", "stage", "ms", "baseline ms", "speedup"],
        rows,
    )
    print(write_result("answer_cpu", {"eps": args.eps, "model": info.name, "rows": payload}))


if __name__ == "__main__":
    main()
