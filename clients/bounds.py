"""Bounds as text, rounded toward safety: a lower bound shown is never above the value,
an upper bound never below it. Rounding to nearest showed a class that keeps 99.977%
of its pixels as "kept >= 100.0%". The CLIs (this package's and `certseg`'s) write
their tables with these; the viewer has their JavaScript twins (`pctDown`, `pctUp`,
`fixedUp`)."""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = ["down3", "fixed_down", "fixed_up", "pct_down", "pct_up"]


def down3(x: float) -> str:
    """3 significant digits, rounded down (the "1% flips at" columns)."""
    if not x > 0 or not math.isfinite(x):
        return f"{x:g}"
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    return f"{math.floor(x / step) * step:.3g}"


def _fixed(x: float, digits: int, up: bool, times: int = 1) -> str:
    """`x * times` to `digits` decimals, rounded down (or up), in exact arithmetic on
    the shortest decimal that reads back as x (0.29 is 29/100, not the double just
    under it, which would show 28.9%): a float product could round onto the next step
    and floor to above the value."""
    if not math.isfinite(x):
        return f"{x * times:g}"
    steps = Fraction(repr(float(x))) * times * 10**digits
    whole = math.ceil(steps) if up else math.floor(steps)
    sign, whole = ("-" if whole < 0 else ""), abs(whole)
    if not digits:
        return f"{sign}{whole}"
    return f"{sign}{whole // 10**digits}.{whole % 10**digits:0{digits}d}"


def fixed_down(x: float, digits: int = 3) -> str:
    """`digits` decimals, rounded down: 0.89951 -> "0.899"."""
    return _fixed(x, digits, up=False)


def fixed_up(x: float, digits: int = 3) -> str:
    """`digits` decimals, rounded up (an upper bound: L, an operator norm): 5.0505 -> "5.051"."""
    return _fixed(x, digits, up=True)


def pct_down(fraction: float, digits: int = 1) -> str:
    """A lower-bound share as a percentage, rounded down: 0.99977 -> "99.9%"."""
    return _fixed(fraction, digits, up=False, times=100) + "%"


def pct_up(fraction: float, digits: int = 1) -> str:
    """An upper-bound share as a percentage, rounded up: 1/3000 -> "0.1%"."""
    return _fixed(fraction, digits, up=True, times=100) + "%"
