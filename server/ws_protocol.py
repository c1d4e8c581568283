"""uvicorn's websockets-sansio protocol with bounds on what one client can make the
server hold below the app, where `stream_send_timeout_s` and the message cap cannot see.

- Pings: the protocol answers each with a pong written past the transport's flow
  control. A client that pings and never reads grew the server by what it sent
  (+237 MB in 8 s). While writing to it is paused (its buffer is full), a ping gets
  no pong: RFC 6455 5.5.3 lets an endpoint answer only the latest, and a client
  that reads again gets the next one. (Dropping the client instead also dropped
  healthy ones on slow links: a few-MB answer in flight when a keepalive ping came.)
  Only pongs are dropped: a close frame that came in the same read as the ping has
  its reply queued beside the pong, and the client gets it.
- Text that is not UTF-8: closed 1007 as uvicorn does, logged as one line at info
  (uvicorn logged an error with a traceback per message: a client could fill the
  error log at will).
- Fragments: a message is held as a list of its fragments. A 3 MB message in 3
  million 1-byte fragments cost 155 MB; past MAX_FRAGMENTS the stream closes 1009,
  as a message over the size cap does.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

__all__ = ["MAX_FRAGMENTS", "BoundedWebSocketProtocol"]

#: Most fragments one message may come in (a 32 MiB message: 2 KiB each on average).
MAX_FRAGMENTS = 16384
#: The first byte of every pong a server writes: FIN and opcode 0xA (control frames
#: are never fragmented, compressed or, from a server, masked).
_PONG = b"\x8a"


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """The default uvicorn WebSocket protocol, with pong and fragment backlogs bounded."""

    def handle_ping(self) -> None:
        if not self.writable.is_set():  # paused: the client is not reading for now
            # the pongs queued, discarded; each queued frame is one bytes object
            kept = [frame for frame in self.conn.data_to_send() if frame[:1] != _PONG]
            self.conn.writes[:0] = kept  # a close reply, or EOF, still goes out
            return
        super().handle_ping()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            self.frames = [b"".join(self.frames)]  # joined once, for the base too
            try:
                self.frames[0].decode()
            except UnicodeDecodeError:
                self.frames = []
                self.logger.info("WebSocket text message is not UTF-8: closing 1007")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_cont(self, event: Any) -> None:
        if len(self.frames) >= MAX_FRAGMENTS:
            self.frames = []
            self.conn.fail(1009, f"message in more than {MAX_FRAGMENTS} fragments")
            self.handle_parser_exception()
            return
        super().handle_cont(event)
