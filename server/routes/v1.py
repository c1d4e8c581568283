"""REST surface: POST /v1/segment and GET /v1/models."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from certseg.certify.numerics import float16_down
from certseg.sizes import format_size
from server.decode import DecodedImage, decode_image, decode_target, parse_resize
from server.errors import (
    PROBLEM_MEDIA_TYPE,
    BodyTooLarge,
    InvalidParameter,
    RequestTimeout,
    client_value,
)
from server.overlay import OverlayStyle, render_overlay
from server.pipeline import (
    FIGURES,
    Certified,
    Timings,
    check_eps,
    check_number,
    parse_outputs,
    segment_image,
)
from server.query import route_query
from server.state import ServerState, get_state

__all__ = ["RESPONSE_HEADERS", "ModelSummary", "ModelsResponse", "SegmentResponse", "router"]

#: The parts a multipart body of POST /v1/segment may hold.
MULTIPART_PARTS = ("image", "target")

router = APIRouter(prefix="/v1", tags=["v1"], dependencies=[Depends(route_query)])

MULTIPART_SLACK = 64 * 1024


class EncodedImage(BaseModel):
    """A PNG, base64-encoded."""

    media_type: str = "image/png"
    dtype: str = Field("uint8", description="Pixel type (class-id masks: uint8 or uint16).")
    data: str


class EncodedArray(BaseModel):
    """A dense array: base64 of its little-endian bytes, C order."""

    dtype: Literal["float16", "float32"]
    byte_order: Literal["little"] = "little"
    shape: list[int]
    data: str


class WorstCaseMetrics(BaseModel):
    """Bounds that hold for every perturbation of norm <= eps (needs a posted target)."""

    worst_case_pixel_accuracy: float | None
    worst_case_miou: float | None = Field(
        description="null when the model was exported without logits (IoU needs them)."
    )
    clean_pixel_accuracy: float | None
    clean_miou: float | None


class ClassCertificate(BaseModel):
    """One predicted class's share of the certificate (output `classes`)."""

    id: int
    name: str
    pixels: int = Field(description="Pixels predicted as this class.")
    guaranteed_fraction: float = Field(description="Fraction of them with radius > eps.")
    max_flips: int = Field(
        description="Most of them one eps-perturbation can flip: at least pixels - max_flips "
        "keep this class under every such attack."
    )
    max_gains: int | None = Field(
        description="Most pixels predicted otherwise one eps-perturbation can turn into this "
        "class (output `gains`, from the logits; else null)."
    )


class StabilityFigure(BaseModel):
    """How strong an attack must be to flip a share of the image (output `stability`)."""

    fraction: float = Field(description="Share of the image's pixels.")
    pixels: int = Field(description="ceil(fraction x pixels): the count that share is.")
    eps: float | None = Field(
        description="Least l2 norm of a perturbation that may flip that many pixels: none of "
        "smaller norm can (null: no perturbation can)."
    )


class ResizeInfo(BaseModel):
    """The area shrink the network saw (asked by `resize`): mask and radius are on the
    source grid, and radii speak of perturbations of the image sent."""

    source: list[int] = Field(description="[height, width] of the image sent.")
    network: list[int] = Field(description="[height, width] the network saw.")
    method: Literal["area"] = "area"
    operator_norm: float = Field(
        description="Upper bound ||D|| of the shrink's l2 operator norm. The radii divide by "
        "it: a pixel's radius is (r - rounding) / operator_norm (at least 0), r the radius of "
        "its network pixel from the network's `lipschitz`; from the image sent to the logits "
        "the constant is lipschitz x operator_norm."
    )
    rounding: float = Field(
        description="l2 bound of the shrink's float32 rounding, taken off every network "
        "radius before it is divided by operator_norm."
    )
    network_eps: float = Field(
        description="Budget at the network input that an eps-attack on the source stays in."
    )


