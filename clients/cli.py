"""`certseg client ...`: the SDK from the command line (a typer sub-app).

    certseg client segment street.png --eps 0.1 --out results/
    certseg client stream clip.mp4 --out annotated.mp4
    certseg client stream --camera 0 --out live.mp4

Needs only the SDK's dependencies, plus PyAV (`av`) for `stream`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from clients.bounds import down3, fixed_down, pct_down, pct_up

if TYPE_CHECKING:  # numpy, PIL and the SDK load when a command runs (fast `certseg --help`)
    import numpy as np
    from PIL import Image

    from clients.models import SegmentResult, StreamResult

__all__ = ["app", "radius_heatmap"]

app = typer.Typer(
    name="client",
    help="Talk to a running certseg server (REST and WebSocket).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _url(value: str) -> str:
    """--url checked before any request (`checked_url`): a usage error, not retries."""
    from clients.sdk import checked_url

    try:
        return checked_url(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


UrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="CERTSEG_URL", help="Server base URL.", callback=_url),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="CERTSEG_API_KEY", help="Bearer API key.", show_default=False),
]
EpsOpt = Annotated[
    float | None,
    typer.Option(help="l2 budget on [0,1] pixels (default: the model's).", show_default=False),
]
ModelOpt = Annotated[str | None, typer.Option(help="Model name (default: the server's first).")]
ResizeOpt = Annotated[
    str | None,
    typer.Option(
        help="fit: let the server shrink images over its pixel limit (area averaging, "
        "certified against the image sent); or a scale in (0, 1].",
        show_default=False,
    ),
]

# Viridis, 9 stops: the radius heat map's colours (dark = fragile, yellow = robust).
_VIRIDIS = (
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)


def radius_heatmap(radius: np.ndarray, eps: float, vmax: float | None = None) -> Image.Image:
    """Radius map as an RGB heat map on [0, vmax] (default 2 * eps: eps sits mid-scale);
    pixels not guaranteed at eps (radius <= eps) are drawn darkened."""
    import numpy as np
    from PIL import Image

    lut = np.asarray(_VIRIDIS, dtype=np.float32)
    vmax = vmax if vmax is not None else max(2.0 * eps, 1e-6)
    t = np.clip(radius / vmax, 0.0, 1.0) * (len(lut) - 1)
    lo = np.floor(t).astype(np.int64).clip(0, len(lut) - 2)
    frac = (t - lo)[..., None]
    rgb = lut[lo] * (1.0 - frac) + lut[lo + 1] * frac
    rgb[radius <= eps] *= 0.45
    return Image.fromarray(rgb.round().astype(np.uint8))


def _output_names(images: list[Path]) -> dict[Path, tuple[str, str]]:
    """Each image's (label, name): its path below the images' common folder, as the
    table shows it, and the <name> of its outputs under --out, that path without the
    extension, or with it where two differ only by that. So a/x.png and b/x.jpg write
    a/x_*.png and b/x_*.png rather than one x_*.png over the other."""
    # absolute, not resolved: a symlinked file keeps the name it was given
    resolved = [Path(os.path.normpath(p.absolute())) for p in images]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    paths = [p.relative_to(common) for p in resolved]
    stems = Counter(p.with_suffix("") for p in set(paths))
    return {
        image: (p.as_posix(), (p if stems[p.with_suffix("")] > 1 else p.with_suffix("")).as_posix())
        for image, p in zip(images, paths, strict=True)
    }


#: What a folder given to `segment` is searched for (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _expand(images: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the images under it (sorted, recursive,
    through symlinked folders, each real folder once)."""
    out: list[Path] = []
    for p in images:
        if not p.is_dir():
            out.append(p)
            continue
        found, seen = [], set()
        for root, dirs, files in os.walk(p, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a link back up the tree
                dirs[:] = []
                continue
            seen.add(real)
            found += [Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        found.sort()
        if not found:
            raise typer.BadParameter(
                f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)})", param_hint="IMAGES"
            )
        out += found
    return out


