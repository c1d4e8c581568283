"""Server parts on their own: decoding limits, overlay, batcher, errors table, settings,
CLI, model resolution and the audit at load, the torch backend against ONNX Runtime."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from PIL import Image, ImageFile
from server_support import (
    bomb_png,
    encode,
    ort_engine,
    random_image,
    tiny_checkpoint,
    tiny_model_dir,
)

from certseg.certify import worst_case_pixel_accuracy
from server.backends import ModelSpec, create_engine, resolve_backend, resolve_model_specs
from server.backends.base import apply_margin_error
from server.batcher import Batcher
from server.decode import Limits, chw8_to_float, decode_image, decode_target, sniff_format
from server.engine import read_onnx_artifact
from server.errors import (
    PROBLEMS,
    BackendError,
    CertSegError,
    CorruptImage,
    InvalidParameter,
    ModelError,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
    problem_for,
)
from server.overlay import DIM, encode_mask_png, overlay_png, render_overlay
from server.pipeline import certify, check_eps, parse_outputs
from server.settings import Settings, default_model_path

LIMITS = Limits(max_bytes=1 << 20, max_pixels=512 * 512)

# ------------------------------------------------------------------------------ decode


def test_sniff():
    assert sniff_format(encode(random_image(4, 4))) == "png"
    assert sniff_format(encode(random_image(4, 4), "JPEG")) == "jpeg"
    assert sniff_format(encode(random_image(4, 4), "WEBP")) == "webp"
    assert sniff_format(b"GIF89a") is None


def test_bomb_refused_before_any_decode(monkeypatch):
    def boom(self):
        raise AssertionError("the pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(PayloadTooLarge) as bomb:  # Pillow's own bomb guard refuses it
        decode_image(bomb_png(50_000, 50_000), LIMITS)
    # ... and the 413 names this server's limit, not Pillow's "DOS attack" text
    assert f"Pillow's bound on a decompression bomb), over the limit of {LIMITS.max_pixels}" in (
        str(bomb.value)
    )
    with pytest.raises(PayloadTooLarge, match="1000x1000"):  # our limit, under Pillow's
        decode_image(bomb_png(1000, 1000), LIMITS)
    with pytest.raises(PayloadTooLarge):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(LIMITS.max_bytes), LIMITS)


def test_decode_modes_match_certseg_loader():
    from certseg.data import to_chw_float

    rgba = np.dstack([random_image(6, 7), np.full((6, 7), 9, np.uint8)])
    for pixels in (rgba, random_image(6, 7)[..., 0], random_image(6, 7)):
        data = encode(pixels)
        d = decode_image(data, LIMITS)
        assert d.array.dtype == np.float32 and d.array.shape == (3, 6, 7)
        with Image.open(io.BytesIO(data)) as img:
            np.testing.assert_array_equal(d.array, to_chw_float(img))
    grey16 = (np.arange(42, dtype=np.uint16).reshape(6, 7) * 1500).astype(np.uint16)
    d = decode_image(encode(grey16), LIMITS)
    np.testing.assert_allclose(d.array[0], grey16 / 65535.0, rtol=1e-6)
    assert d.rgb8.shape == (6, 7, 3)


def test_network_input_is_8bit_for_engines_that_take_it():
    """An 8-bit image is queued as its bytes (a quarter of float32's) when the engine
    converts them itself; more than 8 bits per channel stays exact float32."""
    rgb = random_image(6, 7)
    d = decode_image(encode(rgb), LIMITS)
    bytes8, floats = d.network_input(True), d.network_input(False)
    assert bytes8.dtype == np.uint8 and bytes8.flags.c_contiguous
    np.testing.assert_array_equal(bytes8, rgb.transpose(2, 0, 1))
    assert floats.dtype == np.float32
    np.testing.assert_array_equal(chw8_to_float(bytes8), floats)
    grey16 = (np.arange(42, dtype=np.uint16).reshape(6, 7) * 1500).astype(np.uint16)
    deep = decode_image(encode(grey16), LIMITS)
    assert deep.network_input(True).dtype == np.float32


@pytest.mark.parametrize(
    ("data", "exc"),
    [
        (b"", UnsupportedMediaType),
        (b"BM" + bytes(60), UnsupportedMediaType),
        (encode(random_image(8, 8))[:60], CorruptImage),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 garbage", CorruptImage),
    ],
)
def test_decode_errors(data, exc):
    with pytest.raises(exc):
        decode_image(data, LIMITS)


def test_decode_target():
    for mode_array in (
        np.array([[0, 1], [3, 255]], np.uint8),
        np.array([[0, 1], [3, 2]], np.uint16),
    ):
        t = decode_target(encode(mode_array), 2, 2, 4, 255, LIMITS)
        np.testing.assert_array_equal(t, mode_array.astype(np.int64))
    pal = Image.fromarray(np.array([[0, 2], [1, 1]], np.uint8)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert decode_target(buf.getvalue(), 2, 2, 4, 255, LIMITS).max() == 2
    with pytest.raises(InvalidParameter, match="2x2"):
        decode_target(encode(np.zeros((3, 3), np.uint8)), 2, 2, 4, 255, LIMITS)
    with pytest.raises(InvalidParameter, match="single-channel"):
        decode_target(encode(random_image(2, 2)), 2, 2, 4, 255, LIMITS)
    with pytest.raises(UnsupportedMediaType):
        decode_target(encode(np.zeros((2, 2), np.uint8), "JPEG"), 2, 2, 4, 255, LIMITS)


# ------------------------------------------------------------------------------ overlay


def test_overlay_marks_uncertified_pixels():
    mask = np.array([[0, 1, 2, 3]] * 6)
    radius = np.array([[0.5, 0.01, 0.5, 0.01]] * 6, np.float32)
    palette = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    out = render_overlay(mask, radius, 0.1, palette, style="dim")
    np.testing.assert_array_equal(out[0, 0], palette[0])
    np.testing.assert_array_equal(out[0, 1], np.round(np.array(palette[1]) * DIM))
    hatched = render_overlay(mask, radius, 0.1, palette, style="hatch")
    assert (hatched[:, 1] == 0).all(axis=-1).any()  # dark lines on the uncertified column
    assert not (hatched[:, 0] == 0).all(axis=-1).any()
    clean = render_overlay(mask, radius, 0.0, palette)  # eps 0: everything certified
    np.testing.assert_array_equal(clean[0], np.array(palette))
    heat = render_overlay(mask, radius, 0.1, palette, style="heat")
    assert heat.shape == (6, 4, 3) and heat[0, 0].sum() > heat[0, 1].sum()
    photo = np.full((6, 4, 3), 100, np.uint8)
    blended = render_overlay(mask, radius, 0.0, palette, image=photo, blend=0.5)
    np.testing.assert_array_equal(blended[0, 0], [150, 50, 50])


@pytest.mark.parametrize("style", ["hatch", "dim", "heat"])
@pytest.mark.parametrize("k", [3, 19, 100, 300])
def test_overlay_png_has_render_overlay_pixels(style, k):
    """The indexed PNG (up to 85 classes) and the RGB fallback decode to the pixels
    render_overlay gives, at several eps, with and without a blended photo."""
    rng = np.random.default_rng(k)
    mask = rng.integers(0, k, (37, 53))
    radius = rng.random((37, 53)).astype(np.float32) * 0.2
    palette = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(k)]
    photo = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
    for eps, blend in ((0.0, 0.0), (0.05, 0.0), (0.1, 0.0), (0.05, 0.4)):
        png = overlay_png(mask, radius, eps, palette, photo, style, blend)
        want = render_overlay(mask, radius, eps, palette, photo, style, blend)
        got = Image.open(io.BytesIO(png))
        indexed = style != "heat" and blend == 0 and 3 * k <= 256
        assert got.mode == ("P" if indexed else "RGB")
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), want)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 64)])
def test_png_bytes_decode_to_the_same_plane(shape):
    """server.png's unfiltered writer, read back by Pillow: 8- and 16-bit grey, and
    indexed with a palette (indices and colours)."""
    from server.png import png_bytes

    rng = np.random.default_rng(shape[0])
    grey8 = rng.integers(0, 256, shape, dtype=np.uint8)
    grey16 = rng.integers(0, 65536, shape, dtype=np.uint16)
    for runs in (False, True):
        with Image.open(io.BytesIO(png_bytes(grey8, runs=runs))) as img:
            assert img.mode == "L" and img.size == shape[::-1]
            np.testing.assert_array_equal(np.asarray(img), grey8)
    with Image.open(io.BytesIO(png_bytes(grey16))) as img:
        assert img.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(img).astype(np.uint16), grey16)
    table = rng.integers(0, 256, (7, 3), dtype=np.uint8)
    index = (grey8 % 7).astype(np.uint8)
    with Image.open(io.BytesIO(png_bytes(index, palette=table))) as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.asarray(img), index)
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), table[index])
    for bad in (np.zeros((2, 2, 3), np.uint8), np.zeros((0, 4), np.uint8), grey8.astype(float)):
        with pytest.raises(ValueError):
            png_bytes(bad)
    for plane in (grey16, index + 7):  # not uint8; an index past the palette
        with pytest.raises(ValueError):
            png_bytes(plane, palette=table)


def test_mask_png_depth():
    mask = np.array([[0, 300], [5, 7]])
    png16, dtype = encode_mask_png(mask, 400)
    assert dtype == "uint16"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png16))), mask)
    png8, dtype = encode_mask_png(mask % 256, 19)
    assert dtype == "uint8" and Image.open(io.BytesIO(png8)).mode == "L"


# ------------------------------------------------------------------------------ batcher


class FakeEngine:
    """numpy stand-in: mask = channel 0 > 0.5; records every batch's shape."""

    def __init__(
        self, delay: float = 0.0, fail: bool = False, pad_multiple: int = 1, name: str = "m"
    ) -> None:
        self.batches: list[tuple[int, ...]] = []
        self.delay, self.fail, self.pad_multiple, self.name = delay, fail, pad_multiple, name

    def metadata(self):
        """What the batcher and the server state read: the name and the card's pad
        multiple (0: a broken card)."""
        if self.pad_multiple == 0:
            raise RuntimeError("no card")
        card = SimpleNamespace(pad_multiple=self.pad_multiple)
        return SimpleNamespace(name=self.name, card=card)

    def infer(self, images, outputs):
        self.batches.append(images.shape)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        m = images[:, 0]
        return {"mask": (m > 0.5).astype(np.int32), "margin": m, "radius": m / 2}


def _run_batcher(engine, jobs, **kw):
    async def main():
        b = Batcher({"m": engine}, **kw)
        b.start()
        try:
            return await asyncio.gather(
                *(
                    b.submit("m", np.full((3, h, w), i, np.float32))
                    for i, (h, w) in enumerate(jobs)
                ),
                return_exceptions=True,
            )
        finally:
            await b.stop()

    return asyncio.run(main())


def test_batcher_groups_by_shape_and_caps_batch():
    engine = FakeEngine()
    jobs = [(4, 4)] * 5 + [(4, 6)] * 2 + [(4, 4)]
    results = _run_batcher(engine, jobs, max_batch=4, max_delay_ms=50)
    # a full batch runs at once; then the oldest waiting image's shape goes first
    assert engine.batches == [(4, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 6)]
    for i, r in enumerate(results):  # every image got its own slice back
        assert float(r.outputs["margin"][0, 0]) == i
        assert r.outputs["mask"].shape == jobs[i]


def test_batcher_cuts_batches_to_the_pass_pixel_budget():
    """32 pixels a pass: two 4x4 images, or one 8x8 (an image larger than the budget still
    runs, alone: decode bounds a single image). A batch at its cap is full and runs at
    once: with a 10 s delay this would otherwise take 10 s per batch."""
    engine = FakeEngine()
    jobs = [(4, 4)] * 5 + [(8, 8)] * 2

    async def main():
        b = Batcher({"m": engine}, max_batch=8, max_pass_pixels=32, max_delay_ms=10_000)
        b.start()
        try:
            subs = [
                b.submit("m", np.full((3, h, w), i, np.float32))
                for i, (h, w) in enumerate(jobs[:4])
            ]
            return await asyncio.wait_for(asyncio.gather(*subs), 5)
        finally:
            await b.stop()

    results = asyncio.run(main())
    assert engine.batches == [(2, 3, 4, 4), (2, 3, 4, 4)]
    assert [float(r.outputs["margin"][0, 0]) for r in results] == [0, 1, 2, 3]
    engine.batches.clear()
    _run_batcher(engine, jobs, max_batch=8, max_pass_pixels=32, max_delay_ms=0)
    assert engine.batches == [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4), (1, 3, 8, 8), (1, 3, 8, 8)]
    assert Batcher({}, max_batch=8, max_pass_pixels=1000).batch_cap(10, 10) == 8
    # a pass counts the padded pixels: 1x4 runs as 4x4 at multiple 4, two a pass
    engine = FakeEngine(pad_multiple=4)
    _run_batcher(engine, [(1, 4)] * 3, max_batch=8, max_pass_pixels=32, max_delay_ms=0)
    assert engine.batches == [(2, 3, 1, 4), (1, 3, 1, 4)]
    assert Batcher({}, max_batch=8, max_pass_pixels=1000).batch_cap(1, 100, 8) == 1


