"""TensorRT: cache key, profiles and the error-bound arithmetic on CPU; engine build,
caching, the server's tensorrt backend and the fp16 error bound on a GPU (marked
`gpu`, skipped without one)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from certseg.certify import certified_margins
from export.error_bound import ErrorBound, calibrate, error_bound_from_outputs
from export.tensorrt import Profile, engine_cache_key

PROFILE = Profile.for_sizes((64, 96), (128, 192), (16, 16), max_batch=2)
BASE = ("ab" * 32, "NVIDIA H100 80GB HBM3", (9, 0), "10.3.0", PROFILE, "fp16")


def test_cache_key_is_deterministic_and_sensitive():
    key = engine_cache_key(*BASE)
    assert key == engine_cache_key(*BASE) and len(key) == 64
    assert key == engine_cache_key(BASE[0], BASE[1], "9.0", *BASE[3:])  # same capability
    variants = [
        ("cd" * 32, *BASE[1:]),
        (BASE[0], "NVIDIA A100-SXM4-80GB", *BASE[2:]),
        (*BASE[:2], (8, 0), *BASE[3:]),
        (*BASE[:3], "10.4.0", *BASE[4:]),
        (*BASE[:4], Profile.for_sizes((64, 96), (128, 256), (16, 16), max_batch=2), "fp16"),
        (*BASE[:5], "fp32"),
    ]
    keys = {engine_cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    with pytest.raises(ValueError):
        engine_cache_key(*BASE[:5], "int8")


def test_profile_validation():
    assert PROFILE.to_dict()["max"] == [2, 3, 128, 192]
    with pytest.raises(ValueError):
        Profile((1, 3, 64, 64), (1, 3, 32, 64), (1, 3, 128, 128))
    with pytest.raises(ValueError):
        Profile((1, 3, 64), (1, 3, 64, 64), (1, 3, 64, 64))


def _outputs(rng, n=3, k=4, h=5, w=6, noise=0.0):
    logits = rng.normal(size=(n, k, h, w)).astype(np.float32)
    noisy = logits + rng.uniform(-noise, noise, size=logits.shape).astype(np.float32)

    def head(z):
        s = np.sort(z, axis=1)
        return {"mask": z.argmax(1).astype(np.int32), "margin": s[:, -1] - s[:, -2], "logits": z}

    return head(noisy), head(logits)


def test_error_bound_arithmetic():
    rng = np.random.default_rng(0)
    trt, ref = _outputs(rng, noise=1e-3)
    bound = error_bound_from_outputs([trt], [ref], safety=2.0, slack=1e-4, precision="fp16")
    dm = float(np.max(np.abs(trt["margin"] - ref["margin"])))
    dl = float(np.max(np.abs(trt["logits"] - ref["logits"])))
    # every gap z_t - z_c, t the candidate's class, pixel by pixel
    a, b, t = (x.astype(np.float64) for x in (trt["logits"], ref["logits"], trt["mask"]))
    dg = max(
        abs((a[n, int(t[n, i, j])] - a[n, c]) - (b[n, int(t[n, i, j])] - b[n, c]))[i, j]
        for n in range(3) for c in range(4) for i in range(5) for j in range(6)
    )  # fmt: skip
    differ = trt["mask"] != ref["mask"]
    flip = float(trt["margin"][differ].max()) if differ.any() else 0.0
    assert bound.max_margin_diff == pytest.approx(dm)
    assert bound.max_logit_diff == pytest.approx(dl)
    assert bound.max_gap_diff == pytest.approx(dg)
    assert bound.bound == pytest.approx(2.0 * max(dm, dg, flip) + 1e-4)
    assert dm <= dg + 1e-7 and dg <= 2 * dl + 1e-7  # a gap moves at most twice any logit
    assert bound.pixels == 90 and bound.images == 3

    # Without logits: the margin differences and the flipped pixels.
    no_logits = [{k: v for k, v in d.items() if k != "logits"} for d in (trt, ref)]
    b2 = error_bound_from_outputs([no_logits[0]], [no_logits[1]], safety=3.0, slack=0.0)
    assert b2.max_logit_diff is None and b2.max_gap_diff is None
    assert b2.bound == pytest.approx(3.0 * max(dm, flip))

    # Identical outputs: only the slack remains.
    assert error_bound_from_outputs([ref], [ref], slack=1e-5).bound == pytest.approx(1e-5)
    with pytest.raises(ValueError):
        error_bound_from_outputs([], [])
    with pytest.raises(ValueError):
        error_bound_from_outputs([ref], [ref], safety=0.5)


def test_gap_difference_is_taken_at_the_engines_class_both_ways():
    """One pixel, 3 classes. The engine (class 0) has gap z_0 - z_2 0.3 smaller than
    the reference's: a shrunk gap, the unsafe direction, must count. Another pixel where
    the classes differ: its gaps are the engine's (the ones its figures shrink)."""
    ref_logits = np.array([[[2.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.2]]], np.float32)[None]
    eng_logits = ref_logits.copy()
    eng_logits[0, 2, 0, 0] += 0.3  # gap 0-2 at pixel 0: 2.0 -> 1.7
    eng_logits[0, :, 0, 1] += [1.5, 0.0, -2.0]  # pixel 1: engine class 0, reference 1

    def head(z):
        s = np.sort(z, axis=1)
        return {"mask": z.argmax(1).astype(np.int32), "margin": s[:, -1] - s[:, -2], "logits": z}

    eng, ref = head(eng_logits), head(ref_logits)
    assert eng["mask"].tolist() == [[[0, 0]]] and ref["mask"].tolist() == [[[0, 1]]]
    bound = error_bound_from_outputs([eng], [ref], safety=1.0, slack=0.0)
    # pixel 1 at the engine's class 0: gap 0-2 moved by 1.5 + 2 (at the reference's
    # class 1 the most is 2)
    assert bound.max_gap_diff == pytest.approx(3.5)
    eng_logits[0, :, 0, 1] = ref_logits[0, :, 0, 1]  # now only pixel 0's shrunk gap moved
    assert error_bound_from_outputs([head(eng_logits)], [ref], 1.0, 0.0).max_gap_diff == (
        pytest.approx(0.3)
    )
    broken = head(np.where(eng_logits == 2.0, np.float32(np.inf), eng_logits))
    with pytest.raises(ValueError, match="non-finite"):
        error_bound_from_outputs([{**broken, "margin": ref["margin"]}], [ref])


