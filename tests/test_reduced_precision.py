"""Reduced-precision engines stay sound: the torch backend at bf16/fp16 on the CPU.

The same rule the GPU paths use (a measured margin error bound, subtracted on the
device) is exercised here on the shipped model: the bound is calibrated on some
street scenes and checked on others, where every pixel the reduced engine certifies
at eps must be certified, with the same class, by the fp32 ONNX Runtime reference,
and no joint-budget figure may be smaller than the reference's. Also: TF32 is
switched off wherever certseg certifies on a GPU, and the backends refuse a
reduced precision without an error bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from server_support import assert_gaps_covered

from certseg.certify import max_flips
from certseg.data.synthetic import render_scene
from export.error_bound import calibrate
from server.backends import ModelSpec, create_engine
from server.errors import ModelError
from server.settings import Settings, default_model_path

EPS = (0.0, 0.01, 0.02, 0.05, 0.1)
SIZE = (48, 96)
LOGITS = ["mask", "logits"]


def _scenes(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render_scene(rng, SIZE)[0][None] for _ in range(n)]


@pytest.fixture(scope="module")
def shipped():
    onnx_path = default_model_path()
    assert onnx_path is not None
    reference = create_engine(ModelSpec(None, onnx_path), Settings(intra_op_threads=1))
    reference.load()
    return onnx_path.with_name("model.pt"), reference


def _calibrate(raw, reference, precision):
    """The bound of `raw` (a calibrating engine) on 4 scenes, logits compared too."""
    return calibrate(
        lambda x: raw.infer(x, LOGITS),
        lambda x: reference.infer(x, LOGITS),
        _scenes(1, 4),
        precision=precision,
    )


def _torch_engine(checkpoint, calibrating=False, **kw):
    settings = Settings(backend="torch", intra_op_threads=1, **kw)
    engine = create_engine(ModelSpec(None, checkpoint), settings, calibrating)
    engine.load()
    return engine


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_certifies_a_subset_of_fp32(shipped, precision):
    checkpoint, reference = shipped

    raw = _torch_engine(checkpoint, calibrating=True, precision=precision)
    bound = _calibrate(raw, reference, precision)
    assert bound.max_margin_diff > 0  # the reduced arithmetic really differs
    assert bound.bound < 0.5  # ... and the bound leaves something to certify
    engine = _torch_engine(checkpoint, precision=precision, margin_error=bound.bound)
    L = engine.metadata().lipschitz
    assert pytest.approx(reference.metadata().lipschitz) == L
    certified_any = 0
    for x in _scenes(2, 4):
        got, exact = engine.infer(x, LOGITS), reference.infer(x, LOGITS)
        assert np.all(got["margin"] <= exact["margin"])
        assert_gaps_covered(got, exact, bound.bound)
        for eps in EPS[1:]:
            mine = got["radius"] > eps
            certified_any += int(mine.sum())
            assert np.all(exact["radius"][mine] > eps)
            assert np.array_equal(got["mask"][mine], exact["mask"][mine])
        for eps in EPS:
            assert max_flips(got["margin"][0], eps, L) >= max_flips(exact["margin"][0], eps, L)
    assert certified_any > 0


def test_reduced_precision_needs_an_error_bound(shipped):
    checkpoint, _ = shipped
    with pytest.raises(ModelError, match="margin-error") as refused:
        _torch_engine(checkpoint, precision="bf16")
    # the hint runs as given: a checkpoint with no export beside it needs --reference
    assert "--reference EXPORT_DIR" in str(refused.value)
    onnx_path = default_model_path()
    with pytest.raises(ModelError, match="fp32"):  # ORT CPU runs fp32 only
        create_engine(ModelSpec(None, onnx_path), Settings(precision="fp16", margin_error=0.1))


def test_torch_backend_switches_tf32_off(shipped):
    checkpoint, _ = shipped
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True  # cuDNN's default is True
        _torch_engine(checkpoint)
        assert cudnn.allow_tf32 is False and matmul.allow_tf32 is False
        assert cudnn.conv.fp32_precision != "tf32"
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def test_exact_fp32_restores_the_flags_and_export_still_reads_them():
    from certseg.inference import exact_fp32

    cudnn = torch.backends.cudnn
    before = cudnn.allow_tf32
    try:
        cudnn.allow_tf32 = True
        with exact_fp32():
            assert cudnn.allow_tf32 is False  # readable: torch.export reads this flag
        assert cudnn.allow_tf32 is True
    finally:
        cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_engine_is_sound_against_cpu_fp32(shipped, precision):
    """On the GPU: calibrate against fp32 ONNX Runtime on the CPU, then on other scenes
    the masks agree where the reference margin exceeds the bound, and every certified
    pixel is certified by the reference, with its class, at every eps."""
    checkpoint, reference = shipped

    raw = _torch_engine(checkpoint, calibrating=True, precision=precision)
    assert raw.metadata().device.startswith("cuda")
    bound = _calibrate(raw, reference, precision)
    engine = _torch_engine(checkpoint, precision=precision, margin_error=bound.bound)
    print(f"{precision} on {torch.cuda.get_device_name()}: margin error bound {bound.bound:.3e}")
    for x in _scenes(3, 4):
        got, exact = engine.infer(x, LOGITS), reference.infer(x, LOGITS)
        assert_gaps_covered(got, exact, bound.bound)
        sure = exact["margin"] > 2 * bound.bound
        assert np.array_equal(got["mask"][sure], exact["mask"][sure])
        for eps in EPS[1:]:
            mine = got["radius"] > eps
            assert np.all(exact["radius"][mine] > eps)
            assert np.array_equal(got["mask"][mine], exact["mask"][mine])


@pytest.mark.gpu
@needs_cuda
def test_tf32_would_move_the_margins(shipped):
    """Exact fp32 on the GPU stays within 1e-3 of fp32 ONNX Runtime on the CPU, and
    TF32 convolutions (torch's default) move the margins at least as far (the figures
    are printed: how much farther is what the device run reports)."""
    checkpoint, reference = shipped
    x = np.concatenate(_scenes(4, 2))
    exact = reference.infer(x, ["mask"])["margin"]
    engine = _torch_engine(checkpoint)  # switches TF32 off
    ieee = float(np.max(np.abs(engine.infer(x, ["mask"])["margin"] - exact)))
    cudnn = torch.backends.cudnn
    try:
        cudnn.allow_tf32 = True
        tf32 = float(np.max(np.abs(engine.infer(x, ["mask"])["margin"] - exact)))
    finally:
        cudnn.allow_tf32 = False
    print(f"max |margin - fp32 CPU|: exact fp32 {ieee:.2e}, TF32 {tf32:.2e}")
    assert ieee < 1e-3 and tf32 >= ieee


def _levels_roundtrip(engine) -> None:
    """Every 8-bit level reaches the net as exactly the CPU's float32 v / 255."""
    from server.decode import chw8_to_float

    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    got = engine.upload(levels).cpu().numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, chw8_to_float(levels))