def test_a_fault_forming_a_batch_fails_that_image_and_the_worker_goes_on():
    """A fault no real engine can be made to raise here, hence a stand-in whose
    metadata raises: it plays a bug in forming a batch (one, during this change, hung
    every request after it: the worker task died)."""
    broken, good = FakeEngine(pad_multiple=0), FakeEngine()

    async def main():
        b = Batcher({"broken": broken, "good": good}, max_batch=4, max_delay_ms=0)
        b.start()
        try:
            image = np.zeros((3, 4, 4), np.float32)
            first = await asyncio.gather(b.submit("broken", image), return_exceptions=True)
            second = await asyncio.wait_for(b.submit("good", image), 5)
            return first[0], second
        finally:
            await b.stop()

    failed, served = asyncio.run(main())
    assert isinstance(failed, BackendError) and "cannot batch" in str(failed)
    assert served.outputs["mask"].shape == (4, 4) and good.batches == [(1, 3, 4, 4)]


def test_batcher_without_delay_runs_what_is_queued():
    engine = FakeEngine(delay=0.02)
    _run_batcher(engine, [(4, 4)] * 6, max_batch=8, max_delay_ms=0)
    assert sum(b[0] for b in engine.batches) == 6 and engine.batches[0][0] >= 1


def test_batcher_submit_all_queues_all_or_none():
    """Two requests of 3 images racing for a queue of 4: one is queued whole, the other
    refused whole (503), and only the queued one's 3 images reach the engine."""
    engine = FakeEngine(delay=0.02)

    async def main():
        b = Batcher({"m": engine}, max_batch=1, max_queue=4, max_delay_ms=0)
        b.start()
        try:
            images = [np.zeros((3, 4, 4), np.float32)] * 3
            runs = [b.submit_all("m", images), b.submit_all("m", images)]
            return await asyncio.gather(*runs, return_exceptions=True)
        finally:
            await b.stop()

    first, second = asyncio.run(main())
    outcomes = sorted([type(first).__name__, type(second).__name__])
    assert outcomes == ["Overloaded", "list"]
    assert sum(batch[0] for batch in engine.batches) == 3


