"""Open Inference Protocol (KServe V2) REST, with Triton's binary tensor extension.

`tritonclient.http` and KServe talk to this unchanged. The model takes `image`
FP32 [N, 3, H, W] in [0, 1] and gives `mask` INT32, `margin` FP32, `radius` FP32
[N, H, W] (and `logits` FP32 [N, K, H, W] when exported with it). An `image` input
of datatype BYTES holding encoded PNG/JPEG/WebP files is accepted too (all of one
size); the server decodes it exactly like /v1/segment.

Binary extension: a request whose JSON header is followed by raw tensors says so in
the `Inference-Header-Content-Length` header; inputs with a `binary_data_size`
parameter take their bytes from that tail, in order. Outputs are returned binary
when asked (`binary_data` per output, or `binary_data_output` for all) with the same
header on the response. Errors are ``{"error": "..."}`` (see server.errors).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

import certseg
from certseg.sizes import format_size
from server.decode import decode_image
from server.errors import (
    InvalidParameter,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    client_value,
)
from server.routes.v1 import read_body
from server.state import ServerState, get_state

__all__ = ["router"]

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

HEADER = "Inference-Header-Content-Length"
#: Input datatypes: floats with pixel values in [0, 1] (cast to the model's FP32). No
#: integer types: 0..255 taken as pixel values would certify a different image.
DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP16": np.dtype("<f2"),
    "FP64": np.dtype("<f8"),
}
NP_TO_V2 = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


class Readiness(BaseModel):
    ready: bool
    name: str | None = None


class Liveness(BaseModel):
    live: bool


class V2Error(BaseModel):
    """The protocol's error body."""

    error: str


# OpenAPI documentation of what the routes answer besides 200 (schemathesis checks the
# server against it: tests/test_fuzz_schema.py).
_NOT_READY = {400: {"model": Readiness, "description": "Not ready (the protocol's false)"}}
_NO_MODEL = {404: {"model": V2Error, "description": "No model (or version) of that name"}}
_TENSOR_PARAMS = {
    "type": ["object", "null"],
    "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
    "description": "binary_data_size: the tensor's bytes follow the JSON header.",
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"description": "Echoed back in the response."},
        "parameters": {
            "type": ["object", "null"],
            "description": "binary_data_output: every output as binary data.",
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"type": "string", "enum": ["image"]},
                    "datatype": {"type": "string", "enum": [*DTYPES, "BYTES"]},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "parameters": _TENSOR_PARAMS,
                    "data": {"type": "array", "description": "Row-major values (flat or nested)."},
                },
            },
        },
        "outputs": {
            "type": ["array", "null"],
            "description": "Absent, null or empty: every output.",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {
                        "type": ["object", "null"],
                        "description": "binary_data: as binary.",
                    },
                },
            },
        },
    },
}
_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"type": "string"},
                    "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "parameters": _TENSOR_PARAMS,
                    "data": {"type": "array"},
                },
            },
        },
    },
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_INFER_DOC = {
    "requestBody": {
        "required": True,
        "description": f"JSON; or (binary extension) a JSON header of {HEADER} bytes "
        "followed by the raw tensors.",
        "content": {
            "application/json": {
                "schema": _INFER_REQUEST,
                "example": {
                    "id": "42",
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "FP32",
                            "shape": [1, 3, 1, 2],
                            "data": [0.5] * 6,
                        }
                    ],
                    "outputs": [{"name": "mask"}, {"name": "radius"}],
                },
            },
            "application/octet-stream": _BINARY,
        },
    },
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Outputs (binary ones after the JSON header, see "
        "Inference-Header-Content-Length)",
        "content": {
            "application/json": {"schema": _INFER_RESPONSE},
            "application/octet-stream": _BINARY,
        },
    },
    **_NO_MODEL,
    413: {"model": V2Error, "description": "Body, pixels or batch over the limits"},
    415: {"model": V2Error, "description": "BYTES images that are not PNG, JPEG or WebP"},
    422: {"model": V2Error, "description": "Malformed request or tensors"},
    503: {"model": V2Error, "description": "Overloaded (Retry-After) or backend fault"},
}