def _label_maps(names: dict[Path, tuple[str, str]], labels: Path) -> dict[Path, Path | str]:
    """Each image's label map, or why it has none: labels/<path below the images' common
    folder>.png where that exists (a tree beside the images'), else labels/<stem>.png
    unless another image has that stem too (a/x.png and b/x.jpg took one map each)."""
    stems = Counter(Path(label).stem for label in {label for label, _ in names.values()})
    maps: dict[Path, Path | str] = {}
    for image, (label, _) in names.items():
        mirror = labels / Path(label).with_suffix(".png")
        flat = labels / f"{Path(label).stem}.png"
        if mirror.is_file() or mirror == flat:
            maps[image] = mirror
        elif stems[Path(label).stem] == 1:
            maps[image] = flat if flat.is_file() else f"no label map {mirror} (nor {flat})"
        else:
            maps[image] = f"no label map {mirror} (and {flat} would be another image's too)"
    return maps


def _save(result: SegmentResult, name: str, out: Path) -> list[Path]:
    """The answer's images as out/<name>_{overlay,mask,radius}.png; the files written."""
    from PIL import Image

    base = out / name
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if result.overlay is not None:
        written.append(base.with_name(f"{base.name}_overlay.png"))
        result.overlay.save(written[-1])
    if result.mask is not None:
        written.append(base.with_name(f"{base.name}_mask.png"))
        Image.fromarray(result.mask).save(written[-1])
    if result.radius is not None:
        written.append(base.with_name(f"{base.name}_radius.png"))
        radius_heatmap(result.radius, result.eps).save(written[-1])
    return written


@app.command()
def segment(
    images: Annotated[
        list[Path],
        typer.Argument(help="Image files (PNG, JPEG, WebP, ...), or folders of them."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for <name>_{overlay,mask,radius}.png; <name>: the image's path "
            "under the images' common folder, less its extension (kept if two differ by it).",
        ),
    ] = Path("certseg-out"),
    eps: EpsOpt = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
    model: ModelOpt = None,
    resize: ResizeOpt = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Folder of label maps (class ids): <path below the images' common folder>"
            ".png, or <image stem>.png where no two images share a stem; adds the "
            "worst-case pixel accuracy and mIoU at eps."
        ),
    ] = None,
    classes: Annotated[
        bool,
        typer.Option(
            "--classes",
            help="Also print each image's per-class certificate (pixels, certified, "
            "most one attack flips, kept at least; with a model exported with logits, "
            "the most one attack turns into the class).",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 60.0,
) -> None:
    """Segment and certify images; write overlay, class-id mask and radius heat map PNGs."""
    from rich.progress import Progress

    from clients.models import CertSegClientError
    from clients.sdk import DEFAULT_OUTPUTS, CertSegClient

    images = _expand(images)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"no such file: {', '.join(missing)}", param_hint="IMAGES")
    if labels is not None and not labels.is_dir():  # before any request, as for IMAGES
        raise typer.BadParameter(f"{labels} is not a folder of label maps", param_hint="--labels")
    names = _output_names(images)
    targets = {} if labels is None else _label_maps(names, labels)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, SegmentResult]] = []
    written: set[Path] = set()  # an image given twice writes its files once
    failed = 0
    with (
        CertSegClient(url, api_key=api_key, timeout=timeout) as client,
        Progress(console=console, transient=True, disable=len(images) < 2) as progress,
    ):
        task = progress.add_task("segmenting", total=len(images))
        outputs = DEFAULT_OUTPUTS
        if classes and _has_logits(client, model):  # gains read the logits
            outputs = (*DEFAULT_OUTPUTS, "gains")
        for path in images:
            target = targets.get(path)
            try:
                if isinstance(target, str):  # this image fails, not all
                    raise FileNotFoundError(target)
                if target is not None and not target.is_file():
                    raise FileNotFoundError(f"no label map {target}")
                result = client.segment(
                    path, eps=eps, outputs=outputs, model=model, resize=resize, target=target
                )
            except (CertSegClientError, OSError) as exc:  # OSError: a file we cannot read
                console.print(f"[red]{path}: {exc}[/red]")
                failed += 1
            else:
                label, name = names[path]
                written.update(_save(result, name, out))
                rows.append((label, result))
            progress.advance(task)
    table = Table(title=f"certseg @ {url}")
    cols = ["image", "size", "eps", "guaranteed", "max flips", "1% flips at", "server ms"]
    cols.append("latency ms")
    if labels is not None:
        cols[6:6] = ["worst acc (clean)", "worst mIoU (clean)"]
    if resize is not None:  # what the network saw: the radii fold the shrink in
        cols[2:2] = ["network"]
    for col in cols:
        table.add_column(col, justify="left" if col == "image" else "right", overflow="fold")
    for label, r in rows:
        scored = [] if labels is None else _scored(r.metrics or {})
        shrunk = [_network_cell(r)] if resize is not None else []
        table.add_row(
            label,
            f"{r.height}x{r.width}",  # HxW, as the server writes sizes (no certseg import)
            *shrunk,
            f"{r.eps:g}",
            pct_down(r.guaranteed_fraction),
            f"{r.max_flips} ({pct_up(r.max_flips_fraction)})",
            _stability_cell(r),
            *scored,
            f"{r.timings.get('total', float('nan')):.1f}",
            f"{r.latency_ms or 0.0:.1f}",
        )
    if rows:
        console.print(table)
    if classes:
        for label, r in rows:
            console.print(_class_table(label, r))
    console.print(f"wrote {len(written)} files to {out}" + (f"; {failed} failed" if failed else ""))
    if failed:
        raise typer.Exit(1)