def test_batcher_overload_and_faults():
    results = _run_batcher(FakeEngine(delay=0.05), [(4, 4)] * 6, max_batch=1, max_queue=3)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors and all(isinstance(e, Overloaded) and e.retry_after >= 1 for e in errors)
    results = _run_batcher(FakeEngine(fail=True), [(4, 4)] * 2, max_batch=2)
    assert all(type(r) is BackendError for r in results)
    # the worker survived: a later batcher run is unaffected by the earlier fault
    assert not isinstance(_run_batcher(FakeEngine(), [(4, 4)])[0], Exception)


def test_batcher_skips_images_of_clients_that_left():
    async def main():
        engine = FakeEngine(delay=0.05)
        b = Batcher({"m": engine}, max_batch=1, max_delay_ms=0)
        b.start()
        first = asyncio.ensure_future(b.submit("m", np.zeros((3, 2, 2), np.float32)))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b.submit("m", np.zeros((3, 2, 2), np.float32)))
        await asyncio.sleep(0.005)
        gone.cancel()
        await first
        await asyncio.sleep(0.1)
        await b.stop()
        return engine.batches

    assert len(asyncio.run(main())) == 1


# ------------------------------------------------------------------------------ errors, options


def test_problem_table_covers_the_tree():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in [CertSegError, *subclasses(CertSegError)]:
        assert cls in PROBLEMS, cls
    assert problem_for(PayloadTooLarge("x")).status == 413
    assert problem_for(UnsupportedMediaType("x")).status == 415
    assert problem_for(ModelNotReady("x")).status == 503

    class Custom(InvalidParameter):
        pass

    assert problem_for(Custom("x")).status == 422