def _health(ok: bool, name: str | None = None) -> JSONResponse:
    """The protocol answers health with the status code: 200 true, 4xx false (as Triton,
    which uses 400)."""
    body = Readiness(ready=ok, name=name).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=200 if ok else 400)


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server name, version and the protocol extensions it speaks."""
    return ServerMetadata(
        name="certseg",
        version=certseg.__version__,
        extensions=["binary_tensor_data", "model_configuration"],
    )


@router.get("/health/live", response_model=Liveness)
async def live() -> Liveness:
    """Live as soon as the process serves HTTP (the protocol's body: {"live": true})."""
    return Liveness(live=True)


@router.get("/health/ready", response_model=Readiness, responses=_NOT_READY)
async def ready(request: Request) -> JSONResponse:
    """Ready once every model is loaded and warmed up."""
    return _health(get_state(request).ready)


def _version(state: ServerState, name: str, version: str | None) -> None:
    info = state.info(name)
    if version is not None and version != info.version:
        raise ModelNotFound(
            f"model '{name}' has no version {client_value(version)} (has {info.version})"
        )


def _model_metadata(state: ServerState, name: str) -> ModelMetadata:
    info = state.info(name)
    return ModelMetadata(
        name=info.name,
        versions=[info.version],
        platform=info.platform,
        inputs=[
            TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
            for t in info.inputs
        ],
        outputs=[
            TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
            for t in info.outputs
        ],
        parameters={
            "lipschitz": info.lipschitz,
            "default_eps": info.card.default_eps,
            "classes": info.card.classes,
            "precision": info.precision,
            "margin_error": info.margin_error,
        },
    )


@router.get("/models/{model}", response_model=ModelMetadata, responses=_NO_MODEL)
async def model_metadata(request: Request, model: str) -> ModelMetadata:
    """Inputs, outputs, platform and versions of one model."""
    return _model_metadata(get_state(request), model)


@router.get("/models/{model}/versions/{version}", response_model=ModelMetadata, responses=_NO_MODEL)
async def model_version_metadata(request: Request, model: str, version: str) -> ModelMetadata:
    state = get_state(request)
    _version(state, model, version)
    return _model_metadata(state, model)


@router.get(
    "/models/{model}/ready", response_model=Readiness, responses={**_NOT_READY, **_NO_MODEL}
)
async def model_ready(request: Request, model: str) -> JSONResponse:
    state = get_state(request)
    state.info(model)
    return _health(state.model_ready(model), model)


@router.get(
    "/models/{model}/versions/{version}/ready",
    response_model=Readiness,
    responses={**_NOT_READY, **_NO_MODEL},
)
async def model_version_ready(request: Request, model: str, version: str) -> JSONResponse:
    state = get_state(request)
    _version(state, model, version)
    return _health(state.model_ready(model), model)


@router.get("/models/{model}/config", responses=_NO_MODEL)
async def model_config(request: Request, model: str) -> dict[str, Any]:
    """A Triton-style model configuration (what `get_model_config` reads)."""
    state = get_state(request)
    info = state.info(model)
    return {
        "name": info.name,
        "platform": info.platform,
        "backend": info.backend,
        "max_batch_size": 0,
        "input": [
            {"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": list(t.shape)}
            for t in info.inputs
        ],
        "output": [
            {"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": list(t.shape)}
            for t in info.outputs
        ],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(state.settings.max_delay_ms * 1000),
            "preferred_batch_size": [state.settings.batch_limit(info.device)],
        },
    }