def _has_logits(client: Any, model: str | None) -> bool:
    """Whether the model (the server's default if None) was exported with logits."""
    from clients.models import CertSegClientError

    try:
        listing = client.models()
    except CertSegClientError:
        return False  # the segment calls will say what is wrong
    name = model or listing.get("default")
    return any(m.get("name") == name and m.get("has_logits") for m in listing.get("models", []))


def _network_cell(r: SegmentResult) -> str:
    """The size the network saw ("as sent" when the image needed no shrink)."""
    if not r.resize:
        return "as sent"
    h, w = r.resize["network"]
    return f"{h}x{w}"


def _stability_cell(r: SegmentResult) -> str:
    """The least attack norm that may flip 1% of the image ("never": none can)."""
    first = next((x for x in r.stability or [] if x.fraction == 0.01), None)
    if first is None:
        return "-"
    return "never" if first.eps is None else f"eps {down3(first.eps)}"


def _class_table(name: str, r: SegmentResult) -> Table:
    """One image's per-class certificate at its eps."""
    table = Table(title=f"{name} per class @ eps {r.eps:g}")
    for col in ("class", "pixels", "certified", "max flips", "kept ≥", "max gains"):
        table.add_column(col, justify="left" if col == "class" else "right", overflow="fold")
    for c in r.classes or []:
        table.add_row(
            c.name,
            str(c.pixels),
            pct_down(c.guaranteed_fraction),
            str(c.max_flips),
            pct_down(c.min_kept / c.pixels),
            "-" if c.max_gains is None else str(c.max_gains),
        )
    return table


def _scored(metrics: dict[str, float | None]) -> list[str]:
    """The worst-case / clean metric cells ("-" where the server gives none)."""

    def cell(worst: str, clean: str) -> str:
        w, c = metrics.get(worst), metrics.get(clean)
        return "-" if w is None or c is None else f"{fixed_down(w)} ({fixed_down(c)})"

    return [
        cell("worst_case_pixel_accuracy", "clean_pixel_accuracy"),
        cell("worst_case_miou", "clean_miou"),
    ]


def _import_av() -> Any:
    """PyAV, or the one line that says which extra brings it (exit 2)."""
    try:
        import av
    except ModuleNotFoundError:
        typer.echo(
            "certseg client stream: error: this needs PyAV, from the `client` extra: "
            "pip install -e '.[client]'",
            err=True,
        )
        raise typer.Exit(2) from None
    return av


