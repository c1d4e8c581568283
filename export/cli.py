"""`certseg export` and `certseg audit`, as a typer app whose commands can be mounted.

Mount them as top-level commands of certseg/cli.py:

    from export.cli import app as _export_app
    app.registered_commands += _export_app.registered_commands

Only typer is imported here; torch, onnx and tensorrt load inside the commands, so
mounting costs nothing and `certseg audit` runs on a torch-free server install.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from certseg.errors import cli_errors
from certseg.sizes import parse_size

__all__ = ["app"]

app = typer.Typer(
    help="Export certseg models to ONNX / Triton / TensorRT, and audit ONNX files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def parse_hw(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W); anything else is a usage error of the command."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("export")
@cli_errors("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A certseg checkpoint (.pt).", exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    logits: Annotated[bool, typer.Option("--logits", help="Also output the logits.")] = False,
    triton: Annotated[
        Path | None, typer.Option("--triton", help="Also write a Triton model repository here.")
    ] = None,
    triton_name: Annotated[str, typer.Option(help="Model name in the Triton repo.")] = "certseg",
    trt: Annotated[
        str | None, typer.Option("--trt", help="Also build a TensorRT engine: fp32 or fp16.")
    ] = None,
    trt_opt: Annotated[str, typer.Option(help="Engine optimal size HxW.")] = "512x1024",
    trt_max: Annotated[str, typer.Option(help="Engine largest size HxW.")] = "1024x2048",
    trt_batch: Annotated[int, typer.Option(help="Engine largest batch.")] = 4,
    trt_cache: Annotated[Path, typer.Option(help="Engine cache folder.")] = Path(
        "~/.cache/certseg/trt"
    ),
    calib: Annotated[int, typer.Option(help="Calibration images for the error bound.")] = 16,
    rtol: Annotated[
        float, typer.Option(min=0.0, help="Allowed audited/declared L excess (>= 0).")
    ] = 1e-3,
) -> None:
    """Export CHECKPOINT to OUT/model.onnx (+ card.json, audit.json), audited."""
    if trt is not None and trt not in ("fp32", "fp16"):
        raise typer.BadParameter("--trt must be fp32 or fp16")
    from export.audit import AuditError
    from export.onnx_export import export_onnx

    if out.exists() and not out.is_dir():  # a file there: it would end in FileExistsError
        raise typer.BadParameter(f"{out} is a file; --out names a folder", param_hint="--out")
    from rich.console import Console

    try:  # most of a minute for a large net on a CPU: each stage shown as it starts
        with Console(stderr=True).status("exporting") as status:
            result = export_onnx(
                checkpoint, out, with_logits=logits, rtol=rtol, progress=status.update
            )
    except AuditError as err:
        typer.secho(f"export refused: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"wrote {result.onnx_path} (outputs {', '.join(result.outputs)}); "
        f"L audited {result.lipschitz_audited:.9g}, structural {result.lipschitz_structural:.9g}"
    )
    if triton is not None:
        from export.triton import export_triton

        repo = export_triton(result.onnx_path, triton, triton_name)
        typer.echo(f"wrote Triton model {repo.model_dir}")
    if trt is not None:
        _build_trt(result, trt, trt_opt, trt_max, trt_batch, trt_cache, calib)


def _build_trt(result, precision, opt, largest, batch, cache, calib) -> None:
    import numpy as np

    from certseg.data.synthetic import render_scene
    from export.tensorrt import Profile, build_engine, calibrate_error_bound

    oh, ow = parse_hw(opt)
    mh, mw = parse_hw(largest)
    profile = Profile.for_sizes((oh, ow), (mh, mw), max_batch=batch)
    try:
        info = build_engine(result.onnx_path, precision, profile, cache)
    except RuntimeError as err:
        typer.secho(f"TensorRT: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"engine {info.path} ({'cached' if info.cached else 'built'})")
    rng = np.random.default_rng(0)
    images = [render_scene(rng, (oh, ow))[0][None] for _ in range(calib)]
    bound = calibrate_error_bound(info, result.onnx_path, images)
    target = result.onnx_path.parent / f"engine-{precision}.json"
    target.write_text(
        json.dumps(
            {"engine": str(info.path), "key": info.key, "error_bound": json.loads(bound.to_json())},
            indent=2,
        )
    )
    typer.echo(
        f"margin error bound {bound.bound:.3g} (max |dmargin| {bound.max_margin_diff:.3g} "
        f"on {bound.images} images); certified margin = margin - bound"
    )


@app.command("audit")
def audit_command(
    model: Annotated[
        Path, typer.Argument(help="An exported model.onnx, or its export folder.", exists=True)
    ],
    rtol: Annotated[
        float, typer.Option(min=0.0, help="Allowed audited/declared L excess (>= 0).")
    ] = 1e-3,
    declared: Annotated[
        float | None, typer.Option(help="Declared L (default: the file's metadata).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Recompute MODEL's Lipschitz bound from its weights; exit 1 if it fails."""
    from export.audit import AuditError, audit_onnx

    if model.is_dir() and (model / "model.onnx").is_file():  # as serve and calibrate take it
        model = model / "model.onnx"
    try:
        report = audit_onnx(model, declared=declared, rtol=rtol, strict=False)
    except AuditError as err:
        typer.secho(f"audit failed: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    except Exception as err:  # not ONNX at all (a .pt, a truncated file): protobuf's errors
        typer.secho(
            f"audit failed: {model} is not a readable ONNX model ({err})", fg="red", err=True
        )
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(report.to_json(indent=2))
    else:
        _render(report)
    if not report.ok:
        for p in report.problems:
            typer.secho(f"REFUSED: {p}", fg="red", err=True)
        raise typer.Exit(1)


def _render(report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"audit of {report.path}", show_lines=False)
    for col, justify in [
        ("node", "left"),
        ("op", "left"),
        ("shape", "left"),
        ("upper", "right"),
        ("lower", "right"),
        ("L so far", "right"),
        ("method", "left"),
    ]:
        table.add_column(col, justify=justify, overflow="fold")
    for r in report.layers:
        table.add_row(
            r.node,
            r.op,
            r.shape,
            f"{r.upper:.8f}",
            "" if math.isnan(r.lower) else f"{r.lower:.8f}",
            f"{r.lipschitz:.8f}",
            r.method,
        )
    console = Console()
    console.print(table)
    declared = report.lipschitz_declared
    line = f"audited L = {report.lipschitz_audited:.9g}"
    if declared:
        line += f", declared {declared:.9g} (ratio {report.ratio:.9f}, rtol {report.rtol:g})"
    if report.head_scale is not None:
        line += f"; radius head uses L = {1 / (math.sqrt(2) * report.head_scale):.9g}"
    console.print(line)
    console.print("[green]OK[/green]" if report.ok else "[red]REFUSED[/red]")
