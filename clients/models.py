"""Typed results and the one exception tree of the certseg SDK.

::

    CertSegClientError                 anything the SDK raises on purpose
    ├── APIError                       the server answered with a problem+json body
    │   ├── InputRejected              4xx other than 401/404 (415, 413, 422, ...)
    │   ├── AuthenticationError        401 missing or wrong API key
    │   ├── NotFoundError              404 unknown model or route
    │   └── ServerError                5xx
    │       └── ServiceUnavailable     503 (overload, model warming up, backend fault)
    └── TransportError                 no answer: connection refused, timeout, closed socket

`APIError` carries the RFC 9457 fields (type, title, status, detail, instance,
request_id) and Retry-After when the server sent one. `error_for_status` picks the
class from a status code by a table, as the server does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
from PIL import Image

__all__ = [
    "APIError",
    "AuthenticationError",
    "CertSegClientError",
    "ClassCertificate",
    "InputRejected",
    "ModelSummary",
    "ModelsListing",
    "NotFoundError",
    "SegmentResult",
    "ServerError",
    "ServiceUnavailable",
    "Stability",
    "StreamResult",
    "StreamSummary",
    "TransportError",
    "error_for_status",
]


class CertSegClientError(Exception):
    """Base of every error the SDK raises on purpose."""


class TransportError(CertSegClientError):
    """No usable answer: connection refused, timed out, or the socket closed."""


class APIError(CertSegClientError):
    """The server answered with an error (an RFC 9457 problem+json body)."""

    def __init__(
        self,
        status: int,
        title: str = "",
        detail: str = "",
        *,
        type: str = "about:blank",
        instance: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.instance = instance
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body or {}


class InputRejected(APIError):
    """4xx: the image or an option cannot be served (415, 413, 422, ...)."""


class AuthenticationError(APIError):
    """401: the server wants an API key and got none or a wrong one."""


class NotFoundError(APIError):
    """404: unknown model or route."""


class ServerError(APIError):
    """5xx."""


class ServiceUnavailable(ServerError):
    """503: overloaded (Retry-After), model not ready, or a backend fault."""


_BY_STATUS: dict[int, type[APIError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    503: ServiceUnavailable,
}


def error_for_status(
    status: int,
    body: dict[str, Any] | None = None,
    text: str = "",
    retry_after: float | None = None,
) -> APIError:
    """The typed exception for an error answer (problem+json, V2 {"error"} or plain).
    The HTTP status is the one kept: a body's own "status" may be a proxy's word
    ({"status": "fail"}) or disagree with what reached the client (RFC 9457)."""
    body = body if isinstance(body, dict) else {}
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else InputRejected)
    detail = body.get("detail") or body.get("error") or text[:500]
    return cls(
        status,
        str(body.get("title", "")),
        str(detail),
        type=str(body.get("type", "about:blank")),
        instance=body.get("instance"),
        request_id=body.get("request_id"),
        retry_after=retry_after,
        body=body,
    )


class ModelSummary(TypedDict):
    """One served model as GET /v1/models lists it (`CertSegClient.models()["models"]`).

    `precision` is the arithmetic the engine runs (fp32, fp16, bf16). `margin_error` is
    the bound on |engine margin - fp32 margin| the server takes off every margin: 0 for
    an engine that runs exact fp32; otherwise an empirical bound measured on sample
    frames (`certseg calibrate`), and that model's certificates are only as sound as
    the measurement."""

    name: str
    version: str
    status: str
    ready: bool
    backend: str
    platform: str
    device: str
    lipschitz: float  # the network's audited l2 Lipschitz constant
    default_eps: float
    num_classes: int
    classes: list[str]
    palette: list[list[int]]
    input_size: list[int]
    has_logits: bool
    sha256: str
    arch: str
    precision: str
    margin_error: float


class ModelsListing(TypedDict):
    """GET /v1/models: the default model, every model, the input limits
    ({max_body_bytes, max_pixels, max_source_pixels, pad_multiple}: pixels are counted
    once each side is padded to a multiple of pad_multiple)."""

    default: str
    models: list[ModelSummary]
    limits: dict[str, int]


@dataclass(frozen=True)
class ClassCertificate:
    """One predicted class's share of the certificate at the answer's eps."""

    id: int
    name: str
    pixels: int  # pixels predicted as this class
    guaranteed_fraction: float  # of them, the fraction with radius > eps
    max_flips: int  # the most of them one eps-perturbation can flip
    #: The most pixels predicted otherwise one eps-perturbation can turn into this class
    #: (None for a model exported without logits).
    max_gains: int | None = None

    @property
    def min_kept(self) -> int:
        """Pixels that keep this class under every perturbation of norm <= eps."""
        return self.pixels - self.max_flips

    @property
    def max_area(self) -> int | None:
        """The most pixels this class can cover under one perturbation of norm <= eps."""
        return None if self.max_gains is None else self.pixels + self.max_gains

    @classmethod
    def parse(cls, rows: list[dict[str, Any]] | None) -> list[ClassCertificate] | None:
        """The answer's `classes` field (None when it was not asked for)."""
        if rows is None:
            return None
        return [
            cls(
                int(r["id"]),
                str(r["name"]),
                int(r["pixels"]),
                float(r["guaranteed_fraction"]),
                int(r["max_flips"]),
                None if r.get("max_gains") is None else int(r["max_gains"]),
            )
            for r in rows
        ]


