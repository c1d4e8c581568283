"""WS /v1/stream under abusive clients: one that never reads, many idle ones, oversized
messages. Real uvicorn, real sockets; the never-reading client is a raw TCP socket
speaking just enough WebSocket to send frames (no library would refuse to read)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
import time

import httpx
import pytest
import websockets
from server_support import LiveServer, encode, random_image, serve_tiny


def _open_streams(srv: LiveServer) -> int:
    return srv.app.state.server.streams


def _streams_drain(srv: LiveServer, timeout: float = 5.0) -> bool:
    """Whether the server's stream count reaches 0 (its cleanup runs after the close)."""
    deadline = time.monotonic() + timeout
    while _open_streams(srv) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _open_streams(srv) == 0


def _metric(srv: LiveServer, name: str) -> float:
    for line in httpx.get(srv.base + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class RawStream:
    """A WebSocket client on a raw socket with a tiny receive buffer that never reads."""

    def __init__(self, srv: LiveServer, query: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", srv.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /v1/stream?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_binary(self, data: bytes) -> None:
        self.sock.sendall(frame_bytes(0x2, data))

    def close(self) -> None:
        self.sock.close()


def frame_bytes(opcode: int, data: bytes, fin: bool = True) -> bytes:
    """One masked frame (client frames must be masked, RFC 6455 5.3)."""
    mask = os.urandom(4)
    n, first = len(data), (0x80 if fin else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def test_client_that_never_reads_is_closed_and_holds_no_backlog(caplog):
    """Large answers (overlay PNGs of noise) fill the socket buffers of a client that
    never reads; the stream keeps one waiting frame (the rest are dropped), closes
    after stream_send_timeout_s, and the server goes on serving others."""
    caplog.set_level(logging.INFO, logger="certseg.server")
    srv = serve_tiny(stream_send_timeout_s=1.0, stream_idle_s=30)
    try:
        dropped_before = _metric(srv, "certseg_stream_dropped_frames_total")
        frame = encode(random_image(192, 256, seed=3))
        raw = RawStream(srv, "outputs=overlay,mask&overlay_style=heat")
        raw.sock.settimeout(0.5)
        assert _open_streams(srv) == 1
        sent, deadline = 0, time.monotonic() + 30
        try:
            while _open_streams(srv) and time.monotonic() < deadline:
                try:
                    raw.send_binary(frame)
                    sent += 1
                except (TimeoutError, OSError):
                    pass  # the server stopped reading us: it is closing
                time.sleep(0.01)
        finally:
            raw.close()
        assert _open_streams(srv) == 0, "the stalled stream was not closed"
        assert time.monotonic() < deadline
        dropped = _metric(srv, "certseg_stream_dropped_frames_total") - dropped_before
        assert sent > 3 and dropped >= 1, (sent, dropped)
        closes = [r.getMessage() for r in caplog.records if "stream closed" in r.getMessage()]
        assert closes and "client not reading" in closes[-1], closes

        async def normal_client() -> dict:
            async with websockets.connect(srv.ws_base + "/v1/stream") as ws:
                json.loads(await ws.recv())
                await ws.send(encode(random_image(24, 32)))
                return json.loads(await ws.recv())

        assert asyncio.run(normal_client())["type"] == "result"
    finally:
        srv.stop()


def test_idle_streams_up_to_the_limit_then_503_then_idle_timeout():
    srv = serve_tiny(max_streams=3, stream_idle_s=1.0)

    async def run() -> None:
        url = srv.ws_base + "/v1/stream"
        idle = [await websockets.connect(url) for _ in range(3)]
        for ws in idle:
            assert json.loads(await ws.recv())["type"] == "config"
        assert _open_streams(srv) == 3
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(url)
        resp = info.value.response
        assert resp.status_code == 503 and int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        assert json.loads(resp.body)["status"] == 503
        # counted as what it was: a 503 (the handshake's HTTP answer was counted 101)
        refused = 'certseg_requests_total{method="WS",route="/v1/stream",status="503"}'
        assert _metric(srv, refused) == 1.0
        # a silent stream is closed after stream_idle_s (1000, "idle timeout")
        t0 = time.monotonic()
        for ws in idle:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1000 and ws.close_reason == "idle timeout"
        assert 0.5 < time.monotonic() - t0 < 10
        assert _streams_drain(srv)
        # a stream that is working is not idle: 1.5 s of 0.1 s frames stays open
        async with websockets.connect(url) as ws:
            await ws.recv()
            for _ in range(15):
                await ws.send(encode(random_image(24, 32)))
                assert json.loads(await ws.recv())["type"] == "result"
                await asyncio.sleep(0.1)

    try:
        asyncio.run(run())
    finally:
        srv.stop()


def test_oversized_message_closes_with_1009_and_server_goes_on():
    srv = serve_tiny(ws_max_size=64 * 1024)

    async def run() -> None:
        url = srv.ws_base + "/v1/stream"
        async with websockets.connect(url) as ws:
            await ws.recv()
            await ws.send(b"\x89PNG\r\n\x1a\n" + b"\x00" * (100 * 1024))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1009
        async with websockets.connect(url) as ws:
            await ws.recv()
            await ws.send(encode(random_image(24, 32)))
            assert json.loads(await ws.recv())["type"] == "result"

    try:
        asyncio.run(run())
        assert _streams_drain(srv)
    finally:
        srv.stop()


def test_a_huge_control_message_is_refused_unparsed():
    """A 1 MB config (valid JSON) gets a 413 error and the stream goes on: parsed on
    the event loop, 30 MB of JSON arrays held every stream's frames up for 1.9 s."""
    from server.routes.stream import MAX_CONTROL_CHARS

    srv = serve_tiny()

    async def run() -> None:
        async with websockets.connect(srv.ws_base + "/v1/stream") as ws:
            await ws.recv()
            big = json.dumps({"type": "config", "zz": [0] * (MAX_CONTROL_CHARS // 2 + 1)})
            await ws.send(big)
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and err["status"] == 413, err
            assert str(len(big)) in err["detail"]
            await ws.send(json.dumps({"type": "config", "eps": 0.02}))
            assert json.loads(await ws.recv())["eps"] == 0.02  # still served
            await ws.send(encode(random_image(24, 32)))
            assert json.loads(await ws.recv())["type"] == "result"

    try:
        asyncio.run(run())
    finally:
        srv.stop()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_a_client_that_pings_and_never_reads_costs_no_memory():
    """uvicorn writes each pong past flow control: 8 s of pings from a client that read
    nothing grew the server 237 MB. While its writes are paused a ping gets no pong;
    once it reads again, pings are answered."""
    srv = serve_tiny(stream_idle_s=60)
    try:
        raw = RawStream(srv, "")
        raw.sock.settimeout(0.5)
        ping = frame_bytes(0x9, b"p" * 125)
        # 64 MB of pings, however long a loaded machine takes to read them (6 s idle)
        before, sent, deadline = _rss_mb(), 0, time.monotonic() + 40
        while sent <= 64 << 20 and time.monotonic() < deadline:
            try:
                raw.sock.sendall(ping * 64)
                sent += 64 * len(ping)
            except (TimeoutError, OSError):
                pass  # the server reads its pings more slowly than they come
        grown = _rss_mb() - before
        assert sent > 64 << 20 and grown < 64, (sent, grown)  # it was ~1:1 with `sent`
        raw.sock.settimeout(5)
        drained = 0
        with contextlib.suppress(TimeoutError):
            while drained < 1 << 20 and (chunk := raw.sock.recv(1 << 16)):
                drained += len(chunk)  # what was answered before the pause
        raw.sock.sendall(frame_bytes(0x9, b"again"))
        got = b""
        while b"again" not in got:
            got += raw.sock.recv(1 << 16)  # answered now that it reads
        raw.close()
        assert _streams_drain(srv)
    finally:
        srv.stop()


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole unmasked frame in `data`, in order."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, n, at = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n == 126:
            n, at = struct.unpack("!H", data[at : at + 2])[0], at + 2
        elif n == 127:
            n, at = struct.unpack("!Q", data[at : at + 8])[0], at + 8
        if at + n > len(data):
            break
        frames.append((opcode, data[at : at + n]))
        i = at + n
    return frames


def test_a_close_that_comes_with_a_ping_while_paused_is_answered():
    """A ping that finds the client's writes paused has its pong dropped, and only it:
    the close frame read in the same segment had its reply queued beside the pong and
    thrown away with it (the client saw no close frame: 1006)."""
    srv = serve_tiny(stream_idle_s=60)
    try:
        raw = RawStream(srv, "")
        raw.sock.settimeout(0.5)
        ping = frame_bytes(0x9, b"p" * 125)
        sent, deadline = 0, time.monotonic() + 30
        while sent <= 8 << 20 and time.monotonic() < deadline:  # until writes pause
            with contextlib.suppress(TimeoutError, OSError):
                raw.sock.sendall(ping * 64)
                sent += 64 * len(ping)
        raw.sock.settimeout(10)
        raw.sock.sendall(ping + frame_bytes(0x8, struct.pack("!H", 1000)))
        got = b""
        with contextlib.suppress(OSError):
            while chunk := raw.sock.recv(1 << 16):
                got += chunk
        raw.close()
        frames = _server_frames(got)
        assert sum(op == 0xA for op, _ in frames) < sent // len(ping)  # pongs were dropped
        assert frames[-1][0] == 0x8, frames[-3:]  # the close reply came
        assert struct.unpack("!H", frames[-1][1][:2])[0] == 1000
        assert _streams_drain(srv)
    finally:
        srv.stop()


def test_text_that_is_not_utf8_closes_1007_without_an_error_log(caplog):
    """uvicorn logged each such message as an error with its traceback: a client could
    fill the error log at will. Closed 1007 all the same, without an error record."""
    import logging

    srv = serve_tiny()
    try:
        with caplog.at_level(logging.INFO):
            raw = RawStream(srv, "")
            raw.sock.sendall(frame_bytes(0x1, b"\xff\xfe"))
            raw.sock.settimeout(10)
            got = b""
            with contextlib.suppress(OSError):
                while chunk := raw.sock.recv(1 << 16):
                    got += chunk
            raw.close()
            assert _streams_drain(srv)
        close = _server_frames(got)[-1]
        assert close[0] == 0x8 and struct.unpack("!H", close[1][:2])[0] == 1007
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert any("stream closed" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        srv.stop()


def test_a_message_in_too_many_fragments_closes_1009():
    """Each fragment is held until the message ends: 3 million 1-byte fragments of a
    3 MB message cost 155 MB. Past MAX_FRAGMENTS the stream closes, as for a message
    over the size cap; a message in a few fragments is served."""
    from server.ws_protocol import MAX_FRAGMENTS

    srv = serve_tiny()
    try:
        raw = RawStream(srv, "")
        first = frame_bytes(0x2, b"\x89", fin=False)
        raw.sock.sendall(first + frame_bytes(0x0, b"P", fin=False) * (MAX_FRAGMENTS + 8))
        raw.sock.settimeout(10)
        got = b""
        with contextlib.suppress(OSError):
            while chunk := raw.sock.recv(65536):
                got += chunk
        raw.close()
        close = got[got.rindex(b"\x88") :]  # the close frame: 0x88, length, code
        assert struct.unpack("!H", close[2:4])[0] == 1009, close

        async def fragmented() -> dict:
            async with websockets.connect(srv.ws_base + "/v1/stream") as ws:
                await ws.recv()
                data = encode(random_image(24, 32))
                await ws.send([data[i : i + 100] for i in range(0, len(data), 100)])
                return json.loads(await ws.recv())

        assert asyncio.run(fragmented())["type"] == "result"
    finally:
        srv.stop()