def test_check_eps_and_outputs():
    assert check_eps(None, 0.3) == 0.3
    assert check_eps("0.25", 0.3) == 0.25
    for bad in (float("nan"), -1.0, float("inf"), "x", True, [1]):
        with pytest.raises(InvalidParameter):
            check_eps(bad, 0.1)
    assert parse_outputs(None) == {"mask", "radius", "overlay", "classes", "stability"}
    assert parse_outputs(" Mask ,logits") == {"mask", "logits"}
    with pytest.raises(InvalidParameter):
        parse_outputs("mask,foo")


def test_settings_env_and_cli(monkeypatch):
    from typer.testing import CliRunner

    from server.cli import app, build_settings

    monkeypatch.setenv("CERTSEG_MAX_BATCH", "3")
    monkeypatch.setenv("CERTSEG_MODELS", "a=x.onnx,y")
    monkeypatch.setenv("CERTSEG_API_KEY", "k")
    s = Settings()
    assert s.max_batch == 3 and s.models == ["a=x.onnx", "y"] and s.api_key_bytes() == b"k"
    s = build_settings(max_batch=5, models=None, port=None)
    assert s.max_batch == 5 and s.models == ["a=x.onnx", "y"] and s.port == 8000
    help_text = CliRunner().invoke(app, ["serve", "--help"]).output
    for flag in ("--host", "--port", "--backend", "--max-batch", "--max-delay-ms", "--api-key"):
        assert flag in help_text
    assert "--max-pass-pixels" in help_text


