"""Structured logs: one JSON object per line, with the request id of the request
being served (a context variable set by the request middleware), and no API key:
uvicorn logs each WebSocket handshake with its query string, where a browser sends
its key (``?api_key=``), so every line is redacted before it is written."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

__all__ = [
    "API_KEY_PARAM",
    "API_KEY_SUBPROTOCOL",
    "JsonFormatter",
    "RedactApiKey",
    "configure_logging",
    "redact_api_key",
    "request_id_var",
]

#: The query parameter a WebSocket client may send the API key in (browsers cannot set
#: headers on a WebSocket); the auth check reads it, the log filter blanks it.
API_KEY_PARAM = "api_key"
#: The WebSocket subprotocol a browser may carry the key in instead, base64url after
#: the prefix ("certseg.key.czNjcmV0"): a header, so no proxy's access log (nginx logs
#: the query) nor a URL shows it. The server answers with the protocol "certseg".
API_KEY_SUBPROTOCOL = "certseg.key."
#: to the end of the token, whatever it holds (a list of them is comma-separated)
_SUBPROTOCOL_KEY = re.compile(re.escape(API_KEY_SUBPROTOCOL) + r"[^\s,'\"]*")
REDACTED = "***"
_QUERY_PAIR = re.compile(r"(?P<name>[^\s?&=\"']+)=(?P<value>[^\s&\"']*)")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "certseg_request_id", default=None
)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
_RESERVED |= {"message", "asctime", "color_message"}


#: A header that carries the key, as a debug log shows it: "< authorization: Bearer k"
#: (the websockets handshake at --log-level debug), "x-api-key: k", ("x-api-key", "k").
_KEY_HEADER = re.compile(
    r"(?i)(?P<name>authorization|x-api-key)(?P<sep>['\"]?\s*[:,=]\s*(?:b(?=['\"]))?['\"]?)"
    r"(?P<scheme>(?:bearer|basic|token|digest)\s+)?(?P<value>[^\s'\",)]+)"
)


def redact_api_key(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with the value of every api_key= pair, of every Authorization and
    X-API-Key header, of every certseg.key. subprotocol, and every occurrence of a
    `secrets` string replaced by ***. Query names are compared percent-decoded, as the
    server's query parser sees them (api%5Fkey= is the key too)."""

    def blank(m: re.Match[str]) -> str:
        return f"{m['name']}={REDACTED}" if unquote_plus(m["name"]) == API_KEY_PARAM else m[0]

    text = _QUERY_PAIR.sub(blank, text)
    text = _KEY_HEADER.sub(lambda m: f"{m['name']}{m['sep']}{m['scheme'] or ''}{REDACTED}", text)
    text = _SUBPROTOCOL_KEY.sub(API_KEY_SUBPROTOCOL + REDACTED, text)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


class RedactApiKey(logging.Filter):
    """Rewrites a record whose message carries an API key (uvicorn formats lazily, so
    the key sits in `record.args`: the message is formatted, redacted, and kept as is).
    `secrets`: the configured key itself, blanked wherever it shows."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def redact(self, text: str) -> str:
        return redact_api_key(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """ts, level, logger, msg, request_id, any `extra=` fields, exc (type and message).
    `redact` rewrites the request id and every text field as the message filter does:
    a client may put the key in a path or a request id too."""

    def __init__(self, redact: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.redact = redact or (lambda text: text)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid is not None:
            out["request_id"] = self.redact(rid)
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = self.redact(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            out["trace"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(
    level: str = "info", as_json: bool = True, secrets: tuple[str, ...] = ()
) -> None:
    """Route certseg's and uvicorn's loggers to stderr, as JSON lines when asked, with
    API keys redacted (`secrets`: the configured key, blanked wherever it shows)."""
    handler = logging.StreamHandler(sys.stderr)
    redaction = RedactApiKey(secrets)
    handler.addFilter(redaction)
    if as_json:
        handler.setFormatter(JsonFormatter(redaction.redact))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    for name in ("certseg", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # the middleware logs requests
