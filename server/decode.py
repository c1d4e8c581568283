"""Bytes -> the tensor the certificate speaks of, with limits checked before decoding.

Order matters for decompression bombs: (1) the body size, (2) the format from the
magic bytes (not the client's Content-Type), (3) the width and height the header
declares, read by Pillow's lazy ``open`` which parses headers only, and only then
(4) the full decode. A 100 kB PNG that declares 50000 x 50000 pixels is refused
with 413 at step 3 and never allocates its pixels.

Pixels become float32 RGB in [0, 1], channels first, exactly like
`certseg.data.to_chw_float` (alpha dropped, grey and palette expanded). EXIF
orientation is applied (`certseg.data.upright`): answers are on the grid viewers show,
as the browser viewer draws the photo; a rotation only permutes pixels, so the
certificate is the same on either grid.

An image over the pixel limit is refused (413) unless the client asks for a resize
(`resize=fit` or a scale): then up to `max_source_pixels` are decoded and shrunk by
area averaging (`certseg.certify.resize`), whose operator norm the certificate folds
in, so radii still speak of the image sent.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from certseg.certify.resize import AreaResize
from certseg.data.images import READ_FORMATS, animation_frames, exact_grey, upright, wide_colour
from certseg.sizes import format_size, padded_pixels
from server.errors import (
    CorruptImage,
    InvalidParameter,
    PayloadTooLarge,
    UnsupportedMediaType,
    client_value,
)

__all__ = [
    "DecodedImage",
    "Limits",
    "ResizeRequest",
    "chw8_to_float",
    "decode_image",
    "decode_target",
    "parse_resize",
    "sniff_format",
]

#: What a client asks: no resize (None), shrink to fit the limit, or a scale in (0, 1].
ResizeRequest = Literal["fit"] | float | None

#: Formats we decode: name -> Pillow format id. Sniffed from magic bytes.
FORMATS = {name.lower(): name for name in READ_FORMATS}


@dataclass(frozen=True)
class Limits:
    """Input limits: body bytes and declared pixels (width * height)."""

    max_bytes: int
    max_pixels: int  # what the network runs on, each side padded to pad_multiple
    max_source_pixels: int = 0  # what may be decoded to be shrunk (0: max_pixels)
    #: the served models' largest: their nets pad each side to a multiple of it, and
    #: their time and memory grow with the padded pixels (1xN runs as 8xN at 8)
    pad_multiple: int = 1

    def declared_limit(self, resize: ResizeRequest) -> int:
        """Pixels an image may declare: more when the client asked for a resize."""
        return max(self.max_pixels, self.max_source_pixels) if resize else self.max_pixels

    def network_pixels(self, height: int, width: int) -> int:
        """The pixels the network runs on for an input of this size."""
        return padded_pixels(height, width, self.pad_multiple)

    def check_network_size(self, height: int, width: int, subject: str, hint: str) -> None:
        """A 413 unless an input of this size runs within max_pixels, saying what it
        runs on where padding makes that more than its own pixels."""
        padded = self.network_pixels(height, width)
        if padded <= self.max_pixels:
            return
        text = f"{subject}{format_size(height, width)} = {height * width} pixels"
        if padded != height * width:
            text += f", run as {padded} (each side padded to a multiple of {self.pad_multiple}),"
        raise PayloadTooLarge(f"{text} exceeds the limit of {self.max_pixels} pixels; {hint}")


def parse_resize(value: object) -> ResizeRequest:
    """The `resize` option (query string or JSON): none / fit / a scale in (0, 1];
    else a 422."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text is None or text in ("", "none"):
        return None
    if text == "fit":
        return "fit"
    try:
        scale = float(text) if not isinstance(text, bool) else math.nan  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a huge int
        scale = math.nan
    if not 0.0 < scale <= 1.0:
        raise InvalidParameter(
            f"resize must be none, fit or a scale in (0, 1], got {client_value(value)}"
        )
    return scale


