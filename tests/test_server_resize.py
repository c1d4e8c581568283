"""POST /v1/segment?resize=...: images over the pixel limit shrunk by area averaging,
answered on their own grid with certificates about the image sent (real uvicorn
server, tiny exported model, figures recomputed from a direct ONNX Runtime session)."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
import websockets
from server_support import (
    answer_png,
    answer_radius,
    assert_problem,
    encode,
    ort_session,
    random_image,
    serve_tiny,
    tiny_model_dir,
)

from certseg.certify import float16_down, max_flips
from certseg.certify.resize import AreaResize

MAX_PIXELS = 40 * 64
MAX_SOURCE = 120 * 200
PAD = 2  # the tiny model pads each side to a multiple of 2


@pytest.fixture(scope="module")
def server():
    srv = serve_tiny(max_pixels=MAX_PIXELS, max_source_pixels=MAX_SOURCE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session():
    return ort_session(tiny_model_dir())


def _post(client, body: bytes, **params) -> httpx.Response:
    return client.post("/v1/segment", content=body, params=params)


def test_models_lists_the_input_limits(client):
    limits = client.get("/v1/models").json()["limits"]
    assert limits["max_pixels"] == MAX_PIXELS and limits["max_source_pixels"] == MAX_SOURCE
    assert limits["pad_multiple"] == PAD


def test_a_thin_image_counts_the_pixels_its_padded_pass_runs_on(client, session):
    """1x2000 is 2000 pixels, under the limit, but the net pads each side to a multiple
    of 2 and runs 2x2000: 413 saying so (at the shipped model's multiple 8, a legal
    1x4194304 PNG ran as 8 times the limit and the host ran out of memory); with
    resize=fit it is shrunk until its padded pass fits, and answered."""
    body = encode(random_image(1, 2000))
    problem = assert_problem(_post(client, body, outputs="mask"), 413)
    assert "1x2000 = 2000 pixels, run as 4000" in problem["detail"]
    assert "multiple of 2" in problem["detail"] and "resize=fit" in problem["detail"]
    r = _post(client, body, resize="fit", outputs="mask")
    assert r.status_code == 200, r.text
    network = r.json()["resize"]["network"]
    assert network == list(AreaResize.to_fit(1, 2000, MAX_PIXELS, PAD).network) == [1, 1280]
    v2 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 1, 2000],
                      "data": [0.5] * 6000}]}  # fmt: skip
    assert "run as 4000" in client.post("/v2/models/tiny/infer", json=v2).json()["error"]
    # a V2 request's pixel budget (one pass) counts padded pixels too: two 1x1000 images
    # are 2000 pixels but run as 4000, over the 2560 of a pass
    two = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 3, 1, 1000],
                       "data": [0.5] * 6000}]}  # fmt: skip
    r = client.post("/v2/models/tiny/infer", json=two)
    assert r.status_code == 413 and "4000 pixels" in r.json()["error"], r.text
    thin = encode(random_image(1, 1000))
    pngs = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(thin).decode()] * 2}]}  # fmt: skip
    r = client.post("/v2/models/tiny/infer", json=pngs)
    assert r.status_code == 413 and "4000 pixels" in r.json()["error"], r.text


def test_over_the_limit_is_413_naming_resize(client):
    body = encode(random_image(70, 110))
    problem = assert_problem(_post(client, body), 413)
    assert "resize=fit" in problem["detail"]
    assert "70x110 = 7700 pixels" in problem["detail"]  # HxW, as every size is written
    problem = assert_problem(_post(client, encode(random_image(130, 200)), resize="fit"), 413)
    assert str(MAX_SOURCE) in problem["detail"]


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.05])
def test_fit_answers_on_the_source_grid_with_the_folded_certificate(client, session, eps):
    h, w = 70, 110
    pixels = random_image(h, w, seed=3)
    asked = "mask,radius,overlay,gains,stability"
    r = _post(client, encode(pixels), resize="fit", eps=eps, outputs=asked)
    assert r.status_code == 200, r.text
    ans = r.json()
    plan = AreaResize.to_fit(h, w, MAX_PIXELS, PAD)
    assert ans["resize"]["source"] == [h, w] and ans["resize"]["network"] == list(plan.network)
    assert ans["resize"]["operator_norm"] == pytest.approx(plan.operator_norm)
    assert ans["resize"]["network_eps"] == pytest.approx(plan.network_eps(eps))
    assert (ans["width"], ans["height"]) == (w, h)
    # the engine saw the area shrink of the image sent
    mask, margin, radius = session.run(
        ["mask", "margin", "radius"], {"image": plan.apply(pixels)[None]}
    )
    np.testing.assert_array_equal(answer_png(ans["mask"]), plan.upsample(mask[0]))
    src_radius = plan.upsample(plan.source_radius(radius[0]))
    got = answer_radius(ans["radius"])
    assert got.shape == (h, w)
    np.testing.assert_array_equal(got, float16_down(src_radius).astype(np.float32))
    expected = 1.0 if eps == 0 else float(np.mean(src_radius > eps))
    assert ans["guaranteed_fraction"] == pytest.approx(expected)
    assert ans["max_flips"] == plan.max_source_flips(margin[0], eps, ans["lipschitz"])
    k = int(max_flips(margin[0], plan.network_eps(eps), ans["lipschitz"]))
    assert (ans["max_flips"] > 0) == (k > 0)
    assert answer_png(ans["overlay"]).shape == (h, w, 3)
    # per class, in source pixels: the upsampled mask's counts, never above the image's
    src_mask = plan.upsample(mask[0])
    flips = plan.max_source_flips_by_class(margin[0], mask[0], 4, eps, ans["lipschitz"])
    (logits,) = session.run(["logits"], {"image": plan.apply(pixels)[None]})
    gains = plan.max_source_gains_by_class(logits[0], mask[0], eps, ans["lipschitz"])
    assert [row["id"] for row in ans["classes"]] == [int(c) for c in np.unique(src_mask)]
    for row in ans["classes"]:
        mine = src_mask == row["id"]
        assert row["pixels"] == int(mine.sum())
        src_ok = np.ones_like(mine) if eps == 0 else src_radius > eps
        assert row["guaranteed_fraction"] == pytest.approx(float(src_ok[mine].mean()))
        assert row["max_flips"] == flips[row["id"]] <= min(ans["max_flips"], row["pixels"])
        assert row["max_gains"] == gains[row["id"]] <= h * w - row["pixels"]
        if eps == 0:
            assert row["max_flips"] == row["max_gains"] == 0
    # stability speaks of source pixels and source norms, whatever eps was asked
    norms = plan.source_stability(margin[0], (0.01, 0.05, 0.1), ans["lipschitz"]).tolist()
    assert [r["pixels"] for r in ans["stability"]] == [77, 385, 770]  # of 70 x 110
    assert [r["eps"] for r in ans["stability"]] == norms


def test_lipschitz_is_the_networks_and_the_resize_fields_say_how_radii_fold_it(client, session):
    """The schema called `lipschitz` "the audited constant the radii use", yet a resized
    answer's radii are (r - rounding) / ||D||. It is described as the network's L, and
    the resize object's operator_norm and rounding give the rest; checked on an answer."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    lip = schemas["SegmentResponse"]["properties"]["lipschitz"]["description"]
    assert "network's audited" in lip and "resize.operator_norm" in lip
    assert "the radii use." not in lip
    norm = schemas["ResizeInfo"]["properties"]["operator_norm"]["description"]
    assert "(r - rounding) / operator_norm" in norm and "lipschitz x operator_norm" in norm
    h, w = 70, 110
    pixels = random_image(h, w, seed=9)
    ans = _post(client, encode(pixels), resize="fit", outputs="radius").json()
    plan = AreaResize.to_fit(h, w, MAX_PIXELS, PAD)
    (radius,) = session.run(["radius"], {"image": plan.apply(pixels)[None]})
    (card,) = client.get("/v1/models").json()["models"]
    assert ans["lipschitz"] == card["lipschitz"]  # the network's, resize or not
    rz = ans["resize"]
    folded = np.maximum(radius[0].astype(np.float64) - rz["rounding"], 0) / rz["operator_norm"]
    got = answer_radius(ans["radius"])
    np.testing.assert_allclose(got, plan.upsample(folded), rtol=2e-3, atol=1e-6)
    assert (got <= plan.upsample(folded) * (1 + 1e-6) + 1e-9).all()  # never above it


