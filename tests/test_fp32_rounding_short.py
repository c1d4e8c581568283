"""benchmarks/fp32_rounding.py at test scale: the shipped model's fp32 ONNX Runtime
margins against float64 torch on two small images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fp32_margins_are_within_rounding_of_float64(tmp_path):
    out = tmp_path / "fp32.json"
    cmd = [sys.executable, "fp32_rounding.py", "--images", "2", "--size", "48x64",
           "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    # fp32 rounds (the difference is not 0), by about 1e-6 on margins of order 1.
    assert 0 < result["max_margin_diff"] < 1e-4
    assert [i["kind"] for i in result["images"]] == ["scene", "noise"]
