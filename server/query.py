"""Query strings read strictly: an unknown name or a name given twice is a 422.

A typo such as ``?esp=0.1`` would otherwise be ignored and the image certified at
the card's default eps, an answer that looks like the one asked for and is not;
``?eps=0.1&eps=0.5`` would be read as whichever copy the framework keeps. Both are
refused, as the stream's control messages refuse an unknown field. ``api_key`` is
the one name outside a route's parameters: the WebSocket handshake takes it (a
browser cannot set headers there); REST takes the key in a header only, and says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from fastapi import Request
from fastapi.dependencies.models import Dependant
from starlette.datastructures import QueryParams

from server.errors import InvalidParameter, client_value
from server.logs import API_KEY_PARAM

__all__ = ["check_query", "route_query"]


def check_query(params: QueryParams, known: Iterable[str], *, websocket: bool = False) -> None:
    """Raise InvalidParameter for the first unknown or repeated name in `params`."""
    names = sorted(set(known))
    allowed = {*names, API_KEY_PARAM} if websocket else set(names)
    for name in params:
        if name == API_KEY_PARAM and not websocket:
            raise InvalidParameter(
                f"{API_KEY_PARAM} is read from the query on /v1/stream only; send the key "
                "as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        if name not in allowed:
            known_text = f"known: {', '.join(names)}" if names else "this route takes none"
            raise InvalidParameter(f"unknown query parameter {client_value(name)}; {known_text}")
    counts = Counter(name for name, _ in params.multi_items())
    for name, n in counts.items():
        if n > 1:
            raise InvalidParameter(
                f"query parameter {client_value(name)} given {n} times; give it once"
            )


def _query_names(dependant: Dependant) -> set[str]:
    """The query names a route reads: its own and its dependencies'."""
    names = {f.alias for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def route_query(request: Request) -> None:
    """A router dependency: the request's query names against the matched route's."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is not None:
        check_query(request.query_params, _query_names(dependant))
