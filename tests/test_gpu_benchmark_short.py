"""benchmarks/gpu.py at test scale on the CPU: the same engines the server builds,
calibrated against fp32 ONNX Runtime, timed, checked for soundness, then served.

Only what a CPU has runs here (torch fp32/bf16); the CUDA and TensorRT engines must
show up as skipped with their reason, never as a crash. On a GPU machine the same
script runs in full (scripts/device_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_quick_runs_sound_and_reports_skips(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "gpu.py", "--quick", "--out", str(out)],
        cwd=ROOT / "benchmarks",
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    got = r["models"]["shipped"]
    engines = {row["engine"] for row in got["rows"]}
    assert engines == {"torch-fp32", "torch-bf16", "ort-cpu"}
    assert {(row["size"], row["batch"]) for row in got["rows"]} == {
        ("32x64", 1), ("32x64", 2), ("48x96", 1), ("48x96", 2)
    }  # fmt: skip
    for row in got["rows"]:
        assert row["soundness_violations"] == 0, row
        assert row["images_per_s"] > 0 and row["margin_error_bound"] > 0
    bf16 = got["error_bounds"]["torch-bf16"]
    assert bf16["bound"] > got["error_bounds"]["torch-fp32"]["bound"]
    assert set(got["skipped"]) == {"ort-cuda", "trt-fp16"}
    assert all(why for why in got["skipped"].values())
    assert "head_share" in next(r_ for r_ in got["rows"] if r_["batch"] == 1)
    assert set(got["profiles"]) == {"torch-fp32", "torch-bf16"}  # the torch engines
    for prof in got["profiles"].values():
        assert prof["size"] == "48x96" and prof["gflop_per_image"] > 0 and prof["top_ops"]
        assert all(0 < op["share"] <= 1 for op in prof["top_ops"])
    (e2e,) = r["end_to_end"]
    assert e2e["size"] == "48x96" and e2e["ws_1_stream"]["fps"] > 0
    assert e2e["ws_1_stream_lockstep"]["depth"] == 1 and e2e["ws_1_stream"]["depth"] in (2, 3)
    assert e2e["rest_c8"]["per_s"] > 0 and e2e["ws_4_streams_fps"] > 0
    assert r["versions"]["torch"] and r["versions"]["onnxruntime"]
