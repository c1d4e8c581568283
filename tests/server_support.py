"""Shared helpers of the server tests (tests/test_server_*.py): the tiny exported model,
a real uvicorn server on 127.0.0.1 in a background thread, image bytes, and a
test-only engine wrapper that can fail, stall or hold its warm-up on demand.

Not a test module: imported by the test files (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import atexit
import base64
import io
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageOps

from server.launch import free_port

_CACHE: dict[str, Path] = {}

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25)]


def tiny_model_dir() -> Path:
    """A tiny 4-class certseg model, checkpointed and exported once per test process.

    Built as a user would: create_model + ModelCard + save_checkpoint, then
    export_onnx(checkpoint) with logits. Untrained (seeded): the server's job is to
    serve the graph faithfully, not to be accurate.
    """
    if "tiny" in _CACHE:
        return _CACHE["tiny"]
    import torch

    from certseg.models import ModelCard, create_model, save_checkpoint
    from export.onnx_export import export_onnx

    root = Path(tempfile.mkdtemp(prefix="certseg-server-tests-"))
    atexit.register(shutil.rmtree, root, True)
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=4, width=8)
    card = ModelCard(
        name="tiny",
        arch="tiny",
        num_classes=4,
        classes=["road", "car", "sky", "tree"],
        palette=PALETTE,
        input_size=(32, 48),
        pad_multiple=2,
        default_eps=0.05,
        arch_kwargs={"width": 8},
    )
    ckpt = root / "tiny.pt"
    save_checkpoint(ckpt, model, card)
    export_onnx(ckpt, root / "tiny", with_logits=True)
    _CACHE["tiny"] = root / "tiny"
    _CACHE["tiny.pt"] = ckpt
    return root / "tiny"


def tiny_checkpoint() -> Path:
    tiny_model_dir()
    return _CACHE["tiny.pt"]


def tiny_model_dir_without_logits() -> Path:
    """The same tiny model exported without its logits output (as `certseg export`
    does without --logits): outputs that read the logits are refused for it."""
    if "tiny-no-logits" not in _CACHE:
        from export.onnx_export import export_onnx

        out = tiny_model_dir().parent / "tiny-no-logits"
        export_onnx(tiny_checkpoint(), out, with_logits=False)
        _CACHE["tiny-no-logits"] = out
    return _CACHE["tiny-no-logits"]


class LiveServer:
    """A real uvicorn server on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app, ws_max_size: int = 16 * 1024 * 1024, port: int | None = None) -> None:
        from server.app import uvicorn_config
        from server.shutdown import CertsegServer

        self.port = port or free_port()  # a port again: a restart, as clients see one
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn_config(
            app, "127.0.0.1", self.port, log_level="warning", ws_max_size=ws_max_size
        )
        self.server = CertsegServer(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.base + "/v2/health/ready").status_code == 200:
                return
            time.sleep(0.02)
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve_tiny(ws_max_size: int = 16 * 1024 * 1024, **settings) -> LiveServer:
    """A started LiveServer of the tiny model: one thread, 1 ms batching delay, `settings`."""
    from server import Settings, create_app

    base = {"models": [str(tiny_model_dir())], "intra_op_threads": 1, "max_delay_ms": 1}
    return LiveServer(create_app(Settings(**base | settings)), ws_max_size=ws_max_size).start()


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish RGB image (uint8 H x W x 3): blobs, so the mask has regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.3)
        chans.append(0.5 + 0.5 * np.sin(fx * 6.28 * xx + ph) * np.cos(fy * 6.28 * yy))
    img = np.stack(chans, axis=-1) + rng.normal(0, 0.05, (h, w, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def answer_radius(field: dict) -> np.ndarray:
    """A JSON answer's radius map (base64 little-endian fp16) as float32."""
    assert field["dtype"] == "float16" and field["byte_order"] == "little"
    raw = np.frombuffer(base64.b64decode(field["data"]), dtype="<f2")
    return raw.reshape(field["shape"]).astype(np.float32)


def answer_png(field: dict) -> np.ndarray:
    """A JSON answer's PNG as a viewer sees it: palette (indexed) PNGs expanded to RGB."""
    with Image.open(io.BytesIO(base64.b64decode(field["data"]))) as img:
        return np.asarray(img.convert("RGB") if img.mode == "P" else img)


def to_input(pixels_or_bytes) -> np.ndarray:
    """What the server feeds the model: PIL decode, upright (EXIF orientation applied)
    -> RGB float32 /255 -> (1, 3, H, W)."""
    if isinstance(pixels_or_bytes, bytes | bytearray):
        with Image.open(io.BytesIO(pixels_or_bytes)) as img:
            pixels = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    else:
        pixels = pixels_or_bytes
    return (pixels.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def assert_gaps_covered(got: dict, exact: dict, margin_error: float) -> int:
    """Every gap z_t - z_c of an engine served with `margin_error` (t its class, every
    class c), shrunk by that error, is at most the fp32 reference's gap of the same two
    classes: what the class-wise figures (worst-case metrics, gains) rely on. Checked
    class by class, independently of the calibration code. Returns the gaps checked."""
    a, b = got["logits"].astype(np.float64), exact["logits"].astype(np.float64)
    t = got["mask"][:, None].astype(np.int64)
    a_top, b_top = np.take_along_axis(a, t, axis=1)[:, 0], np.take_along_axis(b, t, axis=1)[:, 0]
    for c in range(a.shape[1]):
        excess = (a_top - a[:, c]) - margin_error - (b_top - b[:, c])
        assert excess.max() <= 0, f"class {c}: a gap moved {excess.max():.3g} past the bound"
    return int(a.size)


def ort_session(model_dir: Path):
    """A direct onnxruntime session on the same file, single-threaded."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(model_dir / "model.onnx"), sess_options=so, providers=["CPUExecutionProvider"]
    )


class ControlledEngine:
    """TEST-ONLY wrapper around a real engine. It is a mock fault injector: a real
    ONNX Runtime fault cannot be caused on demand, so `fail` makes `infer` raise as a
    crashed backend would, `delay_s` stalls it (to fill the queue), `gate` holds each
    call until set (to observe what happens meanwhile), and `warm_gate` holds the
    warm-up (to observe readiness before it)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.fail = False
        self.delay_s = 0.0
        self.gate: threading.Event | None = None
        self.warm_gate: threading.Event | None = None
        self.calls = 0

    @property
    def ready(self) -> bool:
        return self.inner.ready

    def metadata(self):
        return self.inner.metadata()

    def load(self) -> None:
        self.inner.load()

    def warmup(self, sizes: Sequence[tuple[int, int, int]]) -> None:
        if self.warm_gate is not None:
            self.warm_gate.wait(timeout=60)
        self.inner.warmup(sizes)

    def infer(self, images, outputs):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(timeout=60)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("injected backend fault")
        return self.inner.infer(images, outputs)

    def close(self) -> None:
        self.inner.close()


def ort_engine(model_dir: Path, **settings_kw):
    """An (unloaded) OnnxRuntimeEngine of the model with test-friendly settings."""
    from server.backends.ort import OnnxRuntimeEngine
    from server.settings import Settings

    settings = Settings(intra_op_threads=1, **settings_kw)
    return OnnxRuntimeEngine(None, model_dir / "model.onnx", settings)


PROBLEM_KEYS = {"type", "title", "status", "detail", "instance"}


def assert_problem(resp: httpx.Response, status: int) -> dict:
    """An RFC 9457 problem+json answer with this status and no stack trace."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return body


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, color: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie in a header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = _png_chunk(b"IDAT", zlib.compress(rows)) if rows else b""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + idat + _png_chunk(b"IEND", b"")


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels (a decompression bomb
    shape: the data is a few zero rows; a full decode would try to allocate it all)."""
    return raw_png(width, height, 8, 2, b"\x00" * (3 * width + 1) * 4)


def rgb48_png(h: int, w: int, seed: int = 3) -> bytes:
    """16 bits per channel RGB (Pillow reads it as 8-bit RGB: refused everywhere)."""
    px = np.random.default_rng(seed).integers(0, 65536, (h, w, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + px[y].astype(">u2").tobytes() for y in range(h))
    return raw_png(w, h, 16, 2, rows)


def without_module(name: str) -> str:
    """Python source that makes `name` unimportable, as on an install without it.

    TEST-ONLY simulation: torch and PyAV are installed here, so their absence is
    caused by a finder that refuses them (None in sys.modules would also break
    libraries that probe sys.modules, which a real absence does not)."""
    return (
        "import sys, importlib.abc\n"
        "class _Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, fullname, path, target=None):\n"
        f"        if fullname.split('.')[0] == {name!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {fullname!r}', name=fullname)\n"
        "sys.meta_path.insert(0, _Absent())\n"
    )
