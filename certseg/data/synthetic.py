"""Synthetic street scenes: a procedural stand-in for Cityscapes that needs no download.

Why: the default model, the tests and the smoke runs need labelled street images that
are cheap, deterministic and learnable by a tiny 1-Lipschitz net from local context,
yet not solvable by thresholding colours. Scenes are laid out in a pinhole camera over
a flat ground plane (metres, depth z = 1 at the bottom row), so sizes shrink toward
the horizon and the painter's order (far to near) gives correct occlusions:

    sky (gradient, clouds) -> ground (road with markings, sidewalks, verges, shadows)
    -> skyline at the street's end, distant tree line -> side facades / hedges
    -> trees, bushes, cars and people sorted by depth -> lighting and sensor noise.

Every pixel is labelled (no ignore pixels). numpy only: no torch, no per-pixel loops.
Images are quantised to 8-bit levels (k / 255) so they survive a PNG round trip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from certseg.data.images import checked_index

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "SyntheticScenes",
    "colorize_label",
    "contact_sheet",
    "render_scene",
]

SYNTHETIC_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "vegetation",
    "sky",
    "car",
    "person",
)
# Cityscapes colours of the same classes (cityscapesscripts.helpers.labels).
SYNTHETIC_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (107, 142, 35),
    (70, 130, 180),
    (0, 0, 142),
    (220, 20, 60),
)
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, PERSON = range(7)
IGNORE_INDEX = 255

_F = np.float32


# --------------------------------------------------------------------------- noise


def _smooth_noise(
    rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None
) -> np.ndarray:
    """Value noise in [-1, 1] with lattice spacing (cell_y, cell_x) px, smoothstep-interpolated.

    Separable (interpolate lattice rows along x, then along y), so it costs a few
    gathers of the output size, not a per-pixel loop.
    """
    cell_x = cell_y if cell_x is None else cell_x
    cell_y, cell_x = max(cell_y, 0.5), max(cell_x, 0.5)
    gy, gx = int(h / cell_y) + 2, int(w / cell_x) + 2
    grid = rng.uniform(-1.0, 1.0, size=(gy, gx)).astype(_F)
    xs = (np.arange(w, dtype=_F) + 0.5) / _F(cell_x)
    ix = xs.astype(np.int64)
    tx = xs - ix
    tx = tx * tx * (3 - 2 * tx)
    rows = grid[:, ix] * (1 - tx) + grid[:, ix + 1] * tx
    ys = (np.arange(h, dtype=_F) + 0.5) / _F(cell_y)
    iy = ys.astype(np.int64)
    ty = ys - iy
    ty = (ty * ty * (3 - 2 * ty))[:, None]
    return rows[iy] * (1 - ty) + rows[iy + 1] * ty


def _fractal(
    rng: np.random.Generator,
    h: int,
    w: int,
    cell: float,
    octaves: int = 3,
    aspect: float = 1.0,
) -> np.ndarray:
    """Sum of value-noise octaves (cell, cell/2, ...), roughly in [-1, 1]."""
    out = np.zeros((h, w), _F)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        out += _F(amp) * _smooth_noise(rng, h, w, cell, cell * aspect)
        total += amp
        amp *= 0.5
        cell /= 2
    return out / _F(total)


def _jitter(rng: np.random.Generator, colour, spread: float = 0.08) -> np.ndarray:
    """A colour with independent per-channel gain noise (keeps hues varied across images)."""
    c = np.asarray(colour, _F) * rng.uniform(1 - spread, 1 + spread, 3).astype(_F)
    return np.clip(c, 0, 1).astype(_F)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _fade(period_px: np.ndarray | float) -> np.ndarray:
    """Contrast kept for a pattern of this period in px: 0 when it would alias, 1 when clear."""
    return np.clip((np.asarray(period_px, _F) - 2.0) / 3.0, 0.0, 1.0).astype(_F)


# ------------------------------------------------------------------------ palettes

_BUILDING_COLOURS = np.array(
    [
        (0.76, 0.68, 0.55),  # beige
        (0.85, 0.80, 0.68),  # cream
        (0.56, 0.31, 0.23),  # brick
        (0.50, 0.50, 0.50),  # grey
        (0.68, 0.68, 0.66),  # light grey
        (0.86, 0.85, 0.82),  # white
        (0.78, 0.60, 0.36),  # ochre
        (0.80, 0.62, 0.58),  # pink
        (0.33, 0.33, 0.35),  # dark grey
        (0.58, 0.66, 0.74),  # pale blue
        (0.46, 0.36, 0.28),  # brown
        (0.62, 0.70, 0.56),  # pale green (overlaps vegetation hues)
    ],
    _F,
)
_CAR_COLOURS = np.array(
    [
        (0.90, 0.90, 0.90),  # white
        (0.66, 0.68, 0.70),  # silver
        (0.40, 0.41, 0.43),  # grey (overlaps road)
        (0.08, 0.08, 0.09),  # black
        (0.10, 0.16, 0.38),  # dark blue
        (0.70, 0.08, 0.08),  # red
        (0.15, 0.35, 0.75),  # blue
        (0.18, 0.38, 0.20),  # green (overlaps vegetation)
        (0.88, 0.72, 0.12),  # yellow
        (0.70, 0.64, 0.52),  # beige (overlaps buildings)
        (0.40, 0.06, 0.10),  # dark red
        (0.55, 0.70, 0.85),  # light blue (overlaps sky)
    ],
    _F,
)
_CLOTHES = np.array(
    [
        (0.10, 0.10, 0.12),
        (0.20, 0.22, 0.35),
        (0.75, 0.15, 0.15),
        (0.85, 0.85, 0.82),
        (0.30, 0.45, 0.25),
        (0.55, 0.45, 0.30),
        (0.90, 0.65, 0.20),
        (0.25, 0.45, 0.75),
        (0.50, 0.50, 0.52),
        (0.60, 0.30, 0.55),
    ],
    _F,
)
_TROUSERS = np.array(
    [(0.12, 0.16, 0.30), (0.08, 0.08, 0.09), (0.35, 0.35, 0.38), (0.55, 0.48, 0.35)], _F
)
_SKIN = np.array(
    [(0.93, 0.76, 0.64), (0.80, 0.58, 0.43), (0.55, 0.37, 0.25), (0.35, 0.23, 0.16)], _F
)
_HAIR = np.array([(0.08, 0.06, 0.05), (0.30, 0.20, 0.12), (0.75, 0.62, 0.35), (0.6, 0.6, 0.6)], _F)


# ------------------------------------------------------------------------ geometry


@dataclass
class _View:
    """Pinhole camera over flat ground: depth z = 1 at the bottom row, z -> inf at the horizon."""

    H: int
    W: int
    yh: float  # horizon row (px, may be fractional)
    vx: float  # vanishing-point column
    sb: float  # px per metre at depth z = 1
    zb: float  # metres of depth at z = 1 (converts z to metres along the street)

    @property
    def hg(self) -> float:
        return self.H - self.yh

    def scale(self, z: float) -> float:
        return self.sb / z

    def ground_y(self, z: float) -> float:
        return self.yh + self.hg / z

    def screen_x(self, x: float, z: float) -> float:
        return self.vx + x * self.sb / z


@dataclass
class _Layout:
    """Lateral street layout in metres (x < 0 is left of the camera)."""

    road_l: float
    road_r: float
    lane_w: float
    lanes: int
    walk_l: float  # outer edge of the left sidewalk (< road_l)
    walk_r: float
    sides: tuple[str, str]  # "facade" or "park" for (left, right)
    beyond: tuple[int, int]  # label of ground beyond each sidewalk
    z_far: float  # depth of the skyline at the street's end
    cross: tuple[float, float] | None  # depth range (metres) of a crossing street


def _window(
    view: _View, x: float, z: float, half_w: float, top: float, bottom: float = 0.0
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, float] | None:
    """Pixel window around an object standing at (x, z), with metric local coordinates.

    Returns (slices, u (1, w) metres right of x, v (h, 1) metres above ground, px/m) or
    None when the window is off-screen. Working on windows keeps objects cheap.
    """
    p = view.scale(z)
    xc, yb = view.screen_x(x, z), view.ground_y(z)
    r0, r1 = max(0, math.floor(yb - top * p)), min(view.H, math.ceil(yb + bottom * p))
    c0, c1 = max(0, math.floor(xc - half_w * p)), min(view.W, math.ceil(xc + half_w * p))
    if r0 >= r1 or c0 >= c1:
        return None
    u = ((np.arange(c0, c1, dtype=_F) + 0.5 - _F(xc)) / _F(p))[None, :]
    v = ((_F(yb) - np.arange(r0, r1, dtype=_F) - 0.5) / _F(p))[:, None]
    return (slice(r0, r1), slice(c0, c1)), u, v, p


def _rrect(
    u: np.ndarray, v: np.ndarray, x0: float, x1: float, y0: float, y1: float, r: float
) -> np.ndarray:
    """Rounded rectangle [x0, x1] x [y0, y1] (metres) with corner radius r."""
    r = max(0.0, min(r, (x1 - x0) / 2, (y1 - y0) / 2))
    cu = np.clip(u, x0 + r, x1 - r)
    cv = np.clip(v, y0 + r, y1 - r)
    return (u - cu) ** 2 + (v - cv) ** 2 <= r * r + 1e-9


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _paint(
    img: np.ndarray, lab: np.ndarray, mask: np.ndarray, colour: np.ndarray, label: int | None
) -> None:
    """Write colour (3,) or (h, w, 3) and label where mask holds (img/lab are window views)."""
    mask = np.broadcast_to(mask, lab.shape)
    if colour.ndim == 1:
        img[mask] = colour
    else:
        img[mask] = np.broadcast_to(colour, img.shape)[mask]
    if label is not None:
        lab[mask] = label


def _grain(rng: np.random.Generator, shape: tuple[int, int], amp: float) -> np.ndarray:
    """Per-pixel multiplicative texture (h, w, 1) around 1."""
    return (1.0 + _F(amp) * rng.standard_normal((*shape, 1), dtype=_F)).astype(_F)


# ---------------------------------------------------------------------------- sky


def _sky_colours(rng: np.random.Generator) -> tuple[str, np.ndarray, np.ndarray]:
    kind = rng.choice(["clear", "overcast", "dusk"], p=[0.6, 0.3, 0.1])
    if kind == "clear":
        top, hor = (0.20, 0.40, 0.78), (0.62, 0.75, 0.90)
    elif kind == "overcast":
        g = rng.uniform(0.55, 0.75)
        top, hor = (g, g + 0.03, g + 0.08), (g + 0.12, g + 0.13, g + 0.15)
    else:
        top, hor = (0.25, 0.30, 0.55), (0.92, 0.66, 0.45)
    return str(kind), _jitter(rng, top, 0.1), _jitter(rng, hor, 0.06)


def _draw_sky(rng, img, lab, view: _View, kind: str, top, hor) -> None:
    """Vertical gradient to the horizon plus horizontally stretched clouds."""
    H, W = view.H, view.W
    t = np.clip((np.arange(H, dtype=_F) + 0.5) / _F(max(view.yh, 1.0)), 0, 1) ** 0.8
    img[:] = (top * (1 - t[:, None]) + hor * t[:, None])[:, None, :]
    cover = {"clear": rng.uniform(0.0, 0.45), "overcast": rng.uniform(0.3, 0.8), "dusk": 0.3}[kind]
    if cover > 0.02:
        n = _fractal(rng, H, W, cell=W / rng.uniform(2.5, 5.0), octaves=4, aspect=2.5)
        alpha = np.clip((n + cover - 0.45) * 3.0, 0, 0.9)[..., None]
        cloud = _jitter(rng, (0.95, 0.95, 0.96) if kind != "overcast" else (0.82, 0.83, 0.85))
        shade = (1 - 0.25 * np.clip(n, 0, 1))[..., None]  # darker cloud cores
        img[:] = img * (1 - alpha) + cloud * shade * alpha
    lab[:] = SKY


# ------------------------------------------------------------------------- ground


def _draw_ground(rng, img, lab, view: _View, lay: _Layout, sunny: bool) -> None:
    """Road (asphalt, lane markings, crosswalk), sidewalks (tiles, kerb), verges, shadows."""
    H, W = view.H, view.W
    r0 = max(0, math.floor(view.yh + 0.5))
    while r0 < H and (r0 + 0.5 - view.yh) / view.hg < 1e-3:
        r0 += 1
    if r0 >= H:
        return
    h = H - r0
    d = ((np.arange(r0, H, dtype=_F) + 0.5 - _F(view.yh)) / _F(view.hg))[:, None]  # (h, 1)
    px = (d * _F(view.sb)).astype(_F)  # px per metre on each row
    xg = (np.arange(W, dtype=_F)[None, :] + 0.5 - _F(view.vx)) / px  # lateral metres (h, W)
    zm = _F(view.zb) / d  # metres along the street (h, 1)
    im, lb = img[r0:], lab[r0:]

    road = (xg >= lay.road_l) & (xg <= lay.road_r)
    walk = ((xg >= lay.walk_l) & (xg < lay.road_l)) | ((xg > lay.road_r) & (xg <= lay.walk_r))
    left = xg < lay.walk_l
    right = xg > lay.walk_r
    if lay.cross is not None:
        cross = (zm >= lay.cross[0]) & (zm <= lay.cross[1])
        road, walk = road | cross, walk & ~cross  # the crossing street cuts the sidewalks
        left, right = left & ~cross, right & ~cross

    # road: asphalt grain, patches, darker tyre tracks, paint
    grey = rng.uniform(0.22, 0.42)
    asphalt = _jitter(rng, (grey, grey, grey * rng.uniform(0.97, 1.08)), 0.04)
    tex = 1 + 0.12 * _fractal(rng, h, W, cell=W / 6, octaves=3, aspect=2.0)
    tex += 0.07 * _smooth_noise(rng, h, W, 1.2)
    lane_pos = _frac((xg - lay.road_l) / lay.lane_w)
    tex -= 0.06 * (np.abs(np.abs(lane_pos - 0.5) - 0.22) < 0.07)
    col = asphalt * tex[..., None]
    paint = np.zeros((h, W), _F)
    line_hw = rng.uniform(0.06, 0.09)
    row_footprint = _F(view.zb) / (_F(view.hg) * d * d)  # metres of depth per row
    dash_period, dash_frac = rng.uniform(6, 12), rng.uniform(0.3, 0.5)
    dashes = np.where(
        row_footprint < dash_period * dash_frac / 2,
        (_frac(zm / dash_period) < dash_frac).astype(_F),
        _F(dash_frac),
    )
    centre = lay.lanes // 2 if rng.random() < 0.5 else -1
    for k in range(1, lay.lanes):
        dist = np.abs(xg - (lay.road_l + k * lay.lane_w)) * px
        cov = np.clip(line_hw * px + 0.5 - dist, 0, 1) * np.minimum(1, 2 * line_hw * px)
        paint = np.maximum(paint, cov * (1 if k == centre else dashes))
    if rng.random() < 0.6:  # solid edge lines
        for xe in (lay.road_l + 0.35, lay.road_r - 0.35):
            dist = np.abs(xg - xe) * px
            cov = np.clip(line_hw * px + 0.5 - dist, 0, 1) * np.minimum(1, 2 * line_hw * px)
            paint = np.maximum(paint, cov)
    if rng.random() < 0.3:  # zebra crossing
        zc = rng.uniform(1.2, 3.0) * view.zb
        if lay.cross is not None:
            zc = lay.cross[0] - 4.5
        stripes = (_frac((xg - lay.road_l) / 1.0) < 0.5) & (zm >= zc) & (zm <= zc + 3.5)
        paint = np.maximum(paint, stripes * _fade(px))
    paint *= road
    paint_col = np.array((0.92, 0.92, 0.9) if rng.random() < 0.8 else (0.9, 0.75, 0.2), _F)
    col = col * (1 - paint[..., None]) + paint_col * paint[..., None]
    _paint(im, lb, road, col, ROAD)

    # sidewalk: tiles (fade with distance), kerb band, noise
    walk_base = _jitter(
        rng,
        [(0.60, 0.60, 0.58), (0.68, 0.62, 0.52), (0.58, 0.42, 0.38), (0.50, 0.50, 0.53)][
            rng.integers(4)
        ],
        0.06,
    )
    # usually lighter than the asphalt (as in real streets), sometimes just as dark
    target = grey + (rng.uniform(0.08, 0.3) if rng.random() < 0.85 else rng.uniform(-0.05, 0.05))
    walk_base = np.clip(walk_base * _F(target / walk_base.mean()), 0, 1).astype(_F)
    tile = rng.uniform(0.3, 0.8)
    lines = np.maximum(
        (np.abs(_frac(xg / tile) - 0.5) > 0.44) * _fade(tile * px),
        (np.abs(_frac(zm / tile) - 0.5) > 0.44) * _fade(tile / row_footprint),
    )
    wtex = 1 - 0.25 * lines + 0.06 * _smooth_noise(rng, h, W, 1.5)
    wtex += 0.08 * _fractal(rng, h, W, cell=W / 8, octaves=2)
    kerb = (np.minimum(np.abs(xg - lay.road_l), np.abs(xg - lay.road_r)) < 0.25) & walk
    wtex = np.where(kerb, 1.2, wtex)
    gutter = np.minimum(np.abs(xg - lay.road_l), np.abs(xg - lay.road_r)) * px < 0.6
    wtex = np.where(gutter & walk, 0.6, wtex)  # the kerb's shadow line
    _paint(im, lb, walk, walk_base * wtex[..., None], SIDEWALK)

    # verges beyond the sidewalks: grass or more pavement
    for mask, label in ((left, lay.beyond[0]), (right, lay.beyond[1])):
        if label == VEGETATION:
            grass = _jitter(rng, (0.28, 0.45, 0.15), 0.15)
            gtex = 1 + 0.25 * _smooth_noise(rng, h, W, 1.0, 3.0)
            gtex += 0.15 * _fractal(rng, h, W, cell=W / 8, octaves=2)
            _paint(im, lb, mask, grass * gtex[..., None], VEGETATION)
        else:
            _paint(im, lb, mask, walk_base * (wtex[..., None] * 0.95), SIDEWALK)

    # cast shadow of one side's buildings across part of the street
    if sunny and rng.random() < 0.55:
        side = int(rng.integers(2))
        reach = rng.uniform(1.0, 9.0)
        edge = lay.walk_l + reach if side == 0 else lay.walk_r - reach
        shadow = (xg < edge) if side == 0 else (xg > edge)
        factor = np.array((0.50, 0.53, 0.62), _F) * _F(rng.uniform(0.85, 1.25))
        im[shadow] *= factor


# ------------------------------------------------------------------ far background


def _draw_skyline(rng, img, lab, view: _View, lay: _Layout, hor) -> None:
    """Front-facing buildings at the street's end (windows, haze), with a gap where the
    street goes on, and sometimes a distant tree line."""
    z = lay.z_far
    p = view.scale(z)
    yb = view.ground_y(z)
    W = view.W
    gap = None
    if rng.random() < 0.75:
        gap = (view.screen_x(lay.walk_l - 1, z), view.screen_x(lay.walk_r + 1, z))
    haze = rng.uniform(0.1, 0.35)
    x = -rng.uniform(0, 10) * p
    while x < W:
        w = rng.uniform(8, 30) * p
        x0, x1 = x, x + w
        x = x1 + (rng.uniform(1, 8) * p if rng.random() < 0.25 else 0)
        if gap is not None and x1 > gap[0] and x0 < gap[1]:
            continue
        h = rng.uniform(6, 45) * p
        c0, c1 = max(0, math.floor(x0 + 0.5)), min(W, math.floor(x1 + 0.5))
        r0, r1 = max(0, math.floor(yb - h + 0.5)), min(view.H, math.floor(yb + 0.5))
        if c0 >= c1 or r0 >= r1:
            continue
        base = _BUILDING_COLOURS[rng.integers(len(_BUILDING_COLOURS))]
        base = _jitter(rng, base, 0.08)
        floor_px, col_px = rng.uniform(2.8, 3.6) * p, rng.uniform(2.5, 4.5) * p
        yy = (np.arange(r0, r1, dtype=_F) + 0.5 - _F(yb - h))[:, None]
        xx = (np.arange(c0, c1, dtype=_F) + 0.5 - _F(x0))[None, :]
        win = (np.abs(_frac(xx / col_px) - 0.5) < 0.25) & (np.abs(_frac(yy / floor_px) - 0.5) < 0.2)
        fade = min(_fade(floor_px), _fade(col_px))
        amt = fade * win + (1 - fade) * 0.2
        glass = _jitter(rng, (0.2, 0.24, 0.3), 0.2)
        col = base * (1 - amt[..., None]) + glass * amt[..., None]
        col = col * (1 + 0.05 * rng.standard_normal(col.shape[:2], dtype=_F))[..., None]
        col = col * (1 - haze) + hor * haze
        img[r0:r1, c0:c1] = col
        lab[r0:r1, c0:c1] = BUILDING
    if rng.random() < 0.5:  # distant tree line along the horizon, in front of the skyline
        th = rng.uniform(3, 10) * p
        n = _smooth_noise(rng, 1, W, 1, W / rng.uniform(8, 20))[0]
        n2 = _smooth_noise(rng, 1, W, 1, 1.5)[0]
        top = yb - th * (0.6 + 0.4 * n + 0.15 * n2)
        rows = np.arange(view.H, dtype=_F)[:, None] + 0.5
        mask = (rows >= top[None, :]) & (rows < yb)
        if gap is not None:
            cols = np.arange(W) + 0.5
            mask &= ~((cols > gap[0]) & (cols < gap[1]))[None, :]
        green = _jitter(rng, (0.22, 0.33, 0.16), 0.12)
        green = green * (1 - haze) + hor * haze
        tex = 1 + 0.2 * _smooth_noise(rng, view.H, W, 1.2)
        _paint(img, lab, mask, green * tex[..., None], VEGETATION)


# ------------------------------------------------------------------ side walls


def _draw_wall(
    rng, img, lab, view: _View, side: int, xw: float, segs: list[dict], shade: float
) -> None:
    """A vertical plane at lateral x = xw along the street, split into segments (buildings
    with window grids, or hedges). Vectorised over the columns on that side of the view."""
    if not segs:
        return
    H, W = view.H, view.W
    xs = np.arange(W, dtype=_F) + 0.5
    d = (xs - _F(view.vx)) / _F(xw * view.sb)
    cols = np.flatnonzero(d > 1e-4)
    if cols.size == 0:
        return
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    d = d[c0:c1]
    z = 1.0 / d
    z0 = np.array([s["z0"] for s in segs], _F)
    z1 = np.array([s["z1"] for s in segs], _F)
    idx = np.minimum(np.searchsorted(z1, z), len(segs) - 1)
    valid = (z >= z0[idx]) & (z <= z1[idx])
    if not valid.any():
        return
    height = np.array([s["height"] for s in segs], _F)[idx]
    y_base = _F(view.yh) + _F(view.hg) * d
    y_top = y_base - height * _F(view.sb) * d
    r0 = max(0, math.floor(float(y_top[valid].min())))
    r1 = min(H, math.ceil(float(y_base[valid].max())))
    if r0 >= r1:
        return
    yy = np.arange(r0, r1, dtype=_F)[:, None] + 0.5
    mask = valid[None, :] & (yy >= y_top[None, :]) & (yy < y_base[None, :])
    hm = (y_base[None, :] - yy) / (_F(view.sb) * d[None, :])  # metres above ground
    Zm = (_F(view.zb) * z)[None, :]
    h, w = mask.shape

    def per(key: str) -> np.ndarray:
        return np.array([s[key] for s in segs], _F)[idx][None, :]

    kind = np.array([s["label"] for s in segs])[idx]
    base = np.stack([s["colour"] for s in segs]).astype(_F)[idx][None, :, :]
    # windows: a grid in (metres along street, metres up), faded where it would alias
    floor_h, win_sp = per("floor_h"), per("win_sp")
    wfrac, hfrac, gf_h = per("wfrac"), per("hfrac"), per("gf_h")
    fu = _frac(Zm / win_sp)
    fv = _frac(hm / floor_h)
    upper = (hm > gf_h) & (hm < height[None, :] - 0.8)
    win = (np.abs(fu - 0.5) < wfrac / 2) & (fv > 0.3) & (fv < 0.3 + hfrac) & upper
    px_h = win_sp * abs(xw) * view.sb * d[None, :] ** 2 / view.zb
    px_v = floor_h * view.sb * d[None, :]
    fade = np.minimum(_fade(px_h), _fade(px_v))
    amt = fade * win + (1 - fade) * (wfrac * hfrac) * upper
    shop = (hm > 0.4) & (hm < gf_h - 0.7) & (np.abs(_frac(Zm / per("shop_sp")) - 0.5) < 0.3)
    amt = np.maximum(amt, shop * np.minimum(_fade(px_v), 1) * per("shops"))
    glass = np.stack([s["glass"] for s in segs]).astype(_F)[idx][None, :, :]
    refl = (0.85 + 0.3 * _frac(hm / floor_h + Zm * 0.05))[..., None]
    col = base * (1 - amt[..., None]) + glass * refl * amt[..., None]
    col = col * (1 - 0.3 * (hm > height[None, :] - 0.5))[..., None]  # cornice
    col = (
        col
        * (1 + 0.06 * _smooth_noise(rng, h, w, 1.3) + 0.06 * _smooth_noise(rng, h, w, 6))[..., None]
    )
    # hedges: leafy texture instead of windows
    hedge = (kind == VEGETATION)[None, :]
    if hedge.any():
        clumps = 0.6 + 0.4 * _smooth_noise(rng, h, w, 4)
        leaf = 0.75 + 0.45 * _smooth_noise(rng, h, w, 1.2) * clumps
        col = np.where(hedge[..., None], base * leaf[..., None], col)
    col = col * _F(shade)
    im, lb = img[r0:r1, c0:c1], lab[r0:r1, c0:c1]
    im[mask] = col[mask]
    lb[mask] = np.broadcast_to(kind[None, :], mask.shape)[mask]


def _wall_segments(rng, view: _View, lay: _Layout, side: int) -> list[dict]:
    """Buildings (or hedges in parks) along one side, with gaps and the crossing street."""
    segs: list[dict] = []
    zb = view.zb
    park = lay.sides[side] == "park"
    if park and rng.random() < 0.5:
        return segs
    zm = rng.uniform(0.3, 1.5) * zb
    zmax = lay.z_far * zb
    while zm < zmax:
        length = rng.uniform(8, 28) if not park else rng.uniform(5, 40)
        if rng.random() < (0.18 if not park else 0.35):  # gap between buildings
            zm += rng.uniform(3, 12)
            continue
        a, b = zm, min(zm + length, zmax)
        zm = b
        if lay.cross is not None and b > lay.cross[0] - 1 and a < lay.cross[1] + 1:
            if a < lay.cross[0] - 1:
                b = lay.cross[0] - 1
            else:
                zm = lay.cross[1] + 1
                continue
        if park:
            seg = {
                "label": VEGETATION,
                "height": rng.uniform(0.8, 1.8),
                "colour": _jitter(rng, (0.20, 0.36, 0.12), 0.2),
            }
        else:
            seg = {
                "label": BUILDING,
                "height": rng.uniform(6, 32),
                "colour": _jitter(rng, _BUILDING_COLOURS[rng.integers(len(_BUILDING_COLOURS))]),
            }
        seg |= {
            "z0": a / zb,
            "z1": b / zb,
            "floor_h": rng.uniform(2.8, 3.8),
            "win_sp": rng.uniform(2.2, 4.5),
            "wfrac": rng.uniform(0.3, 0.6),
            "hfrac": rng.uniform(0.35, 0.55),
            "gf_h": rng.uniform(3.0, 4.5),
            "shop_sp": rng.uniform(3.0, 6.0),
            "shops": float(rng.random() < 0.6),
            "glass": _jitter(rng, (0.16, 0.2, 0.27), 0.25),
        }
        segs.append(seg)
    return segs


# ------------------------------------------------------------------------ objects


def _draw_tree(rng, img, lab, view: _View, x: float, z: float, crown_only: bool = False) -> None:
    """Trunk plus an irregular leafy crown (both vegetation, as in Cityscapes)."""
    trunk_h = 0.0 if crown_only else rng.uniform(1.5, 3.5)
    rx = rng.uniform(1.2, 3.2) if not crown_only else rng.uniform(0.6, 1.6)
    ry = rx * rng.uniform(0.8, 1.4)
    cv = trunk_h + ry * (0.95 if not crown_only else 0.6)
    win = _window(view, x, z, rx * 1.3, cv + ry * 1.3)
    if win is None:
        return
    sl, u, v, p = win
    im, lb = img[sl], lab[sl]
    if not crown_only:
        tw = rng.uniform(0.2, 0.45)
        trunk = (np.abs(u) < tw / 2) & (v >= 0) & (v < cv)
        bark = _jitter(rng, (0.30, 0.24, 0.18), 0.2)
        _paint(im, lb, trunk, bark * _grain(rng, trunk.shape, 0.1), VEGETATION)
    theta = np.arctan2(v - cv, u)
    rmod = np.ones_like(theta)
    for k in range(3, 8):
        rmod += rng.uniform(0.03, 0.10) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    crown = ((u / rx) ** 2 + ((v - cv) / ry) ** 2 <= rmod**2) & (v >= 0)
    green = _jitter(rng, (0.22, 0.38, 0.12) if rng.random() < 0.88 else (0.55, 0.45, 0.15), 0.18)
    h, w = crown.shape
    clump = _smooth_noise(rng, h, w, max(0.8, 0.35 * p))
    light = 0.75 + 0.35 * np.clip((v - cv) / ry, -1, 1) - 0.15 * np.clip(u / rx, -1, 1)
    tex = light * (0.8 + 0.4 * clump) * (1 + 0.1 * rng.standard_normal((h, w), dtype=_F))
    _paint(im, lb, crown, green * tex[..., None], VEGETATION)


def _draw_car(rng, img, lab, view: _View, x: float, z: float, facing_us: bool) -> None:
    """Rear (or front) view: wheels, body, narrower cabin with glass, lights, plate, shadow."""
    w = rng.uniform(1.65, 2.0)
    tall = rng.random() < 0.25  # vans / SUVs
    hgt = rng.uniform(1.6, 2.0) if tall else rng.uniform(1.35, 1.55)
    win = _window(view, x, z, w * 0.8, hgt + 0.05, bottom=0.4)
    if win is None:
        return
    sl, u, v, _ = win
    im, lb = img[sl], lab[sl]
    hw = w / 2
    shadow = ((u / (hw * 1.15)) ** 2 + ((v + 0.05) / 0.35) ** 2 <= 1) & (lb != SKY)
    im[shadow] *= _F(rng.uniform(0.3, 0.5))
    colour = _jitter(rng, _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], 0.1)
    # wheels
    tyre = np.array((0.05, 0.05, 0.06), _F) * _F(rng.uniform(0.8, 1.6))
    wheels = _rrect(np.abs(u), v, hw - 0.42, hw - 0.06, -0.02, 0.5, 0.1)
    _paint(im, lb, wheels, tyre, CAR)
    # body, shaded lighter toward the top, with a faint highlight band
    body_top = hgt * (0.62 if tall else 0.58)
    body = _rrect(u, v, -hw, hw, 0.18, body_top, 0.18)
    shade = 0.75 + 0.35 * np.clip(v / body_top, 0, 1)
    shade = shade + 0.15 * (np.abs(v - body_top + 0.12) < 0.05)
    body_col = colour * (shade * _grain(rng, body.shape, 0.04)[..., 0])[..., None]
    _paint(im, lb, body, body_col, CAR)
    # cabin: a trapezoid narrowing upward, rounded top
    t = np.clip((v - body_top) / (hgt - body_top), 0, 1)
    cab_hw = hw * (0.92 - (0.2 if not tall else 0.08) * t)
    cabin = (np.abs(u) <= cab_hw) & (v >= body_top - 0.05) & (v <= hgt)
    cabin &= _rrect(u, v, -hw, hw, body_top - 0.3, hgt, 0.3 if not tall else 0.15)
    _paint(im, lb, cabin, colour * 0.95, CAR)
    glass = (np.abs(u) <= cab_hw - 0.1) & (v >= body_top + 0.05) & (v <= hgt - 0.1)
    gcol = _jitter(rng, (0.12, 0.15, 0.2), 0.3)
    refl = (0.8 + 0.8 * t * (u > 0.2 * hw))[..., None]  # sky reflection on one side
    _paint(im, lb, glass, np.broadcast_to(gcol, (*glass.shape, 3)) * refl, CAR)
    # lights, plate, bumper
    lights = _rrect(np.abs(u), v, hw - 0.38, hw - 0.05, body_top - 0.32, body_top - 0.12, 0.05)
    lcol = np.array((0.95, 0.93, 0.8) if facing_us else (0.75, 0.06, 0.05), _F)
    _paint(im, lb, lights, lcol, CAR)
    plate = (np.abs(u) < 0.26) & (v > 0.32) & (v < 0.44)
    _paint(im, lb, plate, np.array((0.88, 0.88, 0.85), _F), CAR)
    bumper = body & (v < 0.3)
    _paint(im, lb, bumper, colour * 0.45, CAR)


def _draw_person(rng, img, lab, view: _View, x: float, z: float) -> None:
    """Legs (walking stance), torso, arms, head with hair; all labelled person."""
    hgt = rng.uniform(1.55, 1.95) if rng.random() < 0.9 else rng.uniform(1.0, 1.4)
    # shoulder width, a little broad: thin shapes vanish in stride-2 nets
    bw = hgt * rng.uniform(0.26, 0.32)
    win = _window(view, x, z, bw, hgt + 0.05)
    if win is None:
        return
    sl, u, v, _ = win
    im, lb = img[sl], lab[sl]
    leg_h = hgt * 0.47
    stride = rng.uniform(0.0, 0.18) * hgt / 1.75
    lw = bw * 0.26
    t = np.clip(1 - v / leg_h, 0, 1)
    legs = (
        ((np.abs(u + bw * 0.16 + stride * t) < lw) | (np.abs(u - bw * 0.16 - stride * t) < lw))
        & (v >= 0)
        & (v < leg_h + 0.05)
    )
    trousers = _jitter(rng, _TROUSERS[rng.integers(len(_TROUSERS))], 0.12)
    _paint(im, lb, legs, trousers * _grain(rng, legs.shape, 0.06), PERSON)
    shoes = legs & (v < 0.08)
    _paint(im, lb, shoes, np.array((0.08, 0.07, 0.07), _F), PERSON)
    shirt = _jitter(rng, _CLOTHES[rng.integers(len(_CLOTHES))], 0.12)
    long_coat = rng.random() < 0.25
    t0 = leg_h * (0.55 if long_coat else 0.95)
    torso = _rrect(u, v, -bw / 2, bw / 2, t0, hgt * 0.83, bw * 0.2)
    _paint(im, lb, torso, shirt * _grain(rng, torso.shape, 0.06), PERSON)
    skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 0.06)
    swing = rng.uniform(-0.08, 0.08)
    arms = _rrect(np.abs(u), v, bw / 2 - 0.03, bw / 2 + 0.09, hgt * 0.47, hgt * 0.81, 0.05)
    arms &= np.abs(u) - swing * (1 - v / hgt) < bw / 2 + 0.09
    _paint(im, lb, arms, shirt * 0.85, PERSON)
    hands = arms & (v < hgt * 0.52)
    _paint(im, lb, hands, skin, PERSON)
    neck = (np.abs(u) < 0.05) & (v >= hgt * 0.8) & (v < hgt * 0.87)
    _paint(im, lb, neck, skin * 0.9, PERSON)
    head_r = hgt * 0.062
    head_c = hgt - head_r * 1.2
    head = _ellipse(u, v, 0, head_c, head_r, head_r * 1.2)
    _paint(im, lb, head, skin * _grain(rng, head.shape, 0.04), PERSON)
    hair = head & (v > head_c + head_r * rng.uniform(-0.1, 0.5))
    _paint(im, lb, hair, _jitter(rng, _HAIR[rng.integers(len(_HAIR))], 0.1), PERSON)
    if rng.random() < 0.3:  # bag on one side
        s = 1 if rng.random() < 0.5 else -1
        bag = _rrect(s * u, v, bw / 2 + 0.02, bw / 2 + 0.2, hgt * 0.38, hgt * 0.55, 0.03)
        _paint(im, lb, bag, _jitter(rng, _CLOTHES[rng.integers(len(_CLOTHES))], 0.1), PERSON)


def _place_objects(rng, view: _View, lay: _Layout) -> list[tuple[float, Callable]]:
    """Sample cars, people, trees and bushes on plausible ground; returns (depth, draw)."""
    objs: list[tuple[float, Callable]] = []
    zb = view.zb
    cars: list[tuple[float, float]] = []

    def d_uniform(lo: float, hi: float) -> float:
        """Depth sampled uniform in 1/z: more near objects (which cover more pixels)."""
        return 1.0 / rng.uniform(1.0 / hi, 1.0 / lo)

    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(6):
            parked = rng.random() < 0.3
            if parked:
                x = lay.road_l + 1.1 if rng.random() < 0.5 else lay.road_r - 1.1
            else:
                lane = int(rng.integers(lay.lanes))
                x = lay.road_l + (lane + 0.5) * lay.lane_w + rng.normal(0, 0.25)
            z = d_uniform(0.95, 7.0)
            if all(abs(x - cx) > 2.3 or abs(z - cz) * zb > 6.5 for cx, cz in cars):
                cars.append((x, z))
                facing = (not parked) and x < 0.5 * (lay.road_l + lay.road_r) - 1.0
                facing = facing and rng.random() < 0.6
                objs.append(
                    (z, lambda i, l, x=x, z=z, f=facing: _draw_car(rng, i, l, view, x, z, f))
                )
                break

    def walk_x(side: int) -> float:
        if side == 0:
            return rng.uniform(lay.walk_l + 0.3, lay.road_l - 0.3)
        return rng.uniform(lay.road_r + 0.3, lay.walk_r - 0.3)

    n_people = int(rng.integers(2, 9))
    k = 0
    while k < n_people:
        z = d_uniform(0.95, 4.5)
        if rng.random() < 0.15:  # crossing the road
            x = rng.uniform(lay.road_l + 0.5, lay.road_r - 0.5)
        else:
            x = walk_x(int(rng.integers(2)))
        group = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        for _ in range(min(group, n_people - k)):
            xi = x + rng.uniform(-0.7, 0.7)
            zi = z + rng.uniform(-0.6, 0.6) / zb
            zi = max(zi, 0.9)
            objs.append((zi, lambda i, l, x=xi, z=zi: _draw_person(rng, i, l, view, x, z)))
            k += 1

    for side in (0, 1):
        sgn = -1 if side == 0 else 1
        edge = lay.walk_l if side == 0 else lay.walk_r
        if lay.sides[side] == "facade":
            if rng.random() < 0.5:  # street trees at the sidewalk's outer edge
                spacing = rng.uniform(8, 16)
                zm = rng.uniform(0.5, 1.2) * zb
                while zm < lay.z_far * zb:
                    if lay.cross is None or not (lay.cross[0] - 2 < zm < lay.cross[1] + 2):
                        x, z = edge - sgn * 0.8, zm / zb
                        objs.append((z, lambda i, l, x=x, z=z: _draw_tree(rng, i, l, view, x, z)))
                    zm += spacing
        else:
            for _ in range(int(rng.integers(3, 10))):
                x = edge + sgn * rng.uniform(1.0, 18.0)
                z = d_uniform(1.0, lay.z_far)
                bush = rng.random() < 0.3
                objs.append(
                    (z, lambda i, l, x=x, z=z, b=bush: _draw_tree(rng, i, l, view, x, z, b))
                )
    return objs


# --------------------------------------------------------------------- lighting


def _finish(rng, img: np.ndarray, kind: str) -> np.ndarray:
    """Blur a little (optics), then exposure, contrast, colour cast, gamma, vignette, noise."""
    H, W = img.shape[:2]
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    blur = (pad[:-2] + 2 * pad[1:-1] + pad[2:]) / 4
    blur = (blur[:, :-2] + 2 * blur[:, 1:-1] + blur[:, 2:]) / 4
    a = _F(rng.uniform(0.2, 0.7))
    img = img * (1 - a) + blur * a
    gain = rng.uniform(0.65, 1.25) * (0.9 if kind == "overcast" else 1.0)
    cast = rng.uniform(0.87, 1.13, 3).astype(_F)
    if kind == "dusk":
        cast *= np.array((1.1, 0.95, 0.85), _F)
    img = img * cast * _F(gain)
    m = img.mean()
    img = (img - m) * _F(rng.uniform(0.75, 1.2)) + m
    img = np.clip(img, 0, 1) ** _F(rng.uniform(0.8, 1.25))
    yy = (np.arange(H, dtype=_F) + 0.5) / H - 0.5
    xx = (np.arange(W, dtype=_F) + 0.5) / W - 0.5
    img = img * (1 - _F(rng.uniform(0, 0.35)) * (yy[:, None] ** 2 + xx[None, :] ** 2))[..., None]
    sigma = _F(rng.uniform(0.004, 0.03))
    img = img + sigma * rng.standard_normal(img.shape, dtype=_F)
    return np.round(np.clip(img, 0, 1) * 255) / _F(255)


# -------------------------------------------------------------------------- scene


def _sample_view(rng, H: int, W: int) -> _View:
    sb = W * rng.uniform(0.075, 0.105)
    return _View(
        H=H,
        W=W,
        yh=H * rng.uniform(0.34, 0.5),
        vx=W * rng.uniform(0.38, 0.62),
        sb=sb,
        zb=W * rng.uniform(0.75, 1.0) / sb,
    )


def _sample_layout(rng, view: _View) -> _Layout:
    lanes = int(rng.choice([2, 2, 3, 3, 4]))
    lane_w = rng.uniform(3.0, 3.6)
    width = lanes * lane_w
    road_l = -rng.uniform(0.25, 0.75) * width
    road_r = road_l + width
    sides = tuple("facade" if rng.random() < 0.72 else "park" for _ in range(2))
    beyond = tuple(VEGETATION if s == "park" or rng.random() < 0.4 else SIDEWALK for s in sides)
    z_far = rng.uniform(5.0, 12.0)
    cross = None
    if rng.random() < 0.3:
        c0 = rng.uniform(1.5, 0.6 * z_far) * view.zb
        cross = (c0, c0 + rng.uniform(8, 14))
    return _Layout(
        road_l=road_l,
        road_r=road_r,
        lane_w=lane_w,
        lanes=lanes,
        walk_l=road_l - rng.uniform(1.8, 4.5),
        walk_r=road_r + rng.uniform(1.8, 4.5),
        sides=sides,  # type: ignore[arg-type]
        beyond=beyond,  # type: ignore[arg-type]
        z_far=z_far,
        cross=cross,
    )


def render_scene(
    rng: np.random.Generator, size: tuple[int, int] = (96, 192)
) -> tuple[np.ndarray, np.ndarray]:
    """One street scene drawn with `rng`: image float32 (3, H, W) in [0, 1] (8-bit levels),
    label int64 (H, W) with train ids 0..6 (see SYNTHETIC_CLASSES)."""
    H, W = int(size[0]), int(size[1])
    if H < 8 or W < 8:
        raise ValueError(f"size must be at least 8x8, got {size}")
    view = _sample_view(rng, H, W)
    lay = _sample_layout(rng, view)
    kind, top, hor = _sky_colours(rng)
    sunny = kind == "clear"
    img = np.empty((H, W, 3), _F)
    lab = np.empty((H, W), np.uint8)
    _draw_sky(rng, img, lab, view, kind, top, hor)
    _draw_ground(rng, img, lab, view, lay, sunny)
    _draw_skyline(rng, img, lab, view, lay, hor)
    walls = (_wall_segments(rng, view, lay, 0), _wall_segments(rng, view, lay, 1))
    lit = int(rng.integers(2))  # the sunlit side
    for side in (0, 1):
        xw = lay.walk_l if side == 0 else lay.walk_r
        shade = 1.0 if (side == lit or not sunny) else rng.uniform(0.6, 0.8)
        _draw_wall(rng, img, lab, view, side, xw, walls[side], shade)
    objs = _place_objects(rng, view, lay)
    for _, draw in sorted(objs, key=lambda o: -o[0]):  # far to near: near objects occlude
        draw(img, lab)
    img = _finish(rng, img, kind)
    return np.ascontiguousarray(img.transpose(2, 0, 1)), lab.astype(np.int64)


class SyntheticScenes:
    """`num_images` street scenes of `size` (H, W); item i depends only on (seed, i, size).

    numpy only, indexable like a map-style Dataset: torch's DataLoader batches the
    (image, label) numpy pairs with its default collate. Items are rendered on access
    (a few ms each); `cache=True` keeps them (as uint8, ~3.3 bytes per pixel).
    """

    classes: tuple[str, ...] = SYNTHETIC_CLASSES
    palette: tuple[tuple[int, int, int], ...] = SYNTHETIC_PALETTE
    num_classes: int = len(SYNTHETIC_CLASSES)
    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        num_images: int,
        size: tuple[int, int] = (96, 192),
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        if num_images < 0:
            raise ValueError("num_images must be >= 0")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.num_images = int(num_images)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        i = checked_index(index, self.num_images, "scenes")
        if self._cache is not None and i in self._cache:
            img8, lab8 = self._cache[i]
            return img8.astype(_F) / _F(255), lab8.astype(np.int64)
        image, label = render_scene(np.random.default_rng([self.seed, i]), self.size)
        if self._cache is not None:
            self._cache[i] = (np.round(image * 255).astype(np.uint8), label.astype(np.uint8))
        return image, label

    def __repr__(self) -> str:
        return f"SyntheticScenes(num_images={self.num_images}, size={self.size}, seed={self.seed})"


# ------------------------------------------------------------------------ preview


def colorize_label(
    label: np.ndarray,
    palette: tuple[tuple[int, int, int], ...] | np.ndarray = SYNTHETIC_PALETTE,
    ignore_colour: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 RGB; ids outside the palette (ignore) get ignore_colour."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:] = ignore_colour
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)
    lut[: len(pal)] = pal
    lab = np.asarray(label)
    return lut[np.where((lab >= 0) & (lab < 256), lab, 255).astype(np.intp)]


def contact_sheet(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    palette: tuple[tuple[int, int, int], ...] | np.ndarray = SYNTHETIC_PALETTE,
    gap: int = 2,
) -> np.ndarray:
    """Rows of [image | colourised label] as one (H', W', 3) uint8 array, for eyeballing data."""
    if not pairs:
        raise ValueError("no pairs to show")
    H = max(img.shape[1] for img, _ in pairs)
    W = max(img.shape[2] for img, _ in pairs)
    sheet = np.full((len(pairs) * (H + gap) - gap, 2 * W + gap, 3), 255, np.uint8)
    for k, (img, lab) in enumerate(pairs):
        y = k * (H + gap)
        rgb = np.round(np.clip(img, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)
        sheet[y : y + rgb.shape[0], : rgb.shape[1]] = rgb
        col = colorize_label(lab, palette)
        sheet[y : y + col.shape[0], W + gap : W + gap + col.shape[1]] = col
    return sheet
