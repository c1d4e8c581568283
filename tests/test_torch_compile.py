"""torch.compile'd forward of the torch backend (`--torch-compile`), on the CPU.

The compiled engine must answer like the eager one (same class wherever the margin
leaves no doubt, margins within float rounding), compile its warm-up sizes before
ready with one graph for batch 1 and one for every larger batch, compile at most a
bounded number of sizes, and certify soundly with the bound `calibrate` measures on
it as served. Real inductor compiles of a tiny model (seconds each on this CPU).
"""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import torch
from server_support import (
    LiveServer,
    answer_png,
    answer_radius,
    assert_gaps_covered,
    encode,
    random_image,
    tiny_checkpoint,
    tiny_model_dir,
    to_input,
)
from typer.testing import CliRunner

from server.app import create_app
from server.backends import ModelSpec, create_engine
from server.backends.compiled import CompiledForward
from server.calibration import calibrate_engine, calibration_images, reference_engine
from server.cli import app as serve_app
from server.errors import ModelError
from server.settings import Settings


def _engine(**kw):
    settings = Settings(backend="torch", intra_op_threads=1, **kw)
    engine = create_engine(ModelSpec(None, tiny_checkpoint()), settings)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engines():
    eager = _engine()
    compiled = _engine(torch_compile=True, max_batch=4)
    compiled.warmup([(1, 32, 48)])
    yield eager, compiled
    eager.close()
    compiled.close()


def test_compiled_forward_bounds_its_sizes_and_shares_one_graph_for_batches(caplog):
    def fn(x):
        return {"y": torch.relu(x * 2 - 1)}

    forward = CompiledForward(torch, fn, sizes=2)
    x = torch.rand(1, 3, 4, 6)
    np.testing.assert_allclose(forward(x)["y"], fn(x)["y"])
    assert forward.compiles == 1
    forward(torch.rand(2, 3, 4, 6))
    forward(torch.rand(5, 3, 4, 6))  # the batch-2 graph serves batch 5
    assert forward.compiles == 2
    forward(torch.rand(1, 3, 5, 7))  # a second size
    assert forward.compiles == 3 and forward.compiled_sizes == [(4, 6), (5, 7)]
    z = torch.rand(3, 4, 6).numpy()[None]  # numpy's way to a batch of one: stride 0
    assert torch.from_numpy(z).stride(0) == 0
    np.testing.assert_allclose(forward(torch.from_numpy(z))["y"], fn(torch.from_numpy(z))["y"])
    assert forward.compiles == 3  # the same size: no compile for another stride
    eager_calls = []
    forward.fn = lambda x: eager_calls.append(tuple(x.shape)) or fn(x)  # the eager path
    with caplog.at_level("INFO", logger="certseg.server"):
        y = forward(torch.ones(1, 3, 6, 8))  # a third size: over the limit, run eagerly
        forward(torch.ones(1, 3, 7, 9))
    assert forward.compiles == 3 and eager_calls == [(1, 3, 6, 8), (1, 3, 7, 9)]
    said = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert said == ["size 6x8 and any further new size run eagerly: 2 sizes are compiled "
                    "already (4x6, 5x7)"]  # fmt: skip
    assert torch.equal(y["y"], torch.ones(1, 3, 6, 8))
    forward(torch.rand(3, 3, 5, 7))
    assert forward.compiles == 4 and len(eager_calls) == 2  # known sizes stay compiled
    with pytest.raises(ValueError):
        CompiledForward(torch, fn, sizes=0)


def test_compiled_engine_answers_like_eager_and_compiles_before_ready(engines):
    eager, compiled = engines
    assert compiled.compiled is not None
    assert compiled.compiled.compiles == 2  # warm-up: batch 1 and batch 2 (max_batch 4)
    assert compiled.compiled.compiled_sizes == [(32, 48)]
    rng = np.random.default_rng(3)
    for shape in [(1, 3, 32, 48), (3, 3, 32, 48), (1, 3, 32, 48)]:
        x = rng.integers(0, 256, shape).astype(np.uint8)
        a, b = eager.infer(x, ["mask", "logits"]), compiled.infer(x, ["mask", "logits"])
        for key in ("margin", "radius", "logits"):
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)
        sure = a["margin"] > 1e-4
        assert sure.mean() > 0.9
        np.testing.assert_array_equal(a["mask"][sure], b["mask"][sure])
    assert compiled.compiled.compiles == 2  # batch 3 took the batch-2 graph: no compile


def _calibrate_and_check(folder, **kw):
    """Calibrate the engine `kw` describe (as served), serve it with its bound, and check
    on other images that what it certifies the fp32 reference certifies, same class.
    Returns the bound, the engine's compile count and captured graphs, and how many
    pixel certificates were checked."""
    settings = Settings(backend="torch", intra_op_threads=1, warmup=False, **kw)
    checkpoint = folder / "model.pt"  # beside its export, as `certseg export` leaves it
    shutil.copy(tiny_checkpoint(), checkpoint)
    shutil.copy(tiny_model_dir() / "model.onnx", folder / "model.onnx")
    bound = calibrate_engine(checkpoint, settings, calibration_images((32, 48), 4))
    served = create_engine(
        ModelSpec(None, checkpoint), settings.model_copy(update={"margin_error": bound.bound})
    )
    served.load()
    reference = reference_engine(checkpoint)
    certified = 0
    try:
        assert bound.max_gap_diff is not None  # the logits were compared, not only margins
        for x in calibration_images((32, 48), 4, seed=7):
            got, exact = served.infer(x, ["mask", "logits"]), reference.infer(x, ["mask", "logits"])
            assert np.all(got["margin"] <= exact["margin"])
            assert_gaps_covered(got, exact, bound.bound)
            for eps in (0.001, 0.005, 0.02):
                mine = got["radius"] > eps
                certified += int(mine.sum())
                assert np.all(exact["radius"][mine] > eps)
                np.testing.assert_array_equal(got["mask"][mine], exact["mask"][mine])
        graphs = served._graphs.captures if served._graphs is not None else 0
        return bound, served.compiled.compiles, graphs, certified
    finally:
        served.close()
        reference.close()


