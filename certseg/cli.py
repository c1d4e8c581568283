"""`certseg` command line. Heavy imports (torch) happen inside the commands that need
them, so the serving commands work on a base install without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from certseg.errors import UserError, cli_errors

app = typer.Typer(
    help="certseg: certifiably robust semantic segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main() -> None:
    """Train, certify, export and serve 1-Lipschitz segmentation networks."""


def _nonnegative(value: float | list[float] | None) -> float | list[float] | None:
    """Budgets and noise levels are >= 0: a usage error here, not a ValueError (or a
    model card with a negative default eps) after the model is built. NaN is refused."""
    for v in value if isinstance(value, list) else [value]:
        if v is not None and not v >= 0:
            raise typer.BadParameter(f"must be >= 0, got {v:g}")
    return value


@app.command()
@cli_errors("certify")
def certify(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, WebP).")],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "--checkpoint",
            help="A checkpoint (.pt, needs the train extra), or an exported model.onnx or "
            "its folder (ONNX Runtime, audited as the server loads it). Default: the "
            "shipped model.",
        ),
    ] = None,
    eps: Annotated[
        list[float] | None,
        typer.Option(help="Attack budgets (l2, image in [0,1]).", callback=_nonnegative),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Certify images: guaranteed fraction, joint-budget flips and radius statistics."""
    from certseg.certify_images import certify_files

    if model is None:
        from server.settings import default_model_path

        model = default_model_path()
        if model is None:
            raise UserError("no shipped model in this install: name one with --model")
    reports = certify_files(images, model, eps)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        from certseg.certify_images import render_table

        render_table(reports)


def _kwargs(pairs: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE pairs, each VALUE JSON (a bare word stays a string). A value that opens
    like a JSON list or object but does not parse is refused: as a string it reached
    the model and failed there (position_grid='[8,16')."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--arch-kwarg")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            if value.lstrip().startswith(("[", "{")):
                raise typer.BadParameter(
                    f"{key}={value} is not valid JSON ({exc.msg} at character {exc.pos})",
                    param_hint="--arch-kwarg",
                ) from None
            out[key] = value
    return out


def _check_arch(arch: str) -> None:
    """A usage error, before any data is read, for an unknown model (its arguments are
    checked by `certseg.train`, as early)."""
    from certseg.models import list_models

    if arch not in list_models():
        raise typer.BadParameter(
            f"no model named {arch!r}; registered: {', '.join(list_models())}", param_hint="--arch"
        )


def _check_data(data: str, root: Path | None) -> None:
    """A usage error, before any model is built, for a source we lack, a missing root,
    or a root given to synthetic scenes (which read none: it looked applied)."""
    from certseg.data.sources import SOURCES

    if data not in SOURCES:
        raise typer.BadParameter(f"choose one of {', '.join(SOURCES)}", param_hint="--data")
    if data != "synthetic" and root is None:
        raise typer.BadParameter(
            f"--data {data} reads its images from --root DIR", param_hint="--root"
        )
    if data == "synthetic" and root is not None:
        raise typer.BadParameter(
            "--data synthetic renders its scenes and reads no --root; name --data "
            "cityscapes or folder to use it",
            param_hint="--root",
        )


