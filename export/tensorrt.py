"""TensorRT engines from the audited ONNX file, cached, with a measured error bound.

GPU-only paths (build_engine, TrtRunner, calibrate_error_bound) import tensorrt and
torch lazily; the cache key, profiles and the error-bound arithmetic are plain Python
and numpy (tested on CPU).

Soundness. A certificate holds for the logits a float32 evaluation gives. An engine
(fp16, or fp32 with other kernels and summation orders) returns slightly different
margins, so it certifies only after subtracting an error bound e from every margin:
certified margin = max(margin - e, 0), radius = that / (sqrt(2) L). e is measured on
calibration images against fp32 ONNX Runtime (the audited reference):

    e = safety * max(max |margin_trt - margin_ort|, 2 max |logits_trt - logits_ort|,
                     largest TRT margin where the two masks disagree) + slack

(2 max |dlogit| bounds the margin change when logits are exported; a pixel whose
class differs between the two must not keep a positive certified margin). This is an
empirical bound, not a proof: it is stored beside the engine with the number of
images and pixels it saw, and the safety factor (default 2) is what covers inputs
outside the calibration set. fp32 engines are built with TF32 disabled.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PRECISIONS",
    "EngineInfo",
    "ErrorBound",
    "Profile",
    "TrtRunner",
    "apply_error_bound",
    "build_engine",
    "calibrate_error_bound",
    "engine_cache_key",
    "error_bound_from_outputs",
    "gpu_identity",
    "sha256_file",
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------- error bound


@dataclass
class ErrorBound:
    """Measured margin error of an engine against fp32 ONNX Runtime."""

    bound: float
    max_margin_diff: float
    max_logit_diff: float | None
    mask_disagreements: int
    max_margin_where_masks_differ: float
    safety: float
    slack: float
    images: int
    pixels: int
    precision: str = "unknown"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ErrorBound:
        return cls(**json.loads(Path(path).read_text()))


def error_bound_from_outputs(
    trt: Iterable[dict[str, np.ndarray]],
    ref: Iterable[dict[str, np.ndarray]],
    safety: float = 2.0,
    slack: float = 1e-4,
    precision: str = "unknown",
) -> ErrorBound:
    """Error bound from paired outputs ({'mask','margin'[,'logits']} per batch)."""
    if safety < 1 or slack < 0:
        raise ValueError("safety must be >= 1 and slack >= 0")
    dm = dl = worst_flip = 0.0
    have_logits = True
    flips = images = pixels = 0
    for a, b in zip(trt, ref, strict=True):
        ma, mb = np.asarray(a["margin"], np.float64), np.asarray(b["margin"], np.float64)
        if ma.shape != mb.shape:
            raise ValueError(f"margin shapes differ: {ma.shape} vs {mb.shape}")
        finite = np.isfinite(ma) & np.isfinite(mb)
        if finite.any():
            dm = max(dm, float(np.max(np.abs(ma[finite] - mb[finite]))))
        if (np.isfinite(ma) != np.isfinite(mb)).any():
            raise ValueError("one backend gives infinite margins where the other does not")
        differ = np.asarray(a["mask"]) != np.asarray(b["mask"])
        flips += int(differ.sum())
        if differ.any():
            worst_flip = max(worst_flip, float(np.max(ma[differ])))
        if "logits" in a and "logits" in b:
            la, lb = np.asarray(a["logits"], np.float64), np.asarray(b["logits"], np.float64)
            dl = max(dl, float(np.max(np.abs(la - lb))))
        else:
            have_logits = False
        images += ma.shape[0] if ma.ndim == 3 else 1
        pixels += ma.size
    if pixels == 0:
        raise ValueError("no calibration outputs")
    raw = max(dm, 2.0 * dl if have_logits else 0.0, worst_flip)
    return ErrorBound(
        bound=safety * raw + slack,
        max_margin_diff=dm,
        max_logit_diff=dl if have_logits else None,
        mask_disagreements=flips,
        max_margin_where_masks_differ=worst_flip,
        safety=safety,
        slack=slack,
        images=images,
        pixels=pixels,
        precision=precision,
    )


def apply_error_bound(
    margin: np.ndarray, bound: float | ErrorBound, lipschitz: float
) -> tuple[np.ndarray, np.ndarray]:
    """(certified margin, certified radius): margin - bound clipped at 0, over sqrt(2) L."""
    e = bound.bound if isinstance(bound, ErrorBound) else float(bound)
    if not (math.isfinite(e) and e >= 0):
        raise ValueError(f"error bound must be finite and >= 0, got {e}")
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"Lipschitz bound must be finite and > 0, got {lipschitz}")
    m = np.asarray(margin)
    certified = np.maximum(m - np.asarray(e, dtype=m.dtype), np.zeros((), dtype=m.dtype))
    return certified, certified / np.asarray(math.sqrt(2.0) * lipschitz, dtype=m.dtype)


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
) -> EngineInfo:  # pragma: no cover - needs a GPU and TensorRT
    """Build (or reuse from the cache) a serialized engine for `onnx_path`.

    Engines live in cache_dir/<key>.engine with <key>.json beside them; a timing cache
    per (GPU, TensorRT version) makes rebuilds with other profiles fast.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    profile = profile or Profile.for_sizes()
    trt = _tensorrt()
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    gpu, cc = gpu_identity(device)
    onnx_sha = sha256_file(onnx_path)
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
    if not parser.parse_from_file(str(onnx_path)):
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


class TrtRunner:  # pragma: no cover - needs a GPU and TensorRT
    """Runs a serialized engine on torch CUDA tensors; returns numpy outputs by name."""

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        import torch

        trt = _tensorrt()
        self.torch, self.trt = torch, trt
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(
            Path(engine_path).read_bytes()
        )
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {engine_path} (other GPU or TensorRT?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream(self.device)

    def _dtype(self, name: str):
        t, trt = self.torch, self.trt
        table = {
            trt.float32: t.float32,
            trt.float16: t.float16,
            trt.int32: t.int32,
            trt.int64: t.int64,
            trt.bool: t.bool,
        }
        return table[self.engine.get_tensor_dtype(name)]

    def run_torch(self, image) -> dict[str, Any]:
        """image: a CUDA float32 tensor (N, 3, H, W); returns CUDA tensors by name."""
        torch = self.torch
        image = image.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape("image", tuple(image.shape))
        self.context.set_tensor_address("image", image.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return outs

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        x = self.torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return {k: v.cpu().numpy() for k, v in self.run_torch(x).items()}


def calibrate_error_bound(
    engine: EngineInfo | str | Path,
    onnx_path: str | Path,
    images: Sequence[np.ndarray] | Iterable[np.ndarray],
    safety: float = 2.0,
    slack: float = 1e-4,
    save: bool = True,
) -> ErrorBound:  # pragma: no cover - needs a GPU and TensorRT
    """Run calibration batches (N, 3, H, W) through the engine and fp32 ONNX Runtime (CPU)
    and derive the margin error bound; saved as <engine>.error.json."""
    import onnxruntime as ort

    path = engine.path if isinstance(engine, EngineInfo) else Path(engine)
    runner = TrtRunner(path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    trt_outs, ref_outs = [], []
    for batch in images:
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        ref_outs.append(dict(zip(names, session.run(None, {"image": x}), strict=True)))
        trt_outs.append(runner(x))
    precision = engine.precision if isinstance(engine, EngineInfo) else "unknown"
    bound = error_bound_from_outputs(trt_outs, ref_outs, safety, slack, precision)
    if save:
        bound.save(path.with_suffix(".error.json"))
    return bound