# ---------------------------------------------------------------------------------
# infer


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip/deflate request bodies (tritonclient's request_compression_algorithm),
    inflated with a cap so a compressed bomb is refused, not allocated."""
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise InvalidParameter(f"unsupported Content-Encoding {client_value(encoding)}")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidParameter(f"body does not inflate ({exc})") from exc
    if len(out) > limit:
        raise PayloadTooLarge(f"inflated body exceeds the limit of {limit} bytes")
    if not d.eof:
        raise InvalidParameter(f"body does not inflate (the {encoding} stream is truncated)")
    if d.unused_data:
        raise InvalidParameter(f"body has data after its {encoding} stream (one stream only)")
    return out


def _split_body(
    body: bytes, header_length: str | None, max_json: int
) -> tuple[dict[str, Any], bytes]:
    """(JSON header, binary tail). The JSON part has its own, smaller limit: parsed, it
    takes about 5x its size in memory, and the parser holds the GIL throughout."""
    if header_length is None:
        head, tail = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()):
            raise InvalidParameter(f"{HEADER} must be an integer, got {header_length[:40]!r}")
        digits = header_length.lstrip("0") or "0"  # int() refuses past 4300 digits
        if len(digits) > len(str(len(body))) or int(digits) > len(body):
            raise InvalidParameter(
                f"{HEADER} {client_value(digits)} outside the body of {len(body)} bytes"
            )
        n = int(digits)
        head, tail = body[:n], body[n:]
    if len(head) > max_json:
        raise PayloadTooLarge(
            f"the JSON part of the request is {len(head)} bytes, over the limit of {max_json}; "
            "send tensor data as binary (the binary_data_size parameter)"
        )
    try:
        req = json.loads(head)
    except (ValueError, RecursionError) as exc:  # nested past the parser's depth: too
        raise InvalidParameter("request header is not valid JSON") from exc
    if not isinstance(req, dict):
        raise InvalidParameter("request header must be a JSON object")
    return req, tail


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The object's `parameters` ({} when absent); anything but an object is a 422."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidParameter(f"{where} 'parameters' must be a JSON object")
    return params


def _parse_bytes_elements(raw: bytes, shape: list[int]) -> list[bytes]:
    """Triton's BYTES serialization: each element is a uint32 LE length, then bytes;
    exactly as many as `shape` holds. Stops at the element past them: a body of many
    tiny elements would otherwise become a list of Python objects about 12x its size
    before it is refused."""
    declared = math.prod(shape)
    out, i = [], 0
    while i < len(raw):
        if len(out) == declared:
            raise InvalidParameter(f"shape {shape} holds {declared} BYTES elements; more were sent")
        if i + 4 > len(raw):
            raise InvalidParameter("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InvalidParameter("truncated BYTES tensor")
        out.append(raw[i : i + n])
        i += n
    if len(out) != declared:
        raise InvalidParameter(f"shape {shape} does not match {len(out)} BYTES elements")
    return out


def _input_tensor(
    spec: dict[str, Any], tail: bytes, offset: int, state: ServerState, budget: int
) -> tuple[np.ndarray | list[bytes], int]:
    """One input as an FP32 array, or a list of encoded images for BYTES; new offset."""
    if not isinstance(spec, dict):
        raise InvalidParameter("each input must be a JSON object")
    name, dtype = spec.get("name"), spec.get("datatype")
    shape = spec.get("shape")
    if name != "image":
        raise InvalidParameter(f"unknown input {client_value(name)}; this model takes 'image'")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise InvalidParameter("input shape must be a list of non-negative integers")
    params = _params(spec, "input")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidParameter("binary_data_size must be a non-negative integer")
        if offset + size > len(tail):
            raise InvalidParameter("binary_data_size runs past the end of the body")
        if "data" in spec:  # which would be the tensor? neither silently
            raise InvalidParameter("input has both 'data' and binary_data_size; send one")
        raw: bytes | None = tail[offset : offset + size]
        offset += size
    else:
        raw = None
        if "data" not in spec:
            raise InvalidParameter("input has neither 'data' nor binary_data_size")
    if dtype == "BYTES":
        declared = math.prod(shape)
        if declared > state.settings.max_queue:  # before a single element is parsed
            raise PayloadTooLarge(f"batch of {declared} exceeds max_queue")
        if not shape:
            raise InvalidParameter("BYTES input shape must be [N] (N encoded images), got []")
        if raw is not None:
            items = _parse_bytes_elements(raw, shape)
        else:
            if not isinstance(spec["data"], list):
                raise InvalidParameter("BYTES data in JSON must be a list of base64 strings")
            flat = np.asarray(spec["data"], dtype=object).reshape(-1).tolist()
            if len(flat) != declared:  # before any is decoded
                raise InvalidParameter(f"shape {shape} does not match {len(flat)} BYTES elements")
            try:
                items = [base64.b64decode(s, validate=True) for s in flat]
            except (ValueError, TypeError) as exc:
                raise InvalidParameter("BYTES data in JSON must be base64 strings") from exc
        return items, offset
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidParameter(
            "input 'image' must be FP32 (FP16, or FP64 of float32 values) with values in "
            f"[0, 1], or BYTES (encoded images), got {client_value(dtype)}"
        )
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidParameter(f"input 'image' must have shape [N, 3, H, W], got {shape}")
    h, w = shape[2], shape[3]
    if h < 1 or w < 1:
        raise InvalidParameter(f"input 'image' has an empty size {format_size(h, w)}")
    state.limits.check_network_size(h, w, "input 'image' of ", "send it downscaled")
    _check_request_pixels(shape[0] * state.limits.network_pixels(h, w), budget)
    count = math.prod(shape)  # exact: np.prod wraps around in int64
    try:
        if raw is not None:
            if len(raw) != count * DTYPES[dtype].itemsize:
                raise InvalidParameter(f"binary data of {len(raw)} bytes does not fit {shape}")
            arr = np.frombuffer(raw, dtype=DTYPES[dtype])
        else:
            arr = np.asarray(spec["data"])
            if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:  # strings, booleans
                raise InvalidParameter(f"input data must be JSON numbers for {dtype}")
            arr = arr.astype(np.float64).reshape(-1)
            if arr.size != count:
                raise InvalidParameter(f"{arr.size} values do not fit shape {shape}")
            if dtype == "FP16":  # JSON numbers of an FP16 tensor: its values, as binary
                if arr.size and np.abs(arr).max() > np.finfo(np.float16).max:
                    raise InvalidParameter("input data holds values past FP16's range")
                arr = arr.astype(np.float16)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidParameter(f"input data does not parse as {dtype} ({exc})") from exc
    sent, arr = arr, arr.astype(np.float32).reshape(shape)
    if not np.isfinite(arr).all():
        raise InvalidParameter("input 'image' has NaN or infinite values")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise InvalidParameter(
            f"input 'image' values must lie in [0, 1] (pixel / 255), got "
            f"{float(arr.min()):g}..{float(arr.max()):g}"
        )
    # The certificate is of the float32 image the network sees: an FP64 image rounded
    # to it is another image, and its radii would not hold around the one sent.
    if dtype == "FP64" and not np.array_equal(arr.reshape(-1), sent.reshape(-1)):
        raise InvalidParameter(
            "input 'image' as FP64 must hold float32 values exactly (the certificate is "
            "of the float32 image the network sees); send FP32"
        )
    return arr, offset


def _pixel_budget(state: ServerState, model: str) -> int:
    """Most pixels (images x height x width) one V2 request may hold: one forward pass
    of the model's batcher (the largest image at least), so that its inputs and the
    outputs it waits for stay one pass's worth."""
    per_pass = state.batcher_for(model).max_pass_pixels or state.limits.max_pixels
    return max(per_pass, state.limits.max_pixels)


def _check_request_pixels(pixels: int, budget: int) -> None:
    if pixels > budget:
        raise PayloadTooLarge(
            f"the request holds {pixels} pixels, over the limit of {budget} per request "
            "(one forward pass): send fewer images per request"
        )


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidParameter(
            f"parameter {key!r} must be true or false, got {client_value(value)}"
        )
    return value


def _requested_outputs(req: dict[str, Any], available: list[str]) -> list[tuple[str, bool]]:
    """[(name, binary)] in the order asked (all outputs if none named)."""
    all_binary = _flag(_params(req, "request"), "binary_data_output", False)
    if "id" in req and not isinstance(req["id"], str):
        raise InvalidParameter("the request 'id' must be a string")
    outs = req.get("outputs")
    if outs is not None and not isinstance(outs, list):
        raise InvalidParameter("'outputs' must be a list")
    if not outs:
        return [(n, all_binary) for n in available]
    result = []
    for o in outs:
        if not isinstance(o, dict):
            raise InvalidParameter('each output must be a JSON object, {"name": ...}')
        name = o.get("name")
        if name not in available:
            raise InvalidParameter(f"unknown output {client_value(name)}; available: {available}")
        if any(name == n for n, _ in result):
            raise InvalidParameter(f"output {name!r} is asked twice")
        params = _params(o, "output")
        if "classification" in params:  # tritonclient's class_count: not the tensor asked
            raise InvalidParameter(
                f"output {name!r}: the classification extension is not served (each output "
                "is its whole tensor); ask it without class_count"
            )
        result.append((name, _flag(params, "binary_data", all_binary)))
    return result


def _check_json_outputs(
    wanted: list[tuple[str, bool]], images: int, pixels: int, num_classes: int, limit: int
) -> None:
    """Refuse, before any inference, outputs asked as JSON that would hold more than
    `limit` numbers (text of ~10-20 bytes each, built in memory at once)."""
    values = sum(
        pixels * (num_classes if name == "logits" else 1) for name, binary in wanted if not binary
    )
    if values > limit:
        raise PayloadTooLarge(
            f"the outputs asked as JSON would hold {values} numbers for {images} image(s), "
            f"over the limit of {limit}: ask them as binary data (binary_data_output)"
        )


async def _images(
    tensor: np.ndarray | list[bytes], state: ServerState, accepts_uint8: bool, budget: int
) -> list[np.ndarray]:
    """The request's images as network inputs; BYTES ones decoded one by one, the
    request's pixels counted as they come (refused once over budget, not after)."""
    if isinstance(tensor, np.ndarray):
        return list(tensor)
    images, size, pixels = [], None, 0
    for data in tensor:
        d = await asyncio.to_thread(decode_image, data, state.limits)
        if size is not None and (d.height, d.width) != size:
            raise InvalidParameter("all BYTES images of one request must have the same size")
        size = (d.height, d.width)
        pixels += state.limits.network_pixels(*size)
        _check_request_pixels(pixels, budget)
        images.append(await asyncio.to_thread(d.network_input, accepts_uint8))
    return images


@router.post("/models/{model}/infer", responses=_INFER_RESPONSES, openapi_extra=_INFER_DOC)
async def infer(request: Request, model: str) -> Response:
    """Run the model on a batch (JSON or binary tensors); one forward pass per image
    shape through the shared dynamic batcher."""
    return await _infer(request, model, None)


@router.post(
    "/models/{model}/versions/{version}/infer",
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOC,
)
async def infer_version(request: Request, model: str, version: str) -> Response:
    return await _infer(request, model, version)


def _parse(
    body: bytes, encoding: str, header_length: str | None, state: ServerState, budget: int
) -> tuple[dict[str, Any], np.ndarray | list[bytes]]:
    """The request header and its one input tensor, from the raw body."""
    body = _decompress(body, encoding, state.settings.max_tensor_bytes)
    req, tail = _split_body(body, header_length, state.settings.max_json_bytes)
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InvalidParameter("exactly one input, 'image', is expected")
    tensor, end = _input_tensor(inputs[0], tail, 0, state, budget)
    if end != len(tail):  # a binary_data_size too small, or bytes of another request
        raise InvalidParameter(
            f"{len(tail) - end} bytes of binary data follow the input's binary_data_size"
        )
    return req, tensor


async def _infer(request: Request, model: str, version: str | None) -> Response:
    state = get_state(request)
    _version(state, model, version)
    info = state.info(model)
    batcher = state.batcher_for(info.name)
    body = await read_body(request, state.settings.max_tensor_bytes)
    encoding = request.headers.get("content-encoding", "").lower()
    # Off the event loop: inflating, parsing and converting up to max_tensor_bytes.
    budget = _pixel_budget(state, info.name)
    req, tensor = await asyncio.to_thread(
        _parse, body, encoding, request.headers.get(HEADER), state, budget
    )
    wanted = _requested_outputs(req, info.output_names)
    count = len(tensor)  # images: the batch dimension, or the BYTES elements
    if count == 0:
        raise InvalidParameter("the input holds no images (batch of 0)")
    # Both before decoding or queueing anything: a request refused is refused for free.
    if count > state.settings.max_queue:
        raise PayloadTooLarge(f"batch of {count} exceeds max_queue")
    if batcher.depth + count > batcher.max_queue:
        # all or nothing: a half-queued request would compute images nobody reads
        raise Overloaded("inference queue full", retry_after=batcher.retry_after())
    images = await _images(tensor, state, info.accepts_uint8, budget)
    pixels = sum(im.shape[-2] * im.shape[-1] for im in images)
    limit = state.settings.max_json_bytes // 8
    _check_json_outputs(wanted, count, pixels, info.card.num_classes, limit)  # before inference
    extra = ("logits",) if any(n == "logits" for n, _ in wanted) else ()
    # all or none, checked again now the images are decoded (others queued meanwhile)
    results = await batcher.submit_all(info.name, images, extra)
    # Off the event loop: stacking and encoding up to one pass's outputs.
    return await asyncio.to_thread(_respond, req, info.name, info.version, results, wanted)


def _respond(
    req: dict[str, Any],
    name: str,
    version: str,
    results: list[Any],
    wanted: list[tuple[str, bool]],
) -> Response:
    """The answer (blocking): each output stacked over the request's images, as JSON
    numbers or, asked binary, raw little-endian bytes after the JSON header."""
    outputs, blobs = [], []
    for out_name, binary in wanted:
        arr = np.stack([r.outputs[out_name] for r in results])
        dtype = NP_TO_V2.get(arr.dtype)
        if dtype is None:
            arr = arr.astype(np.float32)
            dtype = "FP32"
        entry: dict[str, Any] = {"name": out_name, "datatype": dtype, "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outputs}
    if "id" in req:
        head["id"] = req["id"]
    text = json.dumps(head).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER: str(len(text))},
    )
