"""benchmarks/engine_memory.py at test scale: the served ONNX Runtime CPU engine's
peak memory does not grow on repeated passes of one size (onnxruntime's memory
pattern, which the served sessions turn off, nearly doubled it on the second)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_served_engine_memory_stays_flat_over_passes(tmp_path):
    out = tmp_path / "memory.json"
    cmd = [
        sys.executable, "engine_memory.py",
        "--sizes", "256x512",
        "--turns-sizes", "32x64",
        "--rounds", "1",
        "--mixed", "4",
        "--mixed-largest", "192x384",
        "--threads", "1",
        "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["size"], r["variant"]): r for r in result["rows"]}
    assert set(rows) == {
        (size, variant)
        for size in ("256x512", "4 sizes <= 192x384")
        for variant in ("served", "mem-pattern")
    }
    for size in ("256x512", "4 sizes <= 192x384"):  # the same size again, or smaller ones
        served = rows[size, "served"]
        first, *later = (g - served["loaded_gib"] for g in served["peak_gib"])
        assert first > 0 and all(g <= 1.2 * first for g in later), served
    served = rows["256x512", "served"]
    assert 0.5 < served["kib_per_pixel"] < 8, served  # the order of the documented 1.5
    assert set(result["turns"]["median_s"]["32x64"]) == {"served", "mem-pattern"}
