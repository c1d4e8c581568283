"""certseg's inference server: FastAPI app, dynamic batcher, backends.

Imports no torch: the ONNX Runtime backend serves on a base install; the torch and
native TensorRT backends import their packages only when asked for. `create_app`
is imported lazily so that `certseg --help` does not pay for FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.settings import Settings

if TYPE_CHECKING:
    from server.app import create_app

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from server.app import create_app

        return create_app
    raise AttributeError(f"module 'server' has no attribute {name!r}")
