"""One budget for the request bodies all connections hold at once.

Each body is capped (`max_body_bytes`, `max_tensor_bytes`), but the number of
connections is not: 1000 slow uploads of 32 MiB each would hold 32 GB. Bytes are
counted as they arrive and given back when the request ends; a request whose next
chunk would pass the budget is refused with 503 + Retry-After, like a full queue.
"""

from __future__ import annotations

from starlette.types import Message, Receive

from server.errors import Overloaded

__all__ = ["BodyBudget"]


class BodyBudget:
    """Bytes of request bodies held by all requests in flight (event-loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def counting(self, receive: Receive, held: list[int]) -> Receive:
        """`receive` that charges each body chunk to the budget; `held[0]` is what this
        request holds, for `release` at its end."""

        async def counted() -> Message:
            message = await receive()
            n = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if n:
                if self.used + n > self.limit:
                    raise Overloaded(
                        f"request bodies in flight exceed {self.limit} bytes", retry_after=1
                    )
                self.used += n
                held[0] += n
            return message

        return counted

    def release(self, held: list[int]) -> None:
        self.used -= held[0]
        held[0] = 0
