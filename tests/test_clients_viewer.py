"""The browser viewer at / in headless Chromium (Debian chromium + chromedriver via
selenium) against a real server on 127.0.0.1: image upload, overlay pixels, the eps
slider re-certifying, and a video file streamed through the WebSocket.

Skipped when selenium, chromium or chromedriver is missing. Screenshots land in the
test's tmp dir; set CERTSEG_VIEWER_SCREENSHOT=path to also copy the image one there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_support import ControlledEngine, LiveServer, ort_engine, random_image, tiny_model_dir

from server import Settings, create_app

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
av = pytest.importorskip("av", reason="PyAV is not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver)",
    ),
]
KEY = "viewer-key"


@pytest.fixture(scope="module")
def engine():
    return ControlledEngine(ort_engine(tiny_model_dir()))


@pytest.fixture(scope="module")
def server(engine):
    settings = Settings(intra_op_threads=1, max_delay_ms=1, api_key=KEY)
    srv = LiveServer(create_app(settings, engines=[engine])).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream",  # a synthetic webcam
        "--use-fake-ui-for-media-stream",
        "--window-size=1280,860",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, js: str, timeout: float = 30.0):
    """Poll a JS expression until truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + js)
        if value:
            return value
        time.sleep(0.05)
    errors = driver.execute_script("return document.getElementById('error').textContent")
    raise AssertionError(f"timed out waiting for {js!r} (page error: {errors!r})")


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def enter_key(driver) -> None:
    """Type the API key into the page and wait for its models list."""
    driver.execute_script(
        "const k = document.getElementById('apikey'); k.value = arguments[0];"
        "k.dispatchEvent(new Event('change'));",
        KEY,
    )
    wait_for(driver, "document.getElementById('model').dataset.ready === '1'")


def upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false", field)
    field.send_keys(str(path))
    driver.execute_script("arguments[0].hidden = true", field)


def open_viewer(driver, base: str) -> None:
    """The page at `base`, once it has read the models list."""
    driver.get(base + "/")
    wait_for(driver, "document.getElementById('model').dataset.ready === '1'")


def upload_random(driver, tmp_path: Path, h: int, w: int, seed: int, name: str = "x.png") -> Path:
    """A random image of h x w saved as `name` and opened in the page."""
    path = tmp_path / name
    Image.fromarray(random_image(h, w, seed=seed)).save(path)
    upload(driver, path)
    return path


# The per-class table as [name, share %, certified %, kept %, new %] rows.
CLASS_ROWS = (
    "return [...document.querySelectorAll('#perclass tr[data-cls]')].map(r =>"
    " [r.dataset.cls, ...[...r.children].slice(2).map(c => parseFloat(c.textContent))])"
)
CANVAS_STATS = """
const c = document.getElementById('view');
if (c.style.display === 'none' || !c.width) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let sum = 0, sq = 0, n = d.length / 4;
for (let i = 0; i < d.length; i += 4) {
  const v = d[i] + d[i + 1] + d[i + 2]; sum += v; sq += v * v;
}
const mean = sum / n;
return [c.width, c.height, mean, Math.sqrt(sq / n - mean * mean)];
"""


