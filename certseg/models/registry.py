"""Model registry: `create_model(name, ...)` over `@register_model` constructors (timm style)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered architecture; an unknown name lists the closest ones."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"unknown model {name!r}{hint} (known: {', '.join(list_models())})"
        ) from None
    return fn(num_classes=num_classes, **kwargs)
