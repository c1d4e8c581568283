#!/usr/bin/env bash
# Every GPU check of certseg in one run on the device machine (docs/gpu.md):
#   run(command="bash scripts/device_check.sh", carry=[".whl"], timeout_s=600)
# after `bash scripts/device_wheels.sh` here. Each step has its own time limit, so a
# slow one cannot take the others' results with it; all results land in $OUT.
# QUICK=1 runs the same steps at CPU-smoke scale (for trying the script anywhere).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The wheels are for the device's Python 3.12; elsewhere (a QUICK try) the env has all.
if ls .whl/*.whl >/dev/null 2>&1 && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step() {  # step NAME SECONDS CMD...: time-limited, logged to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.log"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PY" -c "import torch, numpy, onnxruntime; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.is_available() \
and torch.cuda.get_device_name()); print('onnxruntime', onnxruntime.__version__, \
onnxruntime.get_available_providers()); print('numpy', numpy.__version__)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
# Preflight: every module the steps import, before any step spends device time on
# failing to (a wheel missing from .whl once took every test and benchmark with it).
# Into machine.txt: $OUT brings back at most 8 files, and the steps write 7 more.
if ! "$PY" -c "import server.app, server.cli, certseg.cli, export.cli, clients.sdk" \
        >>"$OUT/machine.txt" 2>&1; then
    echo "== preflight failed: an import is missing"; tail -n 20 "$OUT/machine.txt"; exit 1
fi

step gpu_tests 180 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider -s \
    tests/test_reduced_precision.py tests/test_cuda_graphs.py tests/test_torch_compile.py \
    tests/test_export_tensorrt.py \
    tests/test_attacks.py tests/test_train_eval.py

if [ "${QUICK:-0}" = 1 ]; then
    step gpu_bench 200 "$PY" benchmarks/gpu.py --quick --out "$OUT/gpu.json"
    smooth=(--images 1 --settings 0.2:4)
else
    # M1 first (the targets are its); each model's results are written as soon as done.
    step gpu_bench 300 "$PY" benchmarks/gpu.py --requests 100 --frames 60 --m1-dir /tmp/certseg-m1 \
        --out "$OUT/gpu.json"
    smooth=(--images 8 --settings 0.2:120,0.3:60)
fi
step smoothing 90 "$PY" benchmarks/certify_vs_smoothing.py certseg/weights/street/model.pt \
    "${smooth[@]}" --out "$OUT/certify_vs_smoothing.json"
# Last, in what time is left before DEADLINE (s since the start; the call's timeout_s
# less a margin): torch.compile'd engines, at the one size of the 30 fps target, and the
# fastest of them end to end (its rows are written before the server starts). Each
# compile takes tens of seconds, so they are not in the main run.
if [ "${QUICK:-0}" = 1 ]; then
    compiled=(--models shipped --sizes 32x64 --calib-size 32x64 --engines torch-fp32,torch-fp32-compile
        --requests 8 --frames 4)
else
    # torch-fp32 first: the reference each engine's soundness is checked against; the
    # M1 export of gpu_bench is reused (--m1-dir), not made again
    compiled=(--models m1 --sizes 1024x2048 --calib-size 1024x2048 --m1-dir /tmp/certseg-m1
        --engines torch-fp32,torch-fp16-compile,torch-fp16-compile-graphs,torch-fp32-compile
        --requests 50 --frames 30)
fi
left=$(( ${DEADLINE:-570} - SECONDS ))
if [ "$left" -gt 30 ]; then
    step compile "$left" "$PY" benchmarks/gpu.py "${compiled[@]}" --batches 1 --calib-images 1 \
        --repeats 10 --out "$OUT/gpu_compile.json"
else
    echo "== compile: skipped, ${left}s left before the deadline"
fi
rm -f "$OUT"/*.part  # a write cut by a step's time limit ($OUT brings back 8 files)
ls -la "$OUT"
