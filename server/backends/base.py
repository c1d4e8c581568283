"""What every backend shares: readiness, warm-up, the margin-error correction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from certseg.certify.numerics import certified_margins
from server.decode import chw8_to_float
from server.engine import ModelInfo
from server.errors import ModelError

__all__ = ["BaseEngine", "apply_margin_error", "check_precision", "unknown_where_not_finite"]


def apply_margin_error(
    outputs: dict[str, np.ndarray], margin_error: float, lipschitz: float
) -> dict[str, np.ndarray]:
    """Shrink margins by a bound on their numerical error before anyone reads radii.

    An fp16 or TensorRT engine gives logits that differ from the fp32 evaluation the
    certificate speaks of; with |error of each margin| <= delta, margin - delta is a
    sound margin (`certseg.certify.certified_margins`, the one place of that rule).
    """
    if margin_error <= 0:
        return outputs
    margin, radius = certified_margins(outputs["margin"], margin_error, lipschitz)
    return {**outputs, "margin": margin, "radius": radius}


def unknown_where_not_finite(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A pixel with a NaN or infinite margin, radius or logit (a faulty engine, or an
    fp16 logit past 65504 that overflowed to inf: its margin came out infinite and was
    certified at any eps) is one nothing is known of: it becomes margin 0, radius 0,
    every logit 0 and class 0 (the argmax of equal logits, so the mask and the logits
    agree), flippable for free into any class and never certified at eps > 0. The one
    place of that rule: every figure, from the margins (max_flips, stability) or from
    the logits (gains, worst-case accuracy and IoU), then counts it. One pass over the
    margins and radii, and one sum over the logits (NaN or inf when one is), when all
    are finite; a finite sum past float32's range only takes the slow path."""
    margin, radius, logits = outputs["margin"], outputs["radius"], outputs.get("logits")
    with np.errstate(over="ignore", invalid="ignore"):
        bad_logits = logits is not None and logits.size > 0 and not np.isfinite(logits.sum())
    if not (bad_logits or not np.isfinite(margin).all() or not np.isfinite(radius).all()):
        return outputs
    unknown = ~np.isfinite(margin) | ~np.isfinite(radius)
    if bad_logits:  # (..., K, H, W): a non-finite value in any class
        unknown |= ~np.isfinite(logits).all(axis=-3)
    fixed = {
        **outputs,
        "margin": np.where(unknown, margin.dtype.type(0), margin),
        "radius": np.where(unknown, radius.dtype.type(0), radius),
    }
    if logits is not None:
        fixed["logits"] = np.where(np.expand_dims(unknown, -3), logits.dtype.type(0), logits)
    if "mask" in outputs:
        mask = outputs["mask"]
        fixed["mask"] = np.where(unknown, mask.dtype.type(0), mask)
    return fixed


def check_precision(
    backend: str,
    precision: str,
    supported: Sequence[str],
    margin_error: float,
    calibrating: bool = False,
) -> None:
    """Refuse a precision the backend cannot run, or a reduced one with no error bound.

    `calibrating` engines (raw margins, to measure that bound; never served) are
    exempt from the second rule.
    """
    if precision not in supported:
        where = "" if backend == "torch" else "; fp16 and bf16 run on --backend torch (CPU or GPU)"
        raise ModelError(
            f"the {backend} backend runs {', '.join(supported)}, not {precision!r}{where}"
        )
    if precision != "fp32" and margin_error <= 0 and not calibrating:
        raise ModelError(
            f"a {precision} engine certifies only with --margin-error > 0 (measure it with "
            f"`certseg calibrate MODEL --backend {backend} --precision {precision}`, adding "
            "`--reference EXPORT_DIR` where no exported model.onnx lies beside MODEL)"
        )


class BaseEngine:
    """Common state of a backend; subclasses implement `load` and `_run`.

    `margin_error` is the bound subtracted from every margin (none for a calibrating
    engine, whose raw margins are what is measured). The base subtracts it after
    `_run`, unless the backend does so itself on its device (`corrects_margins`).
    8-bit images become float32 here, in the device's worker thread, unless the backend
    takes them as they are (`converts_uint8`).
    """

    corrects_margins = False
    converts_uint8 = False

    def __init__(self, info: ModelInfo, margin_error: float = 0.0, calibrating: bool = False):
        self.info = info
        self.margin_error = 0.0 if calibrating else float(margin_error)
        info.margin_error = self.margin_error
        self._loaded = False
        self._warm = False

    @property
    def ready(self) -> bool:
        return self._loaded and self._warm

    def metadata(self) -> ModelInfo:
        return self.info

    def load(self) -> None:
        self._loaded = True

    def warmup(self, sizes: Sequence[tuple[int, int, int]]) -> None:
        """One pass per (batch, H, W): allocators, kernel choice and caches settle here."""
        names = self.info.output_names
        for n, h, w in sizes:
            self.infer(np.zeros((n, 3, h, w), dtype=np.float32), names)
        self._warm = True

    def infer(self, images: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        names = list(dict.fromkeys([*outputs, "margin", "radius"]))
        if images.dtype == np.uint8 and not self.converts_uint8:
            images = chw8_to_float(images)
        got = unknown_where_not_finite(self._run(images, names))
        if self.corrects_margins:
            return got
        return apply_margin_error(got, self.margin_error, self.info.lipschitz)

    def _run(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        self._loaded = self._warm = False
