"""WS /v1/stream: video frames in, one certificate per frame out, latest frame wins.

Protocol (client -> server):
  binary message      one JPEG/PNG/WebP frame; frames are numbered 0, 1, 2, ...
  {"type": "config", "eps": 0.05, "outputs": ["overlay"], "overlay_style": "dim",
   "depth": 2, "resize": "fit"}   changes this stream's settings (answered by a
                      "config" message; any other field is an error, so a typo is
                      not taken as applied); resize: null, "fit" or a scale (as in REST)
  {"type": "ping"}    answered by {"type": "pong"} (protocol-level pings also work)
Server -> client, per frame, in frame order:
  {"type": "result", "frame": n, "dropped": d, "guaranteed_fraction": ..., ...,
   "binary": ["overlay"]}  followed by one binary PNG per name in "binary"
                      (outputs "overlay", "mask"; "classes" adds the per-class
                      certificate to the result, "gains" its max_gains, "stability"
                      the least attack norms that may flip 1/5/10%, as in REST);
  {"type": "error", "frame": n, "status": 422, "detail": ...} for a bad frame.

A stream works on up to `depth` frames at once (Settings.stream_depth, its default
and its limit): while frame n is certified and encoded, frame n + 1 is decoded and
on the device, so the answer rate is set by the slowest stage, not by their sum.
Answers still go out in frame order. When all `depth` are taken, a connection keeps
only its newest waiting frame: a frame arriving before the previous one started
replaces it and counts as dropped (live video wants the present, not a backlog);
a client that keeps at most depth + 1 frames unanswered loses none. Every frame is
either answered (result or error) or dropped, so answered + dropped == sent once
the last answer arrives. Query parameters model, eps, outputs, overlay_style, depth
and resize set the initial settings (with api_key, the only names taken; another, or
one given twice, is an error and close 1008, as a bad config message is refused).

Limits (Settings): at most max_streams open streams (the next handshake gets 503
problem+json with Retry-After); a stream silent for stream_idle_s with nothing in
flight is closed (1000, "idle timeout"); a client that takes no answer for
stream_send_timeout_s is closed (1008, "client not reading"), so a reader that
stalls holds one waiting frame and `depth` answers, never a backlog; a message
over max_body_bytes closes the stream (1009, by uvicorn); a control message over
MAX_CONTROL_CHARS is answered by a 413 error unparsed (a config is under 1 KB, and
parsing megabytes of JSON would hold up every stream's event loop). A server
shutting down reads no more frames, answers those received (within
shutdown_grace_s) and closes with 1012 ("server shutting down").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from server.decode import DecodedImage, ResizeRequest, decode_image, parse_resize
from server.errors import (
    CertSegError,
    InvalidParameter,
    Overloaded,
    PayloadTooLarge,
    client_value,
    problem_for,
    problem_response,
    retry_after_seconds,
)
from server.pipeline import Certified, Timings, check_eps, check_outputs, segment_image
from server.query import check_query
from server.state import ServerState, get_state

__all__ = ["router"]

router = APIRouter(tags=["stream"])
log = logging.getLogger("certseg.server")

STREAM_OUTPUTS = ("overlay", "mask", "classes", "gains", "stability")
BINARY_OUTPUTS = ("overlay", "mask")  # sent as PNG messages; the others: result fields
STYLES = ("hatch", "dim", "heat")
#: A stream's settings: what a config message may change and its answer echoes.
CONFIG_FIELDS = ("model", "eps", "outputs", "overlay_style", "depth", "resize")
#: The longest control message parsed (characters).
MAX_CONTROL_CHARS = 64 * 1024


@dataclass
class StreamConfig:
    """One connection's settings (changed by control messages)."""

    model: str
    eps: float
    outputs: tuple[str, ...] = ()
    overlay_style: str = "hatch"
    depth: int = 1
    resize: ResizeRequest = None

    def update(self, state: ServerState, msg: dict[str, Any]) -> None:
        """Apply a control message; all-or-nothing (a bad field changes nothing, an
        unknown one, a typo such as "ep", too: it must not look applied)."""
        unknown = sorted(set(msg) - {"type", *CONFIG_FIELDS})
        if unknown:
            raise InvalidParameter(
                f"unknown config field {client_value(unknown[0])}; known: {CONFIG_FIELDS}"
            )
        model = msg.get("model", self.model)
        if not isinstance(model, str):
            raise InvalidParameter("model must be a string")
        info = state.info(model)
        eps = check_eps(msg["eps"], info.card.default_eps) if "eps" in msg else self.eps
        if "eps" not in msg and model != self.model:
            eps = info.card.default_eps
        outputs = msg.get("outputs", self.outputs)
        if isinstance(outputs, str):
            outputs = [o.strip() for o in outputs.split(",") if o.strip()]
        if not isinstance(outputs, list | tuple) or any(o not in STREAM_OUTPUTS for o in outputs):
            raise InvalidParameter(f"stream outputs must be a list drawn from {STREAM_OUTPUTS}")
        check_outputs(info, outputs)  # gains need the logits: refused here, not per frame
        style = msg.get("overlay_style", self.overlay_style)
        if style not in STYLES:
            raise InvalidParameter(f"overlay_style must be one of {STYLES}")
        depth = _check_depth(msg.get("depth", self.depth), state.settings.stream_depth)
        resize = parse_resize(msg["resize"]) if "resize" in msg else self.resize
        self.model, self.eps, self.outputs = info.name, eps, tuple(dict.fromkeys(outputs))
        self.overlay_style, self.depth, self.resize = style, depth, resize

    def as_dict(self) -> dict[str, Any]:
        settings = {name: getattr(self, name) for name in CONFIG_FIELDS}
        return {"type": "config", **settings, "outputs": list(self.outputs)}