def test_calibrate_mistakes_are_one_line_before_any_work(tmp_path):
    """Found before a model loads (calibration takes minutes): each is exit 2 and one
    'certseg calibrate: error:' line (or typer's usage error), never a traceback."""
    from typer.testing import CliRunner

    from server.cli import app

    model = str(tmp_path / "m.onnx")
    cases = {
        ("--images", str(tmp_path / "none")): "certseg calibrate: error: --images",
        ("--out", str(tmp_path / "no" / "b.json")): "certseg calibrate: error: --out",
        ("--count", "0"): "--count",
        ("--safety", "0.5"): "--safety",
    }
    for flags, says in cases.items():
        result = CliRunner().invoke(app, ["calibrate", model, *flags])
        assert result.exit_code == 2 and says in result.output, (flags, result.output)
        assert "Traceback" not in result.output
    # the default fp16 on a CPU machine (onnxruntime): says where fp16 runs. In its own
    # process: this one gets as far as configuring logging, onto CliRunner's closed stream
    import subprocess
    import sys

    from server.settings import default_model_path

    cmd = [sys.executable, "-m", "server.cli", "calibrate", str(default_model_path()),
           "--count", "1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "run on --backend torch" in run.stderr, run.stderr[-2000:]


def test_serve_help_says_what_default_model_and_api_key_do():
    """--default-model is the path served when no MODELS are given (a request's model
    defaults to the first served one, not to it); the key is taken three ways."""
    import typer

    from server.cli import app

    params = {p.name: p for p in typer.main.get_command(app).commands["serve"].params}
    assert "when no MODELS are given" in params["default_model"].help
    key_help = params["api_key"].help
    assert all(way in key_help for way in ("Bearer", "X-API-Key", "?api_key=", "viewer"))


def test_pixel_limits_per_image_and_per_pass():
    s = Settings()
    assert s.image_pixels() == s.max_pixels == 2048 * 2048
    assert s.pass_pixels("cpu") == s.max_pixels and s.pass_pixels("cuda:0") == 8 * s.max_pixels
    s = Settings(max_pixels=1000, max_pass_pixels=600)
    assert s.image_pixels() == 600 and s.pass_pixels("cuda:0") == 600  # an image fits a pass
    assert Settings(max_pixels=1000, max_pass_pixels=5000).image_pixels() == 1000


def test_margin_error_shrinks_radius():
    out = {"mask": np.zeros(3, np.int32), "margin": np.array([0.1, 1.0, 3.0], np.float32)}
    out["radius"] = out["margin"] / np.float32(2**0.5 * 2)
    fixed = apply_margin_error(out, 0.5, 2.0)
    np.testing.assert_allclose(fixed["margin"], [0.0, 0.5, 2.5])
    assert (fixed["radius"] <= np.array([0.0, 0.5, 2.5]) / (2**0.5 * 2)).all()
    assert apply_margin_error(out, 0.0, 2.0) is out


def _engine_outputs(logits: np.ndarray, L: float) -> dict[str, np.ndarray]:
    """What an exact fp32 engine returns for these logits (K, H, W): mask, margin, radius."""
    top2 = np.sort(logits, axis=0)[-2:]
    margin = (top2[1] - top2[0]).astype(np.float32)
    radius = ((top2[1] - top2[0]) / (2**0.5 * L)).astype(np.float32)
    return {"mask": logits.argmax(0).astype(np.int32), "margin": margin, "radius": radius}


def test_pixel_accuracy_from_margins_equals_from_logits():
    """A model exported without logits still gets the worst-case accuracy (from margins)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 16, 20)).astype(np.float32)
    target = rng.integers(0, 4, size=(16, 20))
    target[0] = 255
    outputs = _engine_outputs(logits, 1.5)
    info = ort_engine(tiny_model_dir()).metadata()
    info.lipschitz = 1.5
    cert = certify(info, outputs, 0.3, target, 1)
    want = float(worst_case_pixel_accuracy(logits, target, 0.3, 1.5))
    assert cert.metrics["worst_case_pixel_accuracy"] == pytest.approx(want)
    assert cert.metrics["worst_case_miou"] is None
    # an engine with a margin error: bounds from its logits shrink their costs as its
    # margins are shrunk, so both paths still agree (and the error lowers them)
    exact = certify(info, {**outputs, "logits": logits}, 0.3, target, 1).metrics
    info.margin_error = 0.2
    shrunk = apply_margin_error(outputs, 0.2, 1.5)
    from_margins = certify(info, shrunk, 0.3, target, 1).metrics
    from_logits = certify(info, {**shrunk, "logits": logits}, 0.3, target, 1).metrics
    assert from_logits["worst_case_pixel_accuracy"] == pytest.approx(
        from_margins["worst_case_pixel_accuracy"], abs=1e-6
    )
    assert from_logits["worst_case_pixel_accuracy"] < exact["worst_case_pixel_accuracy"]
    assert from_logits["worst_case_miou"] < exact["worst_case_miou"]


def test_margin_error_at_eps_zero_leaves_zero_margins_uncertain():
    """With a margin error (margins max(raw - e, 0)) a pixel of margin 0 may show another
    class than the fp32 net's: at eps = 0 it is not guaranteed and flips for free, in
    every figure (guaranteed fraction, max_flips, per class, worst-case metrics by
    either path, a resized answer), just as at eps = 1e-300; the clean metrics stay
    the served mask's. The old code answered eps = 0 as if the margins were exact:
    guaranteed 1.0, max_flips 0, worst-case = clean, and jumped just above eps = 0."""
    from certseg.certify.resize import AreaResize

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 16, 20)).astype(np.float32)
    target = logits.argmax(0)
    target[0] = 255
    raw = _engine_outputs(logits, 1.5)
    info = ort_engine(tiny_model_dir()).metadata()
    info.lipschitz = 1.5
    plain = certify(info, raw, 0.0, target, 1, figures=frozenset({"classes"}))
    assert plain.guaranteed_fraction == 1.0 and plain.max_flips == 0
    assert plain.metrics["worst_case_pixel_accuracy"] == plain.metrics["clean_pixel_accuracy"]
    info.margin_error = 0.2
    out = apply_margin_error(raw, 0.2, 1.5)
    zeros = out["margin"] == 0
    assert 10 < zeros.sum() < zeros.size / 2
    for with_logits in (False, True):
        got = {**out, "logits": logits} if with_logits else out
        figures = frozenset({"classes", "gains"} if with_logits else {"classes"})
        at0 = certify(info, got, 0.0, target, 1, figures=figures)
        above = certify(info, got, 1e-300, target, 1, figures=figures)
        assert at0.guaranteed_fraction == pytest.approx(1 - zeros.mean())
        assert at0.max_flips == zeros.sum() == above.max_flips
        assert at0.classes == above.classes
        assert sum(row["max_flips"] for row in at0.classes) == zeros.sum()
        m = at0.metrics
        assert m["clean_pixel_accuracy"] == 1.0  # the served mask is the target
        lost = (zeros & (target != 255)).sum() / (target != 255).sum()
        assert m["worst_case_pixel_accuracy"] == pytest.approx(1.0 - lost)
        assert m["worst_case_pixel_accuracy"] == above.metrics["worst_case_pixel_accuracy"]
        if with_logits:
            assert m["clean_miou"] == 1.0 and m["worst_case_miou"] < 1.0
            assert m["worst_case_miou"] == pytest.approx(above.metrics["worst_case_miou"])
            assert sum(row["max_gains"] for row in at0.classes) > 0
    # a 2x shrink: each network pixel stands for 4 source pixels
    plan = AreaResize((32, 40), (16, 20))
    big = plan.upsample(target)
    res = certify(info, out, 0.0, big, 1, resize=plan, figures=frozenset({"classes"}))
    assert res.guaranteed_fraction == pytest.approx(1 - zeros.mean())
    assert res.max_flips == 4 * zeros.sum()
    assert sum(row["max_flips"] for row in res.classes) == 4 * zeros.sum()
    assert res.metrics["worst_case_pixel_accuracy"] < res.metrics["clean_pixel_accuracy"]
    # ... and with logits: gains and the worst-case mIoU take the margin error as well
    both = frozenset({"classes", "gains"})
    res = certify(info, {**out, "logits": logits}, 0.0, big, 1, resize=plan, figures=both)
    assert sum(row["max_gains"] for row in res.classes) > 0
    assert res.metrics["clean_miou"] == 1.0 and res.metrics["worst_case_miou"] < 1.0
    info.margin_error = 0.0
    exact = certify(info, out, 0.0, big, 1, resize=plan)
    assert exact.guaranteed_fraction == 1.0 and exact.max_flips == 0


# ------------------------------------------------------------------------------ models


def test_resolve_models(tmp_path):
    d = tiny_model_dir()
    specs = resolve_model_specs(Settings(models=[str(d), f"other={d / 'model.onnx'}"]))
    assert specs == [ModelSpec(None, d / "model.onnx"), ModelSpec("other", d / "model.onnx")]
    with pytest.raises(ModelError, match="no such"):
        resolve_model_specs(Settings(models=[str(tmp_path / "missing.onnx")]))
    with pytest.raises(ModelError, match=r"no model\.onnx"):
        resolve_model_specs(Settings(models=[str(tmp_path)]))
    assert resolve_model_specs(Settings(default_model=d)) == [ModelSpec(None, d / "model.onnx")]
    weights = tmp_path / "weights"
    (weights / "b").mkdir(parents=True)
    (weights / "b" / "model.onnx").write_bytes(b"")
    assert default_model_path(weights) == weights / "b" / "model.onnx"
    assert resolve_backend("auto", Path("m.pt")) == "torch"
    assert resolve_backend("auto", Path("m.plan")) == "tensorrt"
    assert resolve_backend("auto", Path("m.onnx")) == "onnxruntime"


def test_load_refuses_bad_artifacts(tmp_path):
    path = tiny_model_dir() / "model.onnx"
    artifact = read_onnx_artifact(path)
    card, L, outputs = artifact.card, artifact.lipschitz, artifact.outputs
    assert card.name == "tiny" and L > 0 and outputs == ["mask", "margin", "radius", "logits"]
    assert artifact.data == path.read_bytes()
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "certseg.lipschitz_audited":
            p.value = repr(L / 2)  # claims a smaller L than the weights give
    onnx.save(proto, tmp_path / "lying.onnx")
    with pytest.raises(ModelError, match="audit"):
        read_onnx_artifact(tmp_path / "lying.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    with pytest.raises(ModelError, match=r"certseg\.card"):
        read_onnx_artifact(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError):
        read_onnx_artifact(tmp_path / "junk.onnx")


def test_sessions_run_the_bytes_the_audit_read(tmp_path):
    """The file is read once: replaced between the audit and the session's load (or a
    warm-up size's session), the engine still runs what was audited. It used to open
    the path again for each session, so a swapped file served unaudited weights."""
    import shutil

    from server.engine import file_sha256

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir(), folder)
    path = folder / "model.onnx"
    audited = path.read_bytes()
    engine = ort_engine(folder)
    assert engine.metadata().sha256 == file_sha256(path)
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:  # every weight x10: another function, unaudited
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 4:
            arr = onnx.numpy_helper.to_array(init) * np.float32(10)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, path)
    engine.load()
    engine.warmup([(1, 21, 30)])
    x = (random_image(21, 30, seed=1).transpose(2, 0, 1) / np.float32(255))[None]
    got = engine.infer(x.astype(np.float32), ["logits"])["logits"]
    path.write_bytes(audited)
    fresh = ort_engine(folder)
    fresh.load()
    np.testing.assert_array_equal(got, fresh.infer(x.astype(np.float32), ["logits"])["logits"])


def test_torch_backend_matches_onnxruntime():
    settings = Settings(intra_op_threads=1)
    torch_engine = create_engine(ModelSpec(None, tiny_checkpoint()), settings)
    onnx_engine = ort_engine(tiny_model_dir())
    onnx_engine.load()
    torch_engine.load()
    x = np.stack(
        [random_image(21, 30, seed=s).transpose(2, 0, 1) / np.float32(255) for s in (1, 2)]
    )
    x = x.astype(np.float32)
    a = torch_engine.infer(x, ["mask", "logits"])
    b = onnx_engine.infer(x, ["mask", "logits"])
    assert torch_engine.metadata().backend == "torch"
    assert torch_engine.metadata().lipschitz == pytest.approx(onnx_engine.metadata().lipschitz)
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4)
    assert (a["mask"] == b["mask"]).mean() > 0.99
    np.testing.assert_allclose(a["radius"], b["radius"], atol=1e-4)
    json.dumps(torch_engine.metadata().card.model_dump())


def test_card_mirror_keeps_up_with_model_card():
    """The server's torch-free CardInfo mirrors certseg's ModelCard: no field may drift."""
    import dataclasses

    from certseg.models import ModelCard
    from server.engine import CardInfo

    missing = {f.name for f in dataclasses.fields(ModelCard)} - set(CardInfo.model_fields)
    # arch_kwargs only matter to rebuild the torch model, which the server never does.
    assert missing <= {"arch_kwargs"}, missing


def test_overlay_of_many_classes_keeps_their_colours():
    """Class ids and states index one (3K, 3) table: with K = 300 no index may wrap."""
    mask = np.array([[299, 150, 0]])
    radius = np.array([[0.0, 1.0, 0.0]], np.float32)
    palette = [(i % 256, (7 * i) % 256, 200) for i in range(300)]
    out = render_overlay(mask, radius, 0.1, palette, style="dim")
    np.testing.assert_array_equal(out[0, 1], palette[150])
    np.testing.assert_array_equal(out[0, 0], np.round(np.array(palette[299]) * DIM))


def test_class_figures_gains_take_the_engine_margin_error():
    """The per-class rows: flips from the (already shrunk) margins, gains from the raw
    logits with the engine's margin error subtracted, so an error bound only adds
    gains; without `gains` they are null."""
    from certseg.certify import max_gains_by_class
    from server.pipeline import class_figures

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 16, 20)).astype(np.float32)
    top2 = np.sort(logits, axis=0)[-2:]
    outputs = {
        "mask": logits.argmax(0).astype(np.int32),
        "margin": (top2[1] - top2[0]).astype(np.float32),
        "logits": logits,
    }
    region = np.zeros((16, 20), bool)
    info = ort_engine(tiny_model_dir()).metadata()
    info.lipschitz = 1.5
    plain = class_figures(info, outputs, region, 0.3)
    assert all(row["max_gains"] is None for row in plain)
    exact = class_figures(info, outputs, region, 0.3, with_gains=True)
    want = max_gains_by_class(logits, outputs["mask"], 0.3, 1.5)
    assert [row["max_gains"] for row in exact] == [int(want[row["id"]]) for row in exact]
    info.margin_error = 0.2
    loose = class_figures(info, outputs, region, 0.3, with_gains=True)
    assert all(a["max_gains"] >= b["max_gains"] for a, b in zip(loose, exact, strict=True))
    assert sum(r["max_gains"] for r in loose) > sum(r["max_gains"] for r in exact)


def test_stability_figures_count_pixels_and_invert_the_answer_max_flips():
    """Each row: ceil(fraction x pixels) (source pixels for a shrunk image) and a norm
    just below which the answer's own max_flips stays under that count; null where no
    perturbation can flip that many (a single class: infinite margins)."""
    from certseg.certify.resize import AreaResize
    from server.pipeline import stability_figures

    rng = np.random.default_rng(5)
    margin = rng.random((24, 32)).astype(np.float32)
    outputs = {
        "mask": np.zeros((24, 32), np.int32),
        "margin": margin,
        "radius": (margin / (np.sqrt(2) * 1.5)).astype(np.float32),
    }
    info = ort_engine(tiny_model_dir()).metadata()
    info.lipschitz = 1.5
    for plan in (None, AreaResize((45, 61), (24, 32))):
        n = 24 * 32 if plan is None else 45 * 61
        rows = stability_figures(info, margin, plan)
        assert [r["fraction"] for r in rows] == [0.01, 0.05, 0.1]
        assert [r["pixels"] for r in rows] == [math.ceil(a * n) for a in (0.01, 0.05, 0.1)]
        for r in rows:
            asked = frozenset({"stability"})
            below = certify(info, outputs, r["eps"] * (1 - 1e-6), None, 1, plan, asked)
            above = certify(info, outputs, r["eps"] * (1 + 1e-6), None, 1, plan, asked)
            assert below.max_flips < r["pixels"] <= above.max_flips
            assert below.stability == rows
    never = stability_figures(info, np.full((4, 4), np.inf, np.float32))
    assert [r["eps"] for r in never] == [None, None, None]
    assert certify(info, outputs, 0.1, None, 1).stability is None  # not asked


def test_nan_margins_become_unknown_pixels():
    """An engine's NaN margins or logits become margin 0, radius 0, all logits 0 and
    class 0: never certified, flippable for free; outputs without NaN are passed through
    untouched."""
    from server.backends.base import unknown_where_not_finite

    margin = np.array([[0.5, np.nan], [1.0, 2.0]], np.float32)
    radius = margin / np.float32(2.0)
    mask = np.array([[1, 2], [3, 1]], np.int32)
    out = unknown_where_not_finite({"margin": margin, "radius": radius, "mask": mask})
    assert out["margin"].tolist() == [[0.5, 0.0], [1.0, 2.0]]
    assert out["radius"].tolist() == [[0.25, 0.0], [0.5, 1.0]]
    assert out["mask"].tolist() == [[1, 0], [3, 1]] and out["mask"].dtype == np.int32
    assert out["margin"].dtype == np.float32
    finite = np.ones((2, 2), np.float32)
    clean = {"margin": finite, "radius": finite, "logits": np.ones((1, 3, 2, 2), np.float32)}
    assert unknown_where_not_finite(clean) is clean
    # a NaN in one logit of a pixel whose margin came out finite (a Max that drops NaN)
    logits = np.arange(24, dtype=np.float32).reshape(1, 3, 2, 4)
    logits[0, 1, 1, 2] = np.nan
    ones = np.ones((1, 2, 4), np.float32)
    out = unknown_where_not_finite(
        {"mask": np.full((1, 2, 4), 2, np.int32), "margin": ones, "radius": ones, "logits": logits}
    )
    unknown = np.zeros((1, 2, 4), bool)
    unknown[0, 1, 2] = True
    assert (out["logits"][:, :, 1, 2] == 0).all() and not np.isnan(out["logits"]).any()
    np.testing.assert_array_equal(out["logits"][:, :, ~unknown[0]], logits[:, :, ~unknown[0]])
    np.testing.assert_array_equal(out["margin"] == 0, unknown)
    np.testing.assert_array_equal(out["radius"] == 0, unknown)
    np.testing.assert_array_equal(out["mask"] == 0, unknown)
    # an fp16 logit past 65504 is inf, and its margin inf: it was certified at any eps
    logits[0, 1, 1, 2] = 1.0
    logits[0, 2, 0, 3] = np.inf
    margin = ones.copy()
    margin[0, 0, 3] = np.inf
    out = unknown_where_not_finite(
        {
            "mask": np.full((1, 2, 4), 2, np.int32),
            "margin": margin,
            "radius": margin,
            "logits": logits,
        }
    )
    unknown = np.zeros((1, 2, 4), bool)
    unknown[0, 0, 3] = True
    np.testing.assert_array_equal(out["radius"] == 0, unknown)
    assert np.isfinite(out["logits"]).all() and (out["mask"] == 0).sum() == 1


def test_nan_logits_count_in_every_figure():
    """NaN logits at correctly classified pixels: after the engine's repair, every figure
    at eps > 0 counts them as lost, from the margins or from the logits (accuracy alike
    by both paths, mIoU below clean, gains into every other class). The old repair fixed
    margins only, so the logit-based figures skipped them (worst = clean, gains 0)."""
    from server.backends.base import unknown_where_not_finite
    from server.pipeline import certify

    rng = np.random.default_rng(8)
    logits = (3 * rng.normal(size=(4, 16, 20))).astype(np.float32)
    target = logits.argmax(0)
    top2 = np.sort(logits, axis=0)[-2:]
    bad = np.zeros((16, 20), bool)
    bad.reshape(-1)[rng.choice(320, 40, replace=False)] = True
    logits[:, bad] = np.nan
    margin = (top2[1] - top2[0]).astype(np.float32)
    margin[bad] = np.nan
    raw = {
        "mask": target.astype(np.int32),
        "margin": margin,
        "radius": margin / np.float32(2**0.5 * 1.5),
        "logits": logits,
    }
    out = {
        k: v[0] for k, v in unknown_where_not_finite({k: v[None] for k, v in raw.items()}).items()
    }
    info = ort_engine(tiny_model_dir()).metadata()
    info.lipschitz = 1.5
    eps = 1e-6  # too small to flip any pixel of a finite margin here
    assert (np.nan_to_num(margin, nan=1.0) > 1.5 * 2**0.5 * eps * 10).all()
    figures = frozenset({"classes", "gains"})
    with_logits = certify(info, out, eps, target, 1, figures=figures)
    no_logits = certify(info, {k: v for k, v in out.items() if k != "logits"}, eps, target, 1)
    assert with_logits.max_flips == no_logits.max_flips == bad.sum()
    want = 1.0 - bad.mean()
    assert with_logits.metrics["worst_case_pixel_accuracy"] == pytest.approx(want)
    assert no_logits.metrics["worst_case_pixel_accuracy"] == pytest.approx(want)
    m = with_logits.metrics
    assert m["worst_case_miou"] < m["clean_miou"]
    # every bad pixel may turn into each of the 3 classes it is not (class 0 now)
    gains = {row["id"]: row["max_gains"] for row in with_logits.classes}
    assert gains[0] == 0 and all(gains[c] == bad.sum() for c in (1, 2, 3) if c in gains)


def test_tensorrt_provider_fp32_runs_without_tf32(caplog):
    """ONNX Runtime's TensorRT provider ran fp32 in TF32 (TensorRT's default; no
    provider option clears it, onnxruntime #26029), accepted with margin error 0: the
    fp32 radii assumed fp32 logits. The engine now sets NVIDIA_TF32_OVERRIDE=0 first,
    unless the operator set it; another value is refused at fp32 without a margin error."""
    from server.backends.ort import (
        CPU,
        CUDA,
        TF32_ENV,
        TRT,
        apply_tf32_override,
        choose_providers,
        tf32_override,
    )
    from server.errors import ModelError

    every = [TRT, CUDA, CPU]
    chosen = choose_providers(Settings(providers=[TRT, CUDA, CPU]), every)
    options = dict(chosen)
    assert options[CUDA]["use_tf32"] == "0" and options[TRT]["trt_fp16_enable"] == "False"
    assert [p for p, _ in chosen] == [TRT, CUDA, CPU]

    assert tf32_override([TRT, CPU], "fp32", {}) == {TF32_ENV: "0"}
    assert tf32_override([TRT, CPU], "fp32", {TF32_ENV: "0"}) == {}  # the operator's own
    assert tf32_override([CUDA, CPU], "fp32", {}) == {}  # use_tf32=0 does it
    assert tf32_override([CPU], "fp32", {}) == {}
    assert tf32_override([TRT], "fp16", {}, margin_error=0.01) == {}  # its bound covers it
    with pytest.raises(ModelError, match=r"NVIDIA_TF32_OVERRIDE='1'.*margin-error"):
        tf32_override([TRT], "fp32", {TF32_ENV: "1"})
    assert tf32_override([TRT], "fp32", {TF32_ENV: "1"}, margin_error=0.01) == {}
    assert tf32_override([TRT], "fp32", {TF32_ENV: "1"}, calibrating=True) == {}

    env: dict[str, str] = {"PATH": "/bin"}
    with caplog.at_level("INFO", logger="certseg.server"):
        assert apply_tf32_override([TRT, CPU], "fp32", environ=env) == {TF32_ENV: "0"}
    assert env == {"PATH": "/bin", TF32_ENV: "0"}
    assert any(TF32_ENV in r.getMessage() and "TF32" in r.getMessage() for r in caplog.records)
    env = {TF32_ENV: "0"}
    assert apply_tf32_override([TRT], "fp32", environ=env) == {} and env == {TF32_ENV: "0"}


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.2, "2"), (7.9, "8")]
)
def test_retry_after_is_a_whole_number_of_seconds_rounded_up(seconds, header):
    """RFC 9110 takes whole seconds: a measured 1.2 s becomes 2 (never 1: the client
    would come back before the queue drained), and never 0 (an instant retry loop)."""
    from starlette.requests import Request

    from server.errors import problem_response

    request = Request({"type": "http", "path": "/v1/segment", "headers": [], "state": {}})
    r = problem_response(request, 503, "Server overloaded", "full", "overloaded", seconds)
    assert r.headers["retry-after"] == header


def test_limits_take_the_largest_pad_multiple_and_refuse_a_limit_under_one_block():
    """Every pixel limit counts the padded pass of the model that pads most, whatever
    order the models come in; a max_pixels under one padded block would refuse every
    image, so the server refuses to start with it instead. (Stand-in engines: only
    their names and cards are read here.)"""
    from server.metrics import Metrics
    from server.state import ServerState

    state = ServerState(Settings(), Metrics())
    state.add_engines([FakeEngine(pad_multiple=8, name="a")])
    state.add_engines([FakeEngine(pad_multiple=1, name="b")])  # pads less: lowers nothing
    assert state.limits.pad_multiple == 8 and state.limits.network_pixels(1, 9) == 128
    with pytest.raises(ModelError, match="under one 8x8 block"):
        ServerState(Settings(max_pixels=63), Metrics()).add_engines([FakeEngine(pad_multiple=8)])
    one_block = ServerState(Settings(max_pixels=64), Metrics())
    assert one_block.add_engines([FakeEngine(pad_multiple=8)]) is None


def test_calibration_images_of_a_folder_include_its_subfolders(tmp_path):
    """As `client segment` reads a folder: frames/a/*.png and frames/b/*.png were "no
    images to calibrate on" when none lay at the top."""
    from server.calibration import calibration_images

    for i, rel in enumerate(("a/x.png", "b/y.jpg", "b/c/z.webp", "b/notes.txt")):
        path = tmp_path / "frames" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.fromarray(random_image(8, 12, seed=i)).save(path)
    got = calibration_images((8, 12), 10, tmp_path / "frames")
    assert len(got) == 3 and all(x.shape == (1, 3, 8, 12) for x in got)
    assert len(calibration_images((8, 12), 2, tmp_path / "frames")) == 2
