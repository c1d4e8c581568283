"""benchmarks/load.py at test scale: a real server process, REST at 1..64 clients with
a short queue, WebSocket streams and a short soak. The long soak is the benchmark's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server_support import tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent


def test_load_sheds_with_503_never_errors_and_memory_stays_flat(tmp_path):
    out = tmp_path / "load.json"
    cmd = [
        sys.executable,
        "load.py",
        str(tiny_model_dir()),
        "--size", "64x96",
        "--levels", "1,16,64",
        "--seconds", "2",
        "--streams", "4",
        "--stream-seconds", "2",
        "--warm-seconds", "3",
        "--soak-seconds", "4",
        "--soak-concurrency", "16",
        "--soak-streams", "2",
        "--max-queue", "2",
        "--out", str(out),
        "--plot", str(tmp_path / "load.png"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        cmd, cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    for level in (*r["levels"].values(), r["soak"]["rest"], r["warmup"]["rest"]):
        assert level["errors"] == {} and level["shed_without_retry_after"] == 0, level
        assert level["ok"] > 0
    assert r["levels"]["64"]["shed_rate"] > 0  # 64 clients, queue of 2: shed, not queued
    assert r["levels"]["1"]["shed_rate"] == 0
    s = r["streams"]
    assert s["frames"] > 0 and s["errors"] == 0 and s["closed"] == 0
    assert s["dropped"] == 0 and r["soak"]["stream"]["dropped"] == 0  # depth + 1 in flight
    assert abs(r["rss_soak_growth"]) < 0.10, r["rss_soak_growth"]
    assert r["serves_after"]
    assert (tmp_path / "load.png").stat().st_size > 10_000
