"""Stop work for a client that hung up: an HTTP handler is cancelled when its client
disconnects after sending the whole request and before its answer is sent.

Without it a request whose client gave up (a timeout, a closed tab, the SDK retrying)
was still decoded, queued, run and encoded: 64 such requests kept the queue 59 deep
after every client had left, and the next real client waited 45 s. Cancelling the
handler cancels its batcher future, and the batcher skips images whose future is done
before they run (an image already in a forward pass finishes; its result is dropped).

How: once the app has read the last body chunk, one task waits for the connection's
next ASGI message, which the server sends only when the client disconnects or the
response is complete. A disconnect before the response's last byte cancels the
handler. Later `receive` calls of the app share that task's message, so nothing else
ever waits on the connection at the same time.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CLIENT_LEFT", "serve_while_connected"]

#: The status the access log and request metrics record for a client that left before
#: its answer: nginx's "client closed request". No response carries it (none is sent),
#: and it keeps such requests out of the 5xx a server's own faults are alerted on.
CLIENT_LEFT = 499


async def serve_while_connected(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> bool:
    """Run `app` on one HTTP request; True when it was cancelled because the client
    left (nothing more is sent then), False when it ran to its end."""
    answered = False
    left = False
    watcher: asyncio.Future[Message] | None = None

    def on_next_message(task: asyncio.Future[Message]) -> None:
        nonlocal left
        if task.cancelled() or task.exception() is not None:
            return
        if task.result()["type"] == "http.disconnect" and not answered:
            left = True
            handler.cancel()

    async def app_receive() -> Message:
        nonlocal watcher
        if watcher is not None:
            return await asyncio.shield(watcher)
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            watcher = asyncio.ensure_future(receive())
            watcher.add_done_callback(on_next_message)
        return message

    async def app_send(message: Message) -> None:
        nonlocal answered
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered = True
        await send(message)

    handler: asyncio.Task[Any] = asyncio.ensure_future(app(scope, app_receive, app_send))
    try:
        await handler
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if left and (task is None or not task.cancelling()):
            return True  # the client's cancel, not the server's: swallowed here
        raise
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
    return False
