"""One exception tree, translated at one boundary into RFC 9457 problem+json.

::

    CertSegError                      500  (anything we did not foresee)
    ├── InputError                    422  bad request content or options
    │   ├── UnsupportedMediaType      415  not PNG / JPEG / WebP
    │   ├── PayloadTooLarge           413  bytes or pixels over the limits
    │   ├── CorruptImage              422  header or data cannot be decoded
    │   └── InvalidParameter          422  eps NaN/negative/inf, unknown output, ...
    ├── Unauthorized                  401  API key configured and missing/wrong
    ├── ModelNotFound                 404  unknown model name
    ├── ModelError                    500  a model artifact that cannot be used
    └── BackendError                  503  inference failed; the server keeps serving
        ├── BackendUnavailable        503  backend package/device missing
        ├── ModelNotReady             503  still loading / warming up
        └── Overloaded                503  queue full (Retry-After)

Routers raise these; `install_error_handlers` maps them with `PROBLEMS` (a table,
not a chain of try/except) and also turns FastAPI's own validation and routing
errors into problem+json. The V2 (Open Inference Protocol) routes answer the
protocol's ``{"error": "..."}`` instead, with the same status. Bodies never carry
stack traces: unexpected exceptions are caught by the request middleware
(server.app), logged with theirs and answered with a generic 500.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection

__all__ = [
    "PROBLEMS",
    "BackendError",
    "BackendUnavailable",
    "BodyTooLarge",
    "CertSegError",
    "CorruptImage",
    "InputError",
    "InvalidParameter",
    "ModelError",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PayloadTooLarge",
    "Problem",
    "RequestTimeout",
    "Unauthorized",
    "UnsupportedMediaType",
    "client_value",
    "install_error_handlers",
    "problem_for",
    "problem_response",
    "retry_after_seconds",
]

log = logging.getLogger("certseg.server")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://certseg.dev/problems/"


class CertSegError(Exception):
    """Base of every error the server answers on purpose."""

    #: Answered with `Connection: close` (a request body left unread).
    closes_connection = False

    def __init__(self, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class InputError(CertSegError):
    """The request's content or options cannot be served."""


class UnsupportedMediaType(InputError):
    """Not an image format we decode (PNG, JPEG, WebP)."""


class PayloadTooLarge(InputError):
    """Body bytes or declared image pixels over the configured limits."""


class BodyTooLarge(PayloadTooLarge):
    """A body over its cap, refused before it was read whole: the connection closes
    (the rest of the body is never read, so it cannot carry another request)."""

    closes_connection = True


class CorruptImage(InputError):
    """A supported format whose header or data does not decode."""


class InvalidParameter(InputError):
    """A query/control parameter out of its domain (eps NaN, negative, ...)."""


class RequestTimeout(InputError):
    """The client stopped sending its request body (no byte for `body_idle_s`); the
    connection closes, as for a body over its cap."""

    closes_connection = True


def client_value(value: object, limit: int = 40) -> str:
    """A client's value as an error detail shows it: its repr, cut to `limit`
    characters (a 5000-digit eps does not come back whole; nor, past Python's
    int-to-string limit, does its repr fail)."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return "<an integer too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Unauthorized(CertSegError):
    """API key configured and the request's key is missing or wrong."""


class ModelNotFound(CertSegError):
    """No model of that name is served."""


class ModelError(CertSegError):
    """A model artifact that cannot be used (bad metadata, wrong outputs)."""


class BackendError(CertSegError):
    """Inference failed in the backend; transient from the client's side."""


class BackendUnavailable(BackendError):
    """The backend's package or device is missing on this machine."""


class ModelNotReady(BackendError):
    """The model is loading or warming up."""


class Overloaded(BackendError):
    """The inference queue is full."""


@dataclass(frozen=True)
class Problem:
    """How one exception class is answered."""

    status: int
    title: str
    slug: str


#: Exception class -> answer. Looked up along the MRO, most specific first.
PROBLEMS: dict[type[CertSegError], Problem] = {
    CertSegError: Problem(500, "Internal server error", "internal"),
    InputError: Problem(422, "Unprocessable input", "invalid-input"),
    UnsupportedMediaType: Problem(415, "Unsupported media type", "unsupported-media-type"),
    PayloadTooLarge: Problem(413, "Payload too large", "payload-too-large"),
    BodyTooLarge: Problem(413, "Payload too large", "payload-too-large"),
    CorruptImage: Problem(422, "Corrupt image", "corrupt-image"),
    InvalidParameter: Problem(422, "Invalid parameter", "invalid-parameter"),
    RequestTimeout: Problem(408, "Request timeout", "request-timeout"),
    Unauthorized: Problem(401, "Unauthorized", "unauthorized"),
    ModelNotFound: Problem(404, "Model not found", "model-not-found"),
    ModelError: Problem(500, "Model error", "model-error"),
    BackendError: Problem(503, "Backend error", "backend-error"),
    BackendUnavailable: Problem(503, "Backend unavailable", "backend-unavailable"),
    ModelNotReady: Problem(503, "Model not ready", "model-not-ready"),
    Overloaded: Problem(503, "Server overloaded", "overloaded"),
}

#: Titles for errors raised by the framework itself (routing, validation).
_HTTP_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable input",
    500: "Internal server error",
    503: "Service unavailable",
}


def problem_for(exc: CertSegError) -> Problem:
    """The table entry of the most specific class of ``exc``."""
    for cls in type(exc).__mro__:
        if cls in PROBLEMS:
            return PROBLEMS[cls]  # type: ignore[index]
    return PROBLEMS[CertSegError]


def _is_v2(request: HTTPConnection) -> bool:
    return request.url.path.startswith("/v2")


def retry_after_seconds(retry_after: float) -> int:
    """Whole seconds to wait, at least 1 (what Retry-After and stream errors carry)."""
    return max(1, math.ceil(retry_after))


def problem_response(
    request: HTTPConnection,
    status: int,
    title: str,
    detail: str,
    slug: str,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """problem+json for our surfaces, ``{"error": ...}`` for the V2 protocol."""
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = str(retry_after_seconds(retry_after))
    if status == 401:
        hdrs.setdefault("WWW-Authenticate", 'Bearer realm="certseg"')
    if _is_v2(request):
        return JSONResponse({"error": detail or title}, status_code=status, headers=hdrs)
    body = {
        "type": TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail or title,
        "instance": request.url.path,
    }
    request_id = getattr(request.state, "request_id", None)
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=hdrs, media_type=PROBLEM_MEDIA_TYPE)


async def _certseg_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CertSegError)
    p = problem_for(exc)
    if p.status >= 500 and not isinstance(exc, ModelNotReady | Overloaded):
        log.warning("%s: %s", type(exc).__name__, exc.detail)
    headers = {"Connection": "close"} if exc.closes_connection else None
    return problem_response(
        request, p.status, p.title, exc.detail, p.slug, exc.retry_after, headers=headers
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    title = _HTTP_TITLES.get(exc.status_code, "Error")
    detail = exc.detail if isinstance(exc.detail, str) else title
    slug = title.lower().replace(" ", "-")
    return problem_response(request, exc.status_code, title, detail, slug, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    p = PROBLEMS[InvalidParameter]
    return problem_response(request, 422, p.title, "; ".join(parts), p.slug)


def install_error_handlers(app: FastAPI) -> None:
    """The one boundary where exceptions become answers."""
    app.add_exception_handler(CertSegError, _certseg_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