class SegmentResponse(BaseModel):
    """A segmentation with its certificate at `eps` (l2, image values in [0, 1])."""

    request_id: str | None = None
    model: str
    model_version: str
    eps: float
    lipschitz: float = Field(
        description="The network's audited l2 Lipschitz constant L (logits per unit of "
        "network input). Without `resize` the radii use it as it is; with a server-side "
        "resize each radius also folds in the shrink, (r - resize.rounding) / "
        "resize.operator_norm with r the network pixel's radius from L (see `resize`)."
    )
    width: int
    height: int
    guaranteed_fraction: float = Field(description="Fraction of pixels with radius > eps.")
    max_flips: int = Field(description="Most pixels any single eps-perturbation can flip.")
    max_flips_fraction: float
    batch_size: int = Field(description="Images in the forward pass that served this one.")
    mask: EncodedImage | None = None
    radius: EncodedArray | None = None
    overlay: EncodedImage | None = None
    logits: EncodedArray | None = None
    metrics: WorstCaseMetrics | None = None
    classes: list[ClassCertificate] | None = None
    stability: list[StabilityFigure] | None = None
    resize: ResizeInfo | None = None
    timings_ms: dict[str, float]


class ModelSummary(BaseModel):
    """One served model, from its card and audited metadata."""

    name: str
    version: str
    status: str
    ready: bool
    backend: str
    platform: str
    device: str
    lipschitz: float
    default_eps: float
    num_classes: int
    classes: list[str]
    palette: list[tuple[int, int, int]]
    input_size: tuple[int, int]
    has_logits: bool
    sha256: str
    arch: str
    precision: str = Field(
        description="Arithmetic the engine runs: fp32, or fp16 / bf16 (reduced precision)."
    )
    margin_error: float = Field(
        description="Bound on |engine margin - fp32 margin| taken off every margin before "
        "radii and flip counts: 0 for an engine that runs exact fp32; otherwise (fp16 / "
        "bf16, or any engine served with --margin-error) an empirical bound measured on "
        "sample frames (`certseg calibrate`), so its certificates are only as sound as that "
        "measurement."
    )


class InputLimits(BaseModel):
    """What an image may be: over `max_pixels` (counted once each side is padded to a
    multiple of `pad_multiple`, as the network runs it) it needs resize=fit (up to
    `max_source_pixels`), over `max_body_bytes` it is refused."""

    max_body_bytes: int
    max_pixels: int
    max_source_pixels: int
    pad_multiple: int


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelSummary]
    limits: InputLimits


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "target": {
                            "type": "string",
                            "format": "binary",
                            "description": "Ground-truth class-id PNG (worst-case metrics).",
                        },
                    },
                }
            },
        },
    }
}


#: RFC 9457 problem details, as server.errors answers every error of this surface.
_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
    },
}


def _problem(description: str, **extra: object) -> dict:
    """An error response of the OpenAPI document: problem+json."""
    return {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_SCHEMA}},
        **extra,
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or streamed),
    and with 408 when no byte of it comes for `body_idle_s`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    idle_s = get_state(request).settings.body_idle_s
    chunks, size = [], 0
    stream = aiter(request.stream())
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestTimeout(
                f"no byte of the body for {idle_s:g} s ({size} received); send it whole"
            ) from None
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads a cached body for form parsing
    return body


#: The boundary parameter of a multipart Content-Type, quoted or not.
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


