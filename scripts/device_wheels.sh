#!/usr/bin/env bash
# Wheels the GPU machine lacks, for scripts/device_check.sh (run here, where PyPI is
# reachable; the device reaches nothing). Its image has Python 3.12 with torch (CUDA),
# numpy, onnx, onnxruntime (CPU), pillow, httpx, rich, typer, pytest, hypothesis and
# prometheus-client; certseg's server needs these too. Versions are the ones the CPU
# suite runs with. TensorRT and onnxruntime-gpu cannot travel: onnxruntime-gpu is a
# 256 MB wheel and tensorrt's libraries come from NVIDIA's own index, against 64 MiB
# for everything a device call carries (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
# With their dependencies (4 MB): fastapi 0.165 imports opentelemetry-api, which the
# image lacks, and a hand-kept list of wheels missed it (every GPU test and benchmark
# would have died on import). Those the image has come too, and shadow its copies.
python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    websockets==17.4 python-multipart==0.0.34 array-api-compat==1.16.0 \
    annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2 \
    typing-extensions==4.16.0
du -sh .whl
