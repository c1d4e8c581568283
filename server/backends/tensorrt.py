"""Native TensorRT backend: the exported ONNX graph as a cached TensorRT engine.

Building, caching and running live in `export.tensorrt` (one builder, one cache key of
(ONNX sha256, GPU, compute capability, TensorRT version, profile, precision), one
runner on cuda-python device memory); this module adapts them to the `Engine`
protocol. The engine is fp32 with TF32 disabled unless ``precision`` is fp16; an fp16
engine certifies only after a margin error bound is subtracted
(`Settings.margin_error`), and is refused without one. Needs the ``gpu`` extra;
without `tensorrt` or `cuda-python`, creating the engine raises BackendUnavailable.

Runs on the GPU machine only (tests/test_export_tensorrt.py, marked gpu).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from certseg.errors import EXTRA_OF_MODULE, install_command
from server.backends.base import BaseEngine, check_precision
from server.engine import info_from_card, read_onnx_artifact
from server.errors import BackendError, BackendUnavailable, ModelError
from server.settings import Settings

__all__ = ["TensorRTEngine", "engine_profile"]

MIN_SIDE = 16


def _imports() -> Any:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            "the tensorrt backend needs the `tensorrt` package "
            f"({install_command(EXTRA_OF_MODULE['tensorrt'])})"
        ) from exc
    from export import tensorrt as trt_export

    try:
        trt_export.cuda_runtime()
    except RuntimeError as exc:
        raise BackendUnavailable(str(exc)) from exc
    return trt_export


def engine_profile(input_size: tuple[int, int], settings: Settings) -> Any:
    """The optimization profile the server builds: (1, 3, 16, 16) .. the card's input
    size at batch 1 .. (max_batch, 3, trt_max_side, trt_max_side)."""
    from export.tensorrt import Profile

    h, w = input_size
    top = settings.trt_max_side
    batch = settings.max_batch or 1
    return Profile(
        (1, 3, MIN_SIDE, MIN_SIDE),
        (1, 3, min(h, top), min(w, top)),
        (max(batch, 1), 3, top, top),
    )


class TensorRTEngine(BaseEngine):
    """A TensorRT engine (built from model.onnx, or a given .plan) on one GPU."""

    def __init__(
        self, name: str | None, path: Path, settings: Settings, calibrating: bool = False
    ) -> None:
        self._trt_export = _imports()
        onnx_path = path if path.suffix == ".onnx" else path.with_name("model.onnx")
        if not onnx_path.is_file():
            raise ModelError(
                f"{path}: the TensorRT backend needs the exported model.onnx beside it"
            )
        check_precision(
            "tensorrt", settings.precision, ("fp32", "fp16"), settings.margin_error, calibrating
        )
        artifact = read_onnx_artifact(onnx_path, settings.audit)
        info = info_from_card(
            name or artifact.card.name,
            path,
            artifact.card,
            artifact.lipschitz,
            backend="tensorrt",
            platform="tensorrt_plan",
            device=f"cuda:{settings.device_id}",
            has_logits="logits" in artifact.outputs,
            sha256=artifact.sha256,
            precision=settings.precision,
        )
        super().__init__(info, settings.margin_error, calibrating)
        self._onnx = onnx_path
        self._audited: bytes | None = artifact.data  # built from these; dropped once loaded
        self._plan = path if path.suffix in (".plan", ".engine") else None
        self._settings = settings
        self._runner: Any = None

    def load(self) -> None:
        s, trt_export = self._settings, self._trt_export
        plan = self._plan
        try:
            if plan is None:
                built = trt_export.build_engine(
                    self._onnx,
                    s.precision,
                    engine_profile(self.info.card.input_size, s),
                    s.trt_cache_dir or Path.home() / ".cache" / "certseg" / "trt",
                    device=s.device_id,
                    onnx_bytes=self._audited,
                )
                plan = built.path
            self._runner = trt_export.TrtRunner(plan, s.device_id)
        except RuntimeError as exc:
            raise ModelError(f"{self.info.path}: {exc}") from exc
        self._audited = None
        super().load()

    def _run(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        try:
            return self._runner(images, names)
        except RuntimeError as exc:
            raise BackendError(f"TensorRT: {exc}") from exc

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        super().close()