@dataclass(frozen=True)
class Stability:
    """How strong an attack must be to flip a share of the image: no perturbation of
    l2 norm below `eps` flips `pixels` (that share) of its pixels, whatever eps was asked."""

    fraction: float  # share of the image's pixels
    pixels: int  # ceil(fraction x pixels)
    eps: float | None  # the least norm that may flip that many (None: none can)

    @classmethod
    def parse(cls, rows: list[dict[str, Any]] | None) -> list[Stability] | None:
        """The answer's `stability` field (None when it was not asked for)."""
        if rows is None:
            return None
        return [
            cls(
                float(r["fraction"]),
                int(r["pixels"]),
                None if r["eps"] is None else float(r["eps"]),
            )
            for r in rows
        ]


@dataclass
class SegmentResult:
    """One image's segmentation and certificate at `eps` (l2, pixel values in [0, 1]).

    `radius[y, x]` is the l2 distance within which no perturbation can change pixel
    (y, x)'s class; the pixel is guaranteed at eps when radius > eps.
    """

    model: str
    model_version: str
    eps: float
    #: The network's audited l2 Lipschitz constant. With `resize`, radii also fold in the
    #: shrink: (r - resize["rounding"]) / resize["operator_norm"], r from this constant.
    lipschitz: float
    width: int
    height: int
    guaranteed_fraction: float
    max_flips: int
    max_flips_fraction: float
    timings: dict[str, float]
    mask: np.ndarray | None = None  # (H, W) class ids, uint8 or uint16
    radius: np.ndarray | None = None  # (H, W) float32 (sent as float16, rounded down)
    overlay: Image.Image | None = None
    logits: np.ndarray | None = None  # (C, H, W) float32
    metrics: dict[str, float | None] | None = None
    #: Per predicted class: pixels, fraction certified, most one attack can flip.
    classes: list[ClassCertificate] | None = None
    #: Per share of the pixels (1%, 5%, 10%): the least attack norm that may flip it.
    stability: list[Stability] | None = None
    #: The server's area shrink, when asked (resize=): source and network sizes, the
    #: operator norm folded into the radii, the network-input budget of eps.
    resize: dict[str, Any] | None = None
    batch_size: int = 1
    request_id: str | None = None
    latency_ms: float | None = None  # client-side round trip, retries included

    def guaranteed(self, eps: float | None = None) -> np.ndarray:
        """Boolean (H, W): pixels certified at `eps` (default: the request's eps)."""
        if self.radius is None:
            raise ValueError("request outputs=('radius', ...) to certify at other eps")
        return self.radius > (self.eps if eps is None else eps)

    def guaranteed_fraction_at(self, eps: float) -> float:
        """Fraction of pixels certified at another eps, from the radius map (no request).

        The radius travels as float16, each value rounded down, so this never counts a
        pixel the server would not certify at that eps; it can count fewer (those whose
        radius lies within one float16 step, 2^-10 relative, above eps)."""
        return float(self.guaranteed(eps).mean())


@dataclass
class StreamResult:
    """One answered video frame (a result, or `error` when the frame was refused)."""

    frame: int
    dropped: int  # frames the server dropped on this stream so far
    eps: float | None = None
    guaranteed_fraction: float | None = None
    max_flips: int | None = None
    max_flips_fraction: float | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    lipschitz: float | None = None  # the network's L, as SegmentResult.lipschitz
    resize: dict[str, Any] | None = None  # as SegmentResult.resize
    classes: list[ClassCertificate] | None = None  # as SegmentResult.classes (if asked)
    stability: list[Stability] | None = None  # as SegmentResult.stability (if asked)
    batch_size: int | None = None  # images in the forward pass that served the frame
    timings: dict[str, float] = field(default_factory=dict)
    overlay: Image.Image | None = None
    mask: np.ndarray | None = None
    latency_ms: float | None = None  # client-side: frame sent -> result received
    error: APIError | None = None
    #: The encoded frame as the SDK sent it (None when it did not send it): the
    #: certificate is for the image these bytes decode to. A frame given as pixels and
    #: sent as JPEG (stream's default frame_format) decodes to other pixels than given.
    frame_bytes: bytes | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StreamSummary:
    """Counts and latency of a finished stream (answered + dropped == sent)."""

    sent: int = 0
    answered: int = 0
    dropped: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    def add(self, r: StreamResult) -> None:
        self.answered += 1
        self.dropped = max(self.dropped, r.dropped)
        if r.error is not None:
            self.errors += 1
        if r.latency_ms is not None:
            self.latencies_ms.append(r.latency_ms)
