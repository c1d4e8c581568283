"""Image files read as the tensor certificates speak of, the same in `certseg certify`,
the folder data set and the server: 16-bit grey exactly (Pillow's convert("RGB") clips
it at 255, so a value of 1000 of 65535 read as white), 16-bit colour refused (Pillow
reads it as 8 bits: another image)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_support import rgb48_png

from certseg.data import FolderSegmentation, load_image
from server.decode import Limits, decode_image
from server.errors import UnsupportedMediaType


def _grey16(path: Path, h: int = 6, w: int = 10) -> np.ndarray:
    """A 16-bit grey PNG (dark: values 1000..1000+h*w*7); its exact [0, 1] values."""
    values = (1000 + 7 * np.arange(h * w).reshape(h, w)).astype(np.uint16)
    Image.fromarray(values).save(path)
    return values.astype(np.float32) / np.float32(65535)


def test_16_bit_grey_reads_exactly_as_the_server_reads_it(tmp_path):
    want = _grey16(tmp_path / "g.png")
    got = load_image(tmp_path / "g.png")
    assert got.shape == (3, 6, 10) and float(got.max()) < 0.03  # dark, not clipped white
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))
    served = decode_image((tmp_path / "g.png").read_bytes(), Limits(1 << 20, 1 << 20))
    np.testing.assert_array_equal(served.exact, got)


def test_16_bit_grey_in_a_folder_set_reads_exactly(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    want = _grey16(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((6, 10), np.uint8)).save(tmp_path / "masks" / "a.png")
    image, _ = FolderSegmentation(tmp_path, num_classes=2)[0]
    np.testing.assert_array_equal(image, np.broadcast_to(want, image.shape))


def test_16_bit_colour_is_refused_everywhere(tmp_path):
    path = tmp_path / "c.png"
    path.write_bytes(rgb48_png(6, 10))
    with pytest.raises(ValueError, match="16-bit colour PNG"):
        load_image(path)
    with pytest.raises(UnsupportedMediaType, match="16-bit colour PNG"):
        decode_image(path.read_bytes(), Limits(1 << 20, 1 << 20))
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    path.rename(tmp_path / "images" / "c.png")
    Image.fromarray(np.zeros((6, 10), np.uint8)).save(tmp_path / "masks" / "c.png")
    with pytest.raises(ValueError, match="16-bit colour PNG"):
        FolderSegmentation(tmp_path)[0]


def test_certify_cli_names_a_16_bit_colour_file(tmp_path):
    from server_support import tiny_checkpoint

    path = tmp_path / "c.png"
    path.write_bytes(rgb48_png(6, 10))
    cmd = [sys.executable, "-m", "certseg.cli", "certify", str(path), "--checkpoint",
           str(tiny_checkpoint())]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "16-bit colour PNG" in run.stderr + run.stdout
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
