"""certseg SDK: `CertSegClient` (sync) and `AsyncCertSegClient` (asyncio).

The twins share everything but I/O: `_Core` builds requests (image encoding, query,
headers, stream URL), parses answers into typed results, turns error answers into
exceptions (clients.models) and decides retries; each client only sends and sleeps.
Depends on httpx, websockets, numpy and pillow; never on the server package or torch.

    with CertSegClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.segment("street.png", eps=0.1)
        print(result.guaranteed_fraction, result.mask.shape)
        for frame in client.stream(frames, eps=0.1):
            print(frame.frame, frame.guaranteed_fraction, frame.dropped)

Every certificate is for the image the server decodes: single images go as PNG
(lossless), and a float array must be exactly 8-bit (multiples of 1/255; anything else
is a ValueError, never silently rounded). Stream frames go as JPEG unless
`frame_format="PNG"`, and their certificates are for the JPEG-decoded frames
(`StreamResult.frame_bytes` holds what was sent).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias
from urllib.parse import urlencode

import httpx
import numpy as np
from PIL import Image

from clients.models import (
    APIError,
    CertSegClientError,
    ClassCertificate,
    ModelsListing,
    SegmentResult,
    Stability,
    StreamResult,
    StreamSummary,
    TransportError,
    error_for_status,
)

__all__ = [
    "DEFAULT_OUTPUTS",
    "AsyncCertSegClient",
    "CertSegClient",
    "FrameFormat",
    "ImageInput",
    "TargetInput",
    "encode_image",
    "encode_target",
]

ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | Image.Image | np.ndarray"
#: A label map of class ids (the model's ignore index for unlabelled pixels): a PNG
#: path or bytes, a PIL image, or an (H, W) integer array.
TargetInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | Image.Image | np.ndarray"
#: None (the server refuses images over its pixel limit), "fit", or a scale in (0, 1].
Resize: TypeAlias = "Literal['fit'] | float | None"
#: What `segment` asks for by default (logits are off: they are C x H x W floats).
DEFAULT_OUTPUTS: tuple[str, ...] = ("mask", "radius", "overlay", "classes", "stability")
#: What `stream` asks for by default: the server renders the overlay PNG per frame.
DEFAULT_STREAM_OUTPUTS: tuple[str, ...] = ("overlay",)
RETRY_STATUSES = frozenset({503})
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


def _sniff(data: bytes) -> str:
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


#: How far (in 1/255 steps) a float pixel times 255 may lie from an integer and still
#: count as the 8-bit value it rounds to: float32 k / 255 * 255 is within 2e-5 of k.
EIGHT_BIT_TOLERANCE = 1e-3
#: The PIL modes whose pixels are 8-bit (or fewer) per channel: converting them to RGB
#: loses nothing the server would keep. I, F and I;16 hold more and are refused.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La"})


def _not_eight_bit(detail: str) -> ValueError:
    return ValueError(
        f"{detail}: the server decodes 8-bit colour images (PNG/JPEG/WebP), so the SDK would "
        "have to round it to 8 bits and the certificate would be for another image than the "
        "one given. Pass uint8 pixels (np.round(a * 255).astype(np.uint8): the certificate "
        "is then for that image), or send the float tensor unchanged as FP32 to "
        "POST /v2/models/<model>/infer (mask, margin and radius of the image as given)"
    )


def _pixels(a: np.ndarray) -> Image.Image:
    """A PIL image from H x W x 3 (or H x W) uint8, or float in [0, 1] that is exactly
    8-bit (every value a multiple of 1/255); any other float image is a ValueError,
    never rounded: the certificate would speak of the rounded image."""
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise ValueError(f"expected an H x W x 3 array, got shape {a.shape}")
    if a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise ValueError("float images must hold finite values in [0, 1]")
        scaled = a.astype(np.float64) * 255.0
        steps = np.round(scaled)
        off = np.abs(scaled - steps)
        if off.size and float(off.max()) > EIGHT_BIT_TOLERANCE:
            dist = float(np.linalg.norm((scaled - steps).ravel())) / 255.0
            raise _not_eight_bit(
                f"float image is not 8-bit: {int((off > EIGHT_BIT_TOLERANCE).sum())} of "
                f"{a.size} values are not multiples of 1/255 (the nearest 8-bit image is "
                f"{dist:.4g} away in l2)"
            )
        return Image.fromarray(steps.astype(np.uint8))
    raise ValueError(f"expected uint8 or float pixels, got {a.dtype}")


def encode_image(image: ImageInput, fmt: str = "PNG", quality: int = 90) -> tuple[bytes, str]:
    """(body bytes, media type) for a path, encoded bytes, PIL image or numpy array.

    Encoded inputs (bytes, PNG/JPEG/WebP files) travel unchanged; pixels are
    encoded as `fmt`: PNG (lossless, the default for single images) or JPEG (lossy:
    the certificate is then for the JPEG-decoded image, not the pixels given). Float
    arrays must be exactly 8-bit (multiples of 1/255), and PIL images of more than 8
    bits per channel (modes I, F, I;16) are refused, as no 8-bit image carries them
    (ValueError naming the V2 FP32 path); 16-bit grey ("I;16") goes as a 16-bit PNG,
    which the server reads exactly."""
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        return data, _sniff(data)
    if isinstance(image, str | os.PathLike):
        data = Path(image).read_bytes()
        media = _sniff(data)
        if media != "application/octet-stream":
            return data, media
        try:
            img = Image.open(io.BytesIO(data))  # e.g. BMP/TIFF: re-encode
            img.load()
        except (OSError, ValueError, SyntaxError):  # not an image Pillow reads either:
            return data, media  # sent as it is, the server's 415 says so (as for bytes)
        frames = int(getattr(img, "n_frames", 1))
        if frames > 1:  # re-encoded, only its first frame would be certified, unsaid
            raise ValueError(
                f"{image}: {frames} frames (an animated {img.format}); send one still "
                "image, or a video frame by frame with .stream()"
            )
        return encode_image(img, fmt, quality)
    if isinstance(image, np.ndarray):
        image = _pixels(image)
    if isinstance(image, Image.Image):
        if image.mode == "I;16" and fmt.upper() == "PNG":
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
        if image.mode not in _EIGHT_BIT_MODES:
            raise _not_eight_bit(f"PIL image of mode {image.mode} is not 8-bit")
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buf = io.BytesIO()
        kw: dict[str, Any] = {"quality": quality} if fmt.upper() == "JPEG" else {}
        image.save(buf, format=fmt, **kw)
        return buf.getvalue(), f"image/{fmt.lower()}"
    raise TypeError(f"unsupported image type {type(image).__name__}")


def encode_target(target: TargetInput) -> bytes:
    """PNG bytes of a label map: PNG files and bytes travel unchanged; arrays become
    8-bit grey PNGs (16-bit when a label exceeds 255)."""
    if isinstance(target, bytes | bytearray):
        return bytes(target)
    if isinstance(target, str | os.PathLike):
        return Path(target).read_bytes()
    if isinstance(target, np.ndarray):
        if target.ndim != 2 or not np.issubdtype(target.dtype, np.integer):
            raise ValueError(
                f"a target is an (H, W) integer array, got {target.dtype} {target.shape}"
            )
        if target.size and (target.min() < 0 or target.max() > 65535):
            raise ValueError("target labels must lie in 0..65535")
        wide = bool(target.size) and int(target.max()) > 255
        target = Image.fromarray(target.astype(np.uint16 if wide else np.uint8))
    if isinstance(target, Image.Image):
        buf = io.BytesIO()
        target.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"unsupported target type {type(target).__name__}")


def checked_url(url: str) -> str:
    """`url` without its trailing slash, or a ValueError that shows the form: a URL
    without http:// ("127.0.0.1:8000") failed each request after every retry's wait."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a server URL: {url!r} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"the server URL must be http(s)://host[:port], got {url!r}")
    return url.rstrip("/")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _options(
    eps: float | None,
    outputs: Sequence[str],
    model: str | None,
    overlay_style: str | None,
    resize: Resize,
) -> dict[str, str]:
    """The query options /v1/segment and /v1/stream share."""
    q: dict[str, str] = {"outputs": ",".join(outputs)}
    if eps is not None:
        q["eps"] = repr(float(eps))
    if model is not None:
        q["model"] = model
    if overlay_style is not None:
        q["overlay_style"] = overlay_style
    if resize is not None:
        q["resize"] = resize if isinstance(resize, str) else repr(float(resize))
    return q


