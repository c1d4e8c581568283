"""Helpers shared by benchmark scripts: result files and tables."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from certseg.sizes import parse_size

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import os

    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'512x1024,1024x2048' -> [(512, 1024), (1024, 2048)]."""
    return [parse_size(s) for s in text.split(",") if s]


def time_in_turns(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warm: int = 1,
    alternate: bool = False,
    sync: Callable[[], None] = lambda: None,
    desc: str | None = None,
) -> dict[str, list[float]]:
    """ms per call of each fn, timed in turns (a, b, c, a, b, c, ...) after `warm`
    untimed rounds (0 when the caller made the warm-up calls): a machine that slows
    down or speeds up mid-run moves every fn alike, so their ratios hold. `alternate`
    reverses the order every other round, so that no fn always runs first; `sync`
    waits for queued device work (CUDA) before a clock is read; `desc` shows the
    rounds as a progress bar."""
    from tqdm import tqdm

    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in tqdm(range(warm + repeats), desc=desc, disable=desc is None):
        for name in names[::-1] if alternate and i % 2 else names:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            if i >= warm:
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def write_result(name: str, payload: dict[str, Any], path: Path | None = None) -> Path:
    """benchmarks/results/<name>.json (or `path`), with the machine's description."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a run stopped at its time limit mid-write leaves the last one
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    part.replace(path)
    return path


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    import shutil

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console(width=max(shutil.get_terminal_size().columns, 150)).print(table)


def street_like(h: int, w: int) -> np.ndarray:
    """A smooth image with mild noise (uint8 H x W x 3): PNG sizes and decode times
    like a photo's, unlike white noise (the worst case for PNG)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [
        0.5 + 0.5 * np.sin(6.3 * f * xx + p) * np.cos(6.3 * g * yy)
        for f, g, p in rng.uniform(1, 5, (3, 3))
    ]
    img = np.stack(chans, axis=-1) + rng.normal(0, 0.02, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def percentiles(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))