def _check_depth(value: object, limit: int) -> int:
    """A stream's depth: an integer from 1 to the server's stream_depth (else a 422)."""
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.isascii() and text.isdigit() and len(text) <= 6:
        value = int(text)  # ASCII digits only: "²".isdigit() is True, int("²") fails
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise InvalidParameter(
            f"depth must be an integer from 1 to {limit} (the server's stream_depth), "
            f"got {client_value(value)}"
        )
    return value


class _Closing(Exception):
    """Ends a stream from the server side with this WebSocket close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class _Pending:
    frame: int
    data: bytes
    received: float = field(default_factory=time.perf_counter)


class StreamSession:
    """A socket's receive loop, its frames in flight (at most `depth`), its one-slot
    buffer for the newest frame waiting to start, and the loop that answers in order."""

    def __init__(self, ws: WebSocket, state: ServerState, config: StreamConfig) -> None:
        self.ws = ws
        self.state = state
        self.config = config
        self.sent = 0  # frames received from the client
        self.dropped = 0
        self.answered = 0
        self._slot: _Pending | None = None  # the newest frame waiting for room
        self._send_lock = asyncio.Lock()
        # Frames started and not yet answered, oldest first: at most config.depth.
        self._in_flight: deque[asyncio.Task[_Answer]] = deque()
        self._started = asyncio.Event()  # a frame joined _in_flight
        self._answered = asyncio.Event()  # a frame's answer left
        self._close_asked = False  # the client sent {"type": "close"}

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self._send(json.dumps(obj))

    async def _send(self, *messages: str | bytes) -> None:
        """Send messages back to back; a client that takes none of them in time is stalled."""
        async with self._send_lock:
            try:
                async with asyncio.timeout(self.state.settings.stream_send_timeout_s):
                    for m in messages:
                        if isinstance(m, str):
                            await self.ws.send_text(m)
                        else:
                            await self.ws.send_bytes(m)
            except TimeoutError:
                raise _Closing(1008, "client not reading") from None

    async def run(self) -> _Closing | None:
        """Receive and process until either side ends; why the stream ends (None: client)."""
        receiving = asyncio.create_task(self.receive_loop())
        tasks = [receiving, asyncio.create_task(self.answer_loop())]
        tasks.append(asyncio.create_task(self.stop_loop(receiving)))
        pending = set(tasks)
        try:
            while True:  # the receive loop cancelled at shutdown ends nothing by itself
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not all(task.cancelled() for task in done):
                    break
        finally:
            for task in (*tasks, *self._in_flight):
                task.cancel()
            await asyncio.gather(*tasks, *self._in_flight, return_exceptions=True)
        for task in done:
            if task.cancelled():
                continue
            exc = task.exception()
            if isinstance(exc, _Closing):
                return exc
            if exc is not None and not isinstance(exc, WebSocketDisconnect | RuntimeError):
                raise exc
        return None

    async def receive_loop(self) -> None:
        """Read messages until the client closes or idles; never blocks on inference."""
        idle_s = self.state.settings.stream_idle_s
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    msg = await self.ws.receive()
            except TimeoutError:
                if self._in_flight or self._slot is not None:
                    continue  # silent because it waits for us
                raise _Closing(1000, "idle timeout") from None
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                self._offer(msg["bytes"])
            elif msg.get("text") is not None and await self._control(msg["text"]) == "close":
                self._close_asked = True
                await self._drain()  # a graceful close: what was received is answered
                return

    async def stop_loop(self, receiving: asyncio.Task[None]) -> None:
        """At server shutdown: read no more, answer what was received, close 1012."""
        await self.state.stopping.wait()
        receiving.cancel()
        await self._drain()
        if self._close_asked:  # the client's own close, answered before the shutdown's
            raise _Closing(1000, "")
        raise _Closing(1012, "server shutting down")

    async def _drain(self) -> None:
        """Wait until every frame received so far is answered (or dropped)."""
        while self._in_flight or self._slot is not None:
            self._answered.clear()
            await self._answered.wait()

    def _offer(self, data: bytes) -> None:
        frame = self.sent
        self.sent += 1
        self.state.metrics.stream_frames.inc()
        if self._slot is not None:
            self.dropped += 1
            self.state.metrics.dropped_frames.inc()
        self._slot = _Pending(frame, data)
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Start the waiting frame if fewer than `depth` frames are in flight.

        Decided here, when a frame arrives or an answer leaves, not in a task of its
        own: frames already buffered in the socket arrive without a yield between
        them, and a starter task woken later would find them replaced."""
        if self._slot is None or len(self._in_flight) >= self.config.depth:
            return
        pending, self._slot = self._slot, None
        # The frame keeps the settings it started with (a later config applies later).
        work = self._answer(pending, replace(self.config))
        self._in_flight.append(asyncio.create_task(work))
        self._started.set()

    async def _control(self, text: str) -> str | None:
        if len(text) > MAX_CONTROL_CHARS:
            await self._reject(
                PayloadTooLarge(
                    f"control message of {len(text)} characters; at most {MAX_CONTROL_CHARS}"
                )
            )
            return None
        try:
            msg = json.loads(text)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:  # nested past the parser's depth too
            # the parser's reason: an integer past 4300 digits is valid JSON it refuses
            why = str(exc)[:80] if not isinstance(exc, RecursionError) else "nested too deep"
            await self._reject(InvalidParameter(f"control messages are JSON objects ({why})"))
            return None
        kind = msg.get("type", "config")
        if kind == "ping":
            await self.send_json({"type": "pong", "t": msg.get("t")})
        elif kind == "close":
            return "close"
        elif kind == "config":
            try:
                self.config.update(self.state, msg)
            except CertSegError as exc:
                await self._reject(exc)
            else:
                await self.send_json(self.config.as_dict())
                self._start_waiting()  # a larger depth has room now
        else:
            await self._reject(
                InvalidParameter(
                    f"unknown control type {client_value(kind)}; known: config, ping, close"
                )
            )
        return None

    async def _reject(self, exc: CertSegError) -> None:
        """Answer a bad control message; the stream goes on."""
        await self.send_json(_error_body(None, exc))

    async def answer_loop(self) -> None:
        """Send each frame's answer once it and every frame before it are done."""
        while True:
            while not self._in_flight:
                self._started.clear()
                await self._started.wait()
            answer = await self._in_flight[0]
            answer.body["dropped"] = self.dropped
            if answer.timings is not None:  # until it leaves: it may wait for earlier frames
                answer.timings.since("order", answer.done)
                answer.body["timings_ms"] = stages = answer.timings.finish()
                self.state.metrics.observe_stages(stages)
            await self._send(json.dumps(answer.body), *answer.blobs)
            self.answered += 1
            self._in_flight.popleft()  # after the send: a stalled client holds <= depth
            self._start_waiting()
            self._answered.set()

    async def _answer(self, p: _Pending, cfg: StreamConfig) -> _Answer:
        """One frame's answer: its result, or the error that names it."""
        try:
            return await self._process(p, cfg)
        except CertSegError as exc:
            return _Answer(_error_body(p.frame, exc))
        except Exception as exc:
            log.error("stream frame %d failed: %s", p.frame, exc, exc_info=exc)
            return _Answer(_error_body(p.frame, CertSegError("internal error (see server log)")))

    async def _process(self, p: _Pending, cfg: StreamConfig) -> _Answer:
        timings = Timings(start=p.received)
        t0 = timings.since("pending", p.received)
        self.state.batcher_for(cfg.model).check_capacity()
        image = await asyncio.to_thread(decode_image, p.data, self.state.limits, cfg.resize)
        timings.since("decode", t0)
        wanted = frozenset(cfg.outputs) - set(BINARY_OUTPUTS)  # the figures asked
        cert = await segment_image(self.state, cfg.model, image, cfg.eps, wanted, timings)
        t0 = time.perf_counter()
        binary = [name for name in cfg.outputs if name in BINARY_OUTPUTS]
        # The PNGs of one frame are encoded side by side (zlib and numpy let go of the GIL).
        blobs = list(
            await asyncio.gather(
                *(asyncio.to_thread(_encode, name, cert, image, cfg) for name in binary)
            )
        )
        done = timings.since("encode", t0)
        body = {"type": "result", "frame": p.frame, **cert.summary(), "binary": binary}
        return _Answer(body, blobs, timings, done)


