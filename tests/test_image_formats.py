"""What images certseg reads, the same everywhere: PNG, JPEG and WebP stills. The
server refuses the rest (415, test_bad_inputs.py); `certseg certify` refused none of
them (an animated PNG certified as its first frame, a GIF as a still, though the
command says its figures are the server's), and the SDK sent a re-encoded GIF's first
frame unsaid."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from certseg.data import load_image


def _frames(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)) for _ in range(n)]


def _save(path, fmt: str, frames: int = 1) -> None:
    first, *rest = _frames(frames)
    kw = {"save_all": True, "append_images": rest} if rest else {}
    first.save(path, format=fmt, **kw)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_stills_of_the_served_formats_are_read(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    _save(path, fmt)
    assert load_image(path).shape == (3, 8, 12)


@pytest.mark.parametrize(
    ("fmt", "frames", "says"),
    [("PNG", 3, "animated PNG of 3 frames"), ("WEBP", 2, "animated WEBP of 2 frames"),
     ("GIF", 1, "a GIF image"), ("BMP", 1, "a BMP image")],
)  # fmt: skip
def test_what_the_server_refuses_certify_refuses_in_one_line(tmp_path, fmt, frames, says):
    from typer.testing import CliRunner

    from certseg.cli import app

    path = tmp_path / f"x.{fmt.lower()}"
    _save(path, fmt, frames)
    with pytest.raises(ValueError, match=says):
        load_image(path)
    res = CliRunner().invoke(app, ["certify", str(path)], env={"COLUMNS": "300"})
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith("certseg certify: error: ") and says in line, line


def test_the_sdk_refuses_an_animated_file_it_would_re_encode(tmp_path):
    from clients.sdk import encode_image

    gif = tmp_path / "clip.gif"
    _save(gif, "GIF", 3)
    with pytest.raises(ValueError, match="3 frames"):
        encode_image(gif)
    still = tmp_path / "still.gif"
    _save(still, "GIF")
    data, media = encode_image(still)  # a still GIF is re-encoded as PNG, as before
    assert media == "image/png" and Image.open(io.BytesIO(data)).size == (12, 8)
