"""Image files to the tensor certificates speak of: float32 RGB in [0, 1], (3, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["checked_index", "load_image", "to_chw_float", "upright"]


def to_chw_float(image: Image.Image) -> np.ndarray:
    """RGB (dropping alpha, expanding grey and palette), values in [0, 1], channels first."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1, upright, when there is none or it is invalid)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a garbled EXIF block: taken as no rotation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """The image as viewers show it: its EXIF orientation applied (a phone photo stored
    sideways comes upright), the image itself when it has none. A rotation or flip only
    permutes pixels, so l2 norms, and certificates, are the same on either grid. Call it
    on a loaded image: reading a PNG's EXIF may load its pixels, errors unchecked."""
    if _orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def load_image(path: str | Path) -> np.ndarray:
    """An image file as (3, H, W) float32 in [0, 1], upright as viewers show it."""
    with Image.open(path) as img:
        img.load()  # decode errors surface here, before EXIF is read (a PNG's may follow)
        return to_chw_float(upright(img))


def checked_index(index: int, length: int, noun: str) -> int:
    """Sequence-style index (negative counts from the end) or an IndexError naming `noun`."""
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for {length} {noun}")
    return i
