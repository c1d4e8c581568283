"""Image files to the tensor certificates speak of: float32 RGB in [0, 1], (3, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["checked_index", "load_image", "to_chw_float"]


def to_chw_float(image: Image.Image) -> np.ndarray:
    """RGB (dropping alpha, expanding grey and palette), values in [0, 1], channels first."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def load_image(path: str | Path) -> np.ndarray:
    with Image.open(path) as img:
        return to_chw_float(img)


def checked_index(index: int, length: int, noun: str) -> int:
    """Sequence-style index (negative counts from the end) or an IndexError naming `noun`."""
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for {length} {noun}")
    return i
