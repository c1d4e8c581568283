"""uvicorn's Server with a graceful end for WebSocket streams.

uvicorn's shutdown closes every WebSocket at once (1012) and the stream's frames
already received are lost; HTTP requests, by contrast, finish within the grace. Here
the streams are told first (`ServerState.stopping`): each reads no more frames,
answers those it holds and closes 1012 itself. uvicorn's own shutdown then runs in
what is left of `shutdown_grace_s`, so the whole stays within it.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time

import uvicorn

from server.ws_protocol import BoundedWebSocketProtocol

__all__ = ["CertsegServer"]


class CertsegServer(uvicorn.Server):
    """`certseg serve`'s uvicorn Server (and the tests' live servers)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown  # None: uvicorn waits forever
        deadline = time.monotonic() + (math.inf if grace is None else grace)
        for server in self.servers:  # no new connections, as uvicorn's first step
            server.close()
        for connection in list(self.server_state.connections):
            if not isinstance(connection, BoundedWebSocketProtocol):
                connection.shutdown()  # HTTP: no new request on a kept-alive connection
        state = self.config.app.state.server
        state.stopping.set()
        while state.streams and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if grace is not None:
            self.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())
        await super().shutdown(sockets)