def _encode(name: str, cert: Certified, image: DecodedImage, cfg: StreamConfig) -> bytes:
    """One binary part of a frame's answer: the overlay or the mask PNG (blocking)."""
    if name == "overlay":
        return cert.overlay_png(image.rgb8, cfg.overlay_style)  # type: ignore[arg-type]
    return cert.mask_png()[0]


@dataclass
class _Answer:
    """A frame's messages: the JSON body ("dropped" and a result's "timings_ms" are
    set when it is sent), its blobs, and when its work was done."""

    body: dict[str, Any]
    blobs: list[bytes] = field(default_factory=list)
    timings: Timings | None = None
    done: float = 0.0


def _error_body(frame: int | None, exc: CertSegError) -> dict[str, Any]:
    """The error message for a frame (or, frame None, for a control message)."""
    p = problem_for(exc)
    body = {
        "type": "error",
        "frame": frame,
        "status": p.status,
        "title": p.title,
        "detail": exc.detail,
    }
    if exc.retry_after is not None:  # an overload: when to try again, as REST's header
        body["retry_after"] = retry_after_seconds(exc.retry_after)
    return body


def _initial_config(ws: WebSocket, state: ServerState) -> StreamConfig:
    q = ws.query_params
    check_query(q, CONFIG_FIELDS, websocket=True)
    info = state.info(q.get("model"))
    cfg = StreamConfig(
        model=info.name, eps=info.card.default_eps, depth=state.settings.stream_depth
    )
    cfg.update(state, {k: q[k] for k in CONFIG_FIELDS if k in q and k != "model"})
    return cfg


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    """Binary frames in, one JSON certificate (+ optional PNGs) per frame out."""
    state = get_state(ws)
    if state.streams >= state.settings.max_streams:
        await _refuse(ws, Overloaded(f"{state.streams} streams open (the limit)", retry_after=1))
        return
    state.streams += 1
    state.metrics.stream_connections.inc()
    try:
        await _serve_stream(ws, state)
    finally:
        state.streams -= 1
        state.metrics.stream_connections.dec()


