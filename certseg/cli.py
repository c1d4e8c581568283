"""`certseg` command line. Heavy imports (torch) happen inside the commands that need
them, so the serving commands work on a base install without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="certseg: certifiably robust semantic segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main() -> None:
    """Train, certify, export and serve 1-Lipschitz segmentation networks."""


@app.command()
def certify(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, WebP).")],
    checkpoint: Annotated[Path, typer.Option(help="A certseg checkpoint (.pt).")],
    eps: Annotated[
        list[float] | None, typer.Option(help="Attack budgets (l2, image in [0,1]).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Certify images: guaranteed fraction, joint-budget flips and radius statistics."""
    from certseg.certify_images import certify_files

    reports = certify_files(images, checkpoint, eps)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        from certseg.certify_images import render_table

        render_table(reports)


if __name__ == "__main__":
    app()