def _open_input(video: Path | None, camera: int | None) -> Any:
    import av

    if camera is not None and video is not None:  # which one was meant is not guessed
        raise typer.BadParameter("give a VIDEO file or --camera N, not both")
    if camera is not None:
        device = f"/dev/video{camera}"
        try:
            return av.open(device, format="v4l2")
        except (av.error.FFmpegError, ValueError) as exc:  # absent, busy, or no v4l2 in PyAV
            raise typer.BadParameter(
                f"cannot open camera {device} ({exc})", param_hint="--camera"
            ) from None
    if video is None:
        raise typer.BadParameter("give a VIDEO file or --camera N")
    if not video.is_file():
        raise typer.BadParameter(f"no such file: {video}", param_hint="VIDEO")
    try:
        container = av.open(str(video))
    except av.error.FFmpegError as exc:
        raise typer.BadParameter(f"{video} is not a video FFmpeg reads ({exc})") from None
    if not container.streams.video:
        container.close()
        raise typer.BadParameter(f"{video} has no video stream", param_hint="VIDEO")
    return container


class _DecodeError(Exception):
    """A frame of the input FFmpeg cannot decode: raised in the SDK's sender thread and
    re-raised by the stream, told apart from a muxer's error writing --out."""


def _decoded(container: Any, limit: int | None) -> Iterator[np.ndarray]:
    import av

    try:
        for i, frame in enumerate(container.decode(video=0)):
            if limit is not None and i >= limit:
                return
            yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise _DecodeError(str(exc)) from exc


def _annotate(r: StreamResult) -> Image.Image:
    from PIL import Image, ImageDraw

    img = r.overlay if r.overlay is not None else Image.new("RGB", (r.width or 2, r.height or 2))
    img = img.copy()
    draw = ImageDraw.Draw(img)
    text = (
        f"#{r.frame} eps {r.eps:g} guaranteed {pct_down(r.guaranteed_fraction or 0)}"
        f" {r.latency_ms or 0:.0f}ms"
        if r.ok
        else f"#{r.frame} error {r.error}"
    )
    draw.rectangle((0, 0, img.width, 12), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return img


#: Video codecs tried in turn: the first the build has and the container takes.
_CODECS = ("libx264", "mpeg4", "libvpx-vp9", "libvpx")


class _Writer:
    """Annotated frames into a video file (H.264 when PyAV has it, else MPEG-4, else VP9
    or VP8 for WebM). The codec is chosen when the file is opened, before any frame is
    streamed: a container that takes none of them is a usage error, not a crash."""

    def __init__(self, path: Path, rate: Fraction) -> None:
        import av

        self.av = av
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.container = av.open(str(path), mode="w")
        except (av.error.FFmpegError, ValueError) as exc:
            raise typer.BadParameter(f"cannot write {path} ({exc})", param_hint="--out") from None
        self.stream: Any = None
        for codec in _CODECS:
            try:
                self.stream = self.container.add_stream(codec, rate=rate)
                break
            except (av.error.FFmpegError, ValueError):
                continue
        if self.stream is None:
            self.container.close()
            raise typer.BadParameter(
                f"no video codec this PyAV has ({', '.join(_CODECS)}) fits {path.suffix} files; "
                "write .mp4, .mkv or .webm",
                param_hint="--out",
            )
        self.stream.pix_fmt = "yuv420p"
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, img: Image.Image) -> None:
        from PIL import Image

        w, h = img.width + img.width % 2, img.height + img.height % 2
        if (w, h) != img.size:  # yuv420p needs even sizes
            padded = Image.new("RGB", (w, h))
            padded.paste(img)
            img = padded
        if self.size is None:  # the first frame sets the video's size
            self.size = (w, h)
            self.stream.width, self.stream.height = w, h
        elif (w, h) != self.size:
            img = img.resize(self.size)
        frame = self.av.VideoFrame.from_image(img)  # type: ignore[attr-defined]
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.size is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()