def test_16_bit_images_shrink_from_their_exact_values(client, session):
    grey16 = (np.arange(70 * 110, dtype=np.uint32).reshape(70, 110) * 8 % 65536).astype(np.uint16)
    ans = _post(client, encode(grey16), resize="fit", outputs="mask").json()
    plan = AreaResize.to_fit(70, 110, MAX_PIXELS, PAD)
    exact = np.broadcast_to(grey16.astype(np.float32) / np.float32(65535), (3, 70, 110))
    (mask,) = session.run(["mask"], {"image": plan.apply(np.ascontiguousarray(exact))[None]})
    np.testing.assert_array_equal(answer_png(ans["mask"]), plan.upsample(mask[0]))


def test_fit_leaves_images_within_the_limit_alone(client):
    ans = _post(client, encode(random_image(30, 50)), resize="fit").json()
    assert "resize" not in ans and (ans["width"], ans["height"]) == (50, 30)


def test_scale_shrinks_even_small_images_and_checks_the_limit(client):
    ans = _post(client, encode(random_image(40, 60)), resize="0.5").json()
    assert ans["resize"]["network"] == [20, 30] and (ans["width"], ans["height"]) == (60, 40)
    assert ans["resize"]["operator_norm"] == pytest.approx(0.5)
    problem = assert_problem(_post(client, encode(random_image(100, 160)), resize="0.9"), 413)
    assert "resize=0.9 gives 90x144 = 12960 pixels" in problem["detail"]