#: The subprotocol a client may offer (beside its key, `server.logs.API_KEY_SUBPROTOCOL`):
#: answered with it, as a browser requires when it offered any; never the key's.
SUBPROTOCOL = "certseg"


async def _serve_stream(ws: WebSocket, state: ServerState) -> None:
    await ws.accept(
        subprotocol=SUBPROTOCOL if SUBPROTOCOL in ws.scope.get("subprotocols", ()) else None
    )
    try:
        config = _initial_config(ws, state)
    except CertSegError as exc:
        body = _error_body(None, exc)
        await ws.send_text(json.dumps(body))
        await ws.close(code=1008, reason=body["title"])
        return
    session = StreamSession(ws, state, config)
    closing: _Closing | None = None
    try:
        await session.send_json(config.as_dict())
        closing = await session.run()
    except _Closing as exc:
        closing = exc
    except (WebSocketDisconnect, RuntimeError):
        pass  # client went away mid-send
    finally:
        code, reason = (closing.code, closing.reason) if closing else (1000, "")
        # A stalled client cannot take the close frame either: do not wait on it for long.
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError):
            async with asyncio.timeout(1.0):
                await ws.close(code=code, reason=reason)
        log.info(
            "stream closed (%s): %d frames, %d answered, %d dropped",
            reason or "client",
            session.sent,
            session.answered,
            session.dropped,
        )


async def _refuse(ws: WebSocket, exc: CertSegError) -> None:
    """Refuse a handshake: an HTTP problem+json answer where the server can send one."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        p = problem_for(exc)
        await ws.send_denial_response(
            problem_response(ws, p.status, p.title, exc.detail, p.slug, exc.retry_after)
        )
    else:
        await ws.close(code=1013, reason="try again later")