@app.command()
def stream(
    video: Annotated[
        Path | None, typer.Argument(help="Video file (anything FFmpeg reads).")
    ] = None,
    camera: Annotated[
        int | None,
        typer.Option(help="Capture /dev/videoN instead of a file.", show_default=False, min=0),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Annotated video.")] = Path(
        "certseg-stream.mp4"
    ),
    eps: EpsOpt = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
    model: ModelOpt = None,
    overlay_style: Annotated[str, typer.Option(help="hatch | dim | heat")] = "hatch",
    resize: ResizeOpt = None,
    max_in_flight: Annotated[
        int | None,
        typer.Option(
            help="Frames unanswered at once. Default: the most the server never drops "
            "(its stream depth + 1); 1 = lockstep; 0 = send as fast as frames come and "
            "let the server drop stale ones (always so with --camera).",
            show_default=False,
            min=0,
        ),
    ] = None,
    max_frames: Annotated[
        int | None, typer.Option(help="Stop after this many frames.", show_default=False)
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a result.")] = 60.0,
    frame_format: Annotated[
        str,
        typer.Option(
            help="jpeg | png: how decoded frames are sent. Each certificate is for the "
            "frame the server decodes: JPEG is lossy (certified: the JPEG-decoded frame), "
            "PNG sends the decoded video frame exactly (larger messages).",
        ),
    ] = "jpeg",
) -> None:
    """Stream a video (or a camera) through WS /v1/stream; write the annotated video."""
    av = _import_av()
    from clients.models import CertSegClientError, StreamSummary
    from clients.sdk import CertSegClient, InFlight

    fmt = frame_format.upper()
    if fmt not in ("JPEG", "PNG"):
        raise typer.BadParameter(f"jpeg or png, got {frame_format!r}", param_hint="--frame-format")
    container = _open_input(video, camera)
    vstream = container.streams.video[0]
    rate = vstream.average_rate or vstream.guessed_rate or Fraction(30)
    in_flight: InFlight = "lossless" if max_in_flight is None else max_in_flight
    if camera is not None or max_in_flight == 0:
        in_flight = None
    summary = StreamSummary()
    try:
        writer = _Writer(out, Fraction(rate))
    except typer.BadParameter:
        container.close()
        raise
    t0 = time.perf_counter()
    results = None
    try:
        with CertSegClient(url, api_key=api_key, timeout=timeout) as client:
            results = client.stream(
                _decoded(container, max_frames),
                eps=eps,
                model=model,
                overlay_style=overlay_style,
                resize=resize,
                max_in_flight=in_flight,
                summary=summary,
                frame_format=fmt,
            )
            for r in results:
                writer.write(_annotate(r))
                if r.frame % 10 == 0:
                    elapsed = time.perf_counter() - t0
                    console.print(
                        f"frame {r.frame}: {summary.answered / elapsed:.1f} fps, "
                        f"{summary.dropped} dropped",
                        highlight=False,
                    )
    except CertSegClientError as exc:
        console.print(f"[red]stream failed: {exc}[/red]")
        raise typer.Exit(1) from exc
    except _DecodeError as exc:
        source = video if camera is None else f"/dev/video{camera}"
        console.print(f"[red]cannot decode {source}: {exc}[/red]")
        raise typer.Exit(1) from exc
    except av.error.FFmpegError as exc:  # the muxer refused a frame (e.g. one image file)
        console.print(f"[red]cannot write {out}: {exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        if results is not None:
            results.close()  # joins the SDK's sender, which decodes from `container`
        with contextlib.suppress(av.error.FFmpegError):
            writer.close()
        container.close()
    p50, p99 = summary.percentile(50), summary.percentile(99)
    table = Table(title=f"stream -> {out}")
    for col in ("sent", "answered", "dropped", "errors", "fps", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right", overflow="fold")
    table.add_row(
        str(summary.sent),
        str(summary.answered),
        str(summary.dropped),
        str(summary.errors),
        f"{summary.fps:.1f}",
        f"{p50:.1f}" if p50 is not None else "-",
        f"{p99:.1f}" if p99 is not None else "-",
    )
    console.print(table)
    console.print(
        f"{summary.answered} answered + {summary.dropped} dropped = {summary.sent} sent; "
        f"wrote {writer.frames} frames to {out}",
        highlight=False,
        soft_wrap=True,
    )
