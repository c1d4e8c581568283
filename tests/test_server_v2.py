"""Open Inference Protocol (KServe V2) with the real `tritonclient.http` client."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from server_support import (
    LiveServer,
    answer_png,
    answer_radius,
    encode,
    ort_session,
    random_image,
    tiny_model_dir,
    to_input,
)

from certseg.certify import float16_down
from server import Settings, create_app


@pytest.fixture(scope="module")
def server():
    d = tiny_model_dir()
    models = [f"tiny={d}", f"second={d / 'model.onnx'}"]  # two names, one device
    settings = Settings(models=models, intra_op_threads=1, max_delay_ms=1)
    srv = LiveServer(create_app(settings)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tc():
    """tritonclient.http, the real external client (dev extra: tritonclient[http])."""
    return pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def triton(server, tc):
    client = tc.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def session():
    return ort_session(tiny_model_dir())


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny") and not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert meta["name"] == "certseg" and "binary_tensor_data" in meta["extensions"]
    m = triton.get_model_metadata("tiny")
    assert m["name"] == "tiny" and m["versions"] == ["1"]
    assert m["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    outs = {o["name"]: (o["datatype"], o["shape"]) for o in m["outputs"]}
    assert outs["mask"] == ("INT32", [-1, -1, -1])
    assert outs["margin"] == ("FP32", [-1, -1, -1])
    assert outs["radius"] == ("FP32", [-1, -1, -1])
    assert outs["logits"] == ("FP32", [-1, 4, -1, -1])
    assert triton.get_model_metadata("tiny", model_version="1")["name"] == "tiny"
    assert triton.get_model_metadata("second")["name"] == "second"
    cfg = triton.get_model_config("tiny")
    assert cfg["name"] == "tiny" and cfg["input"][0]["name"] == "image"
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [1]  # CPU: one image a pass


def _infer(tc, triton, x: np.ndarray, binary: bool, names=("mask", "margin", "radius")):
    inp = tc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in names]
    return triton.infer("tiny", [inp], outputs=outs, request_id="r1")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_onnxruntime_and_rest(server, tc, triton, session, binary):
    pixels = [random_image(29, 43, seed=s) for s in (1, 2)]
    x = np.concatenate([to_input(p) for p in pixels])
    res = _infer(tc, triton, x, binary)
    assert res.get_response()["id"] == "r1"
    mask, margin, radius = (res.as_numpy(n) for n in ("mask", "margin", "radius"))
    assert mask.dtype == np.int32 and mask.shape == (2, 29, 43)
    want = session.run(["mask", "margin", "radius"], {"image": x})
    np.testing.assert_array_equal(mask, want[0])
    np.testing.assert_array_equal(margin, want[1])
    np.testing.assert_array_equal(radius, want[2])
    # the same image through REST gives the same mask and radius (fp16 there)
    rest = httpx.post(server.base + "/v1/segment", content=encode(pixels[0])).json()
    np.testing.assert_array_equal(answer_png(rest["mask"]), mask[0])
    r16 = answer_radius(rest["radius"])
    assert r16.shape == (29, 43)
    np.testing.assert_array_equal(r16, float16_down(radius[0]).astype(np.float32))


def test_infer_all_outputs_binary_by_default(tc, triton, session):
    x = to_input(random_image(16, 24, seed=4))
    inp = tc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    res = triton.infer("tiny", [inp])  # no outputs named: all, binary
    logits = res.as_numpy("logits")
    np.testing.assert_array_equal(logits, session.run(["logits"], {"image": x})[0])


def test_bytes_input_of_encoded_images(tc, triton, session):
    pngs = [encode(random_image(20, 30, seed=s)) for s in (5, 6)]
    inp = tc.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    res = triton.infer("tiny", [inp], outputs=[tc.InferRequestedOutput("mask")])
    want = session.run(["mask"], {"image": np.concatenate([to_input(p) for p in pngs])})[0]
    np.testing.assert_array_equal(res.as_numpy("mask"), want)


def test_health_bodies_are_the_protocols(server):
    assert httpx.get(server.base + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.base + "/v2/health/ready").json() == {"ready": True}


def test_models_by_name(server):
    listing = httpx.get(server.base + "/v1/models").json()
    assert listing["default"] == "tiny"
    assert [m["name"] for m in listing["models"]] == ["tiny", "second"]
    body = encode(random_image(16, 24, seed=2))
    a = httpx.post(server.base + "/v1/segment?model=second&outputs=mask", content=body).json()
    b = httpx.post(server.base + "/v1/segment?outputs=mask", content=body).json()
    assert a["model"] == "second" and b["model"] == "tiny" and a["mask"] == b["mask"]


def test_raw_json_infer_and_bytes_base64(server, session):
    x = to_input(random_image(8, 12, seed=8))
    body = {
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}
        ],
        "outputs": [{"name": "mask"}],
    }
    r = httpx.post(server.base + "/v2/models/tiny/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()["outputs"][0]
    assert out["name"] == "mask" and out["datatype"] == "INT32" and out["shape"] == [1, 8, 12]
    want = session.run(["mask"], {"image": x})[0]
    np.testing.assert_array_equal(np.array(out["data"]).reshape(1, 8, 12), want)
    png = base64.b64encode(encode(random_image(8, 12, seed=8))).decode()
    body["inputs"] = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [png]}]
    r = httpx.post(server.base + "/v2/models/tiny/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"]).reshape(1, 8, 12), want)


def test_fp16_and_fp64_inputs_certify_the_float32_image_they_hold(tc, triton, session):
    """FP16 widens to float32 exactly; FP64 is served only when it holds float32
    values: rounded, it would be another image, and the radii not of the one sent."""
    x = to_input(random_image(8, 12, seed=3))  # k / 255 in float32
    want = session.run(["mask", "radius"], {"image": x})
    halves = x.astype(np.float16)
    for arr in (halves, x.astype(np.float64)):
        for binary in (True, False):
            inp = tc.InferInput("image", list(arr.shape), tc.np_to_triton_dtype(arr.dtype))
            inp.set_data_from_numpy(arr, binary_data=binary)
            res = triton.infer("tiny", [inp])
            got = (res.as_numpy("mask"), res.as_numpy("radius"))
            exact = session.run(["mask", "radius"], {"image": arr.astype(np.float32)})
            for a, b in zip(got, exact, strict=True):
                np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(res.as_numpy("radius"), want[1])  # FP64 of x is x
    wide = random_image(8, 12, seed=3).transpose(2, 0, 1)[None] / 255.0  # float64 k / 255
    inp = tc.InferInput("image", list(wide.shape), "FP64")
    inp.set_data_from_numpy(wide)
    with pytest.raises(tc.InferenceServerException) as info:
        triton.infer("tiny", [inp])
    assert "float32 values exactly" in info.value.message()


def test_fp16_json_numbers_are_the_fp16_tensor_they_declare(server, session):
    """JSON numbers of an FP16 input are rounded to FP16, the tensor declared, as its
    binary form gives it: they went to float32 unrounded, and the image certified was
    one the client never declared (0.0168 away in l2 at 8x12, as far as an eps)."""
    x = to_input(random_image(8, 12, seed=5)).astype(np.float64)
    x += np.random.default_rng(5).uniform(-1e-3, 1e-3, x.shape)
    x = np.clip(x, 0, 1)
    halves = x.astype(np.float16)
    assert not np.array_equal(halves.astype(np.float64), x)  # a rounding to do
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": list(x.shape),
                "datatype": "FP16",
                "data": x.reshape(-1).tolist(),
            }
        ],
        "outputs": [{"name": "radius"}],
    }
    r = httpx.post(server.base + "/v2/models/tiny/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 8, 12)
    (want,) = session.run(["radius"], {"image": halves.astype(np.float32)})
    np.testing.assert_array_equal(got, want)
    body["inputs"][0]["data"] = [70000.0] * x.size  # past FP16: a clear 4xx, no warning
    r = httpx.post(server.base + "/v2/models/tiny/infer", json=body, timeout=60)
    assert r.status_code == 422 and "FP16's range" in r.json()["error"], r.text


def test_unknown_model_error_names_the_served_ones(server):
    """(Malformed requests and tensors: tests/test_bad_inputs.py.)"""
    assert httpx.get(server.base + "/v2/models/nope").json() == {
        "error": "no model named 'nope' (served: second, tiny)"
    }


def test_an_output_asked_as_a_classification_is_refused(tc, triton):
    """class_count asks Triton's classification extension (top-k labels as strings):
    not served, so refused by name rather than answered with the whole INT32 mask."""
    from tritonclient.utils import InferenceServerException

    x = to_input(random_image(8, 12, seed=2))
    inp = tc.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = tc.InferRequestedOutput("mask", class_count=3)
    with pytest.raises(InferenceServerException, match="classification extension"):
        triton.infer("tiny", [inp], outputs=[out])


def test_tritonclient_raises_on_error(tc, triton):
    from tritonclient.utils import InferenceServerException

    x = np.zeros((1, 1, 4, 4), np.float32)
    inp = tc.InferInput("image", [1, 1, 4, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(InferenceServerException, match="shape"):
        triton.infer("tiny", [inp])
