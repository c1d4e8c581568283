"""POST /v1/segment, /v1/models, errors, auth, metrics, batching, faults: against a
real uvicorn server on 127.0.0.1 serving the tiny exported model."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from server_support import (
    ControlledEngine,
    LiveServer,
    answer_png,
    answer_radius,
    assert_problem,
    encode,
    ort_engine,
    ort_session,
    random_image,
    serve_tiny,
    tiny_checkpoint,
    tiny_model_dir,
    to_input,
)

from certseg.certify import (
    float16_down,
    guaranteed_region,
    max_flips,
    max_gains_by_class,
    stability,
    worst_case_miou,
)
from certseg.certify import worst_case_pixel_accuracy as wc_acc
from server import Settings, create_app

MAX_BYTES = 512 * 1024
SHARES = ("0.01", "0.05", "0.1")  # the stability fractions, as labels
MAX_PIXELS = 300 * 300


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def server(model_dir):
    srv = serve_tiny(max_body_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session(model_dir):
    return ort_session(model_dir)


# ------------------------------------------------------------------------------ answers


@pytest.mark.parametrize(("h", "w"), [(32, 48), (37, 53)])
def test_segment_matches_direct_onnxruntime(client, session, h, w):
    """Mask equal pixel for pixel, radius equal up to fp16 rounding, certificate
    figures equal to certseg.certify on the direct session's outputs."""
    pixels = random_image(h, w, seed=h)
    body = encode(pixels)
    r = client.post("/v1/segment", content=body, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    ans = r.json()
    mask, margin, radius, logits = session.run(None, {"image": to_input(body)})
    assert (ans["width"], ans["height"]) == (w, h)
    got_mask = answer_png(ans["mask"])
    assert ans["mask"]["dtype"] == "uint8"
    np.testing.assert_array_equal(got_mask, mask[0])
    got_radius = answer_radius(ans["radius"])
    assert got_radius.shape == (h, w)
    np.testing.assert_array_equal(got_radius, float16_down(radius[0]).astype(np.float32))
    assert np.all(got_radius <= radius[0])  # float16 on the wire never claims more
    eps = 0.05  # the card's default_eps
    assert ans["eps"] == eps
    assert ans["guaranteed_fraction"] == pytest.approx(
        float(guaranteed_region(radius[0], eps).mean())
    )
    assert float(guaranteed_region(got_radius, eps).mean()) <= ans["guaranteed_fraction"]
    L = ans["lipschitz"]
    assert ans["max_flips"] == int(max_flips(margin[0], eps, L))
    assert ans["max_flips_fraction"] == pytest.approx(ans["max_flips"] / (h * w))
    # Per predicted class: its pixels, their certified fraction, the most one attack flips.
    region = guaranteed_region(radius[0], eps)
    gains = max_gains_by_class(logits[0], mask[0], eps, L).tolist()
    present = [int(c) for c in np.unique(mask[0])]
    assert [row["id"] for row in ans["classes"]] == present
    for row in ans["classes"]:
        mine = mask[0] == row["id"]
        assert row["name"] == ["road", "car", "sky", "tree"][row["id"]]
        assert row["pixels"] == int(mine.sum())
        assert row["guaranteed_fraction"] == pytest.approx(float(region[mine].mean()))
        assert row["max_flips"] == int(max_flips(margin[0], eps, L, valid=mine))
        assert row["max_gains"] is None  # output gains not asked for
    assert sum(row["pixels"] for row in ans["classes"]) == h * w
    with_gains = client.post("/v1/segment?outputs=gains", content=body).json()
    assert set(with_gains) >= {"classes"} and "mask" not in with_gains  # gains imply rows
    assert [row["max_gains"] for row in with_gains["classes"]] == [gains[c] for c in present]
    assert max(row["max_flips"] for row in ans["classes"]) <= ans["max_flips"]
    # Stability: the least norm that may flip 1/5/10% of the pixels, from the margins.
    norms = stability(margin[0], (0.01, 0.05, 0.1), L).tolist()
    assert ans["stability"] == [
        {"fraction": a, "pixels": math.ceil(a * h * w), "eps": e}
        for a, e in zip((0.01, 0.05, 0.1), norms, strict=True)
    ]
    assert "stability" not in with_gains  # only with the default outputs, or when asked
    overlay = answer_png(ans["overlay"])
    assert overlay.shape == (h, w, 3)
    stages = ("decode", "prepare", "queue", "infer", "certify", "encode", "total")
    assert set(ans["timings_ms"]) == set(stages)
    timing = r.headers["Server-Timing"]
    for stage in stages:
        assert f"{stage};dur=" in timing


def test_l_is_the_audited_one(client, model_dir):
    audit = json.loads((model_dir / "audit.json").read_text())
    ans = client.post("/v1/segment", content=encode(random_image(32, 48))).json()
    assert ans["lipschitz"] == pytest.approx(audit["lipschitz_audited"], rel=1e-9)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp(client, session, fmt):
    body = encode(random_image(40, 56, seed=3), fmt, quality=90)
    r = client.post("/v1/segment?outputs=mask", content=body)
    assert r.status_code == 200, r.text
    mask = session.run(["mask"], {"image": to_input(body)})[0]
    np.testing.assert_array_equal(answer_png(r.json()["mask"]), mask[0])
    assert "radius" not in r.json() and "overlay" not in r.json()


def test_eps_outputs_and_logits(client, session):
    body = encode(random_image(32, 48, seed=5))
    r = client.post("/v1/segment", params={"eps": 0.0, "outputs": "logits,radius"}, content=body)
    ans = r.json()
    assert r.status_code == 200 and ans["eps"] == 0.0
    assert ans["guaranteed_fraction"] == 1.0 and ans["max_flips"] == 0
    logits = session.run(["logits"], {"image": to_input(body)})[0]
    got = np.frombuffer(base64.b64decode(ans["logits"]["data"]), "<f4").reshape(
        ans["logits"]["shape"]
    )
    np.testing.assert_array_equal(got, logits[0])
    assert "mask" not in ans


def test_multipart_with_target_gives_worst_case_metrics(client, session):
    pixels = random_image(32, 48, seed=7)
    body = encode(pixels)
    logits = session.run(["logits"], {"image": to_input(body)})[0][0]
    target = np.argmax(logits, axis=0).astype(np.uint8)
    target[:4] = (target[:4] + 1) % 4  # some wrong pixels
    target[-2:] = 255  # ignored
    files = {"image": ("x.png", body, "image/png"), "target": ("t.png", encode(target))}
    r = client.post("/v1/segment", params={"eps": 0.02, "outputs": "mask"}, files=files)
    assert r.status_code == 200, r.text
    m = r.json()["metrics"]
    L = r.json()["lipschitz"]
    t = target.astype(np.int64)
    assert m["worst_case_pixel_accuracy"] == pytest.approx(float(wc_acc(logits, t, 0.02, L)))
    assert m["worst_case_miou"] == pytest.approx(float(worst_case_miou(logits, t, 0.02, L)))
    assert m["clean_pixel_accuracy"] >= m["worst_case_pixel_accuracy"]
    assert m["clean_miou"] >= m["worst_case_miou"]


def test_margin_error_at_eps_zero_certifies_only_positive_margins(session):
    """A server with --margin-error e: at eps = 0 a pixel whose margin is <= e may show
    another class than the fp32 net's, so it is neither guaranteed nor kept by the
    worst-case figures, and the answer agrees with the one at eps = 1e-12 (the old
    server said guaranteed 1.0, max_flips 0, worst-case = clean at eps = 0)."""
    e = 0.05
    pixels = random_image(32, 48, seed=11)
    body = encode(pixels)
    mask, margin = session.run(["mask", "margin"], {"image": to_input(body)})
    uncertain = margin[0] <= e
    assert 0 < uncertain.sum() < uncertain.size / 2
    target = encode(mask[0].astype(np.uint8))
    srv = serve_tiny(margin_error=e)
    try:
        with httpx.Client(base_url=srv.base, timeout=60) as c:

            def post(eps: float) -> dict:
                files = {"image": ("x.png", body, "image/png"), "target": ("t.png", target)}
                params = {"eps": eps, "outputs": "classes,gains,stability"}
                r = c.post("/v1/segment", params=params, files=files)
                assert r.status_code == 200, r.text
                return r.json()

            def overlay(eps: float) -> np.ndarray:
                params = {"eps": eps, "outputs": "overlay", "format": "npz"}
                r = c.post("/v1/segment", params=params, content=body)
                assert r.status_code == 200, r.text
                return np.load(io.BytesIO(r.content))["overlay"]

            at0, above = post(0.0), post(1e-12)
            # the overlay marks what the figures count: at eps 0 the pixels of margin
            # <= e too (it had drawn every pixel as certified)
            drawn0, drawn_above = overlay(0.0), overlay(1e-12)
    finally:
        srv.stop()
    np.testing.assert_array_equal(drawn0, drawn_above)
    plain = drawn0[~uncertain]
    assert len(np.unique(drawn0.reshape(-1, 3), axis=0)) > len(np.unique(plain, axis=0))
    n = uncertain.size
    assert at0["guaranteed_fraction"] == pytest.approx(1 - uncertain.sum() / n, abs=1 / n)
    assert at0["max_flips"] == above["max_flips"] > 0
    assert abs(at0["max_flips"] - int(uncertain.sum())) <= 2  # the margins' own rounding
    assert at0["guaranteed_fraction"] == above["guaranteed_fraction"]
    assert at0["classes"] == above["classes"]
    assert sum(row["max_gains"] for row in at0["classes"]) > 0
    m = at0["metrics"]
    assert m["clean_pixel_accuracy"] == 1.0 == m["clean_miou"]
    assert m["worst_case_pixel_accuracy"] == pytest.approx(1 - at0["max_flips"] / n)
    assert m == above["metrics"]
    # stability: a share within max_flips costs nothing, as the answer's max_flips says
    for row in at0["stability"]:
        assert (row["eps"] == 0.0) == (row["pixels"] <= at0["max_flips"])


def test_target_metrics_reach_npz_and_png_answers(client):
    """The worst-case metrics of a posted target, as the JSON answer gives them: npz
    arrays of the same names, png headers X-Certseg-<Field-Name>."""
    body = encode(random_image(32, 48, seed=7))
    target = encode(np.arange(32 * 48).reshape(32, 48).astype(np.uint8) % 4)

    def post(fmt: str) -> httpx.Response:
        files = {"image": ("x.png", body, "image/png"), "target": ("t.png", target)}
        r = client.post("/v1/segment", params={"eps": 0.02, "format": fmt}, files=files)
        assert r.status_code == 200, r.text
        return r

    metrics = post("json").json()["metrics"]
    assert set(metrics) == {
        "worst_case_pixel_accuracy",
        "worst_case_miou",
        "clean_pixel_accuracy",
        "clean_miou",
    }
    arrays = np.load(io.BytesIO(post("npz").content))
    headers = post("png").headers
    for key, value in metrics.items():
        assert float(arrays[key]) == value, key
        name = "X-Certseg-" + "-".join(p.capitalize() for p in key.split("_"))
        assert float(headers[name]) == value, name


def test_multipart_image_only(client):
    png = encode(random_image(32, 48))
    files = {"image": ("x.png", png, "image/png")}
    r = client.post("/v1/segment", files=files)
    assert r.status_code == 200 and "metrics" not in r.json()
    # two images, or none: which one to certify is not guessed (422)
    two = [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]
    body = assert_problem(client.post("/v1/segment", files=two), 422)
    assert "2 'image' parts" in body["detail"]
    none = {"target": ("t.png", encode(np.zeros((32, 48), np.uint8)), "image/png")}
    assert "named 'image'" in assert_problem(client.post("/v1/segment", files=none), 422)["detail"]
    # a part of another name, a typo such as 'traget', would drop the metrics unsaid
    typo = {**files, "traget": ("t.png", png, "image/png")}
    detail = assert_problem(client.post("/v1/segment", files=typo), 422)["detail"]
    assert "'traget'" in detail and "image, target" in detail
    # a body cut before its closing boundary: said so, not "needs a field named 'image'"
    whole = httpx.Request("POST", "http://t/", files=files)
    cut = whole.read()[:-60]
    r = client.post(
        "/v1/segment", content=cut, headers={"Content-Type": whole.headers["content-type"]}
    )
    assert "cut short" in assert_problem(r, 422)["detail"]
    # the image whole, the target cut: not a 200 without the metrics asked for
    target = encode(np.zeros((32, 48), np.uint8))
    whole = httpx.Request(
        "POST", "http://t/", files={**files, "target": ("t.png", target, "image/png")}
    )
    body = whole.read()
    assert body.index(b'name="target"') < len(body) - 100  # the cut falls in the target
    ctype = {"Content-Type": whole.headers["content-type"]}
    r = client.post("/v1/segment", content=body[:-100], headers=ctype)
    assert "cut short" in assert_problem(r, 422)["detail"]
    assert "metrics" in client.post("/v1/segment", content=body, headers=ctype).json()
    # another media type that merely starts alike is a raw body: not an image
    odd = {"Content-Type": ctype["Content-Type"].replace("form-data", "form-datax")}
    assert_problem(client.post("/v1/segment", content=body, headers=odd), 415)


def test_format_png_and_npz(client, session):
    body = encode(random_image(33, 47, seed=9))
    r = client.post("/v1/segment?format=png", content=body)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert "Server-Timing" in r.headers and "X-Certseg-Guaranteed-Fraction" in r.headers
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.size == (47, 33) and img.mode == "P"  # indexed: at most 3K colours
        assert np.asarray(img.convert("RGB")).shape == (33, 47, 3)
    r = client.post("/v1/segment?format=npz&outputs=logits", content=body)
    assert r.status_code == 200
    arrays = np.load(io.BytesIO(r.content))
    mask, _, radius, logits = session.run(None, {"image": to_input(body)})
    np.testing.assert_array_equal(arrays["mask"], mask[0])
    np.testing.assert_array_equal(arrays["radius"], radius[0])
    np.testing.assert_array_equal(arrays["logits"], logits[0])
    assert float(arrays["eps"]) == 0.05
    assert "class_pixels" not in arrays  # classes were not asked for
    r = client.post("/v1/segment?format=npz", content=body)  # default outputs: with classes
    arrays = np.load(io.BytesIO(r.content))
    ids = np.unique(mask[0])
    np.testing.assert_array_equal(arrays["class_id"], ids)
    np.testing.assert_array_equal(arrays["class_pixels"], [(mask[0] == c).sum() for c in ids])
    assert arrays["class_max_flips"].shape == arrays["class_guaranteed_fraction"].shape == ids.shape
    np.testing.assert_array_equal(arrays["stability_fraction"], [0.01, 0.05, 0.1])
    assert arrays["stability_pixels"].dtype == np.int64 and arrays["stability_eps"].shape == (3,)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_viewers_show_the_photo(client, session, orientation):
    """A photo stored sideways with an EXIF orientation is answered upright: mask and
    radius on the grid the browser draws (90-degree turns swap width and height), a
    label map of that grid is taken and one of the stored grid refused."""
    stored = random_image(24, 40, seed=orientation)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    body = buf.getvalue()
    ans = client.post("/v1/segment?outputs=mask,radius", content=body).json()
    (h, w) = (40, 24) if orientation in (6, 8) else (24, 40)
    assert (ans["height"], ans["width"]) == (h, w)
    mask, _, radius, _ = session.run(None, {"image": to_input(body)})
    assert to_input(body).shape == (1, 3, h, w)
    np.testing.assert_array_equal(answer_png(ans["mask"]), mask[0])
    np.testing.assert_array_equal(answer_radius(ans["radius"]), float16_down(radius[0]))
    for size, status in (((h, w), 200), ((24, 40), 200 if (h, w) == (24, 40) else 422)):
        target = encode(np.zeros(size, np.uint8))
        files = {"image": ("x.png", body, "image/png"), "target": ("t.png", target, "image/png")}
        r = client.post("/v1/segment?outputs=mask", files=files)
        assert r.status_code == status, r.text


def test_request_id_echoed(client):
    r = client.post(
        "/v1/segment", content=encode(random_image(32, 48)), headers={"X-Request-ID": "abc-123"}
    )
    assert r.headers["X-Request-ID"] == "abc-123" and r.json()["request_id"] == "abc-123"
    r = client.get("/v1/models")
    assert len(r.headers["X-Request-ID"]) == 32


def test_models(client, model_dir):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "tiny"
    (m,) = body["models"]
    assert m["name"] == "tiny" and m["ready"] and m["status"] == "ready"
    assert m["num_classes"] == 4 and m["classes"] == ["road", "car", "sky", "tree"]
    assert m["has_logits"] and m["backend"] == "onnxruntime" and m["default_eps"] == 0.05


def test_docs_metrics_health_and_index(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/models", "/v2/models/{model}/infer"} <= set(paths)
    assert client.get("/healthz").json()["ready"] is True
    assert "certseg" in client.get("/").text
    client.post("/v1/segment", content=encode(random_image(32, 48)))
    text = client.get("/metrics").text
    for name in (
        "certseg_requests_total",
        "certseg_stage_latency_ms_bucket",
        "certseg_batch_size_bucket",
        "certseg_queue_depth",
        "certseg_body_bytes_in_flight 0.0",
        "certseg_stream_dropped_frames_total",
        "certseg_guaranteed_fraction_bucket",
        "certseg_model_ready",
    ):
        assert name in text, name
    assert 'route="/v1/segment"' in text and 'stage="infer"' in text
    rss = float(text.split("\nprocess_resident_memory_bytes ")[1].split()[0])
    assert 50e6 < rss < 64e9  # this process's: the interpreter with the engine loaded

    # one observation per share of the pixels, labelled by it (default outputs ask it)
    def stability_counts(text: str) -> list[float]:
        names = [f'certseg_stability_eps_count{{fraction="{a}",model="tiny"}} ' for a in SHARES]
        return [float(text.split(name)[1].split()[0]) for name in names]

    before = stability_counts(text)
    client.post("/v1/segment", content=encode(random_image(32, 48)))
    after = stability_counts(client.get("/metrics").text)
    assert [a - b for a, b in zip(after, before, strict=True)] == [1.0, 1.0, 1.0]
    for invented in ("PROPFIND", "MKCOL"):  # methods the client picks share one label
        assert client.request(invented, "/v1/models").status_code == 405
    text = client.get("/metrics").text
    assert 'method="other"' in text and "PROPFIND" not in text
    # FastAPI's own pages are labelled by their path, not lumped with 404s
    assert 'route="/openapi.json"' in text and 'route="/docs"' in text


def test_head_is_get_without_the_body(client):
    for path in ("/healthz", "/v1/models", "/v2/health/ready", "/metrics", "/"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
        if path != "/metrics":  # the scrape itself changes the counters
            assert head.headers["content-length"] == str(len(got.content)), path
    r = client.head("/v1/segment")  # a POST route: 405, naming what it takes
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
    assert client.head("/v1/nothing").status_code == 404
    text = client.get("/metrics").text
    assert 'method="HEAD",route="/v1/models",status="200"' in text


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "params",
    [
        {"outputs": "mask,bogus"},
        {"format": "gif"},
        {"blend": "2"},
        {"overlay_style": "x"},
    ],
)
def test_bad_options(client, params):
    r = client.post("/v1/segment", params=params, content=encode(random_image(32, 48)))
    assert_problem(r, 422)


def test_query_names_are_checked_on_every_v1_route(client):
    """An unknown name is a 422 that lists what the route reads (none, for /v1/models);
    the range of blend, now checked by the handler, is still in the OpenAPI schema."""
    body = assert_problem(client.get("/v1/models", params={"verbose": "1"}), 422)
    assert "'verbose'" in body["detail"] and "takes none" in body["detail"]
    r = client.post("/v1/segment", params={"outptus": "mask"}, content=encode(random_image(8, 8)))
    detail = assert_problem(r, 422)["detail"]
    assert "'outptus'" in detail and "outputs" in detail.split("known:")[1]
    params = client.get("/openapi.json").json()["paths"]["/v1/segment"]["post"]["parameters"]
    (blend,) = [p["schema"] for p in params if p["name"] == "blend"]
    assert (blend["minimum"], blend["maximum"]) == (0.0, 1.0)


def test_unknown_route(client):
    """(Bad images, eps values and model names: tests/test_bad_inputs.py.)"""
    assert_problem(client.get("/v1/nothing"), 404)
    assert_problem(client.get("/v1/segment"), 405)


def test_bad_target(client):
    img = encode(random_image(32, 48))
    wrong_size = encode(np.zeros((10, 20), np.uint8))
    r = client.post("/v1/segment", files={"image": ("a", img), "target": ("t", wrong_size)})
    assert "target mask is 10x20, the image 32x48" in assert_problem(r, 422)["detail"]
    bad_labels = encode(np.full((32, 48), 9, np.uint8))
    r = client.post("/v1/segment", files={"image": ("a", img), "target": ("t", bad_labels)})
    assert_problem(r, 422)
    r = client.post("/v1/segment", files={"other": ("a", img)})
    assert_problem(r, 422)  # multipart is a media type this route takes; no image part


# ------------------------------------------------------------------------------ auth


def test_api_key(model_dir):
    settings = Settings(models=[str(model_dir)], intra_op_threads=1, api_key="s3cret")
    srv = LiveServer(create_app(settings)).start()
    try:
        img = encode(random_image(32, 48))
        with httpx.Client(base_url=srv.base) as c:
            assert_problem(c.post("/v1/segment", content=img), 401)
            r = c.post("/v1/segment", content=img, headers={"Authorization": "Bearer wrong"})
            assert_problem(r, 401)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            r = c.post("/v1/segment", content=img, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
            assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
            # the right key in the query, where REST does not read it: the 401 says where
            r = c.post("/v1/segment", content=img, params={"api_key": "s3cret"})
            detail = assert_problem(r, 401)["detail"]
            assert "stream only" in detail and "X-API-Key" in detail, detail
            assert c.get("/v2/models/tiny").status_code == 401
            assert c.get("/v2/models/tiny").json() == {"error": "missing or wrong API key"}
            for public in ("/healthz", "/v2/health/live", "/v2/health/ready", "/docs"):
                assert c.get(public).status_code == 200, public
                assert c.head(public).status_code == 200, public
            r = c.head("/v1/models")  # refused before any route, still without a body
            assert r.status_code == 401 and r.content == b"" and int(r.headers["content-length"])
    finally:
        srv.stop()


def test_cors_off_by_default_and_configurable(client, model_dir):
    origin = {"Origin": "https://viewer.example.org"}
    r = client.get("/v1/models", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    settings = Settings(
        models=[str(model_dir)],
        intra_op_threads=1,
        api_key="s3cret",
        cors_origins="https://viewer.example.org",  # as CERTSEG_CORS_ORIGINS gives it
    )
    srv = LiveServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=srv.base) as c:
            pre = c.options(
                "/v1/segment",
                headers={
                    **origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert pre.status_code == 200  # preflights carry no key
            assert pre.headers["access-control-allow-origin"] == origin["Origin"]
            r = c.get("/v1/models", headers=origin)  # no key: 401, still readable cross-site
            assert_problem(r, 401)
            assert r.headers["access-control-allow-origin"] == origin["Origin"]
            r = c.get(
                "/v1/models", headers={"Origin": "https://evil.example", "X-API-Key": "s3cret"}
            )
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
            # a browser reads only exposed headers: every figure header an answer has
            files = {
                "image": ("x.png", encode(random_image(32, 48)), "image/png"),
                "target": ("t.png", encode(np.zeros((32, 48), np.uint8))),
            }
            r = c.post(
                "/v1/segment",
                params={"format": "png", "resize": "0.5"},
                files=files,
                headers={**origin, "X-API-Key": "s3cret"},
            )
            assert r.status_code == 200 and r.headers["access-control-allow-origin"]
            exposed = {
                h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")
            }
            sent = {h for h in r.headers if h.startswith("x-certseg-") or h == "server-timing"}
            assert {"x-certseg-resize", "x-certseg-worst-case-miou", "server-timing"} <= sent
            assert sent | {"x-request-id", "inference-header-content-length"} <= exposed
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ batching, faults


@pytest.fixture(scope="module")
def controlled(model_dir):
    """A server whose engine is the test-only ControlledEngine around the real one."""
    engine = ControlledEngine(ort_engine(model_dir))
    settings = Settings(intra_op_threads=1, max_batch=4, max_delay_ms=20, max_queue=6)
    srv = LiveServer(create_app(settings, engines=[engine])).start()
    yield srv, engine
    srv.stop()


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _hold_odd_then_queue(srv, engine, pool, post, odd: bytes, imgs: list[bytes]):
    """Hold the worker on `odd` at the engine's gate until all of `imgs` wait in the
    batcher: what shares a pass is then fixed by the batcher, not by thread timing.
    Returns the futures (odd's first); the caller sets `engine.gate` to let them run."""
    batcher = srv.app.state.server.batcher_for("tiny")
    engine.gate, calls = threading.Event(), engine.calls
    first = pool.submit(post, odd)
    _wait_for(lambda: engine.calls == calls + 1, "the odd image to reach the model")
    queued = [pool.submit(post, body) for body in imgs]
    _wait_for(lambda: batcher.depth == len(imgs), "the images to queue")
    return first, queued


def _requests_with_status(srv, status: int) -> float:
    """certseg_requests_total of POST /v1/segment with `status`, from the server's registry."""
    labels = {"route": "/v1/segment", "method": "POST", "status": str(status)}
    registry = srv.app.state.server.metrics.registry
    return registry.get_sample_value("certseg_requests_total", labels) or 0.0


def _raw_post(srv, body: bytes, declared: int) -> socket.socket:
    """A POST of `body` on a raw socket that claims `declared` bytes (left open)."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    head = "POST /v1/segment?outputs=mask HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
    sock.sendall(f"{head}Content-Length: {declared}\r\n\r\n".encode() + body)
    return sock


def test_clients_that_hang_up_leave_the_queue_and_are_not_server_errors(controlled):
    """While the worker is held, three clients send a whole image and hang up: their
    images leave the queue at once (before the worker is free), never reach the model,
    and count as 499, not 500. One that hangs up mid-body is a 499 too. (Before: all
    were run and answered to nobody, 64 such kept the queue 59 deep, and a mid-body
    hang-up was logged as an unhandled error with a 500.)"""
    srv, engine = controlled
    batcher = srv.app.state.server.batcher_for("tiny")
    left, errors = _requests_with_status(srv, 499), _requests_with_status(srv, 500)
    body = encode(random_image(32, 48, seed=4))
    engine.gate, calls = threading.Event(), engine.calls
    try:
        with ThreadPoolExecutor(1) as pool:
            url = srv.base + "/v1/segment?outputs=mask"
            held = pool.submit(httpx.post, url, content=encode(random_image(30, 40)), timeout=30)
            _wait_for(lambda: engine.calls == calls + 1, "the held image to reach the model")
            socks = [_raw_post(srv, body, len(body)) for _ in range(3)]
            _wait_for(lambda: batcher.depth == 3, "the three images to queue")
            for sock in socks:
                sock.close()
            _wait_for(lambda: batcher.depth == 0, "the abandoned images to leave the queue")
            _raw_post(srv, body[:100], 2 * len(body)).close()
            _wait_for(lambda: _requests_with_status(srv, 499) == left + 4, "four 499s")
            engine.gate.set()
            assert held.result().status_code == 200
    finally:
        engine.gate.set()
        engine.gate = None
    assert engine.calls == calls + 1  # only the held image ran
    assert _requests_with_status(srv, 500) == errors
    r = httpx.post(srv.base + "/v1/segment?outputs=mask", content=body, timeout=30)
    assert r.status_code == 200 and r.json()["batch_size"] == 1


def test_dynamic_batching_groups_same_shapes(controlled, session):
    """While the worker is busy with a 30x40 image, four 32x48 ones queue up; they
    then share one forward pass, and every answer still matches the direct session."""
    srv, engine = controlled
    imgs = [encode(random_image(32, 48, seed=i)) for i in range(4)]
    odd = encode(random_image(30, 40, seed=9))

    def post(body):
        return httpx.post(srv.base + "/v1/segment?outputs=mask", content=body, timeout=30)

    try:
        with ThreadPoolExecutor(5) as pool:
            first, queued = _hold_odd_then_queue(srv, engine, pool, post, odd, imgs)
            time.sleep(0.1)  # the queue visibly waits
            engine.gate.set()
            answers = [*(f.result() for f in queued), first.result()]
    finally:
        engine.gate.set()
        engine.gate = None
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    sizes = [r.json()["batch_size"] for r in answers]
    assert sizes == [4, 4, 4, 4, 1], sizes  # the four 32x48 images shared one pass
    for body, r in zip([*imgs, odd], answers, strict=True):
        mask = session.run(["mask"], {"image": to_input(body)})[0][0]
        np.testing.assert_array_equal(answer_png(r.json()["mask"]), mask)
    assert all(r.json()["timings_ms"]["queue"] > 50 for r in answers[:4])


def test_pass_pixel_budget_cuts_batches_and_bounds_images(model_dir):
    """--max-pass-pixels of two 32x48 images: four queued ones run as two passes of
    two, and an image larger than one pass is refused before decoding (413)."""
    engine = ControlledEngine(ort_engine(model_dir))
    settings = Settings(intra_op_threads=1, max_batch=4, max_pass_pixels=2 * 32 * 48)
    srv = LiveServer(create_app(settings, engines=[engine])).start()
    imgs = [encode(random_image(32, 48, seed=i)) for i in range(4)]

    def post(body):
        return httpx.post(srv.base + "/v1/segment?outputs=mask", content=body, timeout=30)

    try:
        with ThreadPoolExecutor(5) as pool:
            odd = encode(random_image(30, 40, seed=9))
            first, queued = _hold_odd_then_queue(srv, engine, pool, post, odd, imgs)
            engine.gate.set()
            answers = [f.result() for f in queued]
            assert first.result().status_code == 200
        assert [r.json()["batch_size"] for r in answers] == [2, 2, 2, 2]
        assert_problem(post(encode(random_image(64, 64))), 413)
        assert post(imgs[0]).status_code == 200
    finally:
        engine.gate.set()
        srv.stop()


def test_backend_fault_gives_503_then_recovers(controlled):
    srv, engine = controlled
    img = encode(random_image(32, 48))
    engine.fail = True
    try:
        r = httpx.post(srv.base + "/v1/segment", content=img, timeout=30)
    finally:
        engine.fail = False
    body = assert_problem(r, 503)
    assert "injected" not in body["detail"]  # internals stay in the log
    r = httpx.post(srv.base + "/v1/segment", content=img, timeout=30)
    assert r.status_code == 200
    assert httpx.get(srv.base + "/v2/health/ready").status_code == 200


def test_fault_mid_batch_fails_that_whole_batch_only(controlled):
    """Four same-shape images queue while the worker is busy and run as one batch; the
    backend raises on it: all four get 503 (none hangs, none gets a half answer), and
    the requests after the fault succeed."""
    srv, engine = controlled
    imgs = [encode(random_image(32, 48, seed=i)) for i in range(4)]

    def post(body):
        return httpx.post(srv.base + "/v1/segment?outputs=mask", content=body, timeout=30)

    calls = engine.calls
    try:
        with ThreadPoolExecutor(5) as pool:
            odd = encode(random_image(30, 40, seed=9))
            first, queued = _hold_odd_then_queue(srv, engine, pool, post, odd, imgs)
            engine.fail = True  # raises on the held pass and on the batch
            engine.gate.set()
            answers = [f.result() for f in queued]
            assert_problem(first.result(), 503)
    finally:
        engine.fail = False
        engine.gate.set()
        engine.gate = None
    assert engine.calls - calls == 2  # the odd one, then the four in one pass
    for r in answers:
        assert "injected" not in assert_problem(r, 503)["detail"]
    assert all(post(body).status_code == 200 for body in imgs)


def test_full_queue_gives_503_with_retry_after(controlled):
    srv, engine = controlled
    img = encode(random_image(32, 48))
    engine.gate = threading.Event()  # the worker holds its first pass: the queue fills
    try:
        with ThreadPoolExecutor(16) as pool:
            url = srv.base + "/v1/segment?outputs=mask"
            futures = [pool.submit(httpx.post, url, content=img, timeout=60) for _ in range(16)]
            # 16 images, at most 4 on the held pass and 6 queued: 6 or more refused at once
            _wait_for(lambda: sum(f.done() for f in futures) >= 6, "refusals of a full queue")
            engine.gate.set()
            answers = [f.result() for f in futures]
    finally:
        engine.gate.set()
        engine.gate = None
    codes = [r.status_code for r in answers]
    assert 200 in codes and 503 in codes, codes
    for r in answers:
        if r.status_code == 503:
            assert_problem(r, 503)
            assert int(r.headers["Retry-After"]) >= 1
    assert httpx.post(srv.base + "/v1/segment", content=img, timeout=30).status_code == 200


def test_not_ready_until_warm(model_dir):
    engine = ControlledEngine(ort_engine(model_dir))
    engine.warm_gate = threading.Event()
    srv = LiveServer(create_app(Settings(intra_op_threads=1), engines=[engine]))
    srv.start(wait_ready=False)
    try:
        with httpx.Client(base_url=srv.base) as c:
            assert c.get("/v2/health/live").status_code == 200
            time.sleep(0.1)
            r = c.get("/v2/health/ready")
            assert r.status_code == 400 and r.json() == {"ready": False}
            assert c.get("/v2/models/tiny/ready").status_code == 400
            assert c.get("/healthz").json()["models"] == {"tiny": "loading"}
            r = c.post("/v1/segment", content=encode(random_image(32, 48)))
            assert_problem(r, 503)
            assert r.headers["Retry-After"] == "1"
            engine.warm_gate.set()
            srv.wait_ready(30)
            assert c.get("/v2/models/tiny/ready").status_code == 200
            assert c.post("/v1/segment", content=encode(random_image(32, 48))).status_code == 200
    finally:
        engine.warm_gate.set()
        srv.stop()


def test_torch_backend_over_http_answers_like_onnxruntime(client):
    """The torch backend takes 8-bit frames (bytes to the engine, the exact table there):
    over a live server its REST answer is the ONNX Runtime server's, mask and radius."""
    body = encode(random_image(40, 56, seed=21))
    live = LiveServer(
        create_app(
            Settings(
                models=[str(tiny_checkpoint())], backend="torch", intra_op_threads=1, max_delay_ms=1
            )
        )
    ).start()
    try:
        with httpx.Client(base_url=live.base, timeout=60) as torch_client:
            a = torch_client.post("/v1/segment?eps=0.02&outputs=mask,radius", content=body)
        b = client.post("/v1/segment?eps=0.02&outputs=mask,radius", content=body)
        assert a.status_code == b.status_code == 200, a.text
        a, b = a.json(), b.json()
        np.testing.assert_array_equal(answer_png(a["mask"]), answer_png(b["mask"]))
        ra, rb = answer_radius(a["radius"]), answer_radius(b["radius"])
        np.testing.assert_allclose(ra, rb, atol=1e-3)
        assert a["max_flips"] == pytest.approx(b["max_flips"], abs=2)
    finally:
        live.stop()


def test_bodies_in_flight_share_one_budget(model_dir):
    """A slow upload holds most of the budget: another body that would pass it gets 503
    + Retry-After (problem+json); once the upload ends its bytes are given back."""
    body = encode(random_image(128, 160, seed=3))
    settings = Settings(intra_op_threads=1, max_body_bytes_in_flight=len(body) * 3 // 2)
    srv = LiveServer(create_app(settings, engines=[ort_engine(model_dir)])).start()
    budget = srv.app.state.server.bodies
    try:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        head = (
            f"POST /v1/segment?outputs=mask HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        slow.sendall(head.encode() + body[:-100])
        _wait_for(lambda: budget.used == len(body) - 100, "the slow upload's bytes")
        scrape = httpx.get(srv.base + "/metrics").text
        assert f"certseg_body_bytes_in_flight {float(len(body) - 100)}" in scrape
        r = httpx.post(srv.base + "/v1/segment?outputs=mask", content=body, timeout=30)
        assert_problem(r, 503)
        assert r.headers["Retry-After"] == "1"
        slow.sendall(body[-100:])
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        slow.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        _wait_for(lambda: budget.used == 0, "the budget given back")
        r = httpx.post(srv.base + "/v1/segment?outputs=mask", content=body, timeout=30)
        assert r.status_code == 200
        # (the charge is given back after the answer is sent: the client may read first)
        _wait_for(lambda: budget.used == 0, "the budget given back after an answer")
        # a request alone may hold more than the budget (an image and its target)
        target = encode(np.zeros((128, 160), np.uint8))
        files = {"image": ("i.png", body, "image/png"), "target": ("t.png", target, "image/png")}
        r = httpx.post(srv.base + "/v1/segment?outputs=mask", files=files, timeout=30)
        assert r.status_code == 200, r.text
        _wait_for(lambda: budget.used == 0, "the budget given back after a large request")
    finally:
        srv.stop()


def test_a_stalled_body_gets_408_and_gives_its_bytes_back(model_dir):
    """A client that stops sending its body mid-way is answered 408 problem+json after
    body_idle_s, its bytes leave the budget, and the server serves the next request."""
    settings = Settings(intra_op_threads=1, body_idle_s=0.3)
    srv = LiveServer(create_app(settings, engines=[ort_engine(model_dir)])).start()
    try:
        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        stalled.sendall(
            b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\x89PNG\r\n\x1a\n"
        )
        answer = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while chunk := stalled.recv(65536):  # the server closes after its answer
                answer += chunk
                stalled.sendall(b"x")  # a client that keeps trickling does not hold it
        stalled.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"application/problem+json" in answer and b"request-timeout" in answer
        assert b"connection: close" in answer.lower()
        _wait_for(lambda: srv.app.state.server.bodies.used == 0, "the budget given back")
        r = httpx.post(srv.base + "/v1/segment?outputs=mask", content=encode(random_image(8, 8)))
        assert r.status_code == 200
    finally:
        srv.stop()


def test_models_and_v2_metadata_disclose_precision_and_margin_error(client):
    """A bf16 engine's radii rest on an empirical margin-error bound, yet /v1/models and
    the V2 metadata said neither its precision nor the bound. Both now say them: fp32 and
    0 for the ONNX Runtime server, bf16 and the bound for a torch bf16 server."""
    (m,) = client.get("/v1/models").json()["models"]
    assert (m["precision"], m["margin_error"]) == ("fp32", 0.0)
    params = client.get("/v2/models/tiny").json()["parameters"]
    assert (params["precision"], params["margin_error"]) == ("fp32", 0.0)
    settings = Settings(
        models=[str(tiny_checkpoint())],
        backend="torch",
        precision="bf16",
        margin_error=0.2,
        intra_op_threads=1,
        max_delay_ms=1,
    )
    live = LiveServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=live.base, timeout=60) as c:
            (m,) = c.get("/v1/models").json()["models"]
            assert (m["backend"], m["precision"], m["margin_error"]) == ("torch", "bf16", 0.2)
            params = c.get(f"/v2/models/{m['name']}").json()["parameters"]
            assert (params["precision"], params["margin_error"]) == ("bf16", 0.2)
            schema = c.get("/openapi.json").json()["components"]["schemas"]["ModelSummary"]
            assert {"precision", "margin_error"} <= set(schema["required"])
            assert "empirical" in schema["properties"]["margin_error"]["description"]
    finally:
        live.stop()
