"""How far an engine's margins may be from fp32 ONNX Runtime's: measured, then subtracted.

A certificate holds for the logits a float32 evaluation gives. An engine that computes
otherwise (fp16 or bf16, TF32, TensorRT's kernels and summation orders) returns
slightly different margins, so it certifies only after subtracting an error bound e
from every margin (`certseg.certify.certified_margins`). e is measured on calibration
images against the audited reference, fp32 ONNX Runtime on the CPU:

    e = safety * max(max |margin - margin_ref|, 2 max |logits - logits_ref|,
                     largest margin where the two masks disagree) + slack

(2 max |dlogit| bounds the margin change when logits are exported; a pixel whose
class differs between the two must not keep a positive certified margin). This is an
empirical bound, not a proof: it is stored beside the engine with the number of
images and pixels it saw, and the safety factor (default 2) is what covers inputs
outside the calibration set. One function serves every engine (`calibrate`): TensorRT
plans, the ONNX Runtime TensorRT provider and the torch backend at fp16/bf16.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["ErrorBound", "Runner", "calibrate", "error_bound_from_outputs"]

#: Something that maps images (N, 3, H, W) float32 to outputs by name.
Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


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


def calibrate(
    candidate: Runner,
    reference: Runner,
    images: Iterable[np.ndarray],
    safety: float = 2.0,
    slack: float = 1e-4,
    precision: str = "unknown",
) -> ErrorBound:
    """Run each calibration batch through both and bound the candidate's margin error."""
    cand, ref = [], []
    for batch in images:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        cand.append(candidate(x))
        ref.append(reference(x))
    return error_bound_from_outputs(cand, ref, safety, slack, precision)