def _b64(data: str) -> bytes:
    return base64.b64decode(data)


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _array(enc: dict[str, Any], out: str = "float32") -> np.ndarray:
    dtype = {"float16": "<f2", "float32": "<f4"}[enc["dtype"]]
    a = np.frombuffer(_b64(enc["data"]), dtype=dtype).reshape(enc["shape"])
    return a.astype(out)


@dataclass
class _Core:
    """Everything the two clients share: configuration, requests, parsing, retries."""

    url: str
    api_key: str | None = None
    timeout: float = 30.0
    max_retries: int = 3
    backoff: float = 0.25
    backoff_max: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = checked_url(self.url)
        if self.api_key is None:
            self.api_key = os.environ.get("CERTSEG_API_KEY") or None

    # -- requests --------------------------------------------------------------------

    def base_headers(self) -> dict[str, str]:
        h = {"User-Agent": "certseg-client", **self.headers}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def segment_request(
        self,
        image: ImageInput,
        eps: float | None,
        outputs: Sequence[str],
        model: str | None,
        overlay_style: str | None,
        resize: Resize = None,
        target: TargetInput | None = None,
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """(query params, httpx body arguments) of POST /v1/segment: the image as the
        raw body, or image and target as multipart files."""
        body, media = encode_image(image)
        params = {"format": "json", **_options(eps, outputs, model, overlay_style, resize)}
        if target is None:
            return params, {"content": body, "headers": {"Content-Type": media}}
        files = {
            "image": ("image", body, media),
            "target": ("target.png", encode_target(target), "image/png"),
        }
        return params, {"files": files}

    def stream_url(
        self,
        eps: float | None,
        outputs: Sequence[str],
        model: str | None,
        overlay_style: str | None,
        resize: Resize = None,
    ) -> str:
        q = _options(eps, outputs, model, overlay_style, resize)
        ws = "wss" + self.url[5:] if self.url.startswith("https") else "ws" + self.url[4:]
        return f"{ws}/v1/stream?{urlencode(q)}"

    # -- answers ---------------------------------------------------------------------

    def check(self, resp: httpx.Response) -> None:
        """Raise the typed exception of an error answer."""
        if resp.status_code < 400:
            return
        try:
            body = resp.json()
        except ValueError:
            body = None
        raise error_for_status(
            resp.status_code, body, resp.text, _retry_after(resp.headers.get("retry-after"))
        )

    def parse_segment(self, resp: httpx.Response, latency_ms: float) -> SegmentResult:
        self.check(resp)
        d = resp.json()
        mask = radius = logits = None
        overlay = None
        if "mask" in d:
            mask = np.asarray(_png(_b64(d["mask"]["data"])))
        if "radius" in d:
            radius = _array(d["radius"])
        if "overlay" in d:
            overlay = _png(_b64(d["overlay"]["data"])).convert("RGB")
        if "logits" in d:
            logits = _array(d["logits"])
        return SegmentResult(
            model=d["model"],
            model_version=d.get("model_version", ""),
            eps=float(d["eps"]),
            lipschitz=float(d["lipschitz"]),
            width=int(d["width"]),
            height=int(d["height"]),
            guaranteed_fraction=float(d["guaranteed_fraction"]),
            max_flips=int(d["max_flips"]),
            max_flips_fraction=float(d.get("max_flips_fraction", 0.0)),
            timings=dict(d.get("timings_ms", {})),
            mask=mask,
            radius=radius,
            overlay=overlay,
            logits=logits,
            metrics=d.get("metrics"),
            classes=ClassCertificate.parse(d.get("classes")),
            stability=Stability.parse(d.get("stability")),
            resize=d.get("resize"),
            batch_size=int(d.get("batch_size", 1)),
            request_id=d.get("request_id"),
            latency_ms=latency_ms,
        )

    # -- retries ---------------------------------------------------------------------

    def retry_delay(self, attempt: int, error: Exception) -> float | None:
        """Seconds to wait before retry `attempt` (0-based), or None to give up.

        Retried: 503 (Retry-After honoured, at most backoff_max) and transport errors
        (refused connection, connect timeout); exponential backoff otherwise. A read
        timeout is not: the server has the request and is likely still working on it
        (a 4K forward pass), so a retry would queue the same work again."""
        if attempt >= self.max_retries or isinstance(error, httpx.ReadTimeout):
            return None
        if isinstance(error, APIError):
            if error.status not in RETRY_STATUSES:
                return None
            if error.retry_after is not None:
                return min(error.retry_after, self.backoff_max)
        elif not isinstance(error, httpx.TransportError):
            return None
        return min(self.backoff * 2.0**attempt, self.backoff_max)

    def transport_error(
        self, method: str, path: str, exc: httpx.TransportError, attempts: int
    ) -> TransportError:
        """The error that ends a request's tries, saying how many and what to change."""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(exc, httpx.ReadTimeout):
            return TransportError(
                f"{method} {path}: no answer within timeout={self.timeout:g} s{tries} (not "
                "retried: the server may still be working on it; raise timeout= for large "
                "images, or send them smaller)"
            )
        return TransportError(f"{method} {path}: {exc!r}{tries}")


class _StreamReader:
    """Turns the server's stream messages into StreamResults (JSON + binary parts)."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None
        self.names: list[str] = []
        self.blobs: dict[str, bytes] = {}
        self.sent_at: dict[int, float] = {}
        self.sent_bytes: dict[int, bytes] = {}  # frame -> the bytes sent (until answered)
        self.config: dict[str, Any] = {}

    def feed(self, msg: str | bytes) -> StreamResult | None:
        """A finished result, or None while parts are missing (or for control answers)."""
        if isinstance(msg, bytes):
            if self.pending is None or not self.names:
                raise TransportError("unexpected binary message on the stream")
            self.blobs[self.names.pop(0)] = msg
            return self._finish() if not self.names else None
        d = json.loads(msg)
        kind = d.get("type")
        if kind == "config":
            self.config = d
            return None
        if kind == "pong":
            return None
        if kind == "error":
            err = error_for_status(int(d.get("status", 500)), d)
            if d.get("frame") is None:
                raise err
            return StreamResult(
                frame=int(d["frame"]),
                dropped=int(d.get("dropped", 0)),
                latency_ms=self._latency(int(d["frame"])),
                error=err,
                frame_bytes=self._sent_bytes(int(d["frame"])),
            )
        if kind == "result":
            self.pending, self.names, self.blobs = d, list(d.get("binary", [])), {}
            return self._finish() if not self.names else None
        return None

    def sent(self, frame: int, data: bytes) -> None:
        self.sent_at[frame] = time.perf_counter()
        self.sent_bytes[frame] = data

    def _latency(self, frame: int) -> float | None:
        t = self.sent_at.pop(frame, None)
        return None if t is None else (time.perf_counter() - t) * 1000.0

    def _sent_bytes(self, frame: int) -> bytes | None:
        """The frame's bytes; frames before it were answered or dropped, so let them go."""
        for k in [k for k in self.sent_bytes if k < frame]:
            del self.sent_bytes[k]
            self.sent_at.pop(k, None)
        return self.sent_bytes.pop(frame, None)

    def _finish(self) -> StreamResult:
        d, self.pending = self.pending or {}, None
        mask = self.blobs.get("mask")
        overlay = self.blobs.get("overlay")
        frame = int(d["frame"])
        return StreamResult(
            frame=frame,
            dropped=int(d.get("dropped", 0)),
            eps=d.get("eps"),
            guaranteed_fraction=d.get("guaranteed_fraction"),
            max_flips=d.get("max_flips"),
            max_flips_fraction=d.get("max_flips_fraction"),
            width=d.get("width"),
            height=d.get("height"),
            model=d.get("model"),
            lipschitz=d.get("lipschitz"),
            resize=d.get("resize"),
            classes=ClassCertificate.parse(d.get("classes")),
            stability=Stability.parse(d.get("stability")),
            batch_size=d.get("batch_size"),
            timings=dict(d.get("timings_ms", {})),
            overlay=_png(overlay).convert("RGB") if overlay is not None else None,
            mask=np.asarray(_png(mask)) if mask is not None else None,
            latency_ms=self._latency(frame),
            frame_bytes=self._sent_bytes(frame),
        )


#: How `stream` encodes pixel frames: JPEG (lossy, small) or PNG (lossless).
FrameFormat: TypeAlias = "Literal['JPEG', 'PNG']"
FRAME_FORMATS = ("JPEG", "PNG")


def _frame_format(frame_format: str) -> str:
    fmt = str(frame_format).upper()
    if fmt not in FRAME_FORMATS:
        raise ValueError(f"frame_format must be 'JPEG' or 'PNG', got {frame_format!r}")
    return fmt


def _frame_message(item: Any, quality: int, fmt: str = "JPEG") -> str | bytes:
    """A frame as `fmt` bytes (encoded bytes pass unchanged), a dict as a control message."""
    if isinstance(item, dict):
        return json.dumps({"type": "config", **item})
    data, _ = encode_image(item, fmt=fmt, quality=quality)
    return data


#: What `stream(max_in_flight=...)` takes: a window, LOSSLESS, None (no window) or AUTO.
InFlight: TypeAlias = "int | Literal['lossless', 'auto'] | None"
LOSSLESS = "lossless"
AUTO = "auto"


class _Flow:
    """Sent / answered / dropped bookkeeping shared by the sender and the reader."""

    def __init__(self, max_in_flight: InFlight, reader: _StreamReader, frames: object) -> None:
        if max_in_flight == AUTO:
            # A list or tuple of frames is a batch of files: none may be dropped. An
            # iterator (a camera, a decoder) is live: the freshest frames matter.
            finite = isinstance(frames, Sequence) and not isinstance(frames, str | bytes)
            max_in_flight = LOSSLESS if finite else None
        window = isinstance(max_in_flight, int) and not isinstance(max_in_flight, bool)
        if not (max_in_flight in (None, LOSSLESS) or (window and max_in_flight >= 1)):
            raise ValueError(
                f"max_in_flight must be >= 1, 'lossless', 'auto' or None: {max_in_flight!r}"
            )
        self.max_in_flight = max_in_flight
        self.reader = reader
        self.summary = StreamSummary()
        self.done = False  # every frame sent
        self.last_frame = -1  # newest frame answered

    def add(self, r: StreamResult) -> None:
        self.summary.add(r)
        self.last_frame = max(self.last_frame, r.frame)

    def complete(self) -> bool:
        """Every frame sent and the last one answered (the rest answered or dropped)."""
        return self.done and self.last_frame >= self.summary.sent - 1

    def window(self) -> int | None:
        """Frames that may be unanswered; lossless: the stream's depth + 1 (a server works
        on depth frames and keeps one waiting, so one more is the most it never drops)."""
        if self.max_in_flight == LOSSLESS:
            return int(self.reader.config.get("depth", 1)) + 1
        return self.max_in_flight  # type: ignore[return-value]

    def can_send(self) -> bool:
        s, window = self.summary, self.window()
        return window is None or s.sent - s.answered - s.dropped < window


class CertSegClient:
    """Synchronous client (httpx + websockets' sync client).

    url: server base URL; api_key: sent as `Authorization: Bearer` (default: the
    CERTSEG_API_KEY environment variable); timeout: seconds per request or stream
    message; max_retries/backoff/backoff_max: retries on 503 and transport errors."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        backoff_max: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = _Core(url, api_key, timeout, max_retries, backoff, backoff_max)
        self._http = httpx.Client(
            base_url=self._core.url,
            timeout=timeout,
            headers=self._core.base_headers(),
            transport=transport,
        )

    @property
    def url(self) -> str:
        return self._core.url

    def __enter__(self) -> CertSegClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, **kw)
                self._core.check(resp)
                return resp
            except (APIError, httpx.TransportError) as exc:
                delay = self._core.retry_delay(attempt, exc)
                if delay is None:
                    if isinstance(exc, httpx.TransportError):
                        raise self._core.transport_error(method, path, exc, attempt + 1) from exc
                    raise
                time.sleep(delay)
                attempt += 1

    def models(self) -> ModelsListing:
        """GET /v1/models: {"default": name, "models": [card summaries], "limits":
        {max_body_bytes, max_pixels, max_source_pixels, pad_multiple}} (over max_pixels,
        counted with each side padded to pad_multiple: resize="fit").
        Each summary (`clients.ModelSummary`) says the engine's `precision` and
        `margin_error`: radii of a model with margin_error > 0 rest on that measured
        bound."""
        return self._request("GET", "/v1/models").json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def segment(
        self,
        image: ImageInput,
        eps: float | None = None,
        outputs: Sequence[str] = DEFAULT_OUTPUTS,
        model: str | None = None,
        overlay_style: str | None = None,
        resize: Resize = None,
        target: TargetInput | None = None,
    ) -> SegmentResult:
        """Segment one image and certify every pixel at eps (default: the model's).

        resize="fit" lets the server shrink an image over its pixel limit (a float in
        (0, 1] shrinks by that scale) by area averaging: the answer stays on the
        image's grid and its radii speak of the image sent (`SegmentResult.resize`).
        A `target` label map of the image's size adds `SegmentResult.metrics`: the
        worst-case pixel accuracy and mIoU any eps-attack can force, beside the clean
        ones (mIoU needs a model exported with logits).

        The image travels as PNG (encoded bytes and PNG/JPEG/WebP files unchanged).
        A float array must be exactly 8-bit (multiples of 1/255): any other is a
        ValueError, since rounding it would certify another image; pass uint8 or send
        the FP32 tensor to /v2/models/<model>/infer."""
        params, body = self._core.segment_request(
            image, eps, outputs, model, overlay_style, resize, target
        )
        t0 = time.perf_counter()
        resp = self._request("POST", "/v1/segment", params=params, **body)
        return self._core.parse_segment(resp, (time.perf_counter() - t0) * 1000.0)

    def stream(
        self,
        frames: Iterable[Any],
        eps: float | None = None,
        outputs: Sequence[str] = DEFAULT_STREAM_OUTPUTS,
        model: str | None = None,
        overlay_style: str | None = None,
        resize: Resize = None,
        max_in_flight: InFlight = AUTO,
        jpeg_quality: int = 90,
        summary: StreamSummary | None = None,
        frame_format: FrameFormat = "JPEG",
    ) -> Iterator[StreamResult]:
        """Send frames over WS /v1/stream; yield results in frame order as they come.

        Frames are images or encoded bytes; a dict item is sent as a config message
        (e.g. {"eps": 0.2}) between frames. Encoded bytes travel unchanged; pixel
        frames (arrays, PIL images) are encoded as `frame_format`: "JPEG" (default,
        quality `jpeg_quality`) is lossy, and each frame's certificate is then for the
        JPEG-decoded frame the server saw, not the pixels given (docs/example_street.png
        at quality 90 decodes 7.2 away in l2, beyond any certified radius); "PNG" sends
        the pixels exactly (larger messages). `StreamResult.frame_bytes` holds the
        bytes each answered frame was sent as: the image its certificate speaks of.
        With max_in_flight=None
        frames go as fast as they come and the server drops stale ones (live video);
        "lossless" keeps the stream's depth + 1 frames unanswered, the most that the
        server never drops (files, at full speed); an int n keeps n (1: lockstep).
        "auto" (the default) is lossless for a list or tuple of frames, live for an
        iterator (a camera or a decoder).
        Pass a StreamSummary to collect counts and latencies; answered + dropped == sent."""
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        core = self._core
        fmt = _frame_format(frame_format)
        reader = _StreamReader()
        flow = _Flow(max_in_flight, reader, frames)
        if summary is not None:
            flow.summary = summary
        cond = threading.Condition()
        failure: list[BaseException] = []
        t_start = time.perf_counter()
        try:
            ws = connect(
                core.stream_url(eps, outputs, model, overlay_style, resize),
                additional_headers=core.base_headers(),
                max_size=2**26,
                open_timeout=core.timeout,
            )
        except (OSError, WebSocketException) as exc:
            raise _ws_error(exc) from exc

        def send_all() -> None:
            try:
                for item in frames:
                    msg = _frame_message(item, jpeg_quality, fmt)
                    with cond:
                        while not cond.wait_for(flow.can_send, timeout=0.5):
                            if failure:
                                return
                        if isinstance(msg, bytes):
                            reader.sent(flow.summary.sent, msg)
                            flow.summary.sent += 1
                    ws.send(msg)
            except BaseException as exc:  # reported by the generator
                failure.append(exc)
            finally:
                with cond:
                    flow.done = True

        sender = threading.Thread(target=send_all, daemon=True, name="certseg-stream-send")
        try:
            with ws:
                reader.feed(ws.recv(timeout=core.timeout))  # the config (raises on error)
                sender.start()
                heard = time.perf_counter()
                while True:
                    with cond:
                        if flow.complete():
                            break
                    if failure:
                        raise failure[0]
                    try:
                        msg = ws.recv(timeout=0.2)
                    except TimeoutError:
                        waiting = flow.summary.sent > flow.last_frame + 1
                        if waiting and time.perf_counter() - heard > core.timeout:
                            raise TransportError("timed out waiting for a stream result") from None
                        continue
                    heard = time.perf_counter()
                    result = reader.feed(msg)
                    if result is None:
                        continue
                    with cond:
                        flow.add(result)
                        cond.notify_all()
                    yield result
        except (OSError, WebSocketException) as exc:
            raise _ws_error(exc) from exc
        finally:
            failure.append(GeneratorExit())
            with cond:
                cond.notify_all()
            if sender.is_alive():
                sender.join(timeout=5)
            flow.summary.seconds = time.perf_counter() - t_start
        if failure and not isinstance(failure[0], GeneratorExit):
            raise failure[0]


def _ws_error(exc: BaseException) -> CertSegClientError:
    """A websockets failure as the SDK's exception (HTTP refusals keep their status)."""
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        body = None
        with contextlib.suppress(ValueError, TypeError):
            body = json.loads(bytes(response.body or b""))
        return error_for_status(response.status_code, body)
    rcvd = getattr(exc, "rcvd", None)
    if rcvd is not None and rcvd.code == 1008:
        return error_for_status(401 if "unauth" in rcvd.reason else 422, {"detail": rcvd.reason})
    return TransportError(f"stream: {exc!r}")


class AsyncCertSegClient:
    """Asyncio twin of CertSegClient (httpx.AsyncClient + websockets' asyncio client)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        backoff_max: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._core = _Core(url, api_key, timeout, max_retries, backoff, backoff_max)
        self._http = httpx.AsyncClient(
            base_url=self._core.url,
            timeout=timeout,
            headers=self._core.base_headers(),
            transport=transport,
        )

    @property
    def url(self) -> str:
        return self._core.url

    async def __aenter__(self) -> AsyncCertSegClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.request(method, path, **kw)
                self._core.check(resp)
                return resp
            except (APIError, httpx.TransportError) as exc:
                delay = self._core.retry_delay(attempt, exc)
                if delay is None:
                    if isinstance(exc, httpx.TransportError):
                        raise self._core.transport_error(method, path, exc, attempt + 1) from exc
                    raise
                await asyncio.sleep(delay)
                attempt += 1

    async def models(self) -> ModelsListing:
        return (await self._request("GET", "/v1/models")).json()

    async def health(self) -> dict[str, Any]:
        return (await self._request("GET", "/healthz")).json()

    async def segment(
        self,
        image: ImageInput,
        eps: float | None = None,
        outputs: Sequence[str] = DEFAULT_OUTPUTS,
        model: str | None = None,
        overlay_style: str | None = None,
        resize: Resize = None,
        target: TargetInput | None = None,
    ) -> SegmentResult:
        params, body = self._core.segment_request(
            image, eps, outputs, model, overlay_style, resize, target
        )
        t0 = time.perf_counter()
        resp = await self._request("POST", "/v1/segment", params=params, **body)
        return self._core.parse_segment(resp, (time.perf_counter() - t0) * 1000.0)

    async def stream(
        self,
        frames: Iterable[Any] | AsyncIterable[Any],
        eps: float | None = None,
        outputs: Sequence[str] = DEFAULT_STREAM_OUTPUTS,
        model: str | None = None,
        overlay_style: str | None = None,
        resize: Resize = None,
        max_in_flight: InFlight = AUTO,
        jpeg_quality: int = 90,
        summary: StreamSummary | None = None,
        frame_format: FrameFormat = "JPEG",
    ) -> AsyncIterator[StreamResult]:
        """Async generator twin of CertSegClient.stream (same arguments and results)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        core = self._core
        fmt = _frame_format(frame_format)
        reader = _StreamReader()
        flow = _Flow(max_in_flight, reader, frames)
        if summary is not None:
            flow.summary = summary
        changed = asyncio.Condition()
        t_start = time.perf_counter()

        async def items() -> AsyncIterator[Any]:
            if isinstance(frames, AsyncIterable):
                async for item in frames:
                    yield item
            else:
                for item in frames:
                    yield item

        try:
            ws = await connect(
                core.stream_url(eps, outputs, model, overlay_style, resize),
                additional_headers=core.base_headers(),
                max_size=2**26,
                open_timeout=core.timeout,
            )
        except (OSError, WebSocketException) as exc:
            raise _ws_error(exc) from exc

        async def send_all() -> None:
            try:
                async for item in items():
                    msg = await asyncio.to_thread(_frame_message, item, jpeg_quality, fmt)
                    async with changed:
                        await changed.wait_for(flow.can_send)
                        if isinstance(msg, bytes):
                            reader.sent(flow.summary.sent, msg)
                            flow.summary.sent += 1
                    await ws.send(msg)
            finally:
                flow.done = True

        sender: asyncio.Task[None] | None = None
        try:
            async with ws:
                reader.feed(await asyncio.wait_for(ws.recv(), core.timeout))  # the config
                sender = asyncio.get_running_loop().create_task(send_all())
                while True:
                    if flow.done:
                        await sender  # re-raises a failed frame source
                        if flow.complete():
                            break
                    recv = asyncio.ensure_future(ws.recv())
                    done, _ = await asyncio.wait(
                        {recv, sender} if not sender.done() else {recv},
                        timeout=core.timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if recv not in done:
                        recv.cancel()
                        if not done:
                            raise TransportError("timed out waiting for a stream result")
                        continue
                    result = reader.feed(recv.result())
                    if result is None:
                        continue
                    async with changed:
                        flow.add(result)
                        changed.notify_all()
                    yield result
        except (OSError, WebSocketException) as exc:
            raise _ws_error(exc) from exc
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            flow.summary.seconds = time.perf_counter() - t_start
