"""TensorRT engines from the audited ONNX file: built once, cached, run with cuda-python.

GPU-only paths (build_engine, TrtRunner, calibrate_error_bound) import tensorrt and
cuda-python lazily; the cache key and profiles are plain Python (tested on CPU).

An engine's margins differ from fp32 ONNX Runtime's (fp16, or fp32 with other kernels
and summation orders), so it certifies only after subtracting a measured error bound:
`calibrate_error_bound` measures it with `export.error_bound` and stores it beside
the engine. fp32 engines are built with TF32 disabled.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.error_bound import ErrorBound, calibrate

__all__ = [
    "PRECISIONS",
    "EngineInfo",
    "Profile",
    "TrtRunner",
    "build_engine",
    "calibrate_error_bound",
    "cuda_check",
    "cuda_runtime",
    "engine_cache_key",
    "gpu_identity",
]

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Profile:
    """Optimization profile of the `image` input: (N, 3, H, W) at min / opt / max."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            shape = tuple(int(v) for v in getattr(self, name))
            if len(shape) != 4 or min(shape) < 1:
                raise ValueError(f"profile {name} must be 4 positive ints, got {shape}")
            object.__setattr__(self, name, shape)
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"profile needs min <= opt <= max per dim: {self}")

    @classmethod
    def for_sizes(
        cls,
        opt_hw: tuple[int, int] = (512, 1024),
        max_hw: tuple[int, int] = (1024, 2048),
        min_hw: tuple[int, int] = (32, 32),
        max_batch: int = 4,
        opt_batch: int = 1,
        channels: int = 3,
    ) -> Profile:
        return cls(
            (1, channels, *min_hw), (opt_batch, channels, *opt_hw), (max_batch, channels, *max_hw)
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def engine_cache_key(
    onnx_sha256: str,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
    trt_version: str,
    profile: Profile,
    precision: str,
) -> str:
    """sha256 of everything an engine depends on; any change gives a new engine."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(compute_capability, str):
        compute_capability = ".".join(str(v) for v in compute_capability)
    blob = json.dumps(
        {
            "onnx_sha256": onnx_sha256,
            "gpu": gpu_name,
            "compute_capability": compute_capability,
            "tensorrt": trt_version,
            "profile": profile.to_dict(),
            "precision": precision,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------- GPU paths


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "TensorRT is not installed: install the gpu extra (pip install -e '.[gpu]') "
            "on a machine with an NVIDIA GPU"
        ) from err
    return trt


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') from torch or nvidia-smi."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:  # pragma: no cover
        pass
    try:  # pragma: no cover - GPU machines only
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", f"-i={device}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        name, cc = (s.strip() for s in out.split(","))
        return name, cc
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise RuntimeError("no CUDA GPU found (torch.cuda and nvidia-smi both failed)") from err


@dataclass
class EngineInfo:
    path: Path
    key: str
    precision: str
    profile: Profile
    cached: bool
    build_seconds: float
    meta_path: Path

    @property
    def error_bound_path(self) -> Path:
        return self.path.with_suffix(".error.json")


def build_engine(
    onnx_path: str | Path,
    precision: str = "fp32",
    profile: Profile | None = None,
    cache_dir: str | Path = "~/.cache/certseg/trt",
    workspace_gib: float = 4.0,
    rebuild: bool = False,
    device: int = 0,
    onnx_bytes: bytes | None = None,
) -> EngineInfo:  # pragma: no cover - needs a GPU and TensorRT
    """Build (or reuse from the cache) a serialized engine for `onnx_path`.

    `onnx_bytes` are the bytes to build from, keyed and parsed as given: the server
    passes the ones its audit read (`read_onnx_artifact`), so a file replaced after the
    audit cannot reach the engine; None reads `onnx_path` once. Engines live in
    cache_dir/<key>.engine with <key>.json beside them; a timing cache per (GPU,
    TensorRT version) makes rebuilds with other profiles fast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    profile = profile or Profile.for_sizes()
    trt = _tensorrt()
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    gpu, cc = gpu_identity(device)
    data = Path(onnx_path).read_bytes() if onnx_bytes is None else onnx_bytes
    onnx_sha = hashlib.sha256(data).hexdigest()
    key = engine_cache_key(onnx_sha, gpu, cc, trt.__version__, profile, precision)
    engine_path = cache / f"{key}.engine"
    meta_path = cache / f"{key}.json"
    if engine_path.exists() and meta_path.exists() and not rebuild:
        return EngineInfo(engine_path, key, precision, profile, True, 0.0, meta_path)

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse() takes no folder for external data: none is allowed (the audit refuses it)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    # fp32 means fp32: TF32 convolutions (on by default on Ampere+) round the inputs
    # to 10 mantissa bits and would void the comparison with fp32 ONNX Runtime.
    config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    timing_path = cache / f"timing-{_slug(gpu)}-{cc}-trt{trt.__version__}.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    opt.set_shape("image", profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - t0
    meta = {
        "key": key,
        "onnx": str(onnx_path),
        "onnx_sha256": onnx_sha,
        "gpu": gpu,
        "compute_capability": cc,
        "tensorrt": trt.__version__,
        "profile": profile.to_dict(),
        "precision": precision,
        "tf32": False,
        "build_seconds": seconds,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return EngineInfo(engine_path, key, precision, profile, False, seconds, meta_path)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def cuda_runtime() -> Any:
    """cuda-python's runtime module (its import path moved in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                "TensorRT engines need cuda-python for device memory (the gpu extra)"
            ) from err
    return cudart


def cuda_check(cudart: Any, result: Any) -> Any:
    """cuda-python returns (err, *values): raise on err, else the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA call failed: {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


class TrtRunner:  # pragma: no cover - needs a GPU and TensorRT
    """One deserialized engine and execution context on one GPU: numpy in, numpy out.

    Device buffers are grown per tensor and reused across calls (no allocation in
    steady state); the input copy, the run and the output copies are queued on one
    stream with a single synchronisation at the end. The one runner of certseg:
    the server's tensorrt backend, calibration and the benchmarks all use it.
    """

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        trt, cudart = _tensorrt(), cuda_runtime()
        self.trt, self.cudart = trt, cudart
        cuda_check(cudart, cudart.cudaSetDevice(device))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(
            Path(engine_path).read_bytes()
        )
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {engine_path} (other GPU or TensorRT?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = cuda_check(cudart, cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self.cudart, self.cudart.cudaFree(ptr))
            ptr = cuda_check(self.cudart, self.cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def __call__(
        self, image: np.ndarray, names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """image (N, 3, H, W) -> the named outputs (default: all) as numpy arrays."""
        trt, cudart, ctx = self.trt, self.cudart, self.context
        x = np.ascontiguousarray(image, dtype=np.float32)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        ctx.set_input_shape("image", x.shape)
        src = self._buffer("image", x.nbytes)
        cuda_check(cudart, cudart.cudaMemcpyAsync(src, x.ctypes.data, x.nbytes, h2d, self.stream))
        ctx.set_tensor_address("image", src)
        host: dict[str, np.ndarray] = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            arr = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            ctx.set_tensor_address(name, self._buffer(name, max(arr.nbytes, 1)))
            host[name] = arr
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        wanted = list(names) if names is not None else self.outputs
        for name in wanted:
            arr, ptr = host[name], self._buffers[name][0]
            cuda_check(
                cudart, cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, d2h, self.stream)
            )
        cuda_check(cudart, cudart.cudaStreamSynchronize(self.stream))
        return {n: host[n] for n in wanted}

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
        self.context = self.engine = None


def calibrate_error_bound(
    engine: EngineInfo | str | Path,
    onnx_path: str | Path,
    images: Iterable[np.ndarray],
    safety: float = 2.0,
    slack: float = 1e-4,
    save: bool = True,
) -> ErrorBound:  # pragma: no cover - needs a GPU and TensorRT
    """The engine's margin error against fp32 ONNX Runtime (CPU) on calibration batches
    (N, 3, H, W); saved as <engine>.error.json."""
    import onnxruntime as ort

    path = engine.path if isinstance(engine, EngineInfo) else Path(engine)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, {"image": x}), strict=True))

    precision = engine.precision if isinstance(engine, EngineInfo) else "unknown"
    bound = calibrate(TrtRunner(path), reference, images, safety, slack, precision)
    if save:
        bound.save(path.with_suffix(".error.json"))
    return bound
