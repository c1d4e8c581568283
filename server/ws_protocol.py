"""uvicorn's websockets-sansio protocol with bounds on what one client can make the
server hold below the app, where `stream_send_timeout_s` and the message cap cannot see.

- Pings: the protocol answers each with a pong written past the transport's flow
  control. A client that pings and never reads grew the server by what it sent
  (+237 MB in 8 s); once PONG_BACKLOG_BYTES wait for it, the next ping drops it.
- Fragments: a message is held as a list of its fragments. A 3 MB message in 3
  million 1-byte fragments cost 155 MB; past MAX_FRAGMENTS the stream closes 1009,
  as a message over the size cap does.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

__all__ = ["MAX_FRAGMENTS", "PONG_BACKLOG_BYTES", "BoundedWebSocketProtocol"]

#: Bytes queued for a client past which its next ping ends the connection.
PONG_BACKLOG_BYTES = 1 << 20
#: Most fragments one message may come in (a 32 MiB message: 2 KiB each on average).
MAX_FRAGMENTS = 16384


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """The default uvicorn WebSocket protocol, with pong and fragment backlogs bounded."""

    def handle_ping(self) -> None:
        if self.transport.get_write_buffer_size() > PONG_BACKLOG_BYTES:
            self.logger.info("WebSocket client pings without reading: connection dropped")
            self.transport.abort()  # a close frame would queue behind what it does not read
            return
        super().handle_ping()

    def handle_cont(self, event: Any) -> None:
        if len(self.frames) >= MAX_FRAGMENTS:
            self.frames = []
            self.conn.fail(1009, f"message in more than {MAX_FRAGMENTS} fragments")
            self.handle_parser_exception()
            return
        super().handle_cont(event)