def test_mask_flip_forces_the_bound_above_its_margin():
    ref = {"mask": np.array([[[0, 1]]], np.int32), "margin": np.array([[[0.5, 0.2]]], np.float32)}
    trt = {"mask": np.array([[[0, 0]]], np.int32), "margin": np.array([[[0.5, 0.21]]], np.float32)}
    b = error_bound_from_outputs([trt], [ref], safety=1.0, slack=0.0)
    assert b.mask_disagreements == 1 and b.bound == pytest.approx(0.21)
    certified, _ = certified_margins(trt["margin"], b.bound, 1.0)
    assert certified[0, 0, 1] == 0  # the flipped pixel is not certified


def test_certified_margins_and_json(tmp_path):
    margin = np.array([0.0, 0.05, 0.1, 1.0, np.inf, np.nan], np.float32)
    certified, radius = certified_margins(margin, 0.1, 4.0)
    np.testing.assert_allclose(certified, [0, 0, 0, 0.9, np.inf, 0], atol=1e-7)
    assert np.all(radius[:4].astype(np.float64) <= certified[:4] / (math.sqrt(2) * 4.0))
    np.testing.assert_allclose(radius, certified / (math.sqrt(2) * 4.0), rtol=1e-6)
    assert certified.dtype == radius.dtype == np.float32
    with pytest.raises(ValueError):
        certified_margins(margin, -1.0, 4.0)
    with pytest.raises(ValueError):
        certified_margins(margin, math.nan, 4.0)
    with pytest.raises(ValueError):
        certified_margins(margin, 0.1, 0.0)
    rng = np.random.default_rng(1)
    b = error_bound_from_outputs(*([x] for x in _outputs(rng, noise=1e-2)))
    b.save(tmp_path / "e.json")
    assert ErrorBound.load(tmp_path / "e.json") == b


def test_certified_margins_never_exceed_the_exact_shrink():
    """The float32 error is rounded up and radii stay below (margin - e) / (sqrt(2) L)."""
    rng = np.random.default_rng(3)
    margin = (rng.random(20000) * 4).astype(np.float32)
    for e in rng.random(50) * 0.3:
        cert, radius = certified_margins(margin, float(e), 2.5)
        exact = np.maximum(margin.astype(np.float64) - e, 0.0)
        assert np.all(cert.astype(np.float64) <= exact * (1 + 2**-23))
        assert np.all(radius.astype(np.float64) <= exact / (math.sqrt(2) * 2.5))


def test_certified_margins_on_torch_match_numpy():
    torch = pytest.importorskip("torch")
    m = np.random.default_rng(4).random((2, 5, 7), dtype=np.float32)
    got_np = certified_margins(m, 0.2, 3.0)
    got_t = certified_margins(torch.from_numpy(m), 0.2, 3.0)
    for a, b in zip(got_np, got_t, strict=True):
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float32
        np.testing.assert_array_equal(a, b.numpy())


