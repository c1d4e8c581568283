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
The head overhead is given four ways: wall-clock median and min against the
logits-only graph; the same with compute time (ONNX Runtime profiler, per-node
minimum kernel time over the runs, summed); and the head's share, its nodes'
compute time over the rest of the same graph (the steadiest figure on a shared
machine; it counts the logits-only graph's K-plane crop against the head, so it
overstates the overhead slightly).
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
from _common import parse_sizes
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from certseg.models import ModelCard, create_model, load_checkpoint
from certseg.nn import certified_lipschitz, fuse_module
from export.audit import audit_onnx, find_logits
from export.graph_head import DEFAULT_HEAD, HEAD_FORMULATIONS
from export.onnx_export import build_segmenter, export_graph

RESULTS = Path(__file__).resolve().parent / "results"


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


def head_nodes(path: Path) -> set[str]:
    """Names of the nodes computed from the logits (the head and its crop)."""
    model = onnx.load(str(path))
    if "mask" not in [o.name for o in model.graph.output]:
        return set()
    desc, names = {find_logits(model)}, set()
    for node in model.graph.node:
        if any(i in desc for i in node.input):
            desc.update(node.output)
            names.add(node.name)
    return names


def kernel_ms(path: Path, x: np.ndarray, threads: int, runs: int, tmp: str) -> tuple[float, float]:
    """(whole graph, head only) compute time from the ONNX Runtime profiler: for each
    node the minimum of its kernel time over `runs` runs, summed. Preemption on a busy
    machine only ever adds time, so per-node minima are the steadiest estimate of what
    each op costs; the head's share comes from the same runs as the total."""
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
    head = head_nodes(path)
    best: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            best[name] = min(best.get(name, np.inf), e["dur"] / 1e3)
    return sum(best.values()), sum(v for k, v in best.items() if k in head)


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
    console = Console(width=max(120, Console().width))

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
                    "kernel_ms": kernels[head][0] if kernels and k.startswith("ort ") else None,
                    "head_overhead_kernels": (
                        kernels[head][0] / kernels["logits"][0] - 1
                        if head in heads and kernels
                        else None
                    ),
                    # head kernels / the rest of the same graph's kernels, same runs
                    "head_share_kernels": (
                        kernels[head][1] / (kernels[head][0] - kernels[head][1])
                        if head in heads and kernels
                        else None
                    ),
                    **({"parity": parity} if k == "ort logits" else {}),
                }
            )

    table = Table(title=f"{card.arch} ({card.num_classes} classes), threads={args.threads}")
    cols = ("size", "backend", "median ms", "min ms", "kernel ms", "head: med/min/kern/share")
    for col in cols:
        table.add_column(col, justify="left" if col in ("size", "backend") else "right")
    for r in rows:
        ov = ""
        if r["head_overhead_median"] is not None:
            ov = f"{100 * r['head_overhead_median']:+.1f}% / {100 * r['head_overhead_min']:+.1f}%"
            if r["head_overhead_kernels"] is not None:
                ov += f" / {100 * r['head_overhead_kernels']:+.1f}%"
                ov += f" / {100 * r['head_share_kernels']:.1f}%"
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