def test_compiled_engine_certifies_soundly_with_its_calibrated_bound(tmp_path):
    bound, compiles, _, certified = _calibrate_and_check(tmp_path, torch_compile=True)
    assert 0 < bound.max_margin_diff < 1e-4 and bound.bound < 1e-3  # float rounding only
    assert compiles == 1 and certified > 0  # one size, batch 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True])
def test_compiled_fp16_on_cuda_certifies_soundly(tmp_path, graphs):
    """On a GPU: the compiled fp16 forward (inductor's kernels), replayed from a CUDA
    graph too, certifies only what fp32 ONNX Runtime on the CPU certifies."""
    bound, compiles, captured, certified = _calibrate_and_check(
        tmp_path, precision="fp16", torch_compile=True, cuda_graphs=graphs
    )
    print(f"compiled fp16{' + graphs' if graphs else ''} on {torch.cuda.get_device_name()}: "
          f"margin error bound {bound.bound:.3e}")  # fmt: skip
    assert bound.max_margin_diff > 0 and bound.bound < 0.5
    assert compiles == 1 and captured == (1 if graphs else 0) and certified > 0


def test_compile_is_refused_for_other_backends():
    with pytest.raises(ModelError, match="torch backend"):
        create_engine(
            ModelSpec(None, tiny_model_dir() / "model.onnx"), Settings(torch_compile=True)
        )


def test_serve_flags_with_bad_values_fail_in_one_line_each():
    result = CliRunner().invoke(
        serve_app, ["serve", "--stream-depth", "99", "--warmup-sizes", "12y4"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in result.output
    assert lines[0].startswith("certseg serve: error: --stream-depth (CERTSEG_STREAM_DEPTH)")
    assert "--warmup-sizes" in lines[1] and "12y4" in lines[1]


def test_warmup_sizes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CERTSEG_WARMUP_SIZES", "512x1024, 256X512")
    assert Settings().warmup_sizes == [(512, 1024), (256, 512)]
    assert Settings().warmup_hw((32, 48)) == [(512, 1024), (256, 512)]
    monkeypatch.delenv("CERTSEG_WARMUP_SIZES")
    assert Settings().warmup_hw((32, 48)) == [(32, 48)]


def test_compiled_server_is_ready_after_compiling_its_warmup_size(engines):
    """A live server with --torch-compile warms up (compiles) at --warmup-sizes, then answers
    a frame of that size with the eager engine's mask and radii."""
    eager, _ = engines
    pixels = random_image(40, 56, seed=5)
    settings = Settings(
        models=[str(tiny_checkpoint())],
        backend="torch",
        torch_compile=True,
        warmup_sizes=["40x56"],
        intra_op_threads=1,
        max_delay_ms=1,
    )
    live = LiveServer(create_app(settings)).start(timeout=300)
    try:
        engine = live.app.state.server.engines["tiny"]
        assert engine.compiled.compiled_sizes == [(40, 56)]
        compiles = engine.compiled.compiles
        with httpx.Client(base_url=live.base, timeout=60) as client:
            got = client.post("/v1/segment?outputs=mask,radius", content=encode(pixels))
        assert got.status_code == 200, got.text
        assert engine.compiled.compiles == compiles  # served from the warm-up's graph
    finally:
        live.stop()
    body = got.json()
    want = eager.infer(to_input(pixels), ["mask"])
    mask, radius = answer_png(body["mask"]), answer_radius(body["radius"])
    sure = want["margin"][0] > 1e-3
    np.testing.assert_array_equal(mask[sure], want["mask"][0][sure])
    np.testing.assert_allclose(radius, want["radius"][0], atol=1e-3)


def test_calibrate_command_measures_the_compiled_engine(tmp_path):
    """`certseg calibrate --torch-compile` calibrates the engine as it will be served and
    says so in the flags it prints."""
    import json
    import subprocess
    import sys

    shutil.copy(tiny_checkpoint(), tmp_path / "model.pt")
    shutil.copy(tiny_model_dir() / "model.onnx", tmp_path / "model.onnx")
    out = tmp_path / "bound.json"
    cmd = [sys.executable, "-m", "certseg.cli", "calibrate", str(tmp_path / "model.pt"),
           "--backend", "torch", "--precision", "fp32", "--torch-compile", "--count", "2",
           "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    bound = json.loads(out.read_text())
    assert 0 < bound["bound"] < 1e-3 and bound["images"] == 2
    assert run.stderr.strip().splitlines()[-1].endswith("--torch-compile")
    assert "compiled the forward pass for batch 1 at 32x48" in run.stderr
