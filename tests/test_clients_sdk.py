"""The SDK (clients.sdk) against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import math
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from server_support import (
    ControlledEngine,
    LiveServer,
    encode,
    ort_engine,
    random_image,
    tiny_model_dir,
)

from clients import (
    AsyncCertSegClient,
    AuthenticationError,
    CertSegClient,
    InputRejected,
    SegmentResult,
    ServerError,
    ServiceUnavailable,
    StreamSummary,
    TransportError,
)
from clients.sdk import _Core, encode_image
from server import Settings, create_app

KEY = "s3cret"


@pytest.fixture(scope="module")
def engine():
    return ControlledEngine(ort_engine(tiny_model_dir()))


@pytest.fixture(scope="module")
def server(engine):
    settings = Settings(intra_op_threads=1, max_delay_ms=1, api_key=KEY)
    srv = LiveServer(create_app(settings, engines=[engine])).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with CertSegClient(server.base, api_key=KEY, backoff=0.01) as c:
        yield c


def test_sdk_imports_neither_server_nor_torch():
    code = (
        "import sys, clients, clients.cli; "
        "bad = [m for m in ('server', 'torch', 'certseg') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _check(r: SegmentResult, h: int, w: int) -> None:
    assert (r.height, r.width) == (h, w)
    assert r.mask is not None and r.mask.shape == (h, w) and r.mask.max() < 4
    assert r.radius is not None and r.radius.dtype == np.float32 and r.radius.shape == (h, w)
    assert r.overlay is not None and r.overlay.size == (w, h) and r.overlay.mode == "RGB"
    assert 0.0 <= r.guaranteed_fraction <= 1.0
    # the server counts radius > eps in float32; the map travels as float16 rounded
    # down, so the client never counts more, and misses only pixels within a step of eps
    assert r.guaranteed_fraction - 0.02 < r.guaranteed_fraction_at(r.eps) <= r.guaranteed_fraction
    assert 0 <= r.max_flips <= h * w
    assert r.classes is not None and sum(c.pixels for c in r.classes) == h * w
    assert [c.id for c in r.classes] == sorted(int(k) for k in np.unique(r.mask))
    for c in r.classes:
        assert c.name in ("road", "car", "sky", "tree") and 0 <= c.max_flips <= r.max_flips
        assert c.min_kept == c.pixels - c.max_flips >= 0
    # stability (a default output): the least norms that may flip 1/5/10% of the pixels
    assert [(x.fraction, x.pixels) for x in r.stability] == [
        (a, math.ceil(a * h * w)) for a in (0.01, 0.05, 0.1)
    ]
    assert all(isinstance(x.eps, float) and x.eps >= 0 for x in r.stability)
    assert [x.eps for x in r.stability] == sorted(x.eps for x in r.stability)
    assert r.lipschitz > 0 and r.model == "tiny"
    assert r.timings["total"] > 0 and r.latency_ms is not None


def test_segment_accepts_every_input_kind(client, tmp_path):
    pixels = random_image(40, 56, seed=3)
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    inputs = [
        pixels,
        pixels.astype(np.float32) / 255.0,
        Image.fromarray(pixels),
        path,
        str(path),
        encode(pixels),
    ]
    results = [client.segment(x, eps=0.05) for x in inputs]
    for r in results:
        _check(r, 40, 56)
        assert r.eps == 0.05
        np.testing.assert_array_equal(r.mask, results[0].mask)


def test_a_float_image_off_the_8_bit_grid_is_refused_never_rounded(client, server):
    """A float image that is not a multiple of 1/255 would have been rounded to 8 bits
    and the rounded image certified (the audit's: 0.15 away in l2 at eps 0.01, 5 answered
    classes not the network's on the image given). It is refused, naming the ways out;
    the V2 FP32 path it names certifies the float image as given, on the same server."""
    pixels = random_image(24, 32, seed=5)
    exact = pixels.astype(np.float64) / 255.0
    np.testing.assert_array_equal(client.segment(exact).mask, client.segment(pixels).mask)
    rng = np.random.default_rng(0)
    noisy = np.clip(exact + rng.uniform(-0.5, 0.5, exact.shape) / 255.0, 0, 1)
    noisy = noisy.astype(np.float32)
    with pytest.raises(ValueError, match=r"not 8-bit.*uint8.*/v2/models/<model>/infer"):
        client.segment(noisy)
    with pytest.raises(ValueError, match="not 8-bit"):
        encode_image(noisy)
    with pytest.raises(ValueError, match="mode F is not 8-bit"):
        client.segment(Image.fromarray(noisy[..., 0]))  # a float PIL image
    x = np.ascontiguousarray(noisy.transpose(2, 0, 1)[None])
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "mask"}],
    }
    r = httpx.post(
        server.base + "/v2/models/tiny/infer", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200, r.text


def test_16_bit_grey_goes_exactly_not_clipped_to_8_bits(client):
    """A 16-bit grey PIL image was converted to RGB (clipped to 255: another image); it
    travels as a 16-bit PNG, which the server reads exactly."""
    grey = (random_image(24, 32, seed=6)[..., 0].astype(np.int64) * 257 + 100).clip(0, 65535)
    img = Image.fromarray(grey.astype(np.uint16))
    assert img.mode == "I;16"
    body, media = encode_image(img)
    assert media == "image/png" and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), grey)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    got, want = client.segment(img), client.segment(buf.getvalue())
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.radius, want.radius)


def test_model_listing_type_matches_the_server_and_says_precision(client):
    """clients.ModelSummary names every field /v1/models gives, precision and
    margin_error among them (the SDK had no word of either)."""
    from clients import ModelsListing, ModelSummary

    listing = client.models()
    assert set(listing) == set(ModelsListing.__annotations__)
    (m,) = listing["models"]
    assert set(m) == set(ModelSummary.__annotations__)
    assert (m["precision"], m["margin_error"]) == ("fp32", 0.0)


def test_eps_changes_certificate(client):
    pixels = random_image(32, 48, seed=4)
    small, large = client.segment(pixels, eps=0.01), client.segment(pixels, eps=0.5)
    assert small.guaranteed_fraction >= large.guaranteed_fraction
    assert small.guaranteed_fraction > large.guaranteed_fraction or small.guaranteed_fraction == 0
    default = client.segment(pixels, outputs=("mask",))
    assert default.eps == 0.05 and default.radius is None and default.overlay is None
    with pytest.raises(ValueError):
        default.guaranteed()


def test_logits_output(client):
    r = client.segment(random_image(32, 48), outputs=("logits",))
    assert r.logits is not None and r.logits.shape == (4, 32, 48)
    assert np.array_equal(r.logits.argmax(0), client.segment(random_image(32, 48)).mask)


def test_resize_reaches_the_server_and_comes_back(client, server):
    img = random_image(32, 48, seed=2)
    r = client.segment(img, resize=0.5)
    assert r.resize["network"] == [16, 24] and r.resize["source"] == [32, 48]
    assert r.mask.shape == r.radius.shape == (32, 48)
    assert client.segment(img, resize="fit").resize is None  # within the limit: untouched
    (frame,) = client.stream([img], resize=0.5, max_in_flight=1)
    assert frame.ok and frame.resize["network"] == [16, 24] and frame.width == 48
    with pytest.raises(InputRejected):
        client.segment(img, resize=3.0)

    async def main():
        async with AsyncCertSegClient(server.base, api_key=KEY) as c:
            return await c.segment(img, resize=0.5)

    assert asyncio.run(main()).resize["operator_norm"] == pytest.approx(0.5)


def test_a_target_brings_the_worst_case_metrics(client, server):
    img = random_image(32, 48, seed=6)
    mask = client.segment(img, outputs=("mask",)).mask.astype(np.int64)
    target = np.where(np.arange(48)[None, :] < 12, (mask + 1) % 4, mask)  # some wrong
    target[:3] = 255  # and some unlabelled
    raw = httpx.post(
        f"{server.base}/v1/segment",
        params={"eps": 0.05, "outputs": "mask"},
        files={
            "image": ("i.png", encode(img), "image/png"),
            "target": ("t.png", encode(target.astype(np.uint8)), "image/png"),
        },
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()["metrics"]
    png = encode(target.astype(np.uint8))
    for t in (target, target.astype(np.uint8), png, Image.open(io.BytesIO(png))):
        m = client.segment(img, eps=0.05, target=t).metrics
        assert m == pytest.approx(raw)
    assert raw["worst_case_pixel_accuracy"] < raw["clean_pixel_accuracy"] < 1
    assert raw["worst_case_miou"] < raw["clean_miou"]
    assert client.segment(img, eps=0.05).metrics is None
    # through the shrink, and from the async twin
    shrunk = client.segment(img, eps=0.05, resize=0.5, target=target).metrics
    assert shrunk["worst_case_miou"] <= shrunk["clean_miou"]

    async def main():
        async with AsyncCertSegClient(server.base, api_key=KEY) as c:
            return await c.segment(img, eps=0.05, target=target)

    assert asyncio.run(main()).metrics == pytest.approx(raw)
    with pytest.raises(InputRejected):  # not the image's size
        client.segment(img, target=target[:-1])
    with pytest.raises(ValueError):
        client.segment(img, target=target.astype(np.float32))


def test_errors_are_typed_problems(server, client):
    with pytest.raises(InputRejected) as info:
        client.segment(b"\x89PNG\r\n\x1a\nnot really a png")
    assert info.value.status == 422 and info.value.title and info.value.detail
    assert info.value.type.startswith("https://") and info.value.instance == "/v1/segment"
    with pytest.raises(InputRejected) as info:
        client.segment(random_image(8, 8), eps=-1.0)
    assert info.value.status == 422
    with pytest.raises(ValueError):
        client.segment(np.full((4, 4, 3), 2.0))
    with CertSegClient(server.base, api_key="wrong") as bad, pytest.raises(AuthenticationError):
        bad.segment(random_image(8, 8))
    with pytest.raises(AuthenticationError):
        list(CertSegClient(server.base, api_key="wrong").stream([random_image(8, 8)]))
    with pytest.raises(InputRejected) as info:
        list(client.stream([random_image(8, 8)], eps=-1.0))
    assert info.value.status == 422
    assert list(client.stream([])) == []


def test_backend_fault_retries_then_raises(server, engine):
    engine.fail = True
    calls = engine.calls
    try:
        c = CertSegClient(server.base, api_key=KEY, max_retries=2, backoff=0.01)
        with c, pytest.raises(ServiceUnavailable) as info:
            c.segment(random_image(16, 16))
        assert info.value.status == 503
        assert engine.calls - calls == 3  # first try + 2 retries
    finally:
        engine.fail = False


def test_retry_after_is_honoured_and_backoff_grows():
    answers = [
        httpx.Response(
            503,
            json={"status": 503, "title": "Server overloaded", "detail": "full"},
            headers={"Retry-After": "0"},
        ),
        httpx.Response(503, json={"status": 503, "title": "Server overloaded", "detail": "full"}),
    ]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return (
            answers[len(seen) - 1]
            if len(seen) <= len(answers)
            else httpx.Response(200, json={"default": "tiny", "models": []})
        )

    with CertSegClient(
        "http://x", api_key="k", backoff=0.001, transport=httpx.MockTransport(handler)
    ) as c:
        assert c.models()["default"] == "tiny"
    assert len(seen) == 3 and seen[0].headers["authorization"] == "Bearer k"
    core = _Core("http://x", backoff=0.5, backoff_max=3.0, max_retries=4)
    err = ServiceUnavailable(503, "Server overloaded", retry_after=2.0)
    assert core.retry_delay(0, err) == 2.0
    plain = ServiceUnavailable(503, "Backend error")
    assert [core.retry_delay(i, plain) for i in range(5)] == [0.5, 1.0, 2.0, 3.0, None]
    assert core.retry_delay(0, InputRejected(422, "Invalid parameter")) is None


def test_a_proxys_json_error_is_typed_by_its_http_status():
    """A gateway's own JSON (a fault the real server never makes, hence the mock
    transport): its "status" is a word or null, the HTTP status is what counts."""
    bodies = [{"status": "fail", "message": "upstream timed out"}, {"status": None}]
    for body in bodies:
        transport = httpx.MockTransport(lambda request, b=body: httpx.Response(502, json=b))
        with (
            CertSegClient("http://x", max_retries=0, transport=transport) as c,
            pytest.raises(ServerError) as info,
        ):
            c.models()
        assert info.value.status == 502


def test_a_read_timeout_is_not_retried_and_says_what_to_change(server, engine):
    """The server has the request and works on: each retry queued the same pass
    again (a 4K image under timeout=5 ran four times). One attempt, and the error
    names the timeout."""
    engine.delay_s, calls = 1.5, engine.calls
    try:
        c = CertSegClient(server.base, api_key=KEY, timeout=0.5, max_retries=3, backoff=0.01)
        with c, pytest.raises(TransportError, match=r"timeout=0\.5 s") as info:
            c.segment(random_image(8, 8))
        assert "not retried" in str(info.value)
        time.sleep(2.0)  # the pass it started ends
    finally:
        engine.delay_s = 0.0
    assert engine.calls - calls == 1


def test_refused_connection_is_transport_error():
    from server_support import free_port

    c = CertSegClient(f"http://127.0.0.1:{free_port()}", max_retries=1, backoff=0.01)
    with c, pytest.raises(TransportError, match="after 2 attempts"):  # retried once
        c.segment(random_image(8, 8))


def test_stream_sync_in_order_without_drops(client):
    frames = [random_image(32, 48, seed=i) for i in range(12)]
    summary = StreamSummary()
    results = list(client.stream(frames, eps=0.05, max_in_flight=1, summary=summary))
    assert [r.frame for r in results] == list(range(12))
    assert summary.sent == 12 and summary.answered == 12 and summary.dropped == 0
    for r in results:
        assert r.ok and r.overlay is not None and r.overlay.size == (48, 32)
        assert r.eps == 0.05 and r.latency_ms is not None and r.latency_ms > 0
        assert r.classes is None  # not asked for
        assert r.batch_size == 1  # the server's figure, as SegmentResult has it
    assert summary.fps > 0 and summary.percentile(50) is not None
    (r,) = client.stream(frames[:1], outputs=("overlay", "classes", "stability"))
    assert r.overlay is not None and sum(c.pixels for c in r.classes) == 32 * 48
    assert [x.pixels for x in r.stability] == [16, 77, 154]  # of 32 x 48


def test_stream_frames_certified_are_the_bytes_sent_png_exact(client):
    """Pixel frames went as JPEG q90 with nothing said: the certificate was for the
    decoded JPEG (the audit's frame 2.98 away in l2). frame_format="PNG" sends them
    exactly, and every result carries the bytes its certificate speaks of."""
    frames = [random_image(32, 48, seed=10 + i) for i in range(3)]
    rest = [client.segment(f, outputs=("mask",)).mask for f in frames]
    png = list(client.stream(frames, outputs=("mask",), max_in_flight=1, frame_format="PNG"))
    jpg = list(client.stream(frames, outputs=("mask",), max_in_flight=1))
    for f, want, p, j in zip(frames, rest, png, jpg, strict=True):
        assert p.frame_bytes is not None and p.frame_bytes.startswith(b"\x89PNG")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(p.frame_bytes))), f)
        np.testing.assert_array_equal(p.mask, want)  # the frame given, certified
        assert j.frame_bytes is not None and j.frame_bytes.startswith(b"\xff\xd8\xff")
        decoded = np.asarray(Image.open(io.BytesIO(j.frame_bytes)).convert("RGB"))
        assert np.linalg.norm((decoded.astype(float) - f) / 255.0) > 0.5  # another image
        np.testing.assert_array_equal(j.mask, client.segment(j.frame_bytes).mask)
    with pytest.raises(ValueError, match="frame_format"):
        list(client.stream(frames, frame_format="TIFF"))


def test_stream_lossless_window_is_the_servers_depth_plus_one(client, server, engine):
    """ "lossless" keeps depth + 1 = 3 frames unanswered: with the model held, the server
    receives exactly 3 (one on the model, one queued, one waiting); once released,
    every frame is answered and none dropped. Sync and async clients alike."""
    frames = [encode(random_image(32, 48, seed=i), "JPEG") for i in range(8)]
    registry = server.app.state.server.metrics.registry

    def received() -> float:
        return registry.get_sample_value("certseg_stream_frames_total") or 0.0

    def held_then_released(run_stream) -> tuple[list, StreamSummary, float]:
        summary, results = StreamSummary(), []
        before = received()
        engine.gate = threading.Event()
        worker = threading.Thread(target=lambda: results.extend(run_stream(summary)))
        worker.start()
        try:
            deadline = time.monotonic() + 10
            while received() - before < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # room for a fourth frame, if the window allowed one
            held = received() - before
        finally:
            engine.gate.set()
            engine.gate = None
        worker.join(timeout=60)
        return results, summary, held

    def sync_stream(summary):
        return list(client.stream(frames, max_in_flight="lossless", summary=summary))

    def async_stream(summary):
        async def run() -> list:
            async with AsyncCertSegClient(server.base, api_key=KEY) as c:
                stream = c.stream(frames, max_in_flight="lossless", summary=summary)
                return [r async for r in stream]

        return asyncio.run(run())

    for run_stream in (sync_stream, async_stream):
        results, summary, held = held_then_released(run_stream)
        assert held == 3
        assert [r.frame for r in results] == list(range(8)) and all(r.ok for r in results)
        assert summary.dropped == 0 and summary.answered == 8
    for bad in (0, "all", True):
        with pytest.raises(ValueError, match="max_in_flight"):
            list(client.stream(frames, max_in_flight=bad))


def test_stream_live_counts_every_frame(client):
    frames = [encode(random_image(32, 48, seed=i), "JPEG") for i in range(20)]
    summary = StreamSummary()
    live = client.stream(frames, outputs=("overlay", "mask"), summary=summary, max_in_flight=None)
    results = list(live)
    assert summary.answered + summary.dropped == 20 == summary.sent
    assert results[-1].frame == 19 and results[-1].dropped == summary.dropped
    assert all(r.mask is not None and r.mask.shape == (32, 48) for r in results)


def test_stream_by_default_keeps_every_frame_of_a_list_and_the_freshest_of_an_iterator(
    client, engine
):
    """A list of 30 frames lost 27 by default (live: the server keeps the newest); a
    list is a batch now, and an iterator (a camera) is still live."""
    frames = [encode(random_image(32, 48, seed=i), "JPEG") for i in range(12)]
    engine.delay_s = 0.05
    try:
        batch, live = StreamSummary(), StreamSummary()
        results = list(client.stream(frames, summary=batch))
        list(client.stream(iter(frames), summary=live))
    finally:
        engine.delay_s = 0.0
    assert [r.frame for r in results] == list(range(12)) and batch.dropped == 0
    assert live.dropped > 0 and live.answered + live.dropped == 12


def test_stream_config_message_and_bad_frame(client):
    img = random_image(32, 48, seed=1)
    items = [img, {"eps": 0.3}, b"garbage", img]
    results = list(client.stream(items, eps=0.01, max_in_flight=1))
    assert [r.frame for r in results] == [0, 1, 2]
    assert results[0].eps == 0.01 and results[2].eps == 0.3
    assert results[1].error is not None and results[1].error.status in (415, 422)
    assert results[0].guaranteed_fraction >= results[2].guaranteed_fraction


def test_async_client(server):
    async def main():
        async with AsyncCertSegClient(server.base, api_key=KEY) as c:
            r = await c.segment(random_image(32, 48), eps=0.05)
            _check(r, 32, 48)
            summary = StreamSummary()

            async def frames():
                for i in range(8):
                    yield random_image(32, 48, seed=i)

            got = [x async for x in c.stream(frames(), max_in_flight=1, summary=summary)]
            live = StreamSummary()
            quick = [random_image(32, 48, seed=i) for i in range(10)]
            _ = [x async for x in c.stream(quick, summary=live, max_in_flight=None)]
            return got, summary, live

    got, summary, live = asyncio.run(main())
    assert [r.frame for r in got] == list(range(8)) and summary.dropped == 0
    assert live.answered + live.dropped == 10


def test_overlay_is_png_decodable(client):
    r = client.segment(random_image(24, 24))
    buf = io.BytesIO()
    r.overlay.save(buf, format="PNG")
    assert np.asarray(r.overlay).std() > 0


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host", "http://", "http://[::1"])
def test_a_url_that_is_no_server_url_is_refused_at_once(url):
    """'127.0.0.1:8000' (no http://) failed each request with UnsupportedProtocol after
    every retry's backoff; now the client refuses it when made, showing the form."""
    with pytest.raises(ValueError, match="server URL"):
        CertSegClient(url)
    with pytest.raises(ValueError, match="server URL"):
        AsyncCertSegClient(url)