def make_webm(path: Path, frames: int = 60, h: int = 96, w: int = 128, fps: int = 30) -> Path:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libvpx", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        base = random_image(h, 2 * w, seed=7)
        for i in range(frames):
            img = np.ascontiguousarray(base[:, i : i + w])
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_viewer_image_then_video(server, engine, browser, tmp_path):
    d = browser
    d.get(server.base + "/")
    # the models list needs the key: the page says so, then works once it is set
    wait_for(d, "document.getElementById('error').textContent.includes('401')")
    enter_key(d)
    assert "tiny" in text(d, "model")

    img_path = tmp_path / "street.png"
    Image.fromarray(random_image(120, 160, seed=2)).save(img_path)
    upload(d, img_path)
    wait_for(d, "document.getElementById('gf').textContent.endsWith('%')")
    w, h, mean, std = d.execute_script(CANVAS_STATS)
    assert (w, h) == (160, 120) and mean > 10 and std > 5  # not blank
    gf_default = text(d, "gf")
    assert text(d, "epsans") == "0.050" and text(d, "netsize") == "full size"
    # the per-class table: every predicted class, shares adding up to the image
    rows = d.execute_script(CLASS_ROWS)
    assert rows and {name for name, *_ in rows} <= {"road", "car", "sky", "tree"}
    assert abs(sum(row[1] for row in rows) - 100) < 0.5
    assert all(0 <= cert <= 100 and 0 <= kept <= 100 for _, _, cert, kept, _ in rows)
    assert all(0 <= new <= 100 for *_, new in rows)  # the tiny model has logits
    # bounds shown round toward safety, as the CLIs' (clients/bounds.py) do, on the
    # count ratios the answers carry
    from clients.bounds import fixed_up, pct_down, pct_up

    rng = np.random.default_rng(5)
    ratios = [0.99977, 1 / 3000, 0.29, 0.0012, 1.0, 0.0]
    ratios += [
        int(k) / int(n)
        for n, k in ((n, rng.integers(0, n + 1)) for n in rng.integers(1, 10**7, 300))
    ]
    shown = d.execute_script("return arguments[0].map(x => [pctDown(x), pctUp(x)])", ratios)
    assert shown == [[pct_down(x), pct_up(x)] for x in ratios]
    norms = [5.0505152, 0.5, 0.7105, 1.0, 2 / 3, *rng.random(50).tolist()]  # L, operator norms
    assert d.execute_script("return arguments[0].map(x => fixedUp(x, 3))", norms) == [
        fixed_up(x, 3) for x in norms
    ]
    assert shown[:2] == [["99.9%", "100.0%"], ["0.0%", "0.1%"]]
    # the least attack norm that may flip 1% of the pixels, whatever eps is set
    stab = text(d, "stab")
    assert stab.startswith("eps ") and float(stab[4:]) > 0, stab

    # layers and colour scale
    d.execute_script(
        "for (const id of ['showMask', 'showGuar', 'showRadius']) {"
        "  const c = document.getElementById(id); c.checked = true;"
        "  c.dispatchEvent(new Event('change')); }"
    )
    assert d.execute_script("return getComputedStyle(document.getElementById('legend')).display")
    assert d.execute_script(CANVAS_STATS)[3] > 5
    d.save_screenshot(str(tmp_path / "viewer-layers.png"))
    d.execute_script(
        "for (const id of ['showMask', 'showRadius']) {"
        "  const c = document.getElementById(id); c.checked = false;"
        "  c.dispatchEvent(new Event('change')); }"
    )

    # the eps slider re-certifies (a new POST): the answered eps and fraction change
    d.execute_script(
        "const s = document.getElementById('eps'); s.value = 0.5;"
        "s.dispatchEvent(new Event('input'));"
    )
    wait_for(d, "document.getElementById('epsans').textContent === '0.500'")
    wait_for(d, "document.getElementById('gf').textContent.endsWith('%')")
    gf_large = text(d, "gf")
    assert float(gf_large[:-1]) < float(gf_default[:-1]), (gf_default, gf_large)
    assert text(d, "stab") == stab  # eps-free: the same image, the same figure
    kept_at = {name: kept for name, _, _, kept, _ in rows}
    new_at = {name: new for name, *_, new in rows}
    wider = d.execute_script(CLASS_ROWS)  # a larger eps keeps no more, adds no fewer
    assert all(kept <= kept_at[name] for name, _, _, kept, _ in wider)
    assert any(kept < kept_at[name] for name, _, _, kept, _ in wider)
    assert all(new >= new_at[name] for name, *_, new in wider if name in new_at)
    d.save_screenshot(str(tmp_path / "viewer-image.png"))
    if os.environ.get("CERTSEG_VIEWER_SCREENSHOT"):
        shutil.copy(tmp_path / "viewer-layers.png", os.environ["CERTSEG_VIEWER_SCREENSHOT"])

    # errors are shown, not swallowed
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    upload(d, bad)
    wait_for(d, "document.getElementById('error').textContent.length > 0")

    # a video file streams through the WebSocket: frames and fps move
    d.execute_script(
        "const s = document.getElementById('eps'); s.value = 0.05;"
        "s.dispatchEvent(new Event('input'));"
    )
    engine.delay_s = 0.05  # slower than the clip's 30 fps: the viewer's window fills
    upload(d, make_webm(tmp_path / "clip.webm"))
    wait_for(d, "parseInt(document.getElementById('frames').textContent) >= 3")
    first = int(text(d, "frames"))
    wait_for(d, f"parseInt(document.getElementById('frames').textContent) > {first}")
    fps = wait_for(d, "parseFloat(document.getElementById('fps').textContent)")
    assert fps > 0
    assert text(d, "latency").endswith("ms") and text(d, "gf").endswith("%")
    assert d.execute_script(CLASS_ROWS)  # streamed frames carry the per-class table too
    assert text(d, "stab").startswith("eps ")  # and the stability
    # the viewer keeps the stream's depth of frames unanswered (the server works on both
    # at once, none waits), so a model slower than the video loses no frame
    engine.delay_s = 0.0
    assert d.execute_script("return [S.depth, S.mostInFlight]") == [2, 2]
    assert text(d, "dropped") == "0" and text(d, "inflight").endswith("of 2")
    # the key went as a subprotocol (the server answered "certseg"), not in the URL
    url, protocol = d.execute_script("return [S.ws.url, S.ws.protocol]")
    assert protocol == "certseg" and "api_key" not in url and KEY not in url
    stats = d.execute_script(CANVAS_STATS)
    assert stats[:2] == [128, 96] and stats[3] > 5
    d.save_screenshot(str(tmp_path / "viewer-stream.png"))
    assert text(d, "error") == ""