@dataclass
class DecodedImage:
    """A decoded image: its 8-bit pixels, and the network input derived from them.

    `array` (float32 (3, H, W) in [0, 1]) is formed on first use: an engine that takes
    8-bit input (`ModelInfo.accepts_uint8`: the torch backend, which divides by 255 on
    its device, and ONNX Runtime on the CPU, which converts each batch in its worker)
    gets `chw8` instead, a quarter of the bytes to queue, batch and copy. Images with
    more than 8 bits per channel, and resized images, have exact float input (at the
    network's size) and no `chw8`; `width`, `height` and `rgb8` stay the source's.
    """

    width: int
    height: int
    format: str
    rgb8: np.ndarray  # (H, W, 3) uint8: overlays, and the input when it is 8-bit
    exact: np.ndarray | None = None  # (3, h, w) float32: > 8 bits, or resized
    resize: AreaResize | None = None  # (H, W) -> the network's (h, w)
    _array: np.ndarray | None = field(default=None, repr=False)

    @property
    def chw8(self) -> np.ndarray | None:
        """(3, H, W) uint8, channels first; None when 8 bits would lose precision."""
        if self.exact is not None:
            return None
        return np.ascontiguousarray(self.rgb8.transpose(2, 0, 1))

    @property
    def array(self) -> np.ndarray:
        """(3, H, W) float32 in [0, 1], exactly `certseg.data.to_chw_float`'s values."""
        if self.exact is not None:
            return self.exact
        if self._array is None:
            self._array = chw8_to_float(self.chw8)
        return self._array

    def network_input(self, accepts_uint8: bool) -> np.ndarray:
        """What the engine gets: `chw8` if it takes 8-bit input and the image has no
        more bits, else `array`. A copy of the frame: run it off the event loop."""
        chw8 = self.chw8 if accepts_uint8 else None
        return chw8 if chw8 is not None else self.array


def chw8_to_float(chw8: np.ndarray) -> np.ndarray:
    """uint8 -> float32 v / 255, the one conversion of 8-bit pixels in the server.

    In place after one astype: the same values as (rgb8 / 255).transpose with a
    quarter of the memory traffic (measured 11 -> 5 ms at 1024x2048)."""
    out = chw8.astype(np.float32)
    out /= np.float32(255.0)
    return out


