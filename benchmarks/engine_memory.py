"""Peak host memory of forward passes, by frame size: what `max_pixels` must bound.

A fully convolutional net's working memory grows with the pixels of a pass. Each
(size, variant) runs in a fresh process (peak RSS is per process): it loads the
shipped model into the engine the server uses (ONNX Runtime CPU, dynamic session)
and runs one image three times, then `ARENA_WINDOW_PASSES` passes of the card's size;
the figures are the peak RSS after each pass, the RSS held after the three passes
and after the small ones (what the server keeps between requests) and the first
pass's growth over the loaded engine per pixel. One more process per variant runs
`--mixed` random sizes after its largest, as clients' varied frames would. Variants:

    served        the engine as served: memory pattern off, the arena given back
                  once the pass that grew it is `ARENA_WINDOW_PASSES` passes old
    mem-pattern   the same with onnxruntime's memory pattern on (its default)
    arena-kept    the served engine whose arena keeps every chunk (onnxruntime's default)

Speed of the three is timed in turns in one process on the same input (a stream of
one size: no shrink); the cost of a shrink, the regrowth of the next large pass, is
timed in turns as a large pass after `ARENA_WINDOW_PASSES` small ones.

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

from server.backends.ort import ARENA_WINDOW_PASSES, OnnxRuntimeEngine
from server.settings import Settings, default_model_path

GIB = 2**30
PASSES = 3
VARIANTS = ("served", "mem-pattern", "arena-kept")
OUTPUTS = ["mask", "margin", "radius"]


class MemPatternEngine(OnnxRuntimeEngine):
    """The served engine with onnxruntime's memory pattern back on: the comparison."""

    def session_options(self, fixed: dict[str, int] | None = None) -> Any:
        so = super().session_options(fixed)
        so.enable_mem_pattern = True
        return so


class ArenaKeptEngine(OnnxRuntimeEngine):
    """The served engine without the arena shrink after large passes: the comparison."""

    def run_options(self, images: np.ndarray) -> Any:
        return None


def make_engine(variant: str, threads: int) -> OnnxRuntimeEngine:
    cls = {"mem-pattern": MemPatternEngine, "arena-kept": ArenaKeptEngine}.get(
        variant, OnnxRuntimeEngine
    )
    settings = Settings(intra_op_threads=threads, ort_specialize=False)
    engine = cls(None, default_model_path(), settings)
    engine.load()
    return engine


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_bytes() -> int:
    """Resident now (Linux): what the process holds once a pass is done."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def measure(variant: str, shapes: list[tuple[int, int]], threads: int) -> dict[str, Any]:
    """In this process: load the engine, run one image of each shape in order, then
    `ARENA_WINDOW_PASSES` of the card's size."""
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
    held = _rss_bytes() / GIB
    small = rng.random((1, 3, *engine.info.card.input_size), dtype=np.float32)
    for _ in range(ARENA_WINDOW_PASSES):
        engine.infer(small, OUTPUTS)
    h, w = shapes[0]
    return {
        "loaded_gib": loaded / GIB,
        "peak_gib": peaks,
        "rss_held_gib": held,
        "rss_after_small_gib": _rss_bytes() / GIB,
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


def regrowth_ms_in_turns(
    large: tuple[int, int], small: tuple[int, int], threads: int, rounds: int
) -> dict[str, float]:
    """Median ms of a `large` pass after `ARENA_WINDOW_PASSES` `small` ones, served (its
    arena given back after the last small one) vs arena-kept, in turns: what giving
    a one-off large image's memory back costs the next one."""
    engines = {v: make_engine(v, threads) for v in ("served", "arena-kept")}
    rng = np.random.default_rng(0)
    big = rng.random((1, 3, *large), dtype=np.float32)
    x = rng.random((1, 3, *small), dtype=np.float32)
    times: dict[str, list[float]] = {v: [] for v in engines}
    for i in tqdm(range(rounds + 1), desc=f"regrowth {large[0]}x{large[1]}"):
        for v in list(engines)[:: -1 if i % 2 else 1]:
            t = time.perf_counter()
            engines[v].infer(big, OUTPUTS)
            if i:  # round 0 warms both up
                times[v].append((time.perf_counter() - t) * 1000)
            for _ in range(ARENA_WINDOW_PASSES):
                engines[v].infer(x, OUTPUTS)
    return {v: float(np.median(t)) for v, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512x1024,1024x2048,2048x2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns-sizes", default="512x1024,1024x2048")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, help="result file (default: benchmarks/results/)")
    ap.add_argument("--mixed", type=int, default=25, help="random sizes in one process")
    ap.add_argument("--mixed-largest", default="1024x2048")
    ap.add_argument(
        "--regrowth", default="1024x2048,256x512", help="LARGE,SMALL: sizes of the regrowth turns"
    )
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
            "RSS held GiB: after them / small passes",
            "KiB/px (pass 1)",
            "s, passes 1/2/3",
        ],
        [
            [r["size"], r["variant"], r["killed"], "", "", ""]
            if "killed" in r
            else [
                r["size"],
                r["variant"],
                " / ".join(f"{g:.2f}" for g in [*r["peak_gib"][:2], r["peak_gib"][-1]]),
                f"{r['rss_held_gib']:.2f} / {r['rss_after_small_gib']:.2f}",
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
    large, small = parse_sizes(args.regrowth)
    regrowth = regrowth_ms_in_turns(large, small, args.threads, args.rounds)
    print_table(
        f"median ms of a {large[0]}x{large[1]} pass after {ARENA_WINDOW_PASSES} of"
        f" {small[0]}x{small[1]}, in turns",
        ["served (arena given back)", "arena-kept"],
        [[regrowth["served"], regrowth["arena-kept"]]],
    )
    result = {
        "threads": args.threads,
        "passes": PASSES,
        "rows": rows,
        "turns": {"rounds": args.rounds, "median_s": turns},
        "window_passes": ARENA_WINDOW_PASSES,
        "regrowth": {"large": list(large), "small": list(small), "median_ms": regrowth},
    }
    print(write_result("engine_memory_cpu", result, args.out))
    return result


if __name__ == "__main__":
    main()
