"""Peak host memory of forward passes, by frame size: what `max_pixels` must bound.

A fully convolutional net's working memory grows with the pixels of a pass. Each
(size, variant) runs in a fresh process (peak RSS is per process): it loads the
shipped model into the engine the server uses (ONNX Runtime CPU, dynamic session)
and runs one image three times; the figures are the peak RSS after each pass and
the first pass's growth over the loaded engine per pixel. One more process per
variant runs `--mixed` random sizes after its largest, as clients' varied frames
would. Variants:

    served        the engine as served (memory pattern off)
    mem-pattern   the same with onnxruntime's memory pattern on (its default)

Speed of the two is timed in turns in one process on the same input.

    python benchmarks/engine_memory.py --sizes 512x1024,1024x2048,2048x2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import parse_sizes, print_table, time_in_turns, write_result
from tqdm import tqdm

from server.backends.ort import OnnxRuntimeEngine
from server.settings import Settings, default_model_path

GIB = 2**30
PASSES = 3
VARIANTS = ("served", "mem-pattern")
OUTPUTS = ["mask", "margin", "radius"]


class MemPatternEngine(OnnxRuntimeEngine):
    """The served engine with onnxruntime's memory pattern back on: the comparison."""

    def session_options(self, fixed: dict[str, int] | None = None) -> Any:
        so = super().session_options(fixed)
        so.enable_mem_pattern = True
        return so


def make_engine(variant: str, threads: int) -> OnnxRuntimeEngine:
    cls = MemPatternEngine if variant == "mem-pattern" else OnnxRuntimeEngine
    settings = Settings(intra_op_threads=threads, ort_specialize=False)
    engine = cls(None, default_model_path(), settings)
    engine.load()
    return engine


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(variant: str, shapes: list[tuple[int, int]], threads: int) -> dict[str, Any]:
    """In this process: load the engine, run one image of each shape in order."""
    engine = make_engine(variant, threads)
    loaded = _peak_rss_bytes()
    rng = np.random.default_rng(0)
    peaks, seconds = [], []
    for h, w in shapes:
        x = rng.random((1, 3, h, w), dtype=np.float32)
        t = time.perf_counter()
        engine.infer(x, OUTPUTS)
        seconds.append(time.perf_counter() - t)
        peaks.append(_peak_rss_bytes() / GIB)
    h, w = shapes[0]
    return {
        "loaded_gib": loaded / GIB,
        "peak_gib": peaks,
        "kib_per_pixel": (peaks[0] * GIB - loaded) / (h * w) / 1024,
        "seconds": seconds,
    }


def mixed_shapes(count: int, largest: tuple[int, int]) -> list[tuple[int, int]]:
    """Random sizes, multiples of 16 up to `largest`, the largest one first: what
    follows shows whether varied sizes grow the memory past the largest pass's."""
    rng = np.random.default_rng(1)
    h, w = largest
    rest = [
        (16 * int(rng.integers(4, h // 16)), 16 * int(rng.integers(4, w // 16)))
        for _ in range(count - 1)
    ]
    return [largest, *rest]


def median_s_in_turns(h: int, w: int, threads: int, rounds: int) -> dict[str, float]:
    """Median seconds per pass of each variant, in turns on the same input, after two
    warm-up passes of each, alternating which goes first."""
    engines = {v: make_engine(v, threads) for v in VARIANTS}
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    fns = {v: lambda e=engine: e.infer(x, OUTPUTS) for v, engine in engines.items()}
    times = time_in_turns(fns, rounds, warm=2, alternate=True, desc=f"turns {h}x{w}")
    return {v: float(np.median(t)) / 1000 for v, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512x1024,1024x2048,2048x2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns-sizes", default="512x1024,1024x2048")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, help="result file (default: benchmarks/results/)")
    ap.add_argument("--mixed", type=int, default=25, help="random sizes in one process")
    ap.add_argument("--mixed-largest", default="1024x2048")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # VARIANT:HxW,HxW..., the child's job
    args = ap.parse_args(argv)
    if args.one:
        variant, sizes = args.one.split(":")
        print(json.dumps(measure(variant, parse_sizes(sizes), args.threads)))
        return {}
    rows = []
    jobs = [
        (f"{h}x{w}", v, [(h, w)] * PASSES) for h, w in parse_sizes(args.sizes) for v in VARIANTS
    ]
    if args.mixed:
        ((h, w),) = parse_sizes(args.mixed_largest)
        label = f"{args.mixed} sizes <= {h}x{w}"
        jobs += [(label, v, mixed_shapes(args.mixed, (h, w))) for v in VARIANTS]
    for label, variant, shapes in tqdm(jobs, desc="fresh processes"):
        sizes = ",".join(f"{h}x{w}" for h, w in shapes)
        cmd = [
            sys.executable,
            __file__,
            "--one",
            f"{variant}:{sizes}",
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        row: dict[str, Any] = {
            "variant": variant,
            "size": label,
            "pixels": shapes[0][0] * shapes[0][1],
        }
        if done.returncode == -9:  # the kernel's OOM killer: the figure this is about
            row["killed"] = "SIGKILL (out of memory)"
        else:
            assert done.returncode == 0, done.stderr[-2000:]
            row.update(json.loads(done.stdout.splitlines()[-1]))
        rows.append(row)
    print_table(
        "forward passes, shipped model, ONNX Runtime CPU (a fresh process per row)",
        [
            "size",
            "variant",
            "peak RSS GiB, passes 1/2/../last",
            "KiB/px (pass 1)",
            "s, passes 1/2/3",
        ],
        [
            [r["size"], r["variant"], r["killed"], "", ""]
            if "killed" in r
            else [
                r["size"],
                r["variant"],
                " / ".join(f"{g:.2f}" for g in [*r["peak_gib"][:2], r["peak_gib"][-1]]),
                r["kib_per_pixel"],
                " / ".join(f"{s:.2f}" for s in r["seconds"][:3]),
            ]
            for r in rows
        ],
    )
    turns = {
        f"{h}x{w}": median_s_in_turns(h, w, args.threads, args.rounds)
        for h, w in parse_sizes(args.turns_sizes)
    }
    print_table(
        "median s per pass, in turns on the same input, after two warm-up passes",
        ["size", *VARIANTS],
        [[size, *(t[v] for v in VARIANTS)] for size, t in turns.items()],
    )
    result = {
        "threads": args.threads,
        "passes": PASSES,
        "rows": rows,
        "turns": {"rounds": args.rounds, "median_s": turns},
    }
    print(write_result("engine_memory_cpu", result, args.out))
    return result


if __name__ == "__main__":
    main()
