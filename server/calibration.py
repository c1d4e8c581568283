"""The margin error bound of a served engine, measured the way the server will run it.

`calibrate_engine` builds the engine exactly as `certseg serve` would (same backend,
precision, providers, CUDA graphs), asks it for raw margins (`calibrating=True`: no
bound subtracted), and compares them with the audited reference, fp32 ONNX Runtime on
the CPU (`export.error_bound.calibrate`). What it returns is what `--margin-error`
takes. Calibration images: the user's own frames (a folder), which is what the bound
should be measured on, or by default synthetic street scenes plus uniform noise at the
model's input size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from export.error_bound import ErrorBound, calibrate
from server.backends import ModelSpec, create_engine
from server.decode import Limits, decode_image
from server.engine import Engine
from server.errors import ModelError
from server.settings import Settings

__all__ = [
    "calibrate_engine",
    "calibration_images",
    "reference_artifact",
    "reference_engine",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def calibration_images(
    size: tuple[int, int], count: int, folder: Path | None = None, seed: int = 0
) -> list[np.ndarray]:
    """`count` images (1, 3, H, W) float32: from `folder` (its first files in path
    order, subfolders included, symlinked ones not followed; any size), else half
    synthetic street scenes, half uniform noise, at `size`."""
    if folder is not None:
        files = sorted(
            Path(root) / name
            for root, _, names in os.walk(folder)
            for name in names
            if Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ModelError(f"{folder}: no PNG, JPEG or WebP images to calibrate on")
        limits = Limits(max_bytes=1 << 30, max_pixels=1 << 28)
        return [decode_image(p.read_bytes(), limits).array[None] for p in files[:count]]
    from certseg.data.synthetic import render_scene

    rng = np.random.default_rng(seed)
    scenes = [render_scene(rng, size)[0][None] for _ in range((count + 1) // 2)]
    noise = [rng.random((1, 3, *size), dtype=np.float32) for _ in range(count // 2)]
    return scenes + noise


def reference_artifact(path: Path) -> Path:
    """The exported model.onnx the reference runs: the artifact itself, or beside it."""
    path = Path(path)
    candidates = [path] if path.suffix == ".onnx" else []
    candidates += [path / "model.onnx"] if path.is_dir() else [path.with_name("model.onnx")]
    for c in candidates:
        if c.is_file():
            return c
    raise ModelError(
        f"{path}: calibration needs the exported model.onnx (the fp32 reference) beside it; "
        "name its export with --reference (e.g. runs/mine/onnx)"
    )


def reference_engine(artifact: Path) -> Engine:
    """fp32 ONNX Runtime on the CPU for the model.onnx of `artifact`, loaded."""
    reference = create_engine(
        ModelSpec(None, reference_artifact(artifact)),
        Settings(backend="onnxruntime", providers=["CPUExecutionProvider"], warmup=False),
    )
    reference.load()
    return reference


#: The card fields a model and its own export share; another model differs in one.
_IDENTITY = ("arch", "arch_kwargs", "classes", "mean", "std", "training")


def _check_same_model(engine: Engine, reference: Engine, reference_path: Path) -> None:
    """The reference must be this model's export: against another model's, the "error"
    measured is the gap between two nets (1262 of 2048 mask pixels apart), and was
    printed as a bound to serve with."""
    cards = engine.metadata().card, reference.metadata().card
    for key in _IDENTITY:
        a, b = (json.dumps(getattr(c, key, None), sort_keys=True, default=list) for c in cards)
        if a != b:
            raise ModelError(
                f"--reference {reference_path} is another model's export (its card's {key} "
                f"differs): calibrate against this model's own export"
            )


def calibrate_engine(
    artifact: Path,
    settings: Settings,
    images: Iterable[np.ndarray],
    safety: float = 2.0,
    slack: float = 1e-4,
    reference: Engine | None = None,
    fp32: Path | None = None,
) -> ErrorBound:
    """Margin error bound of the engine `settings` describe, against fp32 ORT on the CPU
    (`reference`, made here unless given, from the export `fp32` or the one beside
    `artifact`: one can serve many calibrations)."""
    engine = create_engine(ModelSpec(None, artifact), settings, calibrating=True)
    engine.load()
    own = reference is None
    reference = reference or reference_engine(fp32 or artifact)
    _check_same_model(engine, reference, fp32 or artifact)
    # Logits where both give them: the class-wise figures shrink every gap z_t - z_c by
    # the bound, so every gap's error is measured, not only the margin's.
    both = engine.metadata().has_logits and reference.metadata().has_logits
    outputs = ["mask", "logits"] if both else ["mask"]
    try:
        return calibrate(
            lambda x: engine.infer(x, outputs),
            lambda x: reference.infer(x, outputs),
            images,
            safety,
            slack,
            settings.precision,
        )
    finally:
        engine.close()
        if own:
            reference.close()