async def _image_and_target(request: Request, state: ServerState) -> tuple[bytes, bytes | None]:
    """(image bytes, target bytes or None) from a raw or multipart body."""
    ctype = request.headers.get("content-type", "")
    limit = state.limits.max_bytes
    if ctype.split(";")[0].strip().lower() != "multipart/form-data":
        return await read_body(request, limit), None
    body = await read_body(request, 2 * limit + MULTIPART_SLACK)
    boundary = _BOUNDARY.search(ctype)
    # Starlette's parser takes a body cut short for one whose parts are all there: a lost
    # 'target' would drop the worst-case metrics unsaid
    if boundary and f"--{boundary.group(1)}--".encode() not in body:
        raise InvalidParameter("multipart body ends before its closing boundary: it was cut short")
    # one file more than the route takes, so that a second image or target gets our 422
    form = await request.form(max_files=3, max_fields=4, max_part_size=limit)
    try:
        unknown = sorted(set(form.keys()) - set(MULTIPART_PARTS))
        if unknown:  # a typo such as 'traget' would drop the worst-case metrics unsaid
            raise InvalidParameter(
                f"unknown multipart part {client_value(unknown[0])}; known: "
                f"{', '.join(MULTIPART_PARTS)}"
            )
        parts = {}
        for key in MULTIPART_PARTS:
            values = form.getlist(key)
            if not values:
                continue
            if len(values) > 1:
                raise InvalidParameter(f"multipart body has {len(values)} '{key}' parts; send one")
            if isinstance(values[0], str):
                raise InvalidParameter(f"multipart field '{key}' must be a file")
            parts[key] = await values[0].read()
    finally:
        await form.close()
    if "image" not in parts:  # a multipart body, but not the one this route takes
        raise InvalidParameter("multipart body needs a file field named 'image'")
    return parts["image"], parts.get("target")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _array(a: np.ndarray, dtype: Literal["float16", "float32"]) -> EncodedArray:
    """Base64 of little-endian `a`; float16 is rounded down (radii must not grow)."""
    le = float16_down(a).astype("<f2") if dtype == "float16" else a.astype("<f4", copy=False)
    return EncodedArray(dtype=dtype, shape=list(a.shape), data=_b64(le.tobytes()))


def _json_answer(
    cert: Certified,
    image: DecodedImage,
    outputs: frozenset[str],
    style: OverlayStyle,
    blend: float,
) -> dict:
    """Every field but timings; the encode stage (blocking, runs in a thread)."""
    info = cert.model
    ans: dict = {**cert.summary(), "model_version": info.version, "metrics": cert.metrics}
    if "mask" in outputs:
        png, dtype = cert.mask_png()
        ans["mask"] = EncodedImage(dtype=dtype, data=_b64(png))
    if "radius" in outputs:
        ans["radius"] = _array(cert.radius, "float16")
    if "overlay" in outputs:
        ans["overlay"] = EncodedImage(data=_b64(cert.overlay_png(image.rgb8, style, blend)))
    if "logits" in outputs and cert.logits is not None:
        ans["logits"] = _array(cert.logits, "float32")
    return ans


def _json_body(
    cert: Certified,
    image: DecodedImage,
    outputs: frozenset[str],
    style: OverlayStyle,
    blend: float,
    request_id: str | None,
    timings: Timings,
    t0: float,
) -> tuple[bytes, dict[str, float]]:
    """The JSON answer's bytes and the request's stages (blocking, runs in a thread):
    validated and rendered here, off the event loop (with logits at 1024x2048, 84 MB
    took 300 ms there, every stream and probe waiting), the encode stage timed to the
    end of it. The timings, known only then, are the last field."""
    ans = {**_json_answer(cert, image, outputs, style, blend), "request_id": request_id}
    payload = SegmentResponse.model_validate({**ans, "timings_ms": {}}).model_dump(mode="json")
    del payload["timings_ms"]
    head = _render_json({k: v for k, v in payload.items() if v is not None})
    timings.since("encode", t0)
    stages = timings.finish()
    return head[:-1] + b',"timings_ms":' + _render_json(stages) + b"}", stages


