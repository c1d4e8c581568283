"""A corpus of bad and unusual inputs, generated here (no files), against a live server:
raw image bodies on POST /v1/segment and malformed tensors on POST
/v2/models/<name>/infer.

Each case is its own test: the documented status (problem+json on /v1, the protocol's
``{"error": ...}`` on /v2, never a stack trace) and then a valid request of each surface
succeeds. Valid-but-unusual images (1x1, 16-bit grey, palette, grey, alpha, CMYK, EXIF
rotated) are served (server.decode expands every mode to RGB and reads 16-bit grey
at full precision) with a mask of the grid shown. The content type is not trusted:
the format is sniffed from the magic bytes (server.decode, step 2), so a PNG sent as
application/json is served and text sent as image/png is a 415. Finally the whole
corpus, sent three times, must not grow the server's memory.
"""

from __future__ import annotations

import base64
import gc
import gzip
import io
import json
import re
import resource
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from PIL import Image
from server_support import (
    answer_png,
    assert_problem,
    bomb_png,
    encode,
    random_image,
    raw_png,
    rgb48_png,
    serve_tiny,
)

MAX_BYTES = 512 * 1024
MAX_PIXELS = 300 * 300
MAX_TENSOR_BYTES = 2 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024
SEGMENT = "/v1/segment"
INFER = "/v2/models/tiny/infer"
H, W = 24, 40  # the unusual images' size

# --------------------------------------------------------------------------- builders


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bad_crc_png() -> bytes:
    data = bytearray(encode(random_image(H, W)))
    at = data.index(b"IDAT") + 10
    data[at] ^= 0xFF  # inside the compressed data: the chunk's CRC no longer matches
    return bytes(data)


