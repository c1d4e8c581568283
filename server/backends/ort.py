"""ONNX Runtime backend: CPU, CUDA or TensorRT execution providers.

The CUDA provider is asked for full fp32 (``use_tf32=0``): TF32 convolutions would
give logits that differ from the fp32 evaluation the certificate speaks of. The
TensorRT provider runs fp32 unless ``precision`` is fp16, which needs a margin error
bound (`Settings.margin_error`) to stay sound; CPU and CUDA run fp32 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.backends.base import BaseEngine, check_precision
from server.engine import file_sha256, info_from_card, read_onnx_metadata
from server.errors import BackendUnavailable, ModelError
from server.settings import Settings

__all__ = ["OnnxRuntimeEngine", "choose_providers"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise BackendUnavailable("the onnxruntime backend needs `pip install onnxruntime`") from exc
    return onnxruntime


def choose_providers(
    settings: Settings, available: list[str], calibrating: bool = False
) -> list[tuple[str, dict[str, str]]]:
    """Providers with their options: the requested ones, or CUDA (if present) then CPU."""
    wanted = settings.providers or ([CUDA, CPU] if CUDA in available else [CPU])
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendUnavailable(
            f"execution providers {missing} are not in this onnxruntime build "
            f"(available: {available}); onnxruntime-gpu brings CUDA and TensorRT"
        )
    supported = ("fp32", "fp16") if TRT in wanted else ("fp32",)
    check_precision(
        "onnxruntime", settings.precision, supported, settings.margin_error, calibrating
    )
    dev = str(settings.device_id)
    opts: dict[str, dict[str, str]] = {
        CUDA: {"device_id": dev, "use_tf32": "0"},
        TRT: {
            "device_id": dev,
            "trt_fp16_enable": "True" if settings.precision == "fp16" else "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(settings.trt_cache_dir or Path(".trt_cache")),
        },
    }
    return [(p, opts.get(p, {})) for p in wanted]


class OnnxRuntimeEngine(BaseEngine):
    """One InferenceSession of an exported certseg graph."""

    def __init__(
        self, name: str | None, path: Path, settings: Settings, calibrating: bool = False
    ) -> None:
        ort = _ort()
        card, lipschitz, outputs = read_onnx_metadata(path, settings.audit)
        self._providers = choose_providers(settings, ort.get_available_providers(), calibrating)
        first = self._providers[0][0]
        device = f"cuda:{settings.device_id}" if first in (CUDA, TRT) else "cpu"
        info = info_from_card(
            name or card.name,
            path,
            card,
            lipschitz,
            backend="onnxruntime",
            platform="onnxruntime_onnx",
            device=device,
            has_logits="logits" in outputs,
            sha256=file_sha256(path),
        )
        super().__init__(info, settings.margin_error, calibrating)
        self._threads = settings.intra_op_threads
        self._session: Any = None

    def load(self) -> None:
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # No busy-waiting between runs: decoding, certifying and encoding of other
        # requests need those cores (measured: certify 39 -> ~10 ms at 256x512, 2 CPUs).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(self.info.path),
                sess_options=so,
                providers=[p for p, _ in self._providers],
                provider_options=[o for _, o in self._providers],
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"{self.info.path}: onnxruntime cannot load it ({exc})") from exc
        super().load()

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses (a missing GPU falls back to CPU)."""
        return list(self._session.get_providers()) if self._session is not None else []

    def _run(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        got = self._session.run(names, {"image": np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(names, got, strict=True))

    def close(self) -> None:
        self._session = None
        super().close()
