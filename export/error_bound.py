"""How far an engine's margins may be from fp32 ONNX Runtime's: measured, then subtracted.

A certificate holds for the logits a float32 evaluation gives. An engine that computes
otherwise (fp16 or bf16, TF32, TensorRT's kernels and summation orders) returns
slightly different margins, so it certifies only after subtracting an error bound e
from every margin (`certseg.certify.certified_margins`). e is measured on calibration
images against the audited reference, fp32 ONNX Runtime on the CPU:

    e = safety * max(max |margin - margin_ref|, max |gap - gap_ref|,
                     largest margin where the two masks disagree) + slack

where a gap is z_t - z_c for the engine's class t and every class c, measured when
both export logits: the class-wise figures (worst-case metrics, gains) shrink each
gap by e, not only the margin, the smallest gap; without logits only the margins
can be compared. A pixel whose class differs between the two must not keep a
positive certified margin. This is an
empirical bound, not a proof: it is stored beside the engine with the number of
images and pixels it saw, and the safety factor (default 2) is what covers inputs
outside the calibration set. One function serves every engine (`calibrate`): TensorRT
plans, the ONNX Runtime TensorRT provider and the torch backend at fp16/bf16.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
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
    #: max over pixels and classes c of |(z_t - z_c) - (ref_t - ref_c)|, t the engine's
    #: class; None when either side gave no logits
    max_gap_diff: float | None = None

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
    return _bound_of_pairs(zip(trt, ref, strict=True), safety, slack, precision)


def _bound_of_pairs(
    pairs: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    safety: float,
    slack: float,
    precision: str,
) -> ErrorBound:
    """The bound over (candidate, reference) output pairs, read one pair at a time: a
    calibration set's logits need not all be held at once."""
    if safety < 1 or slack < 0:
        raise ValueError("safety must be >= 1 and slack >= 0")
    dm = dl = dg = worst_flip = 0.0
    have_logits = True
    flips = images = pixels = 0
    for a, b in pairs:
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
            dg = max(dg, _max_gap_diff(la - lb, np.asarray(a["mask"])))
        else:
            have_logits = False
        images += ma.shape[0] if ma.ndim == 3 else 1
        pixels += ma.size
    if pixels == 0:
        raise ValueError("no calibration outputs")
    raw = max(dm, dg if have_logits else 0.0, worst_flip)
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
        max_gap_diff=dg if have_logits else None,
    )


def _max_gap_diff(diff: np.ndarray, mask: np.ndarray) -> float:
    """max |diff_t - diff_c| over pixels and classes c, t = `mask` (the engine's class):
    how far any gap z_t - z_c the class-wise figures shrink moved. `diff` is
    (N, K, H, W) or (K, H, W) logits minus reference logits, `mask` without K."""
    if diff.ndim == 3:
        diff, mask = diff[None], mask[None]
    top = np.take_along_axis(diff, mask[:, None].astype(np.int64), axis=1)
    worst = float(np.abs(top - diff).max()) if diff.size else 0.0
    if not np.isfinite(worst):
        raise ValueError("the two backends' logits differ by a non-finite amount")
    return worst


def calibrate(
    candidate: Runner,
    reference: Runner,
    images: Iterable[np.ndarray],
    safety: float = 2.0,
    slack: float = 1e-4,
    precision: str = "unknown",
) -> ErrorBound:
    """Run each calibration batch through both and bound the candidate's margin error."""

    def pairs() -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        for batch in images:
            x = np.ascontiguousarray(batch, dtype=np.float32)
            x = x[None] if x.ndim == 3 else x
            yield candidate(x), reference(x)

    return _bound_of_pairs(pairs(), safety, slack, precision)
