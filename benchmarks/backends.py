"""Latency and agreement of every backend that can serve an exported model here.

    python benchmarks/backends.py                          # random lipdeeplab_xs
    python benchmarks/backends.py --onnx out/model.onnx --sizes 512x1024 --repeats 10
    python benchmarks/backends.py --checkpoint model.pt --backends ort-cpu,trt-fp16

Backends (those not available on the machine are reported as skipped):
  torch-cpu       the fused model in a CertifiedSegmenter, eager (needs the checkpoint)
  ort-cpu         ONNX Runtime CPU, --threads intra-op threads (the reference)
  ort-cpu-1t      ONNX Runtime CPU, one thread
  torch-cuda      eager on the GPU
  ort-cuda        ONNX Runtime CUDA execution provider
  trt-fp32/16     TensorRT engines from the same file, with the measured margin error
                  bound subtracted (export/tensorrt.py)
Every backend gets the same images; agreement is measured against ort-cpu:
largest |margin difference| and the fraction of pixels with the same class.
Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
ALL = ("torch-cpu", "ort-cpu", "ort-cpu-1t", "torch-cuda", "ort-cuda", "trt-fp32", "trt-fp16")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def _random_checkpoint(arch: str, classes: int, folder: Path) -> Path:
    import torch

    from certseg.models import ModelCard, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(arch, num_classes=classes)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 64, 64))
    model.eval()
    card = ModelCard(
        name=f"random-{arch}",
        arch=arch,
        num_classes=classes,
        classes=[f"c{i}" for i in range(classes)],
        palette=[(0, 0, 0)] * classes,
        pad_multiple={"tiny": 2, "lipdeeplab_m2": 16}.get(arch, 8),
    )
    path = folder / f"{arch}.pt"
    save_checkpoint(path, model, card)
    return path


def _ort(path: Path, threads: int, providers: list[str]) -> Callable:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if providers[0] not in sess.get_providers():
        raise RuntimeError(f"{providers[0]} not available")
    names = [o.name for o in sess.get_outputs()]
    return lambda x: dict(zip(names, sess.run(None, {"image": x}), strict=True))


def _torch(checkpoint: Path, device: str, threads: int) -> Callable:
    import torch

    from export.onnx_export import build_segmenter, resolve_model

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    model, card, lip = resolve_model(checkpoint)
    seg = build_segmenter(model, card, lip).to(device)

    def run(x):
        with torch.no_grad():
            mask, margin, _ = seg(torch.from_numpy(x).to(device))
            if device == "cuda":
                torch.cuda.synchronize()
            return {"mask": mask.cpu().numpy(), "margin": margin.cpu().numpy()}

    return run


def _trt(path: Path, precision: str, sizes, calib_images, console) -> tuple[Callable, dict]:
    from export.tensorrt import Profile, TrtRunner, build_engine, calibrate_error_bound

    hs, ws = [s[0] for s in sizes], [s[1] for s in sizes]
    profile = Profile.for_sizes((max(hs), max(ws)), (max(hs), max(ws)), (min(hs), min(ws)), 1)
    info = build_engine(path, precision, profile, Path("~/.cache/certseg/trt"))
    console.print(f"{precision} engine {'cached' if info.cached else 'built'}: {info.path}")
    bound = calibrate_error_bound(info, path, calib_images)
    runner = TrtRunner(info.path)
    return runner, {"error_bound": bound.bound, "engine_key": info.key}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, default=None, help="an exported model.onnx")
    ap.add_argument("--checkpoint", type=Path, default=None, help="exported if --onnx is not given")
    ap.add_argument("--arch", default="lipdeeplab_xs", help="random model without checkpoint")
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--sizes", default="512x1024,1024x2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="ort-cpu threads, 0 = default")
    ap.add_argument("--backends", default=",".join(ALL))
    ap.add_argument("--out", type=Path, default=RESULTS / "backends.json")
    args = ap.parse_args(argv)
    console = Console(width=max(120, Console().width))
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)

    checkpoint = args.checkpoint
    if args.onnx is None:
        from export.onnx_export import export_onnx

        checkpoint = checkpoint or _random_checkpoint(args.arch, args.classes, folder)
        args.onnx = export_onnx(checkpoint, folder / "export").onnx_path
    meta = {
        p.key: p.value for p in onnx.load(str(args.onnx), load_external_data=False).metadata_props
    }
    lip = float(meta.get("certseg.lipschitz_audited", "nan"))
    sizes = parse_sizes(args.sizes)
    rng = np.random.default_rng(0)
    images = {s: rng.random((1, 3, *s), dtype=np.float32) for s in sizes}

    backends: dict[str, Callable] = {}
    info: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    wanted = [b for b in args.backends.split(",") if b]
    if "ort-cpu" not in wanted:
        wanted.insert(0, "ort-cpu")  # the reference
    for name in wanted:
        try:
            if name == "ort-cpu":
                backends[name] = _ort(args.onnx, args.threads, ["CPUExecutionProvider"])
            elif name == "ort-cpu-1t":
                backends[name] = _ort(args.onnx, 1, ["CPUExecutionProvider"])
            elif name == "ort-cuda":
                backends[name] = _ort(
                    args.onnx, 0, ["CUDAExecutionProvider", "CPUExecutionProvider"]
                )
            elif name in ("torch-cpu", "torch-cuda"):
                if checkpoint is None:
                    raise RuntimeError("needs --checkpoint")
                backends[name] = _torch(checkpoint, name.split("-")[1], args.threads)
            elif name in ("trt-fp32", "trt-fp16"):
                calib = [images[s] for s in sizes] * 2
                backends[name], info[name] = _trt(args.onnx, name[4:], sizes, calib, console)
            else:
                raise RuntimeError(f"unknown backend (known: {', '.join(ALL)})")
        except (RuntimeError, ImportError, OSError, ValueError) as err:
            skipped[name] = str(err).splitlines()[0][:120]

    rows = []
    for s in sizes:
        x = images[s]
        ref = backends["ort-cpu"](x)
        for name, fn in backends.items():
            out = fn(x)  # warm-up, and the outputs to compare
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
            row = {
                "size": f"{s[0]}x{s[1]}",
                "backend": name,
                "median_ms": 1e3 * float(np.median(ts)),
                "min_ms": 1e3 * float(np.min(ts)),
                "max_abs_margin_diff": float(np.max(np.abs(out["margin"] - ref["margin"]))),
                "mask_agreement": float(np.mean(out["mask"] == ref["mask"])),
                **info.get(name, {}),
            }
            if "error_bound" in row and np.isfinite(lip):
                from certseg.certify import certified_margins

                cert, _ = certified_margins(out["margin"], row["error_bound"], lip)
                row["certified_fraction_eps0"] = float(np.mean(cert > 0))
            rows.append(row)

    table = Table(title=f"backends on {args.onnx.name} (batch 1)")
    for col in ("size", "backend", "median ms", "min ms", "max |dmargin|", "same class", "notes"):
        table.add_column(col, justify="left" if col in ("size", "backend", "notes") else "right")
    for r in rows:
        notes = f"error bound {r['error_bound']:.2e}" if "error_bound" in r else ""
        table.add_row(
            r["size"],
            r["backend"],
            f"{r['median_ms']:.1f}",
            f"{r['min_ms']:.1f}",
            f"{r['max_abs_margin_diff']:.1e}",
            f"{100 * r['mask_agreement']:.3f}%",
            notes,
        )
    console.print(table)
    for name, why in skipped.items():
        console.print(f"skipped {name}: {why}", style="dim", markup=False)
    result = {
        "onnx": str(args.onnx),
        "lipschitz_audited": lip,
        "repeats": args.repeats,
        "threads": args.threads,
        "rows": rows,
        "skipped": skipped,
        "machine": {
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main()