def _render_json(value: object) -> bytes:
    """JSON as Starlette's JSONResponse writes it (UTF-8, compact, no NaN)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _npz(cert: Certified, image: DecodedImage, outputs: frozenset[str], style, blend) -> bytes:
    arrays: dict[str, np.ndarray] = {
        "mask": cert.mask.astype(np.int32),
        "radius": cert.radius.astype(np.float32),
        "margin": cert.margin.astype(np.float32),
        "eps": np.float64(cert.eps),
        "lipschitz": np.float64(cert.model.lipschitz),
        "guaranteed_fraction": np.float64(cert.guaranteed_fraction),
        "max_flips": np.int64(cert.max_flips),
    }
    if cert.resize is not None:
        arrays["network_size"] = np.asarray(cert.resize.network, np.int64)
        arrays["operator_norm"] = np.float64(cert.resize.operator_norm)
        arrays["network_eps"] = np.float64(cert.resize.network_eps(cert.eps))
    for key, value in (cert.metrics or {}).items():  # NaN where the JSON says null
        arrays[key] = np.float64(math.nan if value is None else value)
    if "overlay" in outputs:
        palette = cert.model.card.palette
        arrays["overlay"] = render_overlay(
            cert.mask, cert.radius, cert.eps, palette, image.rgb8, style, blend, cert.region
        )
    if cert.logits is not None and "logits" in outputs:
        arrays["logits"] = cert.logits.astype(np.float32)
    if cert.classes is not None:  # one entry per predicted class, as in the JSON
        for key in ("id", "pixels", "max_flips"):
            arrays[f"class_{key}"] = np.asarray([c[key] for c in cert.classes], np.int64)
        if cert.classes and cert.classes[0]["max_gains"] is not None:
            arrays["class_max_gains"] = np.asarray([c["max_gains"] for c in cert.classes])
        fractions = [c["guaranteed_fraction"] for c in cert.classes]
        arrays["class_guaranteed_fraction"] = np.asarray(fractions, np.float64)
    if cert.stability is not None:  # eps NaN where no perturbation can flip that many
        for key in ("fraction", "pixels", "eps"):
            values = [math.nan if r[key] is None else r[key] for r in cert.stability]
            arrays[f"stability_{key}"] = np.asarray(values, np.int64 if key == "pixels" else None)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _header(field: str) -> str:
    """The response header of an answer field: guaranteed_fraction ->
    X-Certseg-Guaranteed-Fraction (format=png has no body to carry the figures)."""
    return "X-Certseg-" + "-".join(part.capitalize() for part in field.split("_"))


#: The answer fields also sent as X-Certseg-* headers, in this order; only these are.
HEADER_FIELDS = (
    "model",
    "eps",
    "lipschitz",
    "guaranteed_fraction",
    "max_flips",
    "resize",
    *WorstCaseMetrics.model_fields,
)
SERVER_TIMING = "Server-Timing"
#: Every header of a segment answer a browser client reads (CORS exposes them).
RESPONSE_HEADERS = (*(_header(f) for f in HEADER_FIELDS), SERVER_TIMING)


def _certificate_headers(cert: Certified) -> dict[str, str]:
    """The certificate's figures as X-Certseg-* headers; the target's metrics that have
    a value (null ones are left out). A field not in HEADER_FIELDS is not sent, so
    what CORS exposes is all there is."""
    values = {
        "model": cert.model.name,
        "eps": repr(cert.eps),
        "lipschitz": repr(cert.model.lipschitz),
        "guaranteed_fraction": repr(cert.guaranteed_fraction),
        "max_flips": str(cert.max_flips),
    }
    if cert.resize is not None:
        source, network = format_size(*cert.resize.source), format_size(*cert.resize.network)
        values["resize"] = f"{source}->{network}; operator_norm={cert.resize.operator_norm!r}"
    for key, value in (cert.metrics or {}).items():
        if value is not None:
            values[key] = repr(value)
    return {_header(key): values[key] for key in HEADER_FIELDS if key in values}


@router.post(
    "/segment",
    response_model=SegmentResponse,
    response_model_exclude_none=True,
    openapi_extra=_BODY_DOC,
    responses={
        200: {"content": {"image/png": {}, "application/x-npz": {}}},
        400: _problem("Malformed multipart body"),
        404: _problem("No model of that name"),
        413: _problem("Body or pixels over the limits"),
        415: _problem("Not PNG, JPEG or WebP"),
        422: _problem("Corrupt image or invalid option"),
        503: _problem(
            "Overloaded (Retry-After) or backend fault",
            headers={"Retry-After": {"description": "Seconds", "schema": {"type": "integer"}}},
        ),
    },
)
async def segment(
    request: Request,
    model: Annotated[str | None, Query(description="Model name (default: the first).")] = None,
    eps: Annotated[  # read by check_eps, as written ("1_0" is no number)
        str | None,
        Query(
            description="l2 budget on [0,1] pixels, finite and >= 0 (default: the card's).",
            json_schema_extra={"anyOf": [{"type": "number", "minimum": 0.0}, {"type": "null"}]},
        ),
    ] = None,
    outputs: Annotated[
        str | None,
        Query(
            description="Comma list of mask, radius, overlay, classes, gains, stability, "
            "logits (default: mask, radius, overlay, classes, stability)."
        ),
    ] = None,
    format: Annotated[Literal["json", "png", "npz"], Query()] = "json",
    overlay_style: Annotated[Literal["hatch", "dim", "heat"], Query()] = "hatch",
    blend: Annotated[
        str,
        Query(
            description="Photo weight in the overlay, in [0, 1].",
            json_schema_extra={"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.0},
        ),
    ] = "0",
    resize: Annotated[
        str | None,
        Query(
            description="none (default: over the pixel limit is a 413), fit (shrink to the "
            "limit if over it) or a scale in (0, 1]: area averaging, certified against "
            "perturbations of the image sent; answers stay on its grid."
        ),
    ] = None,
) -> Response:
    """Segment an image (raw body or multipart `image`, optional `target` mask) and
    certify every pixel at eps."""
    timings = Timings()
    state = get_state(request)
    info = state.info(model)
    eps_value = check_eps(eps, info.card.default_eps)
    blend = check_number("blend", blend, high=1.0)
    wanted = parse_outputs(outputs)
    shrink = parse_resize(resize)
    image_bytes, target_bytes = await _image_and_target(request, state)
    state.batcher_for(info.name).check_capacity()
    t0 = time.perf_counter()
    image = await asyncio.to_thread(decode_image, image_bytes, state.limits, shrink)
    target = None
    if target_bytes is not None:
        card = info.card
        target = await asyncio.to_thread(
            decode_target,
            target_bytes,
            image.width,
            image.height,
            card.num_classes,
            card.ignore_index,
            state.limits,
            shrink,
        )
    timings.since("decode", t0)
    if format == "png":  # the overlay and headers only: no figure would be sent
        wanted = wanted - FIGURES
    cert = await segment_image(state, info.name, image, eps_value, wanted, timings, target)
    t0 = time.perf_counter()
    headers = _certificate_headers(cert)
    if format == "png":
        body = await asyncio.to_thread(cert.overlay_png, image.rgb8, overlay_style, blend)
        media = "image/png"
    elif format == "npz":
        body = await asyncio.to_thread(_npz, cert, image, wanted, overlay_style, blend)
        media = "application/x-npz"
        headers["Content-Disposition"] = 'attachment; filename="segment.npz"'
    else:
        rid = getattr(request.state, "request_id", None)
        body, stages = await asyncio.to_thread(
            _json_body, cert, image, wanted, overlay_style, blend, rid, timings, t0
        )
        media = "application/json"
    if format != "json":
        timings.since("encode", t0)
        stages = timings.finish()
    state.metrics.observe_stages(stages)
    headers[SERVER_TIMING] = Timings.header(stages)
    return Response(body, media_type=media, headers=headers)


def model_summary(state: ServerState, name: str) -> ModelSummary:
    info = state.info(name)
    card = info.card
    return ModelSummary(
        name=info.name,
        version=info.version,
        status=state.status.get(name, "loading"),
        ready=state.model_ready(name),
        backend=info.backend,
        platform=info.platform,
        device=info.device,
        lipschitz=info.lipschitz,
        default_eps=card.default_eps,
        num_classes=card.num_classes,
        classes=card.classes,
        palette=card.palette,
        input_size=card.input_size,
        has_logits=info.has_logits,
        sha256=info.sha256,
        arch=card.arch,
        precision=info.precision,
        margin_error=info.margin_error,
    )


@router.get("/models", response_model=ModelsResponse)
async def models(request: Request) -> ModelsResponse:
    """Every served model with its card, audited L and readiness."""
    state = get_state(request)
    limits = state.limits
    return ModelsResponse(
        default=state.default_model(),
        models=[model_summary(state, n) for n in state.engines],
        limits=InputLimits(
            max_body_bytes=limits.max_bytes,
            max_pixels=limits.max_pixels,
            max_source_pixels=limits.declared_limit("fit"),
            pad_multiple=limits.pad_multiple,
        ),
    )
