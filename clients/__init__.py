"""certseg clients: the Python SDK (sync and async), typed results and errors.

The SDK needs only httpx, websockets, numpy and pillow (never the server or torch)::

    from clients import CertSegClient

    with CertSegClient("http://127.0.0.1:8000") as client:
        result = client.segment("street.png", eps=0.1)

Names load on first use (PEP 562), so `certseg --help` does not pay for httpx and numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.models import (
        APIError,
        AuthenticationError,
        CertSegClientError,
        ClassCertificate,
        InputRejected,
        ModelsListing,
        ModelSummary,
        NotFoundError,
        SegmentResult,
        ServerError,
        ServiceUnavailable,
        Stability,
        StreamResult,
        StreamSummary,
        TransportError,
    )
    from clients.sdk import (
        DEFAULT_OUTPUTS,
        AsyncCertSegClient,
        CertSegClient,
        encode_image,
        encode_target,
    )

_HOME = {
    "APIError": "clients.models",
    "AuthenticationError": "clients.models",
    "CertSegClientError": "clients.models",
    "ClassCertificate": "clients.models",
    "InputRejected": "clients.models",
    "ModelSummary": "clients.models",
    "ModelsListing": "clients.models",
    "NotFoundError": "clients.models",
    "SegmentResult": "clients.models",
    "ServerError": "clients.models",
    "ServiceUnavailable": "clients.models",
    "Stability": "clients.models",
    "StreamResult": "clients.models",
    "StreamSummary": "clients.models",
    "TransportError": "clients.models",
    "DEFAULT_OUTPUTS": "clients.sdk",
    "AsyncCertSegClient": "clients.sdk",
    "CertSegClient": "clients.sdk",
    "encode_image": "clients.sdk",
    "encode_target": "clients.sdk",
}

__all__ = [
    "DEFAULT_OUTPUTS",
    "APIError",
    "AsyncCertSegClient",
    "AuthenticationError",
    "CertSegClient",
    "CertSegClientError",
    "ClassCertificate",
    "InputRejected",
    "ModelSummary",
    "ModelsListing",
    "NotFoundError",
    "SegmentResult",
    "ServerError",
    "ServiceUnavailable",
    "Stability",
    "StreamResult",
    "StreamSummary",
    "TransportError",
    "encode_image",
    "encode_target",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clients' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
