"""`certseg serve`: a typer command whose flags mirror `Settings` field names.

A flag left out falls back to the CERTSEG_* environment variable, then to the
default; so ``--max-batch 16`` == ``CERTSEG_MAX_BATCH=16``. Mount it on the
top-level app with ``app.command("serve")(server.cli.serve)``; this module imports
only typer and pydantic-settings until the command runs.
"""

from __future__ import annotations

import signal
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from certseg.errors import fail

__all__ = ["app", "build_settings", "calibrate", "serve"]

app = typer.Typer(help="certseg inference server.", add_completion=False, no_args_is_help=True)


@app.callback()
def _main() -> None:
    """certseg inference server (mounted as `certseg serve` on the top-level CLI)."""


class Backend(StrEnum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    torch = "torch"


def build_settings(command: str = "serve", **flags: Any) -> Any:
    """Settings from the flags that were given (None = not given), env and defaults;
    a bad value is one error line per flag, naming `certseg <command>`."""
    from pydantic import ValidationError

    from server.settings import Settings

    given = {k: (v.value if isinstance(v, Enum) else v) for k, v in flags.items() if v is not None}
    if given.get("models") == []:
        given.pop("models")
    try:
        return Settings(**given)
    except ValidationError as exc:  # a flag's (or CERTSEG_ variable's) value: one line each
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "settings"
            lines.append(f"--{name.replace('_', '-')} (CERTSEG_{name.upper()}): {err['msg']}")
        for line in lines[:-1]:
            typer.echo(f"certseg {command}: error: {line}", err=True)
        fail(command, lines[-1])


@app.command()
def serve(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Models: exported dir, .onnx (or .pt with --backend torch), optionally "
            "NAME=PATH. None: the shipped default model.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: 8000).")] = None,
    backend: Annotated[
        Backend | None, typer.Option(help="Inference backend (default: auto).")
    ] = None,
    providers: Annotated[
        list[str] | None, typer.Option(help="ONNX Runtime providers, in order (repeatable).")
    ] = None,
    device_id: Annotated[int | None, typer.Option(help="GPU index (default: 0).")] = None,
    intra_op_threads: Annotated[
        int | None, typer.Option(help="Threads per forward (default: auto).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Images per forward pass (default: 1 on CPU, 8 on GPU).")
    ] = None,
    max_delay_ms: Annotated[
        float | None, typer.Option(help="Longest wait for a batch to fill (default: 2).")
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Waiting images before 503 (default: 64).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Key for all but health, docs, viewer: Bearer, X-API-Key or "
            "?api_key= (WebSocket). Prefer CERTSEG_API_KEY."
        ),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="Largest image body (default: 32 MiB).")
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="Largest image, H*W pixels (default: 2048^2).")
    ] = None,
    max_source_pixels: Annotated[
        int | None,
        typer.Option(help="Largest image, H*W pixels, sent with resize=fit or a scale (4096^2)."),
    ] = None,
    max_pass_pixels: Annotated[
        int | None,
        typer.Option(help="Most pixels in one forward pass (default: max-pixels; GPU: 8x)."),
    ] = None,
    audit: Annotated[
        bool | None, typer.Option(help="Re-audit each ONNX file's L at load (default: on).")
    ] = None,
    margin_error: Annotated[
        float | None, typer.Option(help="Margin error bound of fp16/TensorRT engines (default: 0).")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 | fp16 | bf16 (reduced ones need --margin-error).")
    ] = None,
    trt_cache_dir: Annotated[Path | None, typer.Option(help="TensorRT engine cache.")] = None,
    ort_specialize: Annotated[
        bool | None,
        typer.Option(help="ONNX Runtime CPU: a session per warm-up size (default: on)."),
    ] = None,
    cuda_graphs: Annotated[
        bool | None, typer.Option(help="torch on a GPU: replay captured CUDA graphs.")
    ] = None,
    torch_compile: Annotated[
        bool | None, typer.Option(help="torch: torch.compile the forward pass, per size.")
    ] = None,
    warmup_sizes: Annotated[
        list[str] | None,
        typer.Option(
            help="HxW to warm up (and compile) at before ready (repeatable; "
            "default: the model card's size)."
        ),
    ] = None,
    default_model: Annotated[
        Path | None,
        typer.Option(help="Model path served when no MODELS are given (default: the shipped one)."),
    ] = None,
    warmup: Annotated[bool | None, typer.Option(help="Warm up before ready (default: on).")] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning (default: info).")
    ] = None,
    log_json: Annotated[bool | None, typer.Option(help="JSON log lines (default: on).")] = None,
    cors_origins: Annotated[
        list[str] | None, typer.Option(help="CORS allowed origin (repeatable; default: off).")
    ] = None,
    max_streams: Annotated[
        int | None, typer.Option(help="Open WebSocket streams (default: 64).")
    ] = None,
    stream_idle_s: Annotated[
        float | None, typer.Option(help="Close streams silent this long (default: 60).")
    ] = None,
    stream_depth: Annotated[
        int | None,
        typer.Option(help="Frames one stream works on at once, and its limit (default: 2)."),
    ] = None,
    shutdown_grace_s: Annotated[
        float | None, typer.Option(help="SIGTERM: seconds for in-flight work (default: 10).")
    ] = None,
) -> None:
    """Serve certified segmentation over REST, WebSocket and the Open Inference Protocol."""
    # As a container's PID 1 the process ignores a signal it has no handler for, and
    # uvicorn installs its own only once it runs: SIGTERM while the models are read
    # and audited (minutes for a large one) did nothing. uvicorn's replaces it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    from server.app import create_app, uvicorn_config
    from server.backends import create_engine, resolve_model_specs
    from server.errors import CertSegError
    from server.logs import configure_logging
    from server.shutdown import CertsegServer
    from server.state import ServerState

    settings = build_settings(
        models=models,
        host=host,
        port=port,
        backend=backend,
        providers=providers,
        device_id=device_id,
        intra_op_threads=intra_op_threads,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_pixels=max_pixels,
        max_source_pixels=max_source_pixels,
        max_pass_pixels=max_pass_pixels,
        audit=audit,
        margin_error=margin_error,
        precision=precision,
        trt_cache_dir=trt_cache_dir,
        ort_specialize=ort_specialize,
        cuda_graphs=cuda_graphs,
        torch_compile=torch_compile,
        default_model=default_model,
        warmup=warmup,
        warmup_sizes=warmup_sizes or None,
        log_level=log_level,
        log_json=log_json,
        cors_origins=cors_origins or None,
        max_streams=max_streams,
        stream_idle_s=stream_idle_s,
        stream_depth=stream_depth,
        shutdown_grace_s=shutdown_grace_s,
    )
    key = settings.api_key_bytes()
    secrets = (key.decode(),) if key else ()
    configure_logging(settings.log_level, settings.log_json, secrets)
    try:  # a missing, corrupt or over-claiming model stops here, before the port opens
        engines = [create_engine(spec, settings) for spec in resolve_model_specs(settings)]
        ServerState.check_names(engines)
    except CertSegError as exc:
        fail("serve", exc.detail)
    _check_port_free(settings.host, settings.port)
    application = create_app(settings, engines=engines)
    server = CertsegServer(uvicorn_config(application, settings.host, settings.port))
    state = application.state.server
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn restores the handler it found and re-raises SIGTERM after its graceful
    # stop: the default, so the exit reads "terminated by SIGTERM" (not 143)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    server.run()
    if state.fatal:  # a model failed to load in the background: exit non-zero
        fail("serve", state.fatal, code=1)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM before the server runs: nothing is served yet, so stop (128 + 15)."""
    raise SystemExit(128 + signum)


def _check_port_free(host: str, port: int) -> None:
    """A port another process holds is said before the models load: uvicorn found it
    only after their warm-up, and exited 3 with the reason deep in the log."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # an address uvicorn will refuse with its own message
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            fail("serve", f"cannot listen on {host}:{port} ({exc.strerror}); choose --port")


