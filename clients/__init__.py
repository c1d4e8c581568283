"""certseg clients: the Python SDK (sync and async), typed results and errors.

The SDK needs only httpx, websockets, numpy and pillow (never the server or torch)::

    from clients import CertSegClient

    with CertSegClient("http://127.0.0.1:8000") as client:
        result = client.segment("street.png", eps=0.1)
"""

from __future__ import annotations

from clients.models import (
    APIError,
    AuthenticationError,
    CertSegClientError,
    InputRejected,
    NotFoundError,
    SegmentResult,
    ServerError,
    ServiceUnavailable,
    StreamResult,
    StreamSummary,
    TransportError,
)
from clients.sdk import DEFAULT_OUTPUTS, AsyncCertSegClient, CertSegClient, encode_image

__all__ = [
    "DEFAULT_OUTPUTS",
    "APIError",
    "AsyncCertSegClient",
    "AuthenticationError",
    "CertSegClient",
    "CertSegClientError",
    "InputRejected",
    "NotFoundError",
    "SegmentResult",
    "ServerError",
    "ServiceUnavailable",
    "StreamResult",
    "StreamSummary",
    "TransportError",
    "encode_image",
]
