"""PNG bytes of class-id and palette-index planes, written without row filters.

Why not Pillow for these: its encoder tries all five PNG filters on every row of a
greyscale image (it skips them for palette images only). Mask and overlay planes are
flat regions of a few values, where unfiltered rows compress as well or better, so
that search is wasted: a 1024x2048 mask took 23-25 ms through Pillow and takes 6-8 ms
here, and with run-length deflate it is half the size (77 vs 140 kB;
benchmarks/answer_cpu.py). Photos and heat maps (RGB,
continuous tones) still go through Pillow, where the filters pay.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["png_bytes"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY, _INDEXED = 0, 3  # PNG colour types


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(
    plane: np.ndarray,
    palette: np.ndarray | None = None,
    level: int = 1,
    runs: bool = False,
) -> bytes:
    """A 2-D uint8 or uint16 plane as PNG: greyscale (8 or 16 bit), or with `palette`
    ((n, 3) uint8, n <= 256; uint8 plane of indices < n) an indexed PNG. `runs`:
    deflate with run-length matches only (zlib's Z_RLE), as fast and 40% smaller on
    class-id masks; not on hatched overlays, whose diagonal lines are no runs."""
    a = np.asarray(plane)
    if a.ndim != 2 or a.dtype not in (np.uint8, np.uint16) or 0 in a.shape:
        raise ValueError(f"need a non-empty 2-D uint8 or uint16 plane, got {a.dtype} {a.shape}")
    h, w = a.shape
    depth = 8 * a.itemsize
    chunks = []
    if palette is None:
        colour = _GREY
    else:
        table = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        if depth != 8 or not 1 <= len(table) <= 256 or int(a.max()) >= len(table):
            raise ValueError("an indexed PNG needs 1..256 colours and a uint8 plane of indices")
        colour = _INDEXED
        chunks.append(_chunk(b"PLTE", table.tobytes()))
    rows = np.empty((h, 1 + w * a.itemsize), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None on every row
    rows[:, 1:] = a.astype(a.dtype.newbyteorder(">"), copy=False).view(np.uint8).reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    strategy = zlib.Z_RLE if runs else zlib.Z_DEFAULT_STRATEGY
    deflate = zlib.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
    idat = _chunk(b"IDAT", deflate.compress(rows) + deflate.flush())
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header), *chunks, idat, _chunk(b"IEND", b"")))