SLOW_H, SLOW_W = 80, 112  # not the other clips' 96x128


def test_viewer_sends_each_video_frame_once(server, engine, browser, tmp_path, monkeypatch):
    """A 10 fps clip and a model far faster than it: the viewer sends each decoded frame
    once, never the frame on screen again while the next one is not decoded yet (the
    engine sees no image twice; a polling viewer sent each about six times)."""
    seen: list[str] = []
    infer = engine.infer

    def recording(images, outputs):
        # this clip's frames only: a frame the last test's stream still had in flight
        # (its clip, of another size, shares this one's pictures) is not this viewer's
        seen.extend(
            hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
            for x in images
            if np.shape(x)[-2:] == (SLOW_H, SLOW_W)
        )
        return infer(images, outputs)

    monkeypatch.setattr(engine, "infer", recording)
    d = browser
    d.get(server.base + "/")
    enter_key(d)
    upload(d, make_webm(tmp_path / "slow.webm", frames=20, h=SLOW_H, w=SLOW_W, fps=10))
    wait_for(d, "document.getElementById('fps').dataset.done === '1'")
    # the clip's 20 frames at most, and the first one once more when it is shown on load
    # (seen once in 4 runs: 21 distinct images)
    assert 5 <= len(seen) <= 21, len(seen)
    assert len(set(seen)) == len(seen), f"{len(seen) - len(set(seen))} frames sent again"
    assert text(d, "error") == ""


def test_viewer_shrinks_images_over_the_servers_limit(browser, tmp_path):
    """A photo over the pixel limit is certified shrunk (resize=fit), shown at its own
    size, and the page says what the network saw."""
    settings = Settings(intra_op_threads=1, max_delay_ms=1, max_pixels=60 * 80)
    srv = LiveServer(create_app(settings, engines=[ort_engine(tiny_model_dir())])).start()
    try:
        d = browser
        open_viewer(d, srv.base)
        upload_random(d, tmp_path, 120, 160, seed=5, name="big.png")
        wait_for(d, "document.getElementById('gf').textContent.endsWith('%')")
        assert text(d, "netsize") == "60x80 (norm 0.500)" and text(d, "error") == ""
        w, h, _, std = d.execute_script(CANVAS_STATS)
        assert (w, h) == (160, 120) and std > 5
    finally:
        srv.stop()


def test_viewer_webcam_streams(server, browser, tmp_path):
    d = browser
    d.get(server.base + "/")
    enter_key(d)
    d.execute_script("document.getElementById('camera').click()")
    wait_for(d, "parseInt(document.getElementById('frames').textContent) >= 2")
    assert d.execute_script(CANVAS_STATS)[3] > 1
    # on a stream the eps slider sends a config message; later frames answer at it
    d.execute_script(
        "const s = document.getElementById('eps'); s.value = 0.3;"
        "s.dispatchEvent(new Event('input'));"
    )
    wait_for(d, "document.getElementById('epsans').textContent === '0.300'")
    d.execute_script("document.getElementById('stop').click()")
    d.save_screenshot(str(tmp_path / "viewer-webcam.png"))