def _refuse_unused(ctx: typer.Context, names: tuple[str, ...], unless: bool, why: str) -> None:
    """A usage error for options given on the command line that this run would ignore
    (`--sigma` with the lipschitz method): silently dropped, they look applied."""
    # by name: typer's context answers with its own copy of click's enum
    given = [n for n in names if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"]
    if given and not unless:
        flag = "--" + given[0].replace("_", "-")
        raise typer.BadParameter(f"{flag} applies to {why} only", param_hint=flag)


@app.command()
@cli_errors("train")
def train(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (resumes if it has last.pt).")
    ],
    arch: Annotated[str, typer.Option(help="Registered model name.")] = "lipdeeplab_xs",
    arch_kwarg: Annotated[
        list[str] | None,
        typer.Option(help="Model argument KEY=VALUE (JSON value), e.g. width=24; repeatable."),
    ] = None,
    data: Annotated[str, typer.Option(help="synthetic | cityscapes | folder")] = "synthetic",
    root: Annotated[Path | None, typer.Option(help="Data root (cityscapes, folder).")] = None,
    num_images: Annotated[int, typer.Option(help="Synthetic training scenes.", min=1)] = 512,
    val_images: Annotated[int, typer.Option(help="Synthetic held-out scenes.", min=1)] = 64,
    height: Annotated[int, typer.Option(help="Training image height.", min=1)] = 96,
    width: Annotated[int, typer.Option(help="Training image width.", min=1)] = 192,
    epochs: Annotated[int, typer.Option(min=0)] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    lr: Annotated[float, typer.Option()] = 1e-3,
    tau: Annotated[
        float, typer.Option(help="Loss temperature (paper: 20 Cityscapes, 8 small).")
    ] = 8.0,
    train_eps: Annotated[
        float,
        typer.Option(
            help="Certified-margin training: offset wrong classes by sqrt(2) L eps.",
            callback=_nonnegative,
        ),
    ] = 0.0,
    position_lr_scale: Annotated[
        float, typer.Option(help="lr multiplier of position biases (arch position_grid).")
    ] = 1.0,
    eps: Annotated[
        float, typer.Option(help="Validation eps and the card's default.", callback=_nonnegative)
    ] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision (CUDA only).")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader workers.", min=0)] = 0,
    noise_sigma: Annotated[
        float, typer.Option(help="Gaussian noise augmentation.", callback=_nonnegative)
    ] = 0.0,
    unconstrained: Annotated[
        bool, typer.Option(help="Train the unconstrained twin (smoothing baseline).")
    ] = False,
    init: Annotated[Path | None, typer.Option(help="Fine-tune from this checkpoint.")] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option(hidden=True)] = None,
    name: Annotated[str | None, typer.Option(help="Model name for the card.")] = None,
) -> None:
    """Train a 1-Lipschitz segmenter (under torchrun for several GPUs or nodes)."""
    from certseg.train import NothingToDo, Recipe, TrainConfig
    from certseg.train import train as run

    _check_data(data, root)
    _refuse_unused(ctx, ("num_images", "val_images"), data == "synthetic", "--data synthetic")
    arch_kwargs = _kwargs(arch_kwarg) | ({"constrained": False} if unconstrained else {})
    _check_arch(arch)

    cfg = TrainConfig(
        out=str(out),
        arch=arch,
        arch_kwargs=arch_kwargs,
        data=data,
        root=str(root) if root else None,
        num_images=num_images,
        val_images=val_images,
        size=(height, width),
        batch_size=batch_size,
        recipe=Recipe(
            epochs=epochs,
            lr=lr,
            tau=tau,
            train_eps=train_eps,
            position_lr_scale=position_lr_scale,
        ),
        seed=seed,
        device=device,
        amp=amp,
        workers=workers,
        eps=eps,
        noise_sigma=noise_sigma,
        init=str(init) if init else None,
        name=name,
        max_steps_per_epoch=max_steps_per_epoch,
    )
    try:
        path = run(cfg)
    except NothingToDo as done:  # a rerun of a finished run: its model.pt stands
        typer.echo(str(done))
        return
    typer.echo(f"wrote {path}")


@app.command()
@cli_errors("evaluate")
def evaluate(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="A certseg checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    data: Annotated[str, typer.Option(help="synthetic | cityscapes | folder")] = "synthetic",
    root: Annotated[Path | None, typer.Option(help="Data root (cityscapes, folder).")] = None,
    split: Annotated[str, typer.Option(help="Split (cityscapes, folder).")] = "val",
    num_images: Annotated[int, typer.Option(help="Synthetic held-out scenes.", min=1)] = 64,
    seed: Annotated[int, typer.Option(help="Synthetic held-out seed.")] = 10_000,
    eps: Annotated[
        list[float] | None,
        typer.Option(help="eps grid (repeat the flag).", callback=_nonnegative),
    ] = None,
    method: Annotated[str, typer.Option(help="lipschitz | smoothing")] = "lipschitz",
    sigma: Annotated[
        float, typer.Option(help="Smoothing noise level.", callback=_nonnegative)
    ] = 0.25,
    n0: Annotated[int, typer.Option(help="Smoothing selection samples.", min=1)] = 10,
    n: Annotated[int, typer.Option(help="Smoothing estimation samples.", min=1)] = 100,
    alpha: Annotated[
        float, typer.Option(help="Smoothing test level (Holm).", min=0.0, max=1.0)
    ] = 0.001,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Clean and certified metrics over an eps grid: result.json, table.md, plots."""
    from certseg.evaluate import DEFAULT_EPS, EvalConfig
    from certseg.evaluate import evaluate as run

    _check_data(data, root)
    _refuse_unused(ctx, ("sigma", "n0", "n", "alpha"), method == "smoothing", "--method smoothing")
    _refuse_unused(ctx, ("split",), data != "synthetic", "--data cityscapes and folder")
    _refuse_unused(ctx, ("num_images", "seed"), data == "synthetic", "--data synthetic")

    cfg = EvalConfig(
        checkpoint=str(checkpoint),
        out=str(out),
        data=data,
        root=str(root) if root else None,
        split=split,
        num_images=num_images,
        seed=seed,
        eps=eps or DEFAULT_EPS,
        method=method,
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        batch_size=batch_size,
        device=device,
    )
    result = run(cfg)
    from certseg.evaluate import markdown_table

    typer.echo(markdown_table(result))


def _mount() -> None:
    """Sub-commands that live in other packages (they import lazily, without torch)."""
    from clients.cli import app as client_app
    from export.cli import app as export_app
    from server.cli import calibrate, serve

    app.registered_commands += export_app.registered_commands
    app.command("serve")(serve)
    app.command("calibrate")(calibrate)
    app.add_typer(client_app, name="client")


_mount()

if __name__ == "__main__":
    app()
