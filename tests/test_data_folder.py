"""Folder of image/mask pairs: matching by stem and clear errors on anything unmatched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certseg.data import FolderSegmentation


def write_pair(root: Path, stem: str, ext: str = ".png", size=(12, 20), value: int = 1) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = size
    rgb = (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)
    Image.fromarray(rgb).save(root / "images" / f"{stem}{ext}")
    mask = np.full((h, w), value, np.uint8)
    mask[0, 0] = 255
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_pairs_load_sorted_by_stem(tmp_path: Path) -> None:
    write_pair(tmp_path, "b", ".jpg", value=2)
    write_pair(tmp_path, "a", ".png", value=1)
    write_pair(tmp_path, "c", ".JPEG", value=0)
    ds = FolderSegmentation(tmp_path, num_classes=3)
    assert [p.stem for p, _ in ds.files] == ["a", "b", "c"]
    image, label = ds[0]
    assert image.dtype == np.float32 and image.shape == (3, 12, 20)
    assert label.dtype == np.int64 and label.shape == (12, 20)
    assert label[0, 0] == 255 and (label.ravel()[1:] == 1).all()
    with Image.open(tmp_path / "images" / "a.png") as im:
        np.testing.assert_array_equal(image, np.asarray(im).transpose(2, 0, 1) / np.float32(255))
    assert ds[1][1].max() == 255 and ds[-1][1][5, 5] == 0


def test_resize_keeps_ids(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", value=4)
    image, label = FolderSegmentation(tmp_path, size=(6, 10))[0]
    assert image.shape == (3, 6, 10) and label.shape == (6, 10)
    assert set(np.unique(label)) <= {4, 255}


def test_unmatched_files_are_named(tmp_path: Path) -> None:
    write_pair(tmp_path, "a")
    write_pair(tmp_path, "b")
    (tmp_path / "masks" / "b.png").unlink()
    Image.new("L", (4, 4)).save(tmp_path / "masks" / "zz.png")
    with pytest.raises(ValueError, match=r"without a mask: b.*without an image: zz"):
        FolderSegmentation(tmp_path)


def test_duplicate_stems_are_an_error(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", ".png")
    write_pair(tmp_path, "a", ".jpg")
    with pytest.raises(ValueError, match="same stem"):
        FolderSegmentation(tmp_path)


def test_missing_or_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images"):
        FolderSegmentation(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        FolderSegmentation(tmp_path)


def test_bad_masks(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", value=7)
    with pytest.raises(ValueError, match=r"values \[7\]"):
        FolderSegmentation(tmp_path, num_classes=3)[0]
    Image.new("RGB", (20, 12)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match="not single-channel"):
        FolderSegmentation(tmp_path)[0]
    Image.new("L", (7, 5)).save(tmp_path / "masks" / "a.png")  # 5 rows, 7 columns
    with pytest.raises(ValueError, match=r"is 5x7 but a\.png is 12x20"):  # HxW
        FolderSegmentation(tmp_path)[0]
