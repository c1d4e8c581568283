"""The picture of a certificate: prediction in the palette, uncertified pixels marked.

Pixels outside the guaranteed region at eps (`certseg.certify.guaranteed_region`:
radius <= eps, and at eps = 0 radius 0 when the engine's margins carry an error
bound) are dimmed and, in the
default "hatch" style, crossed by dark diagonal lines, so the region an attacker
cannot touch reads at a glance and survives greyscale printing. "heat" replaces the
palette by a radius heat map (black = 0, white >= 2 eps), for seeing where the
margin is thin. The photo shows through with `blend`.

PNG encoding uses zlib level 1: on a 512x1024 overlay it is several times faster
than Pillow's default for files ~20% larger, and encode time is part of latency.
Masks and palette overlays go through `server.png` (unfiltered rows); RGB overlays
(heat map, blended photo) through Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image

from certseg.certify import guaranteed_region
from server.png import png_bytes

__all__ = ["OverlayStyle", "encode_mask_png", "encode_png", "overlay_png", "render_overlay"]

OverlayStyle = Literal["hatch", "dim", "heat"]

DIM = 0.35  # brightness kept by uncertified pixels
HATCH_PERIOD = 6
_DIM_LUT = np.round(np.arange(256) * DIM).astype(np.uint8)


def _lut(palette: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Palette as a (K, 3) uint8 table; classes without a colour get grey."""
    lut = np.full((max(num_classes, 1), 3), 128, dtype=np.uint8)
    for i, c in enumerate(palette[:num_classes]):
        lut[i] = np.asarray(c, dtype=np.int64).clip(0, 255)
    return lut


def _heat(radius: np.ndarray, eps: float) -> np.ndarray:
    """Radius as an (H, W, 3) uint8 map: red (0) -> yellow (eps) -> white (>= 2 eps)."""
    top = 2 * eps if eps > 0 else float(np.max(radius, initial=0.0)) or 1.0
    t = np.clip(radius / top, 0.0, 1.0)
    r = np.clip(t * 3, 0, 1)
    g = np.clip(t * 3 - 1, 0, 1)
    b = np.clip(t * 3 - 2, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255 + 0.5).astype(np.uint8)


@lru_cache(maxsize=4)
def _hatch_lines(h: int, w: int) -> np.ndarray:
    """(H, W) bool: pixels on the diagonal hatch lines (cached: frames share a size)."""
    period = HATCH_PERIOD
    lines = (np.arange(h, dtype=np.intp)[:, None] % period + np.arange(w) % period) % period
    out = lines == 0
    out.flags.writeable = False
    return out


def _state(
    radius: np.ndarray, eps: float, style: OverlayStyle, region: np.ndarray | None
) -> np.ndarray | None:
    """Per pixel 0 (certified), 1 (dimmed) or 2 (on a hatch line) as uint8, or None if
    all 0. `region`: the guaranteed pixels as the answer counts them (the caller has
    them); None: `guaranteed_region(radius, eps)` of exact margins."""
    if style == "heat":
        return None
    if region is None:
        if eps <= 0:  # exact margins at eps 0: every pixel is guaranteed
            return None
        region = guaranteed_region(radius, eps)
    region = np.asarray(region, bool)
    if eps <= 0 and region.all():  # nothing to mark (one pass, not a state plane: 22 ms
        return None  # of 37 at 1024x2048)
    state = (~region).view(np.uint8)
    if style == "hatch":
        state = state + (state & _hatch_lines(*radius.shape))
    return state


def _palette(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
    """(colour table (3K, 3) uint8: plain, dimmed, hatched rows; K)."""
    k = max(int(mask.max(initial=0)) + 1, len(palette))
    lut = _lut(palette, k)
    return np.concatenate([lut, _DIM_LUT[lut], np.zeros_like(lut)]), k


def _flat(style: OverlayStyle, image: np.ndarray | None, blend: float) -> bool:
    """Whether the overlay is the palette alone (no heat map, no photo blended in)."""
    return style != "heat" and (image is None or blend <= 0)


def _palette_index(
    mask: np.ndarray,
    radius: np.ndarray,
    eps: float,
    k: int,
    style: OverlayStyle,
    dtype,
    region: np.ndarray | None,
) -> np.ndarray:
    """Row of the colour table per pixel: class + K * state, in `dtype` (wide enough
    for 3K rows)."""
    index = np.clip(mask, 0, k - 1).astype(dtype)
    state = _state(radius, eps, style, region)
    if state is not None:
        index += dtype(k) * state.astype(dtype)
    return index


def render_overlay(
    mask: np.ndarray,
    radius: np.ndarray,
    eps: float,
    palette: Sequence[Sequence[int]],
    image: np.ndarray | None = None,
    style: OverlayStyle = "hatch",
    blend: float = 0.0,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 overlay of a mask (H, W) and radii (H, W) at eps.

    `image`: (H, W, 3) uint8 photo mixed in with weight `blend` (0: pure palette).
    `region`: the (H, W) guaranteed pixels the answer counts (`Certified.region`:
    with a margin error, not all of them at eps 0); None: those of exact radii.
    Without blending it is one gather from a (3K, 3) table indexed by class and
    state (certified, dimmed, hatched): this runs on every answer.
    """
    mask = np.asarray(mask)
    table, k = _palette(mask, palette)
    if _flat(style, image, blend):
        return table[_palette_index(mask, radius, eps, k, style, np.intp, region)]
    rgb = _heat(radius, eps) if style == "heat" else table[np.clip(mask, 0, k - 1)]
    if image is not None and blend > 0:
        rgb = (1.0 - blend) * rgb.astype(np.float32) + blend * image.astype(np.float32)
        rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    state = _state(radius, eps, style, region)
    if state is not None:
        shade = np.array([1.0, DIM, 0.0], np.float32)[state][..., None]
        rgb = np.clip(rgb * shade + 0.5, 0, 255).astype(np.uint8)
    return rgb


def overlay_png(
    mask: np.ndarray,
    radius: np.ndarray,
    eps: float,
    palette: Sequence[Sequence[int]],
    image: np.ndarray | None = None,
    style: OverlayStyle = "hatch",
    blend: float = 0.0,
    region: np.ndarray | None = None,
) -> bytes:
    """The overlay of `render_overlay` as PNG bytes, the same pixels.

    Without blending or heat the overlay has at most 3K colours, so it is written as
    an indexed (palette) PNG: one byte per pixel to build and compress instead of
    three (80 -> 17 ms at 1024x2048 on the shipped model: benchmarks/answer_cpu.py).
    """
    mask = np.asarray(mask)
    table, k = _palette(mask, palette)
    if not _flat(style, image, blend) or 3 * k > 256:
        return encode_png(render_overlay(mask, radius, eps, palette, image, style, blend, region))
    index = _palette_index(mask, radius, eps, k, style, np.uint8, region)
    return png_bytes(index, palette=table)


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W[, 3]) or uint16 (H, W) array -> PNG bytes."""
    img = Image.fromarray(pixels)  # uint16 (H, W) becomes mode I;16
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_mask_png(mask: np.ndarray, num_classes: int) -> tuple[bytes, str]:
    """Class ids as a greyscale PNG: 8-bit when K <= 256, else 16-bit. (bytes, dtype)."""
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    return png_bytes(np.asarray(mask).astype(dtype, copy=False), runs=True), np.dtype(dtype).name