def test_torch_backend_takes_uint8_with_exact_levels(shipped):
    checkpoint, reference = shipped
    engine = _torch_engine(checkpoint)
    assert engine.metadata().accepts_uint8 and reference.metadata().accepts_uint8
    _levels_roundtrip(engine)
    x8 = (np.concatenate(_scenes(5, 2)) * 255 + 0.5).astype(np.uint8)
    from server.decode import chw8_to_float

    a, b = engine.infer(x8, ["mask"]), engine.infer(chw8_to_float(x8), ["mask"])
    for k in ("mask", "margin", "radius"):
        np.testing.assert_array_equal(a[k], b[k])
    ref8, ref = reference.infer(x8, ["mask"]), reference.infer(chw8_to_float(x8), ["mask"])
    # ONNX Runtime on the CPU: converted by the base, in the worker, to the same values
    for k in ("mask", "margin", "radius"):
        np.testing.assert_array_equal(ref8[k], ref[k])


@pytest.mark.gpu
@needs_cuda
def test_cuda_upload_of_uint8_is_exact(shipped):
    checkpoint, _ = shipped
    engine = _torch_engine(checkpoint)
    assert engine.upload(np.zeros((1, 3, 4, 4), np.uint8)).is_cuda
    _levels_roundtrip(engine)


def test_calibrate_command_gives_the_bound_serve_needs(tmp_path):
    """`certseg calibrate` measures the engine as served and writes the bound; the
    refusal message of a reduced-precision engine names that command."""
    import json
    import subprocess
    import sys

    frames = tmp_path / "frames"
    frames.mkdir()
    from PIL import Image

    for i, x in enumerate(_scenes(6, 2)):
        Image.fromarray((x[0].transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save(
            frames / f"f{i}.png"
        )
    checkpoint = default_model_path().with_name("model.pt")
    out = tmp_path / "bound.json"
    cmd = [sys.executable, "-m", "certseg.cli", "calibrate", str(checkpoint), "--backend",
           "torch", "--precision", "bf16", "--images", str(frames), "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    bound = json.loads(out.read_text())
    assert bound["images"] == 2 and bound["precision"] == "bf16" and bound["bound"] > 1e-3
    assert f"--margin-error {bound['bound']:.6g}" in run.stderr
    with pytest.raises(ModelError, match="certseg calibrate"):
        _torch_engine(checkpoint, precision="bf16")
    bad = subprocess.run(
        [*cmd[:4], str(tmp_path / "missing.pt"), *cmd[5:]], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "certseg calibrate: error:" in bad.stderr
    # against another model's export: no "bound" to serve with (it measured two nets' gap)
    from server_support import tiny_model_dir

    other = subprocess.run([*cmd, "--reference", str(tiny_model_dir())], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert other.returncode == 2 and "another model's export" in other.stderr, other.stderr[-999:]
    assert "--margin-error" not in other.stderr
    # a checkpoint away from its export (README's runs/mine/model.pt, runs/mine/onnx/):
    # the error names --reference, which finds the fp32 model
    import shutil

    alone = tmp_path / "alone" / "model.pt"
    alone.parent.mkdir()
    shutil.copy(checkpoint, alone)
    lost = subprocess.run([*cmd[:4], str(alone), *cmd[5:]], capture_output=True, text=True)
    assert lost.returncode == 2 and "--reference" in lost.stderr
    found = [*cmd[:4], str(alone), "--reference", str(default_model_path().parent), *cmd[5:]]
    run = subprocess.run(found, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(out.read_text())["bound"] == pytest.approx(bound["bound"])
