"""Image files to the tensor certificates speak of: float32 RGB in [0, 1], (3, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "READ_FORMATS",
    "animation_frames",
    "checked_index",
    "exact_grey",
    "load_image",
    "refuse_unread",
    "refuse_wide_colour",
    "to_chw_float",
    "upright",
    "wide_colour",
]


#: The image formats certseg reads (Pillow's ids), as the server accepts them.
READ_FORMATS = ("PNG", "JPEG", "WEBP")


def animation_frames(image: Image.Image) -> int:
    """Frames of an animated PNG or WebP (1 for a still image): only the first would be
    certified, unsaid. A JPEG of more images (MPO) is a photo plus a preview or depth
    map: its first is it, so it counts 1."""
    if image.format not in ("PNG", "WEBP"):
        return 1
    return int(getattr(image, "n_frames", 1))


def refuse_unread(image: Image.Image, path: str | Path) -> None:
    """A ValueError naming `path` for an image the server would refuse: a format other
    than `READ_FORMATS` (a GIF, a BMP), or an animation."""
    if image.format not in (*READ_FORMATS, "MPO"):  # MPO: Pillow's name of such a JPEG
        raise ValueError(
            f"{path}: a {image.format or 'unknown'} image; certseg reads PNG, JPEG and "
            "WebP, as the server does"
        )
    frames = animation_frames(image)
    if frames > 1:
        raise ValueError(
            f"{path}: animated {image.format} of {frames} frames; certify one still image "
            "(a video frame by frame: certseg client stream)"
        )


def wide_colour(image: Image.Image) -> str | None:
    """The mode of a 16-bit colour PNG (RGB, RGBA, grey + alpha), None for any other
    image. Pillow decodes those to 8 bits: a certificate of what it gives would speak of
    another image than the file (two such PNGs 0.26 apart in l2 got the same answer)."""
    tile = image.tile[0].args if image.tile else None
    rawmode = tile if isinstance(tile, str) else ""
    if rawmode.endswith(";16B") and not rawmode.startswith("I"):
        return rawmode.split(";")[0]
    return None


def refuse_wide_colour(image: Image.Image, path: str | Path) -> None:
    """A ValueError naming `path` for a 16-bit colour PNG (`wide_colour`)."""
    mode = wide_colour(image)
    if mode is not None:
        raise ValueError(
            f"{path}: 16-bit colour PNG ({mode}) would be read as 8 bits, and certified "
            "as another image; save it as 8-bit colour or 16-bit grey"
        )


def exact_grey(image: Image.Image) -> np.ndarray | None:
    """A 16-bit or float grey image as (H, W) float32 in [0, 1], scaled without going
    through 8 bits (Pillow's convert("RGB") clips 16-bit values at 255: a value of 1000
    of 65535 read as white); None for other modes."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return None
    scale = np.float32(65535.0 if image.mode != "F" else 1.0)
    return np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)


def to_chw_float(image: Image.Image) -> np.ndarray:
    """RGB (dropping alpha, expanding grey and palette), values in [0, 1], channels
    first; 16-bit grey exactly (`exact_grey`)."""
    grey = exact_grey(image)
    if grey is not None:
        return np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape)))
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
    """An image file as (3, H, W) float32 in [0, 1], upright as viewers show it; what the
    server refuses is refused (ValueError): a 16-bit colour PNG, another format than
    PNG, JPEG and WebP, an animation."""
    with Image.open(path) as img:
        refuse_unread(img, path)
        refuse_wide_colour(img, path)
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
