"""Image sizes written as text: "HxW" (1024x2048), the one parser and the one
formatter of them (answers, headers, flags and error messages all say height first),
the largest size along any axis of a network's input, and the pixels a network that
pads its input runs on."""

from __future__ import annotations

__all__ = ["SIZE_MAX", "format_size", "padded_pixels", "parse_size"]

#: The largest size along any axis of a network input: the ONNX audit's shape proofs
#: assume it (export.shapes: shape arithmetic checked not to wrap around in int64),
#: and the server's limits on pixels, batch and queue are capped at it.
SIZE_MAX = 2**31 - 1


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), both positive; anything else is a ValueError that says so."""
    h, sep, w = text.strip().lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise ValueError(f"expected a size HxW such as 1024x2048, got {text!r}")
    return int(h), int(w)


def format_size(height: int, width: int) -> str:
    """(H, W) -> 'HxW', as parse_size reads it back."""
    return f"{height}x{width}"


def padded_pixels(height: int, width: int, multiple: int = 1) -> int:
    """The pixels a network that pads each side up to a multiple of `multiple` runs on:
    what its time and memory grow with, and so what every pixel limit counts (a 1xN
    image runs as 8xN at multiple 8)."""
    if multiple < 1:
        raise ValueError(f"pad multiple must be >= 1, got {multiple}")
    return -(-height // multiple) * multiple * (-(-width // multiple) * multiple)