def test_viewer_shows_no_certificate_of_another_image(server, browser, tmp_path):
    """After a certified image, one the server refuses (a GIF: 415) showed the first
    one's guaranteed region, flips, stability and class table; and of two images
    opened at once, the slower decode won the canvas under the other's answer."""
    d = browser
    d.get(server.base + "/")
    enter_key(d)
    upload_random(d, tmp_path, 120, 160, seed=3, name="first.png")
    wait_for(d, "document.getElementById('gf').textContent.endsWith('%')")
    gif = tmp_path / "second.gif"
    Image.fromarray(random_image(120, 160, seed=4)).save(gif)
    upload(d, gif)
    wait_for(d, "document.getElementById('error').textContent.includes('415')")
    d.execute_script(
        "document.getElementById('showGuar').checked = true;"
        "const s = document.getElementById('eps'); s.value = 0.2;"
        "s.dispatchEvent(new Event('input'));"
    )
    time.sleep(0.5)  # the debounce: a re-certify of the GIF, refused again
    assert d.execute_script("return S.radius === null && !S.layers.guar")
    for cell in ("gf", "flips", "stab", "lip"):
        assert text(d, cell) == "–", (cell, text(d, cell))
    assert d.execute_script("return document.getElementById('perclass').rows.length") == 0
    # a large image opened, then at once a small one: the small one is shown
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(random_image(1500, 2000, seed=5)).save(big)
    Image.fromarray(random_image(48, 64, seed=6)).save(small)
    for path in (big, small):
        upload(d, path)  # back to back: the second is opened while the first decodes
    wait_for(d, "document.getElementById('gf').textContent.endsWith('%')")
    time.sleep(1.0)  # the big decode, had it won, lands by now
    assert d.execute_script("return [S.file.name, S.photo.width, S.photo.height]") == [
        "small.png",
        64,
        48,
    ]
    assert d.execute_script(CANVAS_STATS)[:2] == [64, 48]


def test_viewer_keeps_eps_when_the_key_changes(server, browser, tmp_path):
    d = browser
    d.get(server.base + "/")
    enter_key(d)
    upload_random(d, tmp_path, 40, 56, seed=7)
    d.execute_script(
        "const s = document.getElementById('eps'); s.value = 0.3;"
        "s.dispatchEvent(new Event('input'));"
    )
    wait_for(d, "document.getElementById('epsans').textContent === '0.300'")
    enter_key(d)  # typed again: the models list reloads, eps stays (it was reset to 0.1)
    time.sleep(0.3)
    assert text(d, "epsval") == "0.300" and text(d, "epsans") == "0.300"


def test_viewer_stream_reconnects_after_a_server_restart(browser):
    """A restart closes the stream 1012 once its frames are answered; the page
    reconnects with backoff to the server on the same port, camera kept on. It used
    to leave the camera running with Stop disabled and never come back."""
    make = lambda port=None: LiveServer(  # noqa: E731
        create_app(
            Settings(intra_op_threads=1, max_delay_ms=1), engines=[ort_engine(tiny_model_dir())]
        ),
        port=port,
    ).start()
    srv = make()
    d = browser
    try:
        open_viewer(d, srv.base)
        d.execute_script("document.getElementById('camera').click()")
        wait_for(d, "parseInt(document.getElementById('frames').textContent) >= 2")
        srv.stop()
        wait_for(d, "document.getElementById('error').textContent.includes('reconnecting')")
        assert "1012" in text(d, "error")
        assert d.execute_script("return document.getElementById('video').srcObject.active")
        frames = int(text(d, "frames"))
        time.sleep(3.0)  # a restart takes a while (load, audit): the first retries fail
        srv = make(srv.port)
        wait_for(d, f"parseInt(document.getElementById('frames').textContent) > {frames}", 30)
        assert not d.execute_script("return document.getElementById('stop').disabled")
        assert text(d, "error") == ""  # the reconnect notice is gone once back
        d.execute_script("document.getElementById('stop').click()")
        assert d.execute_script("return document.getElementById('video').srcObject === null")
    finally:
        srv.stop()


def test_viewer_retries_an_image_refused_while_the_model_warms_up(browser, tmp_path):
    """A 503 (warming up, overloaded) is retried after its Retry-After: the image is
    certified once the model is ready, with no nudge of the slider or a re-drop."""
    import threading

    engine = ControlledEngine(ort_engine(tiny_model_dir()))
    engine.warm_gate = threading.Event()  # holds the warm-up: the model is not ready
    settings = Settings(intra_op_threads=1, max_delay_ms=1)
    srv = LiveServer(create_app(settings, engines=[engine])).start(wait_ready=False)
    try:
        d = browser
        open_viewer(d, srv.base)
        upload_random(d, tmp_path, 40, 56, seed=8)
        wait_for(d, "document.getElementById('error').textContent.includes('retrying')")
        assert "503" in text(d, "error")
        engine.warm_gate.set()
        wait_for(d, "document.getElementById('gf').textContent.endsWith('%')")
        assert text(d, "error") == ""
    finally:
        engine.warm_gate.set()
        srv.stop()