def sniff_format(data: bytes) -> str | None:
    """png / jpeg / webp from the first bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


#: A Python object's repr in a library's message, "<_io.BytesIO object at 0x7f...>":
#: an address of the server's memory, and nothing the client can act on.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _pillow_reason(exc: Exception, limit: int = 200) -> str:
    """Pillow's message for a client: what to fix, without the server's addresses."""
    return _OBJECT_REPR.sub("the data", str(exc))[:limit]


def _open_checked(
    data: bytes, limits: Limits, formats: tuple[str, ...], resize: ResizeRequest = None
) -> tuple[Image.Image, str]:
    """Steps 1-3: size, format, declared pixels; returns the lazily opened image."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"body of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    allowed = ", ".join(f.upper() for f in formats)
    if not data:
        raise UnsupportedMediaType(f"empty body; send an image (accepted: {allowed})")
    fmt = sniff_format(data)
    if fmt is None or fmt not in formats:
        raise UnsupportedMediaType(f"not a supported image (accepted: {allowed})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[FORMATS[fmt]])
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(
            f"image declares more than {Image.MAX_IMAGE_PIXELS} pixels (Pillow's bound on a "
            f"decompression bomb), over the limit of {limits.declared_limit(resize)} pixels; "
            "send it downscaled"
        ) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error
        # Pillow's reason (a text chunk over its limit, a bad chunk) says what to fix
        raise CorruptImage(
            f"cannot read the {fmt.upper()} header ({_pillow_reason(exc, 80)})"
        ) from exc
    frames = animation_frames(img)
    if frames > 1:
        raise UnsupportedMediaType(
            f"animated {fmt.upper()} of {frames} frames: send one still image; a video goes "
            "frame by frame over /v1/stream"
        )
    if width < 1 or height < 1:
        raise CorruptImage(f"image declares an empty size {format_size(height, width)}")
    if resize:  # decoded to be shrunk: its own pixels count
        limit = limits.declared_limit(resize)
        if width * height > limit:
            raise PayloadTooLarge(
                f"image of {format_size(height, width)} = {width * height} pixels exceeds the "
                f"limit of {limit} pixels; send it downscaled"
            )
    else:
        hint = "send it downscaled"
        if limits.max_source_pixels > limits.max_pixels:
            hint += f", or ask resize=fit (up to {limits.max_source_pixels} pixels)"
        limits.check_network_size(height, width, "image of ", hint)
    return img, fmt


def _plan_resize(
    height: int, width: int, resize: ResizeRequest, limits: Limits
) -> AreaResize | None:
    if resize is None:
        return None
    if resize == "fit":
        try:
            return AreaResize.to_fit(height, width, limits.max_pixels, limits.pad_multiple)
        except ValueError as exc:  # max_pixels under one padded pixel: nothing fits
            raise PayloadTooLarge(str(exc)) from exc
    plan = AreaResize.by_scale(height, width, float(resize))
    h, w = plan.network if plan else (height, width)
    limits.check_network_size(h, w, f"resize={resize} gives ", "ask a smaller scale or resize=fit")
    return plan


def _load(img: Image.Image, fmt: str) -> None:
    """Step 4: the full decode; truncated or garbled data -> CorruptImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError, ...
        raise CorruptImage(
            f"the {fmt.upper()} data does not decode ({_pillow_reason(exc)})"
        ) from exc


def _refuse_cut_to_8_bits(img: Image.Image) -> None:
    """16-bit colour PNGs are refused, naming what is taken (`wide_colour`)."""
    mode = wide_colour(img)
    if mode is not None:
        raise UnsupportedMediaType(
            f"16-bit colour PNG ({mode}): it would be read as 8 bits, and "
            "certified as another image; send 8-bit colour or 16-bit grey"
        )


def decode_image(data: bytes, limits: Limits, resize: ResizeRequest = None) -> DecodedImage:
    """Decode a PNG/JPEG/WebP body into the network's input, limits first; with
    `resize`, shrunk by area averaging (only if it needs it, for "fit")."""
    img, fmt = _open_checked(data, limits, ("png", "jpeg", "webp"), resize)
    _refuse_cut_to_8_bits(img)
    _plan_resize(img.height, img.width, resize, limits)  # a scale that cannot fit: 413 now
    _load(img, fmt)
    # EXIF only once decoded: a PNG's may follow its pixels, and reading it loads them
    img = upright(img)
    plan = _plan_resize(img.height, img.width, resize, limits)  # a turn swaps the sides
    exact, grey = None, exact_grey(img)
    if grey is not None:  # 16-bit/float grey: the network's input as it is, not 8 bits
        exact = np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape)))
        rgb8 = np.repeat((grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    else:
        rgb8 = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    if plan is not None:
        exact = plan.apply(rgb8 if exact is None else exact)
    return DecodedImage(img.width, img.height, fmt, rgb8, exact, plan)


def decode_target(
    data: bytes,
    width: int,
    height: int,
    num_classes: int,
    ignore_index: int,
    limits: Limits,
    resize: ResizeRequest = None,
) -> np.ndarray:
    """A ground-truth mask PNG (class ids; 8/16-bit grey or palette) as (H, W) int64;
    `resize` as the image's was asked (the target must have the image's size)."""
    img, fmt = _open_checked(data, limits, ("png",), resize)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise InvalidParameter(f"target mask must be a single-channel PNG, got mode {img.mode}")
    _load(img, fmt)
    img = upright(img)
    if img.size != (width, height):
        raise InvalidParameter(
            f"target mask is {format_size(img.height, img.width)}, "
            f"the image {format_size(height, width)}"
        )
    target = np.asarray(img).astype(np.int64)
    bad = (target >= num_classes) & (target != ignore_index) | (target < 0)
    if bad.any():
        raise InvalidParameter(
            f"target mask has labels outside 0..{num_classes - 1} (ignore: {ignore_index})"
        )
    return target
