"""The FastAPI application factory.

``create_app(settings)`` builds an app whose lifespan resolves the models (failing
fast on a bad path or artifact), starts one batcher per device and loads + warms
the models in the background. Tests and embedders may pass ready-made engines.

One pure-ASGI middleware wraps every request and WebSocket: request id (the
client's X-Request-ID if sane, else a fresh one; echoed back), API-key check
(constant-time; health and docs exempt), one JSON log line, the request counter,
and a last-resort 500 problem+json without a stack trace. CORS, when configured, wraps
it (off by default).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import certseg
from server.disconnect import CLIENT_LEFT, serve_while_connected
from server.engine import Engine
from server.errors import (
    PROBLEM_MEDIA_TYPE,
    PROBLEMS,
    TYPE_BASE,
    BackendError,
    CertSegError,
    Unauthorized,
    install_error_handlers,
)
from server.logs import API_KEY_PARAM, API_KEY_SUBPROTOCOL, request_id_var
from server.metrics import Metrics
from server.routes import ops, stream, v1, v2
from server.settings import Settings
from server.state import ServerState

__all__ = ["create_app", "uvicorn_config"]

log = logging.getLogger("certseg.server")

#: Paths that never need the API key (probes, docs, the viewer page).
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/healthz",
        "/v2/health/live",
        "/v2/health/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
    }
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The request counter's method label: the client picks the method, so any other is
# "other" (one label set per invented method would grow the scrape without bound).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "WS"})

DESCRIPTION = """Certified semantic segmentation: every pixel comes with the l2 radius
within which no perturbation of the image can change its class, and every image with
the most pixels any eps-perturbation can flip. REST (/v1), WebSocket (/v1/stream) and
the Open Inference Protocol (/v2)."""


def _problem_bytes(status: int, title: str, detail: str, slug: str, path: str, rid: str) -> bytes:
    if path.startswith("/v2"):
        return json.dumps({"error": detail}).encode()
    return json.dumps(
        {
            "type": TYPE_BASE + slug,
            "title": title,
            "status": status,
            "detail": detail,
            "instance": path,
            "request_id": rid,
        }
    ).encode()


def _subprotocol_key(scope: Scope) -> bytes:
    """The key a WebSocket handshake offers as a `certseg.key.<base64url>` subprotocol,
    or b"" (none, or not base64url: no key from it, so unless ?api_key= has the right
    one the handshake is refused). Only the URL-safe alphabet: a standard one's + and /
    would pass b64decode but stop the log's redaction halfway through the key."""
    for offered in scope.get("subprotocols") or ():
        if offered.startswith(API_KEY_SUBPROTOCOL):
            coded = offered[len(API_KEY_SUBPROTOCOL) :]
            if not _BASE64URL.fullmatch(coded):
                return b""
            try:
                return base64.urlsafe_b64decode(coded + "=" * (-len(coded) % 4))
            except (binascii.Error, ValueError):  # a length no base64 has
                return b""
    return b""


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _query(scope: Scope) -> dict[str, list[str]]:
    """The request's query string by name, percent-decoded, blank values kept."""
    return parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def _bodiless(send: Send) -> Send:
    """`send` with every response body emptied; the headers (Content-Length) stay."""

    async def bodiless(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return bodiless


class RequestContextMiddleware:
    """Request id, auth, access log, request metrics, last-resort 500."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.key = state.settings.api_key_bytes()

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None or scope["path"] in PUBLIC_PATHS:
            return True
        headers = dict(scope.get("headers") or [])
        given = b""
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        elif b"x-api-key" in headers:
            given = headers[b"x-api-key"].strip()
        elif scope["type"] == "websocket":
            # Browsers cannot set headers on a WebSocket: accept the key there in a
            # subprotocol (the viewer's way) or ?api_key= (server.logs redacts both)
            given = _subprotocol_key(scope) or _query(scope).get(API_KEY_PARAM, [""])[0].encode()
        return hmac.compare_digest(given, self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "WS")
        if method == "HEAD":  # GET without the body (RFC 9110 9.3.2): probes and caches use it
            scope, send = {**scope, "method": "GET"}, _bodiless(send)
        headers = dict(scope.get("headers") or [])
        rid_in = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid_in if _REQUEST_ID.match(rid_in) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = {"code": 101 if scope["type"] == "websocket" else 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                # (the second: a refused handshake's HTTP answer, e.g. 503 at max_streams)
                status["code"] = message["status"]
                status["started"] = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode()),
                ]
            elif message["type"] == "websocket.close" and not status["started"]:
                status["code"] = 403 if status["code"] == 101 else status["code"]
            elif message["type"] == "websocket.accept":
                status["started"] = True
            await send(message)

        charge = self.state.bodies.charge()
        if scope["type"] == "http":
            receive = charge.counting(receive)
        try:
            if not self._authorized(scope):
                status["code"] = 401
                await self._deny(scope, send, rid)
            elif scope["type"] == "websocket":
                await self.app(scope, receive, send_wrapper)
            elif await serve_while_connected(self.app, scope, receive, send_wrapper):
                status["code"] = CLIENT_LEFT
                log.info(
                    "client left before its answer on %s: its work was cancelled", scope["path"]
                )
        except ClientDisconnect:  # hung up while sending its body: not a server fault
            status["code"] = CLIENT_LEFT
            log.info("client left while sending its request on %s", scope["path"])
        except asyncio.CancelledError:
            # uvicorn cancels what still runs once shutdown_grace_s is over: a 503 the
            # client can retry elsewhere, not uvicorn's bare 500
            if scope["type"] != "http" or status["started"]:
                raise
            status["code"] = 503
            p = PROBLEMS[BackendError]
            detail = "server shutting down: the answer was not ready within its shutdown grace"
            body = _problem_bytes(503, p.title, detail, p.slug, scope["path"], rid)
            await self._send_body(send, 503, body, scope["path"], rid, retry=True)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # answered: the cancel has done its work
        except Exception as exc:
            log.error("unhandled error on %s", scope["path"], exc_info=exc)
            if scope["type"] == "http" and not status["started"]:
                status["code"] = 500
                p = PROBLEMS[CertSegError]
                body = _problem_bytes(
                    500, p.title, "internal error (see server log)", p.slug, scope["path"], rid
                )
                await self._send_body(send, 500, body, scope["path"], rid)
        finally:
            charge.release()
            self._record(scope, method, status["code"], start)
            request_id_var.reset(token)

    async def _deny(self, scope: Scope, send: Send, rid: str) -> None:
        p = PROBLEMS[Unauthorized]
        detail = "missing or wrong API key"
        if scope["type"] == "http" and API_KEY_PARAM in _query(scope):
            detail += (  # the key may be right: it is only read from headers here
                f"; ?{API_KEY_PARAM}= is read on the WebSocket stream only: send it as "
                "Authorization: Bearer <key> or X-API-Key"
            )
        body = _problem_bytes(401, p.title, detail, p.slug, scope["path"], rid)
        if scope["type"] == "http":
            await self._send_body(send, 401, body, scope["path"], rid)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await self._send_body(send, 401, body, scope["path"], rid, prefix="websocket.")
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})

    @staticmethod
    async def _send_body(
        send: Send,
        status: int,
        body: bytes,
        path: str,
        rid: str,
        prefix: str = "",
        retry: bool = False,
    ) -> None:
        media = "application/json" if path.startswith("/v2") else PROBLEM_MEDIA_TYPE
        headers = [
            (b"content-type", media.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="certseg"'))
        if retry:  # elsewhere: this server is going away
            headers += [(b"retry-after", b"1"), (b"connection", b"close")]
        await send({"type": f"{prefix}http.response.start", "status": status, "headers": headers})
        await send({"type": f"{prefix}http.response.body", "body": body})

    def _record(self, scope: Scope, method: str, status: int, start: float) -> None:
        route = scope.get("route")  # set by FastAPI's routes, not Starlette's (docs)
        template = getattr(route, "path", None) or (
            scope["path"] if scope["path"] in PUBLIC_PATHS else "unmatched"
        )
        ms = (time.perf_counter() - start) * 1000.0
        label = method if method in _METHODS else "other"
        self.state.metrics.requests.labels(template, label, str(status)).inc()
        log.info(
            "%s %s %d %.1fms",
            method,
            scope["path"],
            status,
            ms,
            extra={"method": method, "path": scope["path"], "status": status, "ms": round(ms, 3)},
        )


def create_app(
    settings: Settings | None = None, engines: Sequence[Engine] | None = None
) -> FastAPI:
    """The certseg server. `engines`: serve these instead of settings.models."""
    settings = settings or Settings()
    metrics = Metrics()
    state = ServerState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if engines is not None:
            state.add_engines(list(engines))
        else:
            from server.backends import create_engine, resolve_model_specs

            def build() -> list[Engine]:
                return [create_engine(s, settings) for s in resolve_model_specs(settings)]

            state.add_engines(await asyncio.to_thread(build))
        await state.start()
        log.info("serving %s", ", ".join(state.engines))
        try:
            yield {}
        finally:
            await state.stop()

    app = FastAPI(
        title="certseg",
        version=certseg.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    for module in (v1, stream, v2, ops):
        app.include_router(module.router)
    app.add_middleware(RequestContextMiddleware, state=state)
    if settings.cors_origins:  # outermost: preflights need no key, 401s carry CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"],
            expose_headers=["x-request-id", "retry-after", *v1.RESPONSE_HEADERS, v2.HEADER],
        )
    return app


def uvicorn_config(application: FastAPI, host: str, port: int, **overrides: Any) -> Any:
    """How uvicorn runs the app, from its Settings: the one place `certseg serve` and
    the tests' live servers take it from (WebSocket message cap, graceful shutdown)."""
    import uvicorn

    from server.ws_protocol import BoundedWebSocketProtocol

    settings = application.state.server.settings
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        "ws": BoundedWebSocketProtocol,  # pongs and fragments bounded (server/ws_protocol.py)
        "ws_max_size": settings.max_body_bytes,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "lifespan": "on",
    }
    return uvicorn.Config(application, **{**options, **overrides})
