"""Certify image files with a model: the engine of `certseg certify`.

The model is a torch checkpoint (the `train` extra) or an exported model.onnx, served
by the server's own ONNX Runtime engine (audited at load), so a base install certifies
with the shipped model and its figures are the server's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from certseg.certify import (
    STABILITY_FRACTIONS,
    certified_radius,
    guaranteed_region,
    margins,
    max_flips,
    stability,
    stability_rows,
)
from certseg.data import load_image
from certseg.errors import UserError
from certseg.sizes import format_size
from clients.bounds import down3, fixed_down, fixed_up, pct_down, pct_up

__all__ = ["ImageReport", "certify_files", "render_table"]


@dataclass
class ImageReport:
    """Certificate summary of one image, named as the REST answer names its figures
    (one entry per eps where the answer has one eps)."""

    image: str
    height: int
    width: int
    lipschitz: float
    eps: list[float]
    guaranteed_fraction: list[float]
    max_flips: list[int]
    max_flips_fraction: list[float]
    radius_quantiles: dict[str, float]
    #: per share of the pixels: {fraction, pixels, eps}, eps the least l2 norm that may
    #: flip that many (null: none can), as `stability_rows` gives it
    stability: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(name: str, margin: np.ndarray, lipschitz: float, eps: Sequence[float]) -> ImageReport:
    """Per-pixel radii and joint-budget figures of one image's margins (H, W)."""
    radius = certified_radius(margin, lipschitz)
    n = radius.size
    qs = {"min": 0.0, "p10": 0.1, "median": 0.5, "p90": 0.9, "max": 1.0}
    flips = [int(max_flips(margin, e, lipschitz)) for e in eps]
    return ImageReport(
        image=name,
        height=int(radius.shape[0]),
        width=int(radius.shape[1]),
        lipschitz=lipschitz,
        eps=list(eps),
        guaranteed_fraction=[float(guaranteed_region(radius, e).mean()) for e in eps],
        max_flips=flips,
        max_flips_fraction=[f / n for f in flips],
        radius_quantiles={k: float(np.quantile(radius, q)) for k, q in qs.items()},
        stability=stability_rows(stability(margin, STABILITY_FRACTIONS, lipschitz).tolist(), n),
    )


MarginsOf = Callable[[np.ndarray], np.ndarray]


def certify_files(
    paths: Sequence[Path], model: Path, eps: Sequence[float] | None = None
) -> list[ImageReport]:
    """Each image's report at `eps` (default: the card's); `model` an exported
    model.onnx or its folder, else a checkpoint."""
    if model.is_dir() or model.suffix == ".onnx":
        margins_of, lipschitz, default_eps = _export(model)
    else:  # a checkpoint, whatever its name ends in (.pt, .pth)
        margins_of, lipschitz, default_eps = _checkpoint(model)
    grid = list(eps) if eps else [default_eps]
    return [summarize(str(p), margins_of(_read(p)), lipschitz, grid) for p in paths]


def _checkpoint(path: Path) -> tuple[MarginsOf, float, float]:
    from certseg.inference import predict_logits
    from certseg.models import load_checkpoint, require_lipschitz

    model, card = load_checkpoint(path)
    lipschitz = require_lipschitz(card, path)

    def margins_of(image: np.ndarray) -> np.ndarray:
        return margins(predict_logits(model, image, card.pad_multiple)[0])[1]

    return margins_of, lipschitz, card.default_eps


def _export(path: Path) -> tuple[MarginsOf, float, float]:
    """The export served as `certseg serve` serves it on the CPU (audited at load, the
    same session options, non-finite pixels made unknown): its figures are the server's."""
    from server.backends import ModelSpec, create_engine
    from server.errors import ModelError
    from server.settings import Settings

    onnx_path = path / "model.onnx" if path.is_dir() else path
    if not onnx_path.is_file():
        raise UserError(f"{path}: no such model (a checkpoint .pt, a model.onnx or its folder)")
    settings = Settings(backend="onnxruntime", providers=["CPUExecutionProvider"], warmup=False)
    try:
        engine = create_engine(ModelSpec(None, onnx_path), settings)
        engine.load()
    except ModelError as exc:
        raise UserError(exc.detail) from None
    info = engine.metadata()

    def margins_of(image: np.ndarray) -> np.ndarray:
        return engine.infer(image[None].astype(np.float32), ["margin"])["margin"][0]

    return margins_of, info.lipschitz, info.card.default_eps


def _read(path: Path) -> np.ndarray:
    """The image, or a UserError that names it (missing, a folder, not an image)."""
    try:
        return load_image(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the image ({exc.strerror or exc})") from None
    except ValueError as exc:  # an image it would misread (16-bit colour)
        raise UserError(str(exc)) from None


def render_table(reports: Sequence[ImageReport]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="certseg certificates (l2, image in [0,1])")
    cols = ("image", "size", "L", "eps", "guaranteed", "max flips", "radius p10/med/p90")
    for col in (*cols, "1% flips at"):
        table.add_column(col, overflow="fold")  # wrapped, never cut to an ellipsis
    for r in reports:
        q = r.radius_quantiles
        for i, e in enumerate(r.eps):
            table.add_row(
                Path(r.image).name if i == 0 else "",
                format_size(r.height, r.width) if i == 0 else "",
                fixed_up(r.lipschitz, 4) if i == 0 else "",
                f"{e:g}",
                pct_down(r.guaranteed_fraction[i], 2),
                f"{r.max_flips[i]} ({pct_up(r.max_flips_fraction[i], 2)})",
                "/".join(fixed_down(q[k]) for k in ("p10", "median", "p90")) if i == 0 else "",
                _stability_cell(r.stability) if i == 0 else "",
            )
    Console().print(table)


def _stability_cell(rows: list[dict]) -> str:
    """The least norm that may flip 1% of the pixels ("never": none can)."""
    eps = next(row["eps"] for row in rows if row["fraction"] == 0.01)
    return "never" if eps is None else f"eps {down3(eps)}"
