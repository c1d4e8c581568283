"""Export parity and latency: torch eager (parametrized, fused) vs ONNX Runtime CPU,
and the certificate head's overhead (logits-only graph vs full graph), same inputs,
same process.

    python benchmarks/export_parity.py                       # lipdeeplab_xs, 7 classes
    python benchmarks/export_parity.py --sizes 128x256 --repeats 3 --heads chain
    python benchmarks/export_parity.py --checkpoint model.pt --threads 0

Prints a table and writes JSON under benchmarks/results/. Timings are per image
(batch 1), median and min over --repeats runs after one warm-up, runs interleaved
across the compared graphs so that machine load drifts hit them alike. --threads 1
(default) pins torch and ONNX Runtime to one thread; 0 leaves both at their defaults.
The head overhead is given three ways: wall-clock median, wall-clock min, and the
ONNX Runtime profiler's summed kernel time (the steadiest on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from certseg.models import ModelCard, create_model, load_checkpoint
from certseg.nn import certified_lipschitz, fuse_module
from export.audit import audit_onnx
from export.graph_head import DEFAULT_HEAD, HEAD_FORMULATIONS
from export.onnx_export import build_segmenter, export_graph

RESULTS = Path(__file__).resolve().parent / "results"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def random_model(arch: str, classes: int, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=classes)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 64, 64))
    return model.eval()


def stride_of(arch: str) -> int:
    """Output stride (pad multiple) of the registered architectures."""
    return {"tiny": 2, "lipdeeplab_m2": 16}.get(arch, 8)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def kernel_ms(path: Path, x: np.ndarray, threads: int, runs: int, tmp: str) -> float:
    """Median over `runs` of the summed ONNX Runtime kernel times of one run (profiler):
    the graph's compute without session overheads, steadier than wall time on a busy
    machine."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tmp) / path.stem)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, {"image": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"]
    totals = [0.0] * len(spans)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for i, (a, b) in enumerate(spans):
                if a <= e["ts"] <= b:
                    totals[i] += e["dur"] / 1e3
                    break
    return float(np.median(totals[1:]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="lipdeeplab_xs")
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--sizes", default="512x1024,1024x2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="0 = library defaults")
    ap.add_argument("--heads", default=",".join(HEAD_FORMULATIONS))
    ap.add_argument("--skip-eager", action="store_true", help="ONNX Runtime only")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel-time overhead")
    ap.add_argument("--out", type=Path, default=RESULTS / "export_parity.json")
    args = ap.parse_args(argv)
    console = Console()

    if args.checkpoint:
        model, card = load_checkpoint(args.checkpoint, fused=False)
    else:
        model = random_model(args.arch, args.classes)
        card = ModelCard(
            name=f"random-{args.arch}",
            arch=args.arch,
            num_classes=args.classes,
            classes=[f"c{i}" for i in range(args.classes)],
            palette=[(0, 0, 0)] * args.classes,
            pad_multiple=stride_of(args.arch),
        )
    fused = fuse_module(model).eval()
    lip = certified_lipschitz(fused)
    heads = [h for h in args.heads.split(",") if h]
    if args.threads:
        torch.set_num_threads(args.threads)

    graphs, export_s = {}, {}
    workdir = tempfile.TemporaryDirectory()
    tmp = workdir.name
    for head in ["logits", *heads]:
        t = time.perf_counter()
        proto = export_graph(build_segmenter(fused, card, lip, head=head))
        export_s[head] = time.perf_counter() - t
        path = Path(tmp) / f"{head}.onnx"
        onnx.save(proto, path)
        graphs[head] = path
    audit = audit_onnx(graphs[heads[0]], check_head=False)
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
    sessions = {
        h: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        for h, p in graphs.items()
    }

    m = card.pad_multiple
    rows = []
    for h, w in parse_sizes(args.sizes):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        xn = x.numpy()

        def eager(net, x=x, h=h, w=w):
            with torch.no_grad():
                xp = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m))
                return net(xp)[:, :, :h, :w]

        runs: dict[str, callable] = {}
        if not args.skip_eager:
            runs["torch parametrized"] = lambda: eager(model)
            runs["torch fused"] = lambda: eager(fused)
        for head, s in sessions.items():
            runs[f"ort {head}"] = lambda s=s, xn=xn: s.run(None, {"image": xn})
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k] += timed(fn, 1)

        ref = eager(model).numpy() if not args.skip_eager else None
        logits = sessions["logits"].run(None, {"image": xn})[0]
        parity = {}
        if ref is not None:
            parity["max_abs_logits_ort_vs_parametrized"] = float(np.abs(logits - ref).max())
            top = np.sort(ref, axis=1)
            margin_ref = top[:, -1] - top[:, -2]
            for head in heads:
                mask = sessions[head].run(None, {"image": xn})[0]
                sure = margin_ref > 1e-4
                parity[f"mask_agreement_{head}"] = float((mask[sure] == ref.argmax(1)[sure]).mean())
        kernels = {}
        if not args.no_profile:
            kernels = {
                h: kernel_ms(p, xn, args.threads, args.repeats, tmp) for h, p in graphs.items()
            }
        base_med = float(np.median(times["ort logits"]))
        base_min = float(np.min(times["ort logits"]))
        for k, ts in times.items():
            head = k.removeprefix("ort ")
            rows.append(
                {
                    "size": f"{h}x{w}",
                    "backend": k,
                    "median_ms": 1e3 * float(np.median(ts)),
                    "min_ms": 1e3 * float(np.min(ts)),
                    "head_overhead_median": (
                        float(np.median(ts)) / base_med - 1 if head in heads else None
                    ),
                    "head_overhead_min": (
                        float(np.min(ts)) / base_min - 1 if head in heads else None
                    ),
                    "kernel_ms": kernels.get(head) if k.startswith("ort ") else None,
                    "head_overhead_kernels": (
                        kernels[head] / kernels["logits"] - 1 if head in heads and kernels else None
                    ),
                    **({"parity": parity} if k == "ort logits" else {}),
                }
            )

    table = Table(title=f"{card.arch} ({card.num_classes} classes), threads={args.threads}")
    cols = ("size", "backend", "median ms", "min ms", "kernel ms", "head: median/min/kernels")
    for col in cols:
        table.add_column(col, justify="left" if col in ("size", "backend") else "right")
    for r in rows:
        ov = ""
        if r["head_overhead_median"] is not None:
            ov = f"{100 * r['head_overhead_median']:+.1f}% / {100 * r['head_overhead_min']:+.1f}%"
            if r["head_overhead_kernels"] is not None:
                ov += f" / {100 * r['head_overhead_kernels']:+.1f}%"
        km = "" if r["kernel_ms"] is None else f"{r['kernel_ms']:.1f}"
        table.add_row(
            r["size"], r["backend"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", km, ov
        )
    console.print(table)
    for r in rows:
        if "parity" in r:
            console.print(f"{r['size']}: {json.dumps(r['parity'])}")
    result = {
        "arch": card.arch,
        "classes": card.num_classes,
        "threads": args.threads,
        "repeats": args.repeats,
        "default_head": DEFAULT_HEAD,
        "lipschitz_torch": lip,
        "lipschitz_onnx": audit.lipschitz_audited,
        "export_seconds": export_s,
        "rows": rows,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")
    workdir.cleanup()
    return result


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main()
