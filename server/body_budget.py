"""One budget for the request bodies all connections hold at once.

Each body is capped (`max_body_bytes`, `max_tensor_bytes`), but the number of
connections is not: 1000 slow uploads of 32 MiB each would hold 32 GB. Bytes are
counted as they arrive and given back when the request ends; a request whose next
chunk would pass the budget is refused with 503 + Retry-After, like a full queue,
unless it holds the whole budget alone.
"""

from __future__ import annotations

from starlette.types import Message, Receive

from server.errors import Overloaded

__all__ = ["BodyBudget", "BodyCharge"]


class BodyBudget:
    """Bytes of request bodies held by all requests in flight (event-loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self) -> BodyCharge:
        """What one request holds of the budget; `release` it when the request ends."""
        return BodyCharge(self)


class BodyCharge:
    """One request's share of a `BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def counting(self, receive: Receive) -> Receive:
        """`receive` that charges each body chunk to the budget before handing it on."""

        async def counted() -> Message:
            message = await receive()
            n = len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if n:
                budget = self.budget
                # A request alone in the budget always goes on (its own cap bounds it):
                # a budget below one multipart body would otherwise refuse it for ever.
                if budget.used + n > budget.limit and budget.used > self.held:
                    raise Overloaded(
                        f"request bodies in flight exceed {budget.limit} bytes", retry_after=1
                    )
                budget.used += n
                self.held += n
            return message

        return counted

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0
