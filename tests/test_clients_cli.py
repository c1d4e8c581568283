"""`certseg client segment|stream` (clients.cli) against a real server on 127.0.0.1."""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_support import (
    LiveServer,
    ort_engine,
    random_image,
    tiny_model_dir,
    tiny_model_dir_without_logits,
)
from typer.testing import CliRunner

from clients.cli import app, radius_heatmap
from server import Settings, create_app

av = pytest.importorskip("av")
KEY = "cli-key"


@pytest.fixture(scope="module")
def server():
    settings = Settings(intra_op_threads=1, max_delay_ms=1, api_key=KEY)
    srv = LiveServer(create_app(settings, engines=[ort_engine(tiny_model_dir())])).start()
    yield srv
    srv.stop()


def make_video(path: Path, frames: int = 60, h: int = 48, w: int = 64) -> Path:
    """A small H.264 (or MPEG-4) clip of moving blobs."""
    with av.open(str(path), mode="w") as out:
        try:
            stream = out.add_stream("libx264", rate=Fraction(30))
        except Exception:
            stream = out.add_stream("mpeg4", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        base = random_image(h, 2 * w, seed=5)
        for i in range(frames):
            img = np.ascontiguousarray(base[:, i % w : i % w + w])
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    with av.open(str(path)) as c:
        frames = [f for f in c.decode(video=0)]
    return len(frames), (frames[0].width, frames[0].height)


def test_segment_writes_three_pngs_per_image(server, tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(random_image(40, 56, seed=i)).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["segment", *paths, "--eps", "0.05", "--out", str(out), "--url", server.base],
        env={"CERTSEG_API_KEY": KEY, "COLUMNS": "160"},
    )
    assert res.exit_code == 0, res.output
    for i in range(2):
        for kind in ("overlay", "mask", "radius"):
            with Image.open(out / f"img{i}_{kind}.png") as img:
                assert img.size == (56, 40)
    assert "guaranteed" in res.output and "img1.png" in res.output
    assert "40x56" in res.output  # the size column: HxW, as the server writes sizes
    assert re.search(r"\d+\.\d%", res.output)
    assert len(re.findall(r"│\s+eps (\d\.\d+(e-\d+)?)\s+│", res.output)) == 2  # 1% flips at


def test_segment_classes_prints_the_per_class_certificate(server, tmp_path):
    img = tmp_path / "street.png"
    Image.fromarray(random_image(40, 56, seed=3)).save(img)
    args = ["segment", str(img), "--out", str(tmp_path / "o"), "--url", server.base]
    env = {"CERTSEG_API_KEY": KEY, "COLUMNS": "200"}
    plain = CliRunner().invoke(app, args, env=env)
    res = CliRunner().invoke(app, [*args, "--classes"], env=env)
    assert plain.exit_code == 0 and res.exit_code == 0, res.output
    assert "per class" not in plain.output and "street.png per class" in res.output
    # one row per predicted class: name, pixels, certified %, max flips, kept >= %, gains
    cells = r"│ (road|car|sky|tree)\s+│\s+(\d+) │\s+([\d.]+)% │\s+(\d+) │\s+([\d.]+)% │\s+(\d+) │"
    rows = re.findall(cells, res.output)
    assert rows and sum(int(row[1]) for row in rows) == 40 * 56


def test_segment_classes_on_a_model_without_logits_leaves_gains_out(tmp_path):
    """--classes asks for gains only when the model has logits (they read them): a
    model exported without gets its per-class table, gains shown as "-"."""
    settings = Settings(intra_op_threads=1, max_delay_ms=1, api_key=KEY)
    engine = ort_engine(tiny_model_dir_without_logits())
    srv = LiveServer(create_app(settings, engines=[engine])).start()
    try:
        img = tmp_path / "street.png"
        Image.fromarray(random_image(40, 56, seed=3)).save(img)
        args = ["segment", str(img), "--out", str(tmp_path / "o"), "--url", srv.base, "--classes"]
        res = CliRunner().invoke(app, args, env={"CERTSEG_API_KEY": KEY, "COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        rows = re.findall(r"│ (road|car|sky|tree)\s+│\s+(\d+) │.*│\s+- │", res.output)
        assert rows and sum(int(row[1]) for row in rows) == 40 * 56
    finally:
        srv.stop()


def test_segment_with_labels_reports_the_worst_case_metrics(server, tmp_path):
    img, labels = tmp_path / "street.png", tmp_path / "labels"
    pixels = random_image(40, 56, seed=7)
    Image.fromarray(pixels).save(img)
    labels.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 4, (40, 56), dtype=np.uint8)).save(
        labels / "street.png"
    )
    args = ["segment", str(img), "--out", str(tmp_path / "o"), "--url", server.base]
    env = {"CERTSEG_API_KEY": KEY, "COLUMNS": "200"}
    res = CliRunner().invoke(app, [*args, "--labels", str(labels)], env=env)
    assert res.exit_code == 0, res.output
    assert "worst mIoU" in res.output
    assert re.search(r"0\.\d{3} \(0\.\d{3}\)", res.output)  # worst (clean)
    res = CliRunner().invoke(app, [*args, "--labels", str(tmp_path / "none")], env=env)
    assert res.exit_code != 0 and "label map" in res.output


def test_segment_reports_errors_and_exits_nonzero(server, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    res = CliRunner().invoke(
        app,
        ["segment", str(bad), "--out", str(tmp_path / "o"), "--url", server.base],
        env={"CERTSEG_API_KEY": KEY},
    )
    assert res.exit_code == 1 and "422" in res.output


def test_stream_video_writes_annotated_video(server, tmp_path):
    video = make_video(tmp_path / "clip.mp4")
    out = tmp_path / "annotated.mp4"
    res = CliRunner().invoke(
        app,
        ["stream", str(video), "--out", str(out), "--url", server.base, "--api-key", KEY],
        env={"COLUMNS": "160"},
    )
    assert res.exit_code == 0, res.output
    m = re.search(r"(\d+) answered \+ (\d+) dropped = (\d+) sent; wrote (\d+) frames", res.output)
    assert m, res.output
    answered, dropped, sent, written = map(int, m.groups())
    assert sent == 60 and answered + dropped == 60 and written == answered
    n, size = count_frames(out)
    assert n == answered and size == (64, 48)
    assert dropped == 0  # lockstep (--max-in-flight 1) loses nothing
    assert "fps" in res.output and "p99" in res.output


def test_stream_live_mode_accounts_for_drops(server, tmp_path):
    video = make_video(tmp_path / "clip.mp4", frames=30)
    out = tmp_path / "live.mp4"
    res = CliRunner().invoke(
        app,
        ["stream", str(video), "-o", str(out), "--url", server.base, "--max-in-flight", "0"],
        env={"CERTSEG_API_KEY": KEY, "COLUMNS": "160"},
    )
    assert res.exit_code == 0, res.output
    m = re.search(r"(\d+) answered \+ (\d+) dropped = (\d+) sent; wrote (\d+) frames", res.output)
    answered, dropped, sent, written = map(int, m.groups())
    assert answered + dropped == sent == 30 and count_frames(out)[0] == written == answered


def test_stream_refused_key_exits_nonzero(server, tmp_path):
    video = make_video(tmp_path / "clip.mp4", frames=2)
    res = CliRunner().invoke(
        app,
        ["stream", str(video), "-o", str(tmp_path / "x.mp4"), "--url", server.base],
        env={"CERTSEG_API_KEY": "nope"},
    )
    assert res.exit_code == 1 and "stream failed" in res.output


@pytest.mark.timeout(120)
def test_stream_out_formats_folders_and_bad_videos(server, tmp_path):
    """The codec is picked when the file opens (WebM gets VP9/VP8); a muxer that refuses
    frames ends the stream with exit 1 and a message, never a hang; --out's folder is
    made; a file that is not a video is a usage error."""
    video = make_video(tmp_path / "clip.mp4", frames=4)
    env = {"CERTSEG_API_KEY": KEY, "COLUMNS": "160"}
    for out in (tmp_path / "a.webm", tmp_path / "new" / "dir" / "a.mkv"):
        res = CliRunner().invoke(
            app, ["stream", str(video), "-o", str(out), "--url", server.base], env=env
        )
        assert res.exit_code == 0, res.output
        assert count_frames(out)[0] == 4
    res = CliRunner().invoke(
        app, ["stream", str(video), "-o", str(tmp_path / "a.png"), "--url", server.base], env=env
    )
    assert res.exit_code == 1 and "cannot write" in res.output  # an image muxer: one frame
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    res = CliRunner().invoke(app, ["stream", str(junk), "--url", server.base], env=env)
    assert res.exit_code == 2 and "not a video" in res.output


def test_stream_input_errors_are_one_line(server, tmp_path):
    """A camera that does not open and a negative --max-in-flight are usage errors (exit
    2); a video that opens but whose frames do not decode ends with exit 1 and says so,
    not "cannot write" (the muxer's message) nor a traceback."""
    env = {"CERTSEG_API_KEY": KEY, "COLUMNS": "200"}
    video = make_video(tmp_path / "clip.mp4")
    res = CliRunner().invoke(app, ["stream", "--camera", "99", "--url", server.base], env=env)
    assert res.exit_code == 2 and "cannot open camera /dev/video99" in res.output, res.output
    both = ["stream", str(video), "--camera", "0", "--url", server.base]
    res = CliRunner().invoke(app, both, env=env)
    assert res.exit_code == 2 and "not both" in res.output, res.output
    args = ["stream", str(video), "--max-in-flight", "-1", "--url", server.base]
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 2 and "--max-in-flight" in res.output, res.output
    data = bytearray(video.read_bytes())
    start = data.find(b"mdat") + 58  # frames' bytes, past the first ones; the index intact
    data[start : start + 2000] = np.random.default_rng(0).bytes(2000)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(av.error.FFmpegError), av.open(str(bad)) as c:  # opens, fails to decode
        for _ in c.decode(video=0):
            pass
    res = CliRunner().invoke(app, ["stream", str(bad), "--url", server.base], env=env)
    assert res.exit_code == 1 and f"cannot decode {bad}" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_segment_reports_a_file_that_is_no_image_and_goes_on(server, tmp_path):
    """A file that is no image is refused by the server (415), printed, and the next
    image is still segmented; the exit status is 1."""
    bad, good = tmp_path / "bad.png", tmp_path / "good.png"
    bad.write_text("just text")
    Image.fromarray(random_image(40, 56, seed=1)).save(good)
    args = ["segment", str(bad), str(good), "--out", str(tmp_path / "o"), "--url", server.base]
    res = CliRunner().invoke(app, args, env={"CERTSEG_API_KEY": KEY, "COLUMNS": "200"})
    assert res.exit_code == 1, res.output
    assert "bad.png" in res.output and "415" in res.output
    assert (tmp_path / "o" / "good_overlay.png").is_file()
    assert "wrote 3 files" in res.output and "1 failed" in res.output


def test_segment_outputs_of_images_that_share_a_stem_do_not_collide(server, tmp_path):
    """a/x.png, b/x.jpg and a/x.jpg: each writes its own three PNGs under its path below
    the images' common folder (the extension kept where only it differs), the count
    written is the files on disk, and the size column is HxW."""
    imgs = tmp_path / "imgs"
    paths = [imgs / "a" / "x.png", imgs / "b" / "x.jpg", imgs / "a" / "x.jpg"]
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(40, 56, seed=i)).save(p)
    out = tmp_path / "o"
    args = ["segment", *map(str, paths), "--out", str(out), "--url", server.base]
    res = CliRunner().invoke(app, args, env={"CERTSEG_API_KEY": KEY, "COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    names = ("a/x.png", "b/x", "a/x.jpg")
    written = sorted(str(f.relative_to(out)) for f in out.rglob("*.png"))
    assert written == sorted(f"{n}_{k}.png" for n in names for k in ("overlay", "mask", "radius"))
    assert "wrote 9 files" in res.output
    assert all(f"│ {p.relative_to(imgs).as_posix()} " in res.output for p in paths)
    assert "40x56" in res.output


def test_segment_reports_an_image_without_its_label_map_and_goes_on(server, tmp_path):
    """--labels with a map for x but none for y: x is scored, y is reported by name,
    and the exit status is 1 at the end."""
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(labels / "x.png")
    paths = [tmp_path / "x.png", tmp_path / "y.png"]
    for i, p in enumerate(paths):
        Image.fromarray(random_image(40, 56, seed=i)).save(p)
    args = ["segment", *map(str, paths), "--out", str(tmp_path / "o"), "--url", server.base]
    env = {"CERTSEG_API_KEY": KEY, "COLUMNS": "200"}
    res = CliRunner().invoke(app, [*args, "--labels", str(labels)], env=env)
    assert res.exit_code == 1, res.output
    assert "y.png: no label map" in res.output and "wrote 3 files" in res.output
    assert "1 failed" in res.output and (tmp_path / "o" / "x_mask.png").is_file()
    assert re.search(r"│ x\.png\s+│.*0\.\d{3} \(0\.\d{3}\)", res.output)  # x scored


def test_segment_takes_folders_and_finds_label_maps_by_path(server, tmp_path):
    """A folder stands for its images (it was "no such file"). Label maps are looked up
    as the images' tree (labels/a/x.png), else by a stem no other image shares: a/x.png
    and b/x.jpg both took labels/x.png, silently. --resize adds what the network saw."""
    imgs, labels = tmp_path / "imgs", tmp_path / "labels"
    for i, rel in enumerate(("a/x.png", "b/x.jpg", "b/y.png")):
        (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(40, 56, seed=i)).save(imgs / rel)
    (imgs / "notes.txt").write_text("not an image")
    (labels / "a").mkdir(parents=True)
    zeros = Image.fromarray(np.zeros((40, 56), np.uint8))
    zeros.save(labels / "a" / "x.png")  # a/x: by path
    zeros.save(labels / "y.png")  # b/y: by its stem, which no other image has
    args = ["segment", str(imgs), "--out", str(tmp_path / "o"), "--url", server.base]
    env = {"CERTSEG_API_KEY": KEY, "COLUMNS": "220"}
    res = CliRunner().invoke(app, [*args, "--labels", str(labels), "--resize", "0.5"], env=env)
    assert res.exit_code == 1, res.output  # b/x has no map of its own
    assert "b/x.jpg: no label map" in res.output and "another image's too" in res.output
    assert re.search(r"│ a/x\.png\s+│\s+40x56\s+│\s+20x28\s+│.*0\.\d{3} \(0\.\d{3}\)", res.output)
    assert re.search(r"│ b/y\.png\s+│.*0\.\d{3} \(0\.\d{3}\)", res.output)
    assert "wrote 6 files" in res.output and "1 failed" in res.output


def test_a_missing_label_map_names_both_places_looked_and_a_missing_folder_is_refused(
    server, tmp_path
):
    """The message named only the stem fallback (labels/y.png) for b/y.png, whose map a
    user puts at labels/b/y.png; a --labels folder that does not exist failed image by
    image after the requests, where a missing image is refused before any (exit 2)."""
    imgs, labels = tmp_path / "imgs", tmp_path / "labels"
    for i, rel in enumerate(("a/x.png", "b/y.png")):
        (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(40, 56, seed=i)).save(imgs / rel)
    (labels / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(labels / "a" / "x.png")
    args = ["segment", str(imgs), "--out", str(tmp_path / "o"), "--url", server.base]
    env = {"CERTSEG_API_KEY": KEY, "COLUMNS": "300"}
    res = CliRunner().invoke(app, [*args, "--labels", str(labels)], env=env)
    assert res.exit_code == 1, res.output
    said = f"no label map {labels / 'b' / 'y.png'} (nor {labels / 'y.png'})"
    assert said in res.output.replace("\n", ""), res.output
    args[3] = str(tmp_path / "o2")
    res = CliRunner().invoke(app, [*args, "--labels", str(tmp_path / "nodir")], env=env)
    assert res.exit_code == 2 and "is not a folder of label maps" in res.output, res.output
    assert not (tmp_path / "o2").exists()  # refused before any request or file
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["segment", str(empty), "--url", server.base], env=env)
    assert res.exit_code == 2 and "holds no images" in res.output


def test_radius_heatmap_colours():
    radius = np.linspace(0, 0.2, 50, dtype=np.float32).reshape(5, 10)
    img = np.asarray(radius_heatmap(radius, eps=0.05))
    assert img.shape == (5, 10, 3)
    assert img[-1, -1].tolist() == [253, 231, 37]  # radius >= 2 eps: top of the scale
    assert img[0, 0].sum() < img[-1, -1].sum()


def test_bounds_are_shown_rounded_toward_safety():
    """A lower bound shown never reads above it, an upper bound never below: a class
    that keeps 99.977% of its pixels read "kept >= 100.0%" when rounded to nearest."""
    from clients.bounds import down3, fixed_down, pct_down, pct_up

    rng = np.random.default_rng(0)
    for x in [0.01636, 0.016399, 6e-6, 1.0, 0.999999, 123.456, *rng.lognormal(-3, 3, 500)]:
        shown = float(down3(float(x)))
        assert shown <= x and shown >= x * (1 - 1.1e-2), (x, down3(float(x)))
    assert down3(0.0) == "0"
    counts = [
        (int(k), int(n)) for n in rng.integers(1, 10**7, 500) for k in [rng.integers(0, n + 1)]
    ]
    for x in [*(k / n for k, n in counts), *rng.random(500)]:
        low, high = float(pct_down(x)[:-1]), float(pct_up(x)[:-1])
        assert low <= 100 * x + 1e-12 and 100 * x - low < 0.1 + 1e-12, (x, low)
        assert high >= 100 * x - 1e-12 and high - 100 * x < 0.1 + 1e-12, (x, high)
        assert 0 <= x - float(fixed_down(x)) < 1e-3 + 1e-15
    assert (pct_down(0.99977), pct_up(1 / 3000), fixed_down(0.89951)) == ("99.9%", "0.1%", "0.899")
    assert (pct_down(0.29), pct_down(1.0), pct_up(0.0), pct_down(0.05, 2)) == (
        "29.0%", "100.0%", "0.0%", "5.00%"
    )  # fmt: skip


def test_folders_are_walked_through_symlinks_and_one_image_named_twice_keeps_its_map(tmp_path):
    """rglob skipped a symlinked folder; resolve() moved the common folder when one file
    was a link; the same image given twice counted as two stems and lost its map."""
    from clients.cli import _expand, _label_maps, _output_names

    imgs, elsewhere, labels = tmp_path / "imgs", tmp_path / "elsewhere", tmp_path / "labels"
    (imgs / "a").mkdir(parents=True)
    elsewhere.mkdir()
    labels.mkdir()
    for path in (imgs / "a" / "x.png", elsewhere / "y.png"):
        Image.fromarray(random_image(8, 8)).save(path)
    (imgs / "linked").symlink_to(elsewhere, target_is_directory=True)
    (imgs / "linked" / "loop").symlink_to(imgs, target_is_directory=True)  # a cycle
    found = _expand([imgs])
    assert [p.relative_to(imgs).as_posix() for p in found] == ["a/x.png", "linked/y.png"]
    names = _output_names(found)
    assert [label for label, _ in names.values()] == ["a/x.png", "linked/y.png"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(labels / "x.png")
    x = imgs / "a" / "x.png"
    twice = [Path(os.path.relpath(x)), x.absolute(), imgs / "linked" / "y.png"]  # x twice
    maps = _label_maps(_output_names(twice), labels)
    assert maps[twice[0]] == labels / "x.png" and maps[twice[1]] == labels / "x.png"


def test_a_url_without_its_scheme_is_a_usage_error(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(random_image(8, 8)).save(img)
    res = CliRunner().invoke(app, ["segment", str(img), "--url", "127.0.0.1:8000"])
    assert res.exit_code == 2 and "http(s)://host[:port]" in res.output, res.output
