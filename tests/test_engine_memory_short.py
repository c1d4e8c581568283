"""benchmarks/engine_memory.py at test scale: the served ONNX Runtime CPU engine's
peak memory does not grow on repeated passes of one size (onnxruntime's memory
pattern, which the served sessions turn off, nearly doubled it on the second), and
after a pass larger than its steady sizes it gives the arena back (onnxruntime's
default keeps it)."""

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
        "--regrowth", "256x512,32x64",
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
        for variant in ("served", "mem-pattern", "arena-kept")
    }
    for size in ("256x512", "4 sizes <= 192x384"):  # the same size again, or smaller ones
        served = rows[size, "served"]
        first, *later = (g - served["loaded_gib"] for g in served["peak_gib"])
        assert first > 0 and all(g <= 1.2 * first for g in later), served
    served = rows["256x512", "served"]
    assert 0.5 < served["kib_per_pixel"] < 8, served  # the order of the documented 1.5
    # held between requests, over the loaded engine: after the 256x512 passes (a stream
    # keeps its arena), then after a window of card-size passes (the served one gave it back)
    served, kept = (rows["256x512", v] for v in ("served", "arena-kept"))
    grown = kept["peak_gib"][0] - kept["loaded_gib"]
    for r in (served, kept):
        assert r["rss_held_gib"] - r["loaded_gib"] > 0.5 * grown, r
    assert kept["rss_after_small_gib"] - kept["loaded_gib"] > 0.5 * grown, kept
    assert served["rss_after_small_gib"] - served["loaded_gib"] < 0.25 * grown, served
    assert set(result["turns"]["median_s"]["32x64"]) == {"served", "mem-pattern", "arena-kept"}
    assert set(result["regrowth"]["median_ms"]) == {"served", "arena-kept"}