@app.command()
def calibrate(
    model: Annotated[
        Path, typer.Argument(help="Exported dir, .onnx, or .pt (torch), as for serve.")
    ],
    backend: Annotated[Backend, typer.Option(help="Backend to calibrate.")] = Backend.auto,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | bf16.")] = "fp16",
    providers: Annotated[
        list[str] | None, typer.Option(help="ONNX Runtime providers, in order (repeatable).")
    ] = None,
    cuda_graphs: Annotated[bool, typer.Option(help="As served with --cuda-graphs.")] = False,
    torch_compile: Annotated[bool, typer.Option(help="As served with --torch-compile.")] = False,
    images: Annotated[
        Path | None, typer.Option(help="Folder of your own frames (recommended).")
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="How many calibration images.")] = 8,
    size: Annotated[
        str | None, typer.Option(help="HxW of synthetic images (default: the card's).")
    ] = None,
    safety: Annotated[
        float, typer.Option(min=1.0, help="Factor (>= 1) on the largest error seen.")
    ] = 2.0,
    out: Annotated[Path | None, typer.Option(help="Write the bound's JSON here.")] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="The exported model (dir or .onnx) the fp32 reference runs; default: the "
            "model.onnx beside MODEL (a .pt's export folder, e.g. runs/mine/onnx, needs it).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Measure an engine's margin error bound against fp32 ONNX Runtime (for --margin-error)."""
    from rich.console import Console
    from rich.progress import track

    from export.cli import parse_hw
    from server.backends import resolve_model_specs
    from server.calibration import calibrate_engine, calibration_images
    from server.errors import CertSegError
    from server.logs import configure_logging

    if out is not None and not out.parent.is_dir():  # before minutes of calibration
        fail("calibrate", f"--out {out}: no folder {out.parent}")
    if images is not None and not images.is_dir():
        fail("calibrate", f"--images {images}: not a folder")
    configure_logging("info", as_json=False)  # a compile takes a while: say what it does
    settings = build_settings(
        "calibrate",
        models=[str(model)],
        backend=backend,
        precision=precision,
        providers=providers,
        cuda_graphs=cuda_graphs,
        torch_compile=torch_compile,
        warmup=False,
    )
    try:
        (spec,) = resolve_model_specs(settings)
        hw = parse_hw(size) if size else _input_size(reference or spec.path)
        frames = calibration_images(hw, count, images)
        # a minute or more on a CPU: the two loads (each audited), then a bar per image
        typer.echo("loading the engine and its fp32 reference (each audited) ...", err=True)
        shown = track(frames, "calibrating", transient=True, console=Console(stderr=True))
        bound = calibrate_engine(spec.path, settings, shown, safety=safety, fp32=reference)
    except CertSegError as exc:
        fail("calibrate", exc.detail)
    if out is not None:
        bound.save(out)
    typer.echo(bound.to_json())
    typer.echo(
        f"serve with: --backend {settings.backend} --precision {precision} "
        f"--margin-error {bound.bound:.6g}"
        + (" --cuda-graphs" if cuda_graphs else "")
        + (" --torch-compile" if torch_compile else ""),
        err=True,
    )


def _input_size(path: Path) -> tuple[int, int]:
    """The card's input size, from the exported ONNX beside the artifact (no audit)."""
    from server.calibration import reference_artifact
    from server.engine import read_onnx_artifact

    card = read_onnx_artifact(reference_artifact(path), audit=False).card
    return tuple(card.input_size)


if __name__ == "__main__":  # python -m server.cli serve ...
    app()
