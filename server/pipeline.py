"""decode -> queue -> infer -> certify: the path every image takes, REST or stream.

The certificate figures come from `certseg.certify` (numpy only) applied to the
graph's own fp32 margins and radii, with the model's audited L:

- guaranteed fraction: pixels with radius > eps (all of them at eps = 0, unless the
  engine's margins are shrunk by a margin error: then those of radius > 0 alone, the
  others may not show the fp32 network's class; every figure at eps = 0 counts them
  as flippable for free, `certseg.certify.pixelwise._unperturbed`);
- max_flips: the most pixels one perturbation of norm <= eps can flip (the joint
  budget: the longest prefix of sorted margin^2/2 costs within (L eps)^2);
- per predicted class (output `classes`): its pixels, the fraction of them certified,
  the most of them one eps-attack can flip (`max_flips_by_class`: at least
  pixels - max_flips keep the class under every such attack); with output `gains`,
  from the logits, the most pixels predicted otherwise one can turn into it
  (`max_gains_by_class`);
- stability (output `stability`): per share a of the pixels (1%, 5%, 10%), the least
  norm of a perturbation that may flip that many (none of smaller norm can): one
  figure of how robust the frame is, whatever eps was asked;
- with a ground-truth mask: worst-case pixel accuracy and mIoU at eps.

A resized image (`certseg.certify.resize`) is certified at the network-input budget
an eps-attack on the source stays within, and its answer is brought back to the
source grid: radii in source units, every source pixel with its network pixel's
class, max_flips counting the source pixels those network pixels cover.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from certseg.certify import (
    STABILITY_FRACTIONS,
    guaranteed_region,
    max_flips,
    max_flips_by_class,
    max_gains_by_class,
    stability,
    stability_rows,
    worst_case_miou,
    worst_case_pixel_accuracy,
)
from certseg.certify.resize import AreaResize
from server.decode import DecodedImage
from server.engine import ModelInfo
from server.errors import InvalidParameter, client_value
from server.overlay import OverlayStyle, encode_mask_png, overlay_png
from server.state import ServerState

__all__ = [
    "DEFAULT_OUTPUTS",
    "FIGURES",
    "OUTPUTS",
    "Certified",
    "Timings",
    "check_eps",
    "check_number",
    "check_outputs",
    "class_figures",
    "parse_outputs",
    "segment_image",
    "stability_figures",
]

OUTPUTS = ("mask", "radius", "overlay", "classes", "gains", "stability", "logits")
DEFAULT_OUTPUTS = frozenset({"mask", "radius", "overlay", "classes", "stability"})
#: The outputs that are figures of the certificate (the rest are arrays and images).
FIGURES = frozenset({"classes", "gains", "stability"})
#: The outputs that read the logits: a model exported without them cannot give these.
LOGIT_OUTPUTS = frozenset({"gains", "logits"})


@dataclass
class Timings:
    """Stage durations in ms, in the order they happened."""

    start: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, ms: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + ms

    def since(self, stage: str, t0: float) -> float:
        """Record the time since t0 under stage; returns now."""
        now = time.perf_counter()
        self.add(stage, (now - t0) * 1000.0)
        return now

    def finish(self) -> dict[str, float]:
        """The stages plus total, rounded to microseconds."""
        out = {k: round(v, 3) for k, v in self.stages.items()}
        out["total"] = round((time.perf_counter() - self.start) * 1000.0, 3)
        return out

    @staticmethod
    def header(stages: dict[str, float]) -> str:
        """The Server-Timing header value (W3C Server Timing)."""
        return ", ".join(f"{k};dur={v:.3f}" for k, v in stages.items())


def parse_outputs(value: str | Iterable[str] | None) -> frozenset[str]:
    """Comma list (or list) of output names -> a set; unknown names are a 422."""
    if value is None:
        return DEFAULT_OUTPUTS
    items = value.split(",") if isinstance(value, str) else list(value)
    names = frozenset(s.strip().lower() for s in items if isinstance(s, str) and s.strip())
    bad = sorted(names - set(OUTPUTS))
    if bad or (not isinstance(value, str) and any(not isinstance(s, str) for s in items)):
        raise InvalidParameter(f"unknown outputs {bad}; choose from {', '.join(OUTPUTS)}")
    return names


def check_outputs(info: ModelInfo, outputs: Iterable[str]) -> None:
    """Outputs that read the logits need a model exported with them (else a 422)."""
    asked = sorted(LOGIT_OUTPUTS.intersection(outputs))
    if asked and not info.has_logits:
        raise InvalidParameter(
            f"model '{info.name}' was exported without a logits output, which "
            f"{' and '.join(asked)} need (export with --logits)"
        )


#: A number as a query writes it: ASCII digits, a point, an exponent (no "1_0", "inf").
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def check_number(name: str, value: object, high: float = math.inf) -> float:
    """`value` as a finite float in [0, high]; else a 422 that names `name` and the range
    (not a bare "less than or equal to 1" for a NaN that is no number at all)."""
    span = ">= 0" if high == math.inf else f"in [0, {high:g}]"
    refused = InvalidParameter(f"{name} must be a finite number {span}, got {client_value(value)}")
    # float() also reads "1_0" as 10, "inf" and non-ASCII digits: a query says it as written
    if isinstance(value, bool) or (
        isinstance(value, str) and not _DECIMAL.fullmatch(value.strip())
    ):
        raise refused
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a huge int
        raise refused from exc
    if not (math.isfinite(number) and 0 <= number <= high):
        raise refused
    return number + 0.0  # -0.0 -> 0.0


def check_eps(value: object, default: float) -> float:
    """eps as a finite float >= 0 (default: the card's); else a 422."""
    return float(default) if value is None else check_number("eps", value)


@dataclass
class Certified:
    """One image's outputs and certificate at one eps."""

    model: ModelInfo
    eps: float
    mask: np.ndarray  # (H, W) int32
    margin: np.ndarray  # (H, W) float32
    radius: np.ndarray  # (H, W) float32
    region: np.ndarray  # (H, W) bool: guaranteed at eps, as guaranteed_fraction counts
    logits: np.ndarray | None
    guaranteed_fraction: float
    max_flips: int
    batch_size: int
    metrics: dict[str, float | None] | None = None
    resize: AreaResize | None = None  # the shrink the network saw, if any
    classes: list[dict] | None = None  # per predicted class (`class_figures`), if asked
    stability: list[dict] | None = None  # per share of pixels (`stability_figures`), if asked

    @property
    def pixels(self) -> int:
        return int(self.mask.size)

    def overlay_png(
        self, photo: np.ndarray | None, style: OverlayStyle, blend: float = 0.0
    ) -> bytes:
        """This certificate's overlay PNG (blocking): the one call of both routes."""
        card = self.model.card
        return overlay_png(
            self.mask, self.radius, self.eps, card.palette, photo, style, blend, self.region
        )

    def mask_png(self) -> tuple[bytes, str]:
        """The class ids as PNG and their dtype (blocking): the one call of both routes."""
        return encode_mask_png(self.mask, self.model.card.num_classes)

    def summary(self) -> dict:
        """The certificate fields every answer carries, REST and stream alike."""
        height, width = self.mask.shape
        resized = {"resize": self.resize.describe(self.eps)} if self.resize else {}
        return {
            "model": self.model.name,
            "eps": self.eps,
            "lipschitz": self.model.lipschitz,
            "width": int(width),
            "height": int(height),
            "guaranteed_fraction": self.guaranteed_fraction,
            "max_flips": self.max_flips,
            "max_flips_fraction": self.max_flips / self.pixels,
            "batch_size": self.batch_size,
            **resized,
            **({"classes": self.classes} if self.classes is not None else {}),
            **({"stability": self.stability} if self.stability is not None else {}),
        }


def class_figures(
    info: ModelInfo,
    outputs: dict[str, np.ndarray],
    region: np.ndarray,
    eps: float,
    resize: AreaResize | None = None,
    with_gains: bool = False,
) -> list[dict]:
    """Per class the network predicted (graph outputs on its own grid): its pixels, the
    fraction of them certified at eps (`region`), the most of them one eps-attack can
    flip, and `with_gains` (from the logits; else null) the most pixels predicted
    otherwise it can turn into the class; a shrunk image's figures count source pixels.
    Classes with no pixel are left out.

    Gains cost K passes over the logits (1024x2048, 7 classes: 37 ms on one core
    against 11 ms for the rest; benchmarks/answer_cpu.py), hence their own output."""
    card, L, e = info.card, info.lipschitz, info.margin_error
    exact = e == 0  # margins not shrunk by an error: nothing flips at eps == 0
    K = card.num_classes
    mask, margin = outputs["mask"], outputs["margin"]
    logits = outputs["logits"] if with_gains else None
    gains = None
    if resize is None:
        labels = np.clip(mask, 0, K - 1)
        pixels = np.bincount(labels.reshape(-1), minlength=K)
        certified = np.bincount(labels[region], minlength=K)
        flips = max_flips_by_class(margin, mask, K, eps, L, exact)
        if logits is not None:
            gains = max_gains_by_class(logits, mask, eps, L, margin_error=e)
    else:
        pixels = resize.source_counts_by_class(mask, K)
        certified = resize.source_counts_by_class(mask, K, region)
        flips = resize.max_source_flips_by_class(margin, mask, K, eps, L, exact)
        if logits is not None:
            gains = resize.max_source_gains_by_class(logits, mask, eps, L, margin_error=e)
    return [
        {
            "id": c,
            "name": card.classes[c],
            "pixels": int(pixels[c]),
            "guaranteed_fraction": float(certified[c]) / float(pixels[c]),
            "max_flips": int(flips[c]),
            "max_gains": None if gains is None else int(gains[c]),
        }
        for c in range(K)
        if pixels[c]
    ]


def stability_figures(
    info: ModelInfo, margin: np.ndarray, resize: AreaResize | None = None
) -> list[dict]:
    """Per share a of `STABILITY_FRACTIONS`: the pixels it is (k = ceil(a n), n the
    image's pixels, source pixels for a shrunk image) and the least norm of a
    perturbation that may flip k of them (null: none can, e.g. a single class).
    `margin`: the network's, on its own grid."""
    if resize is None:
        n = margin.size
        eps = stability(margin, STABILITY_FRACTIONS, info.lipschitz).tolist()
    else:
        n = resize.source[0] * resize.source[1]
        eps = resize.source_stability(margin, STABILITY_FRACTIONS, info.lipschitz).tolist()
    return stability_rows(eps, n)


def _finite_or_none(x: float) -> float | None:
    """A figure as JSON can carry it: NaN (none given) and inf (none can) become null."""
    return x if math.isfinite(x) else None


def _mean_present(per_class: np.ndarray) -> float:
    """Mean over the classes the target has (NaN entries are the absent ones)."""
    present = per_class[~np.isnan(per_class)]
    return float(present.mean()) if present.size else math.nan


def _metrics(acc: float, miou: float, clean_acc: float, clean_miou: float) -> dict:
    """The answer's worst-case metrics (NaN, what no bound is given for, as null)."""
    return {
        "worst_case_pixel_accuracy": _finite_or_none(acc),
        "worst_case_miou": _finite_or_none(miou),
        "clean_pixel_accuracy": _finite_or_none(clean_acc),
        "clean_miou": _finite_or_none(clean_miou),
    }


def certify(
    info: ModelInfo,
    outputs: dict[str, np.ndarray],
    eps: float,
    target: np.ndarray | None,
    batch_size: int,
    resize: AreaResize | None = None,
    figures: frozenset[str] = frozenset(),
) -> Certified:
    """The certificate figures of one image's graph outputs (blocking; run in a thread),
    with those of `FIGURES` asked in `figures` (gains come in the per-class rows)."""
    if resize is not None:
        return _certify_resized(info, outputs, eps, target, batch_size, resize, figures)
    L, exact = info.lipschitz, info.margin_error == 0
    margin, radius = outputs["margin"], outputs["radius"]
    region = guaranteed_region(radius, eps, exact)
    guaranteed = float(np.mean(region))
    flips = int(max_flips(margin, eps, L, exact=exact))
    logits = outputs.get("logits")
    metrics = None
    if target is not None:
        ignore = info.card.ignore_index
        if logits is not None:  # costs shrunk by the engine's margin error, as margins are
            bound = {"ignore_index": ignore, "margin_error": info.margin_error}
            acc = float(worst_case_pixel_accuracy(logits, target, eps, L, **bound))
            miou = float(worst_case_miou(logits, target, eps, L, **bound))
            # the served mask's own figures: no error, no perturbation
            clean_acc = float(
                worst_case_pixel_accuracy(logits, target, 0.0, L, ignore_index=ignore)
            )
            clean_miou = float(worst_case_miou(logits, target, 0.0, L, ignore_index=ignore))
        else:  # accuracy needs margins only; IoU needs the runner-up logits
            valid = target != ignore
            correct = valid & (outputs["mask"] == target)
            n_valid = int(valid.sum())
            k = int(max_flips(margin, eps, L, valid=correct, exact=exact))
            acc = (int(correct.sum()) - k) / n_valid if n_valid else math.nan
            clean_acc = int(correct.sum()) / n_valid if n_valid else math.nan
            miou = clean_miou = math.nan
        metrics = _metrics(acc, miou, clean_acc, clean_miou)
    return Certified(
        model=info,
        eps=eps,
        mask=outputs["mask"],
        margin=margin,
        radius=radius,
        region=region,
        logits=logits,
        guaranteed_fraction=guaranteed,
        max_flips=flips,
        batch_size=batch_size,
        metrics=metrics,
        **_optional_figures(info, outputs, region, eps, None, figures),
    )


async def segment_image(
    state: ServerState,
    model: str,
    image: DecodedImage,
    eps: float,
    outputs: frozenset[str],
    timings: Timings,
    target: np.ndarray | None = None,
) -> Certified:
    """Queue the image, wait for its batch, certify it; records queue/infer/certify."""
    info = state.info(model)
    batcher = state.batcher_for(info.name)
    check_outputs(info, outputs)
    need_logits = bool(outputs & LOGIT_OUTPUTS) or (target is not None and info.has_logits)
    if image.resize is not None and "logits" in outputs:
        raise InvalidParameter(
            "a resized image has no logits at its own size (they are the network's); "
            "send it at most the pixel limit for those"
        )
    t0 = time.perf_counter()
    pixels = await asyncio.to_thread(image.network_input, info.accepts_uint8)
    timings.since("prepare", t0)  # to the network's layout (13 ms at 1024x2048)
    result = await batcher.submit(info.name, pixels, ("logits",) if need_logits else ())
    timings.add("queue", result.queue_ms)
    timings.add("infer", result.infer_ms)
    t0 = time.perf_counter()
    cert = await asyncio.to_thread(
        certify,
        info,
        result.outputs,
        eps,
        target,
        result.batch_size,
        image.resize,
        outputs & FIGURES,
    )
    timings.since("certify", t0)
    if "logits" not in outputs:
        cert.logits = None  # read for the figures only: K x H x W floats not held longer
    state.metrics.guaranteed_fraction.labels(info.name).observe(cert.guaranteed_fraction)
    for row in cert.stability or ():
        if row["eps"] is not None:
            histogram = state.metrics.stability_eps.labels(info.name, f"{row['fraction']:g}")
            histogram.observe(row["eps"])
    return cert


def _certify_resized(
    info: ModelInfo,
    outputs: dict[str, np.ndarray],
    eps: float,
    target: np.ndarray | None,
    batch_size: int,
    resize: AreaResize,
    figures: frozenset[str],
) -> Certified:
    """A shrunk image's certificate, on the source grid. With a source-size target:
    worst-case pixel accuracy, and mIoU from the network's logits (null for a model
    exported without them)."""
    exact = info.margin_error == 0
    radius = resize.source_radius(outputs["radius"])  # source units, network grid
    region = guaranteed_region(radius, eps, exact)
    metrics = None
    if target is not None:
        acc, clean = resize.worst_case_accuracy(
            outputs["mask"],
            outputs["margin"],
            target,
            eps,
            info.lipschitz,
            info.card.ignore_index,
            exact,
        )
        miou = clean_miou = math.nan
        if "logits" in outputs:
            iou, clean_iou = resize.worst_case_iou(
                outputs["mask"],
                outputs["margin"],
                outputs["logits"],
                target,
                eps,
                info.lipschitz,
                info.card.ignore_index,
                info.margin_error,
            )
            miou, clean_miou = _mean_present(iou), _mean_present(clean_iou)
        metrics = _metrics(acc, miou, clean, clean_miou)
    return Certified(
        model=info,
        eps=eps,
        mask=resize.upsample(outputs["mask"]),
        margin=resize.upsample(outputs["margin"]),
        radius=resize.upsample(radius),
        region=resize.upsample(region),
        logits=None,
        guaranteed_fraction=resize.source_fraction(region),
        max_flips=resize.max_source_flips(outputs["margin"], eps, info.lipschitz, exact),
        batch_size=batch_size,
        metrics=metrics,
        resize=resize,
        **_optional_figures(info, outputs, region, eps, resize, figures),
    )


def _optional_figures(
    info: ModelInfo,
    outputs: dict[str, np.ndarray],
    region: np.ndarray,
    eps: float,
    resize: AreaResize | None,
    figures: frozenset[str],
) -> dict[str, list[dict] | None]:
    """The `Certified` fields of the figures asked: classes (with gains, if asked; gains
    imply classes) and stability, None for those not asked."""
    gains = "gains" in figures
    per_class = gains or "classes" in figures
    return {
        "classes": class_figures(info, outputs, region, eps, resize, gains) if per_class else None,
        "stability": (
            stability_figures(info, outputs["margin"], resize) if "stability" in figures else None
        ),
    }
