"""Native TensorRT backend: an engine built from the exported ONNX graph, cached.

The engine is fp32 with TF32 disabled unless ``trt_fp16`` is set; an fp16 engine
certifies only after a margin error bound is subtracted (`Settings.margin_error`),
and is refused without one. Engines are cached under a key of (ONNX sha256, GPU
name, TensorRT version, shape profile, precision), as DESIGN.md asks. Device memory
is handled with cuda-python (``cuda.bindings.runtime``). Needs the ``gpu`` extra;
without `tensorrt` or `cuda-python` creating the engine raises BackendUnavailable.

Not exercised by the CPU test suite (no GPU there).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.base import BaseEngine
from server.engine import file_sha256, info_from_card, read_onnx_metadata
from server.errors import BackendError, BackendUnavailable, ModelError
from server.settings import Settings

__all__ = ["TensorRTEngine"]

MIN_SIDE = 16


def _imports() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            "the tensorrt backend needs the `tensorrt` package (pip install 'certseg[gpu]')"
        ) from exc
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailable(
                "the tensorrt backend needs `cuda-python` for device memory"
            ) from exc
    return trt, cudart


def _check(cudart: Any, result: Any) -> Any:
    """cuda-python returns (err, *values); raise on err, return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTEngine(BaseEngine):
    """A deserialized TensorRT engine with one execution context on one GPU."""

    def __init__(self, name: str | None, path: Path, settings: Settings) -> None:
        self._trt, self._cudart = _imports()
        onnx_path = path if path.suffix == ".onnx" else path.with_name("model.onnx")
        if not onnx_path.is_file():
            raise ModelError(
                f"{path}: the TensorRT backend needs the exported model.onnx beside it"
            )
        if settings.trt_fp16 and settings.margin_error <= 0:
            raise ModelError("an fp16 TensorRT engine certifies only with --margin-error > 0")
        card, lipschitz, outputs = read_onnx_metadata(onnx_path, settings.audit)
        info = info_from_card(
            name or card.name,
            path,
            card,
            lipschitz,
            backend="tensorrt",
            platform="tensorrt_plan",
            device=f"cuda:{settings.device_id}",
            has_logits="logits" in outputs,
            sha256=file_sha256(onnx_path),
        )
        super().__init__(info, settings.margin_error)
        self._onnx = onnx_path
        self._plan = path if path.suffix in (".plan", ".engine") else None
        self._settings = settings
        self._context: Any = None
        self._engine: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, bytes)

    # building -----------------------------------------------------------------
    def _profile(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        s = self._settings
        h, w = self.info.card.input_size
        top = s.trt_max_side
        return (1, 3, MIN_SIDE, MIN_SIDE), (1, 3, h, w), (s.max_batch, 3, top, top)

    def _cache_path(self, gpu: str) -> Path:
        trt, s = self._trt, self._settings
        key = "|".join(
            [self.info.sha256, gpu, trt.__version__, repr(self._profile()), str(s.trt_fp16)]
        )
        root = s.trt_cache_dir or Path.home() / ".cache" / "certseg" / "trt"
        return root / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".plan")

    def _build(self, logger: Any) -> bytes:
        trt = self._trt
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(self._onnx.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"{self._onnx}: TensorRT cannot parse it ({errors})")
        config = builder.create_builder_config()
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: margins must be exact
        if self._settings.trt_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape("image", *self._profile())
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelError(f"{self._onnx}: TensorRT engine build failed")
        return bytes(plan)

    def load(self) -> None:
        trt, cudart = self._trt, self._cudart
        _check(cudart, cudart.cudaSetDevice(self._settings.device_id))
        props = _check(cudart, cudart.cudaGetDeviceProperties(self._settings.device_id))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        logger = trt.Logger(trt.Logger.WARNING)
        if self._plan is not None:
            plan = self._plan.read_bytes()
        else:
            cached = self._cache_path(gpu)
            if cached.is_file():
                plan = cached.read_bytes()
            else:
                plan = self._build(logger)
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp")
                tmp.write_bytes(plan)
                tmp.replace(cached)
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ModelError(f"{self.info.path}: cannot deserialize the TensorRT engine")
        self._context = self._engine.create_execution_context()
        self._stream = _check(cudart, cudart.cudaStreamCreate())
        super().load()

    # running ------------------------------------------------------------------
    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least nbytes, grown (never shrunk) per tensor."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart, self._cudart.cudaFree(ptr))
            ptr = _check(self._cudart, self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _run(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        trt, cudart, ctx = self._trt, self._cudart, self._context
        images = np.ascontiguousarray(images, dtype=np.float32)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        ctx.set_input_shape("image", images.shape)
        src = self._buffer("image", images.nbytes)
        _check(
            cudart,
            cudart.cudaMemcpyAsync(src, images.ctypes.data, images.nbytes, h2d, self._stream),
        )
        ctx.set_tensor_address("image", src)
        host: dict[str, np.ndarray] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            if self._engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            arr = np.empty(shape, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
            ctx.set_tensor_address(name, self._buffer(name, max(arr.nbytes, 1)))
            host[name] = arr
        if not ctx.execute_async_v3(self._stream):
            raise BackendError("TensorRT execution failed")
        for name in names:
            arr = host[name]
            ptr = self._buffers[name][0]
            _check(
                cudart, cudart.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, d2h, self._stream)
            )
        _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        return {n: host[n] for n in names}

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._context = self._engine = None
        super().close()
