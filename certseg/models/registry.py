"""Model registry: `create_model(name, ...)` over `@register_model` constructors (timm style)."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any

from torch import nn

__all__ = [
    "check_model_arguments",
    "create_model",
    "list_models",
    "model_arguments",
    "preset_of",
    "register_model",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def preset_of(
    base: Callable[..., nn.Module], *fixed: str, **defaults: Any
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Make a `(num_classes, **kw)` preset of `base`: `defaults` are the preset's own
    (given to it unless overridden), and its signature is what it passes on (base's
    parameters less the `fixed` ones it sets, `defaults` in place of base's), so that
    `model_arguments` lists what it takes, with the values it builds with."""
    sig = inspect.signature(base)
    params = [
        p.replace(default=defaults[name]) if name in defaults else p
        for name, p in sig.parameters.items()
        if name not in fixed
    ]

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(fn)
        def preset(num_classes: int, **kw: Any) -> nn.Module:
            return fn(num_classes, **{**defaults, **kw})

        preset.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return preset

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"unknown model {name!r}{hint} (known: {', '.join(list_models())})"
        ) from None


def model_arguments(name: str) -> dict[str, Any]:
    """The keyword arguments model `name` takes besides num_classes, with their defaults
    (inspect.Parameter.empty where none)."""
    params = inspect.signature(_factory(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.name != "num_classes" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def check_model_arguments(
    name: str, kwargs: dict[str, Any], reserved: Collection[str] = ()
) -> None:
    """A TypeError naming an argument model `name` does not take (with those it does;
    `reserved`: ones the caller sets itself), or a value of another kind than its
    default's (width='abc' for an int): said before the model is built, where it
    failed deep in a layer's constructor."""
    takes = {k: v for k, v in model_arguments(name).items() if k not in reserved}
    for key, value in kwargs.items():
        if key not in takes:
            close = difflib.get_close_matches(key, takes, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TypeError(f"{name} takes no argument {key!r}{hint}; it takes {', '.join(takes)}")
        kinds = _kinds(takes[key])
        if kinds and not (isinstance(value, kinds) and not _bool_for_number(value, kinds)):
            raise TypeError(
                f"{name}: {key} must be {' or '.join(k.__name__ for k in kinds)} "
                f"(its default is {takes[key]!r}), got {value!r}"
            )


def _kinds(default: Any) -> tuple[type, ...]:
    """The value types a default of this type stands for (none: no check)."""
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, str):
        return (str,)
    if isinstance(default, tuple | list):
        return (list, tuple)
    return ()


def _bool_for_number(value: Any, kinds: tuple[type, ...]) -> bool:
    """true/false where a number is asked: bool is an int to isinstance, not to a user."""
    return isinstance(value, bool) and bool not in kinds


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered architecture; an unknown name lists the closest ones."""
    return _factory(name)(num_classes=num_classes, **kwargs)