def _jpeg_bomb() -> bytes:
    """A small JPEG whose frame header (SOF0) claims 65000 x 65000 pixels."""
    data = bytearray(encode(random_image(H, W), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def _exif_rotated_jpeg() -> bytes:
    """Stored W x H with EXIF orientation 6 (a viewer shows it H x W)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(random_image(H, W, seed=4)), "JPEG", exif=exif.tobytes())


def _image(mode: str, fmt: str = "PNG", **kw) -> bytes:
    return _save(Image.fromarray(random_image(H, W, seed=5)).convert(mode), fmt, **kw)


def _grey16() -> bytes:
    ramp = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 68).astype(np.uint16)
    return _save(Image.fromarray(ramp))  # mode I;16


def _palette(**kw) -> bytes:
    img = Image.fromarray(random_image(H, W, seed=6)).convert("P", palette=Image.Palette.ADAPTIVE)
    return _save(img, **kw)


def _over_limit_chunks() -> Iterator[bytes]:
    """A body with no Content-Length (chunked) that passes the limit mid-stream."""
    yield b"\x89PNG\r\n\x1a\n"
    for _ in range(MAX_BYTES // 65536 + 1):
        yield b"\x00" * 65536


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One request and the answer it must get."""

    id: str
    content: bytes | Callable[[], Iterator[bytes]]
    status: int
    slug: str | None = None  # problem type suffix (/v1) or a word of the error (/v2)
    path: str = SEGMENT
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=lambda: {"Content-Type": "image/png"})
    size: tuple[int, int] | None = None  # (height, width) of the mask, for 200s


def _img(id: str, content: bytes, size=(H, W), **kw) -> Case:
    """A valid-but-unusual image: served, mask of `size` (H, W)."""
    return Case(id, content, 200, size=size, params={"outputs": "mask"}, **kw)


def _bad(id: str, content: bytes, status: int, slug: str, **kw) -> Case:
    return Case(id, content, status, slug, **kw)


def _v2(id: str, body, status: int, word: str, path: str = INFER, headers=None) -> Case:
    """A /v2 infer request (a dict is sent as JSON)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(id, content, status, word, path, headers=headers or {})


def _tensor(shape, data=None, datatype="FP32", **extra) -> dict:
    spec = {"name": "image", "datatype": datatype, "shape": shape, **extra}
    if data is not None:
        spec["data"] = data
    return {"inputs": [spec]}


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(random_image(H, W, seed=i)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


_PNG = encode(random_image(H, W, seed=7))
_JPEG = encode(random_image(H, W, seed=8), "JPEG")
_GOOD = _tensor([1, 3, 1, 2], [0.5] * 6)


def _binary(header: dict, tail: bytes, length: int | str | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    n = len(head) if length is None else length
    return head + tail, {"Inference-Header-Content-Length": str(n)}


def _binary_case(
    id: str, header: dict, tail: bytes, word: str, length=None, status: int = 422
) -> Case:
    body, headers = _binary(header, tail, length)
    return _v2(id, body, status, word, headers=headers)


_BIN = {"binary_data_size": 24}  # 6 FP32 values

CORPUS: list[Case] = [
    # ---- unusual but valid images: served
    _img("png-1x1", encode(random_image(1, 1)), size=(1, 1)),
    _img("png-1x7", encode(random_image(1, 7)), size=(1, 7)),
    _img("png-grey16-I16", _grey16()),
    # ---- 16-bit colour: Pillow cuts it to 8 bits, the certificate would be of another
    # image (16-bit grey is served exactly, above)
    _bad("png-rgb48", rgb48_png(H, W), 415, "unsupported-media-type"),
    # Pillow's reason named its BytesIO object, address and all
    _bad("png-signature-then-zeros", b"\x89PNG\r\n\x1a\n" + bytes(4096), 422, "corrupt-image"),
    _img("png-palette-P", _palette()),
    _img("png-palette-with-transparency", _palette(transparency=0)),
    _img("png-grey-L", _image("L")),
    _img("png-bilevel-1", _image("1")),
    _img("png-alpha-RGBA", _image("RGBA")),
    _img("png-alpha-LA", _image("LA")),
    _img("jpeg-grey-L", _image("L", "JPEG")),
    _img("jpeg-CMYK", _image("CMYK", "JPEG")),
    _img("jpeg-exif-rotated", _exif_rotated_jpeg(), size=(W, H)),  # answered as shown
    # ---- the content type is not trusted: the magic bytes decide
    _img("ctype-json-png-body", _PNG, headers={"Content-Type": "application/json"}),
    _img("ctype-text-png-body", _PNG, headers={"Content-Type": "text/plain"}),
    _img("ctype-png-jpeg-body", _JPEG, headers={"Content-Type": "image/png"}),
    _img("ctype-none", _PNG, headers={}),
    _bad("ctype-png-json-body", b'{"image": "x"}', 415, "unsupported-media-type"),
    _bad("text", b"just some text", 415, "unsupported-media-type"),
    _bad("gif", b"GIF89a" + b"\x00" * 64, 415, "unsupported-media-type"),
    # animated: only the first frame would be certified, unsaid (was a 200)
    _bad("png-animated-APNG", _animated("PNG"), 415, "unsupported-media-type"),
    _bad("webp-animated", _animated("WEBP"), 415, "unsupported-media-type"),
    _img("jpeg-MPO-photo-plus-preview", _animated("MPO")),  # a camera's: its first is it
    _bad("bmp", b"BM" + b"\x00" * 64, 415, "unsupported-media-type"),
    _bad(
        "ctype-multipart-no-boundary",
        _PNG,
        400,
        "bad-request",
        headers={"Content-Type": "multipart/form-data"},
    ),
    # ---- empty, truncated, corrupt
    _bad("empty", b"", 415, "unsupported-media-type"),
    _bad("png-truncated", encode(random_image(32, 48))[:120], 422, "corrupt-image"),
    _bad("png-garbled", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 422, "corrupt-image"),
    _bad("png-bad-crc", _bad_crc_png(), 422, "corrupt-image"),
    _bad("png-no-idat", raw_png(W, H, 8, 2, b""), 422, "corrupt-image"),
    _bad("png-zero-width", raw_png(0, H, 8, 2, b""), 422, "corrupt-image"),
    _bad("jpeg-truncated", _JPEG[: len(_JPEG) // 2], 422, "corrupt-image"),
    _bad("jpeg-garbled", b"\xff\xd8\xff" + b"\x13" * 100, 422, "corrupt-image"),
    _bad("webp-garbled", b"RIFF\x20\x00\x00\x00WEBPVP8 " + b"\x00" * 24, 422, "corrupt-image"),
    # ---- over the limits: refused before any pixel is allocated
    _bad("png-bomb-20000x20000", bomb_png(20_000, 20_000), 413, "payload-too-large"),
    _bad("png-bomb-10000x10000", bomb_png(10_000, 10_000), 413, "payload-too-large"),
    _bad("png-pixels-301x300", bomb_png(301, 300), 413, "payload-too-large"),
    _bad("jpeg-bomb-65000x65000", _jpeg_bomb(), 413, "payload-too-large"),
    _bad("bytes", b"\x89PNG\r\n\x1a\n" + b"\x00" * (MAX_BYTES + 1), 413, "payload-too-large"),
    _bad("bytes-chunked", _over_limit_chunks, 413, "payload-too-large"),
    # ---- options
    _bad("eps-nan", _PNG, 422, "invalid-parameter", params={"eps": "nan"}),
    _bad("eps-inf", _PNG, 422, "invalid-parameter", params={"eps": "inf"}),
    _bad("eps-minus-inf", _PNG, 422, "invalid-parameter", params={"eps": "-inf"}),
    _bad("eps-overflows-to-inf", _PNG, 422, "invalid-parameter", params={"eps": "1e999"}),
    _bad("eps-negative", _PNG, 422, "invalid-parameter", params={"eps": "-0.1"}),
    _bad("eps-not-a-number", _PNG, 422, "invalid-parameter", params={"eps": "abc"}),
    # float() would read these as 10 and 5: a number is as a query writes one
    _bad("eps-underscored", _PNG, 422, "invalid-parameter", params={"eps": "1_0"}),
    _bad("eps-arabic-digit", _PNG, 422, "invalid-parameter", params={"eps": "\u0665"}),
    _bad("model-unknown", _PNG, 404, "model-not-found", params={"model": "nope"}),
    _bad("blend-nan", _PNG, 422, "invalid-parameter", params={"blend": "nan"}),
    _bad("blend-over-one", _PNG, 422, "invalid-parameter", params={"blend": "1.5"}),
    _bad("blend-negative", _PNG, 422, "invalid-parameter", params={"blend": "-0.5"}),
    # a typo or a second copy would otherwise certify at an eps nobody asked for
    _bad("query-unknown-name", _PNG, 422, "invalid-parameter", params={"esp": "0.1"}),
    _bad("query-repeated", _PNG, 422, "invalid-parameter", params={"eps": ["0.1", "0.5"]}),
    _bad("query-api-key-on-rest", _PNG, 422, "invalid-parameter", params={"api_key": "k"}),
    # ---- V2: malformed requests and tensors
    _v2("v2-model-unknown", _GOOD, 404, "nope", path="/v2/models/nope/infer"),
    _v2("v2-version-unknown", _GOOD, 404, "version", path="/v2/models/tiny/versions/7/infer"),
    _v2("v2-not-json", b"{inputs", 422, "JSON"),
    _v2("v2-json-array", [], 422, "object"),
    _v2("v2-missing-inputs", {}, 422, "input"),
    _v2("v2-no-inputs", {"inputs": []}, 422, "input"),
    _v2("v2-two-inputs", {"inputs": _GOOD["inputs"] * 2}, 422, "input"),
    _v2("v2-inputs-not-a-list", {"inputs": _GOOD["inputs"][0]}, 422, "input"),
    _v2("v2-input-not-an-object", {"inputs": ["image"]}, 422, "object"),
    _v2("v2-input-name", {"inputs": [{**_GOOD["inputs"][0], "name": "x"}]}, 422, "'x'"),
    _v2("v2-no-data", _tensor([1, 3, 1, 2]), 422, "data"),
    _v2("v2-shape-rank-3", _tensor([3, 1, 2], [0.5] * 6), 422, "shape"),
    _v2("v2-shape-1-channel", _tensor([1, 1, 2, 2], [0] * 4), 422, "shape"),
    _v2("v2-shape-not-a-list", _tensor("1,3,1,2", [0.5] * 6), 422, "shape"),
    _v2("v2-shape-negative", _tensor([1, 3, -1, 2], [0.5] * 6), 422, "shape"),
    _v2("v2-shape-float", _tensor([1, 3, 1.0, 2], [0.5] * 6), 422, "shape"),
    _v2("v2-shape-bool", _tensor([True, 3, 1, 2], [0.5] * 6), 422, "shape"),
    _v2("v2-batch-0", _tensor([0, 3, 1, 2], []), 422, "no images"),
    _v2("v2-height-0", _tensor([1, 3, 0, 2], []), 422, "empty size"),
    _v2("v2-shape-overflows-int64", _tensor([2**62, 3, 2, 2], []), 413, "pixels"),
    _v2("v2-pixels-over-limit", _tensor([1, 3, 301, 300], []), 413, "pixels"),
    _v2("v2-data-too-short", _tensor([1, 3, 2, 2], [0]), 422, "fit"),
    _v2("v2-data-too-long", _tensor([1, 3, 1, 2], [0.5] * 7), 422, "fit"),
    _v2("v2-data-ragged", _tensor([1, 3, 1, 2], [[0.5, 0.5], [0.5]]), 422, "FP32"),
    _v2("v2-data-strings", _tensor([1, 3, 1, 2], ["a"] * 6), 422, "FP32"),
    _v2("v2-data-huge-int", _tensor([1, 3, 1, 2], [10**400] + [0] * 5), 422, "FP32"),
    _v2(
        "v2-data-nan",
        b'{"inputs": [{"name": "image", "datatype": "FP32", '
        b'"shape": [1, 3, 1, 1], "data": [NaN, 0, 0]}]}',
        422,
        "NaN",
    ),
    _v2("v2-datatype-unknown", _tensor([1, 3, 1, 2], [0.5] * 6, "FP8"), 422, "FP32"),
    _v2("v2-datatype-lowercase", _tensor([1, 3, 1, 2], [0.5] * 6, "fp32"), 422, "FP32"),
    _v2("v2-datatype-list", _tensor([1, 3, 1, 2], [0.5] * 6, ["FP32"]), 422, "FP32"),
    _v2(
        "v2-datatype-missing",
        {"inputs": [{"name": "image", "shape": [1, 3, 1, 2], "data": [0.5] * 6}]},
        422,
        "FP32",
    ),
    _v2("v2-bytes-not-an-image", _tensor([1], ["eA=="], "BYTES"), 415, "not a supported"),
    _v2("v2-bytes-not-base64", _tensor([1], ["not base64!"], "BYTES"), 422, "base64"),
    _v2("v2-bytes-batch-0", _tensor([0], [], "BYTES"), 422, "no images"),
    _v2(
        "v2-bytes-data-not-a-list",
        _tensor([1], base64.b64encode(_PNG).decode(), "BYTES"),
        422,
        "list",
    ),
    _v2(
        "v2-bytes-shape-scalar", _tensor([], [base64.b64encode(_PNG).decode()], "BYTES"), 422, "[N]"
    ),
    _v2(
        "v2-bytes-shape-mismatch",
        _tensor([2], [base64.b64encode(_PNG).decode()], "BYTES"),
        422,
        "shape",
    ),
    _v2(
        "v2-bytes-corrupt-png",
        _tensor([1], [base64.b64encode(_PNG[:100]).decode()], "BYTES"),
        422,
        "PNG",
    ),
    _v2("v2-output-unknown", {**_GOOD, "outputs": [{"name": "nope"}]}, 422, "nope"),
    _v2("v2-outputs-not-a-list", {**_GOOD, "outputs": 3}, 422, "outputs"),
    _v2("v2-parameters-string", {**_GOOD, "parameters": "binary"}, 422, "parameters"),
    _v2(
        "v2-input-parameters-list",
        _tensor([1, 3, 1, 2], [0.5] * 6, parameters=[1]),
        422,
        "parameters",
    ),
    _v2(
        "v2-output-parameters-string",
        {**_GOOD, "outputs": [{"name": "mask", "parameters": "x"}]},
        422,
        "parameters",
    ),
    _v2("v2-data-numeric-strings", _tensor([1, 3, 1, 2], ["0.5"] * 6), 422, "numbers"),
    _v2("v2-data-booleans", _tensor([1, 3, 1, 2], [True] * 6), 422, "numbers"),
    _v2("v2-output-twice", {**_GOOD, "outputs": [{"name": "mask"}] * 2}, 422, "twice"),
    _v2("v2-json-nested-past-the-parser", b"[" * 20_000 + b"]" * 20_000, 422, "JSON"),
    _v2("v2-datatype-uint8", _tensor([1, 3, 1, 2], [255] * 6, "UINT8"), 422, "FP32"),
    _v2("v2-values-over-1", _tensor([1, 3, 1, 2], [255.0] * 6), 422, "[0, 1]"),
    _v2("v2-values-negative", _tensor([1, 3, 1, 2], [-0.5] * 6), 422, "[0, 1]"),
    _v2("v2-id-not-a-string", {**_GOOD, "id": 5}, 422, "id"),
    _v2("v2-output-a-string", {**_GOOD, "outputs": ["mask"]}, 422, "object"),
    _v2(
        "v2-binary-flag-a-string",
        {**_GOOD, "parameters": {"binary_data_output": "no"}},
        422,
        "true or false",
    ),
    # 3 images of 200x200: each under the pixel limit, together over one pass
    _v2(
        "v2-bytes-over-one-pass",
        _tensor(
            [3], [base64.b64encode(encode(np.zeros((200, 200, 3), np.uint8))).decode()] * 3, "BYTES"
        ),
        413,
        "per request",
    ),
    # 65 elements: refused by count, before any of them is decoded
    _v2(
        "v2-bytes-over-max-queue",
        _tensor([65], [base64.b64encode(encode(random_image(1, 1))).decode()] * 65, "BYTES"),
        413,
        "max_queue",
    ),
    # ---- V2 binary extension
    # 32x48: 1536 pixels x 7 numbers as JSON (mask, margin, radius, 4 logits), over
    # max_json_bytes / 8; refused before inference, binary outputs are fine
    _binary_case(
        "v2-json-outputs-over-limit",
        _tensor([1, 3, 32, 48], parameters={"binary_data_size": 4 * 3 * 32 * 48}),
        np.full(3 * 32 * 48, 0.5, "<f4").tobytes(),
        "binary_data_output",
        status=413,
    ),
    _binary_case("v2-bin-header-past-body", {"inputs": []}, b"xxxx", "outside", length=999),
    # past Python's 4300-digit int() limit: was a 500
    _binary_case("v2-bin-header-5000-digits", {"inputs": []}, b"", "outside", length="9" * 5000),
    _binary_case("v2-bin-header-negative", {"inputs": []}, b"", "integer", length=-1),
    _binary_case("v2-bin-header-not-int", {"inputs": []}, b"", "integer", length="12a"),
    _binary_case("v2-bin-header-underscore", {"inputs": []}, b"", "integer", length="1_0"),
    _binary_case(
        "v2-bin-size-bool",
        _tensor([1, 3, 1, 2], parameters={"binary_data_size": True}),
        bytes(24),
        "non-negative integer",
    ),
    # 300k 1-byte BYTES elements: refused by the declared shape, none parsed
    _binary_case(
        "v2-bin-bytes-count-over-max-queue",
        _tensor([300_000], datatype="BYTES", parameters={"binary_data_size": 1_500_000}),
        (struct.pack("<I", 1) + b"x") * 300_000,
        "max_queue",
        status=413,
    ),
    # 200k 1-byte elements behind a shape of one: refused at the second, not once all
    # are parsed into Python objects (about 12x the body)
    _binary_case(
        "v2-bin-bytes-more-than-the-shape",
        _tensor([1], datatype="BYTES", parameters={"binary_data_size": 1_000_000}),
        (struct.pack("<I", 1) + b"x") * 200_000,
        "more were sent",
    ),
    _binary_case(
        "v2-bin-header-cuts-json",
        _tensor([1, 3, 1, 2], parameters=_BIN),
        bytes(24),
        "JSON",
        length=10,
    ),
    # were answered, the extra bytes or the JSON data silently ignored
    _binary_case(
        "v2-bin-bytes-after-the-tensor",
        _tensor([1, 3, 1, 2], parameters=_BIN),
        bytes(24 + 8),
        "8 bytes of binary data follow",
    ),
    _binary_case(
        "v2-bin-and-json-data",
        _tensor([1, 3, 1, 2], [0.5] * 6, parameters=_BIN),
        bytes(24),
        "both",
    ),
    _binary_case(
        "v2-bin-size-past-tail",
        _tensor([1, 3, 1, 2], parameters=_BIN),
        bytes(20),
        "binary_data_size",
    ),
    _binary_case(
        "v2-bin-size-negative",
        _tensor([1, 3, 1, 2], parameters={"binary_data_size": -4}),
        b"",
        "binary_data_size",
    ),
    _binary_case(
        "v2-bin-size-not-shape", _tensor([1, 3, 2, 2], parameters=_BIN), bytes(24), "does not fit"
    ),
    _binary_case(
        "v2-bin-bytes-truncated",
        _tensor([1], datatype="BYTES", parameters={"binary_data_size": 6}),
        struct.pack("<I", 100) + b"ab",
        "truncated",
    ),
    # ---- V2 body encodings and sizes
    _v2(
        "v2-gzip-garbage", b"not gzip at all", 422, "inflate", headers={"Content-Encoding": "gzip"}
    ),
    _v2(
        "v2-encoding-unknown",
        json.dumps(_GOOD).encode(),
        422,
        "Content-Encoding",
        headers={"Content-Encoding": "br"},
    ),
    _v2(
        "v2-gzip-bomb",
        gzip.compress(b" " * (2 * MAX_TENSOR_BYTES)),
        413,
        "inflated",
        headers={"Content-Encoding": "gzip"},
    ),
    _v2(
        "v2-gzip-truncated",
        gzip.compress(json.dumps(_GOOD).encode())[:-12],
        422,
        "truncated",
        headers={"Content-Encoding": "gzip"},
    ),
    _v2(
        "v2-gzip-trailing-data",
        gzip.compress(json.dumps(_GOOD).encode()) + b"junk",
        422,
        "after",
        headers={"Content-Encoding": "gzip"},
    ),
    _v2("v2-body-over-limit", b" " * (MAX_TENSOR_BYTES + 1), 413, "limit"),
    # 48x96 values as JSON text: 135 KB, over the JSON limit; the same as binary is fine
    _v2("v2-json-tensor-over-limit", _tensor([1, 3, 48, 96], [0.123] * 13824), 413, "binary"),
    _binary_case(
        "v2-json-header-over-limit",
        {**_tensor([1, 3, 1, 2], parameters=_BIN), "pad": " " * MAX_JSON_BYTES},
        bytes(24),
        "binary",
        status=413,
    ),
]
BY_ID = {c.id: c for c in CORPUS}
assert len(BY_ID) == len(CORPUS), "corpus ids must be unique"


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server():
    srv = serve_tiny(
        max_body_bytes=MAX_BYTES,
        max_pixels=MAX_PIXELS,
        max_tensor_bytes=MAX_TENSOR_BYTES,
        max_json_bytes=MAX_JSON_BYTES,
    )
    yield srv
    srv.stop()


def send(client: httpx.Client, case: Case) -> httpx.Response:
    content = case.content() if callable(case.content) else case.content
    return client.post(case.path, params=case.params, headers=case.headers, content=content)


def check(case: Case, r: httpx.Response) -> None:
    """The documented answer for this case."""
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text
    assert not re.search(r" at 0x[0-9a-f]+>", r.text), r.text  # a repr: the server's memory
    if case.status == 200:
        assert r.status_code == 200, (r.status_code, r.text)
        ans = r.json()
        h, w = case.size
        assert (ans["height"], ans["width"]) == (h, w)
        mask = answer_png(ans["mask"])
        assert mask.shape == (h, w)
        assert int(mask.max()) < 4  # class ids of the 4-class model
        return
    if case.path.startswith("/v2"):
        assert r.status_code == case.status, (r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        assert case.slug in body["error"], body
        return
    body = assert_problem(r, case.status)
    assert body["type"].endswith("/" + case.slug), body
    assert body["instance"] == case.path
    if case.id == "model-unknown":
        assert "tiny" in body["detail"]  # says what is served
    if case.id.startswith("eps-"):  # names the option and what it must be
        assert "eps" in body["detail"] and ("number" in body["detail"]), body
    if case.id.startswith("blend-"):
        assert "blend must be a finite number in [0, 1]" in body["detail"], body
    if case.id.startswith("query-"):  # names the parameter and what to do instead
        (name,) = case.params
        assert name in body["detail"], body
        assert any(w in body["detail"] for w in ("known:", "once", "Authorization")), body


def assert_serving(client: httpx.Client) -> None:
    """A valid request of each surface succeeds."""
    r = client.post(SEGMENT, params={"outputs": "mask"}, content=_PNG)
    assert r.status_code == 200, r.text
    assert (r.json()["height"], r.json()["width"]) == (H, W)
    r = client.post(INFER, json={**_GOOD, "outputs": [{"name": "mask"}]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [1, 1, 2]


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_bad_input_then_valid_request(client, case_id):
    case = BY_ID[case_id]
    check(case, send(client, case))
    assert_serving(client)


LONG = "x" * 5000


@pytest.mark.parametrize(
    "request_args",
    [
        ("POST", SEGMENT, {"params": {"model": LONG}, "content": _PNG}),
        ("GET", "/v2/models/" + LONG, {}),
        ("GET", "/v2/models/tiny/versions/" + LONG, {}),
        ("POST", INFER, {"json": {**_GOOD, "outputs": [{"name": LONG}]}}),
        ("POST", INFER, {"json": {"inputs": [{**_GOOD["inputs"][0], "name": LONG}]}}),
        ("POST", INFER, {"json": {"inputs": [{**_GOOD["inputs"][0], "datatype": LONG}]}}),
        ("POST", INFER, {"json": {**_GOOD, "parameters": {"binary_data_output": LONG}}}),
        ("POST", INFER, {"json": _GOOD, "headers": {"Content-Encoding": LONG}}),
    ],
    ids=[
        "v1-model",
        "v2-model",
        "v2-version",
        "v2-output",
        "v2-input",
        "v2-datatype",
        "v2-flag",
        "v2-encoding",
    ],
)
def test_a_long_client_value_is_cut_in_the_error(client, request_args):
    """Every error that shows a client's value shows at most 40 characters of it (a
    5000-character model name, output name or header is not echoed whole)."""
    method, path, kwargs = request_args
    r = client.request(method, path, **kwargs)
    assert r.status_code in (404, 422), (r.status_code, r.text[:300])
    body = r.json()
    message = body.get("detail") or body.get("error")
    assert isinstance(message, str) and "xxxx" in message and len(message) < 300, message
    assert_serving(client)


def _rss_bytes() -> int:
    """Resident set of this process (the server runs in it: LiveServer is a thread)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_memory_bounded_over_the_corpus(client):
    """The corpus three times: resident memory after the third pass stays within
    max(10%, 50 MB) of after the first, and the peak never jumps by a decoded bomb.

    LiveServer runs uvicorn in a thread of this process, so this process's RSS is the
    server's. The first pass is the warm-up (allocator arenas, ONNX Runtime's buffers for
    each new input shape, Pillow's decoders, lazily built caches), so it is the baseline,
    not the RSS before it; a leak per bad input (a kept body, tensor or image) grows
    every pass and shows between the first and the third. The peak (ru_maxrss) bounds
    what any single case allocated: a 20000x20000 bomb decoded would be 1.2 GB (RGB8).
    """
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss = []
    for _ in range(3):
        for case in CORPUS:
            r = send(client, case)
            assert r.status_code == case.status, (case.id, r.status_code, r.text)
        assert_serving(client)
        gc.collect()
        rss.append(_rss_bytes())
    margin = max(0.10 * rss[0], 50 * 2**20)
    assert rss[2] <= rss[0] + margin, [f"{x / 2**20:.0f} MB" for x in rss]
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert peak_growth < 300 * 2**20, f"peak RSS grew by {peak_growth / 2**20:.0f} MB"


def test_a_query_api_key_on_rest_names_the_headers_that_carry_it(client):
    """No key configured: still a 422 that says where a key goes (a generic unknown
    parameter 422 would leave the client guessing)."""
    r = client.post(SEGMENT, content=_PNG, params={"api_key": "k"})
    detail = assert_problem(r, 422)["detail"]
    assert "Authorization" in detail and "X-API-Key" in detail, detail