def test_calibrate_runs_both_runners_on_every_batch():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 3)).astype(np.float32)

    def head(z):
        s = np.sort(z, axis=1)
        return {"mask": z.argmax(1).astype(np.int32), "margin": s[:, -1] - s[:, -2], "logits": z}

    def reference(x):
        return head(np.einsum("kc,nchw->nkhw", w, x))

    def candidate(x):  # the same net with its weights rounded to fp16
        return head(np.einsum("kc,nchw->nkhw", w.astype(np.float16).astype(np.float32), x))

    images = [rng.random((3, 8, 9), dtype=np.float32), rng.random((2, 3, 8, 9), np.float32)]
    bound = calibrate(candidate, reference, images, safety=2.0, slack=0.0, precision="fp16")
    assert bound.images == 3 and bound.pixels == 3 * 72 and bound.precision == "fp16"
    assert 0 < bound.max_logit_diff < 1e-2
    x = rng.random((1, 3, 8, 9), dtype=np.float32)
    cert, _ = certified_margins(candidate(x)["margin"], bound.bound, 1.0)
    assert np.all(cert <= reference(x)["margin"])


def test_server_engine_profile_spans_card_and_limits():
    from server.backends.tensorrt import MIN_SIDE, engine_profile
    from server.settings import Settings

    p = engine_profile((96, 192), Settings(max_batch=8, trt_max_side=1024))
    assert p.min == (1, 3, MIN_SIDE, MIN_SIDE)
    assert p.opt == (1, 3, 96, 192) and p.max == (8, 3, 1024, 1024)
    assert engine_profile((4096, 64), Settings(trt_max_side=512)).opt == (1, 3, 512, 64)


# ----------------------------------------------------------------------------- GPU


def _gpu():
    trt = pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return trt


@pytest.mark.gpu
def test_engine_build_cache_and_fp16_bound(tmp_path):
    _gpu()
    import onnxruntime as ort
    import torch

    from certseg.models import ModelCard, create_model, save_checkpoint
    from export.onnx_export import export_onnx
    from export.tensorrt import TrtRunner, build_engine, calibrate_error_bound

    torch.manual_seed(0)
    model = create_model("tiny", num_classes=4).eval()
    card = ModelCard("t", "tiny", 4, list("abcd"), [(0, 0, 0)] * 4, pad_multiple=2)
    save_checkpoint(tmp_path / "t.pt", model, card)
    res = export_onnx(tmp_path / "t.pt", tmp_path / "out", with_logits=True)
    cache = tmp_path / "cache"
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, 64, 96), dtype=np.float32) for _ in range(4)]
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    for precision, tol in (("fp32", 1e-4), ("fp16", 5e-2)):
        info = build_engine(res.onnx_path, precision, PROFILE, cache)
        assert not info.cached and info.path.exists()
        again = build_engine(res.onnx_path, precision, PROFILE, cache)
        assert again.cached and again.key == info.key
        # the bytes given are what is keyed and built, not the file read again
        given = build_engine(
            tmp_path / "gone.onnx", precision, PROFILE, cache, onnx_bytes=res.onnx_path.read_bytes()
        )
        assert given.cached and given.key == info.key
        x = np.ascontiguousarray(images[0][:, :, :61, :93])  # odd size inside the profile
        out = TrtRunner(info.path)(x)
        names = [o.name for o in sess.get_outputs()]
        ref = dict(zip(names, sess.run(None, {"image": x}), strict=True))
        assert out["mask"].shape == ref["mask"].shape == (1, 61, 93)
        assert np.abs(out["margin"] - ref["margin"]).max() < tol
        bound = calibrate_error_bound(info, res.onnx_path, images)
        assert info.error_bound_path.exists() and bound.bound < 10 * tol
        certified, _ = certified_margins(out["margin"], bound.bound, res.lipschitz_audited)
        same = out["mask"] == ref["mask"]
        assert same.mean() > 0.99
        assert np.all(certified[same] <= ref["margin"][same] + 1e-6)
    assert any(p.name.startswith("timing-") for p in cache.iterdir())


@pytest.mark.gpu
def test_server_tensorrt_backend_reuses_its_cached_engine(tmp_path):
    """Second start of the server's backend deserializes the cached plan (timed)."""
    _gpu()
    import time

    import onnxruntime as ort

    from server.backends import ModelSpec, create_engine
    from server.settings import Settings

    onnx_path = _default_onnx()
    settings = Settings(backend="tensorrt", trt_cache_dir=tmp_path, max_batch=2, trt_max_side=512)
    starts, stamps = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        engine = create_engine(ModelSpec(None, onnx_path), settings)
        engine.load()
        starts.append(time.perf_counter() - t0)
        x = np.random.default_rng(0).random((2, 3, 96, 192), dtype=np.float32)
        out = engine.infer(x, ["mask"])
        engine.close()
        stamps.append({p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.engine")})
    print(f"tensorrt backend start: first {starts[0]:.1f} s, cached {starts[1]:.2f} s")
    assert len(stamps[0]) == 1 and stamps[1] == stamps[0]  # reused, not rebuilt
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref_mask, ref_margin = sess.run(["mask", "margin"], {"image": x})
    sure = ref_margin > 1e-3  # pixels whose class fp32 rounding cannot change
    assert np.array_equal(out["mask"][sure], ref_mask[sure])


def _default_onnx():
    from server.settings import default_model_path

    path = default_model_path()
    assert path is not None, "the shipped model is missing"
    return path