@pytest.mark.parametrize("value", ["2", "0", "-1", "huge", "nan"])
def test_bad_resize_values_are_422(client, value):
    assert_problem(_post(client, encode(random_image(20, 30)), resize=value), 422)


def test_logits_need_the_image_at_its_own_size(client):
    big = encode(random_image(70, 110))
    problem = assert_problem(_post(client, big, resize="fit", outputs="mask,logits"), 422)
    assert "resized" in problem["detail"]
    assert _post(client, big, resize="fit").status_code == 200  # the server keeps serving


def test_a_source_size_target_gives_the_worst_case_metrics(client, session):
    pixels = random_image(70, 110, seed=9)
    plan = AreaResize.to_fit(70, 110, MAX_PIXELS, PAD)
    mask, margin, logits = session.run(
        ["mask", "margin", "logits"], {"image": plan.apply(pixels)[None]}
    )
    target = plan.upsample(mask[0]).astype(np.uint8)
    target[:10] = (target[:10] + 1) % 4  # some pixels wrong
    target[-5:] = 255  # and some ignored
    files = {
        "image": ("x.png", encode(pixels), "image/png"),
        "target": ("t.png", encode(target), "image/png"),
    }
    r = client.post("/v1/segment", files=files, params={"resize": "fit", "eps": 0.05})
    assert r.status_code == 200, r.text
    m = r.json()["metrics"]
    worst, clean = plan.worst_case_accuracy(mask[0], margin[0], target, 0.05, r.json()["lipschitz"])
    assert m["worst_case_pixel_accuracy"] == pytest.approx(worst)
    assert m["clean_pixel_accuracy"] == pytest.approx(clean) and clean < 1
    assert m["worst_case_pixel_accuracy"] <= clean
    iou, clean_iou = plan.worst_case_iou(
        mask[0], margin[0], logits[0], target, 0.05, r.json()["lipschitz"]
    )
    assert m["worst_case_miou"] == pytest.approx(float(np.nanmean(iou)))
    assert m["clean_miou"] == pytest.approx(float(np.nanmean(clean_iou)))
    assert m["worst_case_miou"] < m["clean_miou"] < 1
    # a target of another size is refused
    files["target"] = ("t.png", encode(target[:-1]), "image/png")
    r = client.post("/v1/segment", files=files, params={"resize": "fit"})
    assert_problem(r, 422)


def test_png_and_npz_say_so(client):
    big = encode(random_image(70, 110))
    r = _post(client, big, resize="fit", format="png")
    assert r.status_code == 200 and r.headers["X-Certseg-Resize"].startswith("70x110->")
    r = _post(client, big, resize="fit", format="npz")
    arrays = np.load(io.BytesIO(r.content))
    plan = AreaResize.to_fit(70, 110, MAX_PIXELS, PAD)
    assert arrays["mask"].shape == (70, 110)
    assert tuple(arrays["network_size"]) == plan.network
    assert float(arrays["operator_norm"]) == pytest.approx(plan.operator_norm)


def test_stream_frames_shrink_when_the_stream_asks(server):
    """A 4K-like stream: frames over the limit are an error per frame until the stream
    asks resize=fit (query or config message), then answered on their own grid."""
    frame = encode(random_image(70, 110), "JPEG", quality=90)

    async def main() -> list[dict]:
        got = []
        async with websockets.connect(f"{server.ws_base}/v1/stream") as ws:
            assert json.loads(await ws.recv())["resize"] is None
            await ws.send(frame)
            got.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "config", "resize": "fit"}))
            got.append(json.loads(await ws.recv()))
            await ws.send(frame)
            got.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "config", "resize": 7}))
            got.append(json.loads(await ws.recv()))
        async with websockets.connect(f"{server.ws_base}/v1/stream?resize=0.5") as ws:
            got.append(json.loads(await ws.recv()))
        return got

    too_big, config, result, bad, query = asyncio.run(main())
    assert too_big["type"] == "error" and too_big["status"] == 413
    assert config["type"] == "config" and config["resize"] == "fit"
    assert result["type"] == "result" and (result["width"], result["height"]) == (110, 70)
    plan = AreaResize.to_fit(70, 110, MAX_PIXELS, PAD)
    assert result["resize"]["network"] == list(plan.network)
    assert bad["type"] == "error" and bad["status"] == 422
    assert query["resize"] == 0.5
