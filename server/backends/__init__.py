"""Backends behind the `Engine` protocol, chosen by name or by the artifact's suffix.

Each backend module imports its heavy package (onnxruntime, tensorrt, torch) only
when an engine is created, and raises `BackendUnavailable` with the install hint
when the package is missing, so the server imports on a base install.

    auto         .pt -> torch, .plan/.engine -> tensorrt, else onnxruntime
    onnxruntime  CPU / CUDA / TensorRT execution providers (`Settings.providers`)
    tensorrt     native TensorRT engine built from the ONNX file (cached)
    torch        eager fused model from a certseg checkpoint (.pt)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.engine import Engine
from server.errors import ModelError
from server.settings import Settings, default_model_path

__all__ = ["ModelSpec", "create_engine", "resolve_backend", "resolve_model_specs"]


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its name (None: from the card) and artifact path."""

    name: str | None
    path: Path


def _artifact(path: Path) -> Path:
    """An exported directory means its model.onnx (or model.plan / checkpoint)."""
    if path.is_dir():
        for candidate in ("model.onnx", "model.plan", "model.pt"):
            if (path / candidate).is_file():
                return path / candidate
        raise ModelError(f"{path}: no model.onnx in this directory")
    if not path.is_file():
        raise ModelError(f"{path}: no such model file or directory")
    return path


def resolve_model_specs(settings: Settings) -> list[ModelSpec]:
    """Settings.models (PATH or NAME=PATH), else the default model."""
    entries = list(settings.models)
    if not entries:
        default = settings.default_model or default_model_path()
        if default is None:
            raise ModelError(
                "no model named and no default model shipped in certseg/weights/; "
                "pass an exported model directory or .onnx file"
            )
        entries = [str(default)]
    specs = []
    for entry in entries:
        name, sep, rest = entry.partition("=")
        if sep and name and "/" not in name and "\\" not in name:
            specs.append(ModelSpec(name, _artifact(Path(rest).expanduser())))
        else:
            specs.append(ModelSpec(None, _artifact(Path(entry).expanduser())))
    return specs


def resolve_backend(requested: str, path: Path) -> str:
    """The concrete backend for an artifact ("auto" looks at the suffix)."""
    if requested != "auto":
        return requested
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return "torch"
    if suffix in (".plan", ".engine"):
        return "tensorrt"
    return "onnxruntime"


def create_engine(spec: ModelSpec, settings: Settings, calibrating: bool = False) -> Engine:
    """Build (not load) the engine of one model; imports the backend lazily.

    calibrating=True gives the raw margins of a reduced-precision engine, with no
    error bound subtracted, for `export.error_bound.calibrate`; never serve those.
    """
    backend = resolve_backend(settings.backend, spec.path)
    if settings.torch_compile and backend != "torch":
        raise ModelError(f"--torch-compile is for the torch backend (a .pt model), not {backend}")
    if backend == "onnxruntime":
        from server.backends.ort import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec.name, spec.path, settings, calibrating)
    if backend == "tensorrt":
        from server.backends.tensorrt import TensorRTEngine

        return TensorRTEngine(spec.name, spec.path, settings, calibrating)
    if backend == "torch":
        from server.backends.torch_eager import TorchEngine

        return TorchEngine(spec.name, spec.path, settings, calibrating)
    raise ModelError(f"unknown backend {backend!r}")
