"""Cityscapes-format loader and fixture: exact layout, label round trips, id mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cityscapesscripts")
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from certseg.data import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SYNTHETIC_TO_CITYSCAPES_TRAIN_ID,
    CityscapesSegmentation,
    SyntheticScenes,
    cityscapes_classes,
    cityscapes_palette,
    label_ids_to_train_ids,
    make_cityscapes_fixture,
    train_ids_to_label_ids,
)

SIZE = (32, 64)
N = 5
EGO = 3


def expected_train_ids(i: int, n: int = N, size=SIZE, seed: int = 0, ego: int = EGO) -> np.ndarray:
    _, lab = SyntheticScenes(n, size, seed)[i]
    out = np.asarray(SYNTHETIC_TO_CITYSCAPES_TRAIN_ID)[lab]
    if ego:
        out[-ego:] = 255
    return out


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cs_ids")
    make_cityscapes_fixture(root, N, SIZE, seed=0, ego_rows=EGO)
    return root


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cs_train")
    make_cityscapes_fixture(root, N, SIZE, seed=0, ego_rows=EGO, write_train_ids=True)
    return root


def test_table_comes_from_cityscapesscripts() -> None:
    train = sorted({lab.trainId for lab in CS_LABELS if 0 <= lab.trainId < 255})
    assert train == list(range(19))
    assert len(cityscapes_classes()) == 19
    assert cityscapes_classes()[0] == "road" and cityscapes_classes()[18] == "bicycle"
    for name, colour in zip(SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, strict=True):
        t = SYNTHETIC_TO_CITYSCAPES_TRAIN_ID[SYNTHETIC_CLASSES.index(name)]
        assert cityscapes_classes()[t] == name
        assert cityscapes_palette()[t] == colour


def test_label_ids_to_train_ids_matches_the_official_table() -> None:
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    train = label_ids_to_train_ids(ids)
    table = {lab.id: lab.trainId for lab in CS_LABELS if lab.id >= 0}
    for i in range(256):
        want = table.get(i, 255)
        want = 255 if want < 0 or want == 255 else want
        assert train.flat[i] == want, (i, train.flat[i], want)
    # and back: the first label listed with each train id
    back = train_ids_to_label_ids(np.arange(19))
    assert [label_ids_to_train_ids(np.array([b]))[0] for b in back] == list(range(19))
    assert train_ids_to_label_ids(np.array([255]))[0] == 0  # 'unlabeled'


def test_fixture_writes_the_exact_layout(ids_root: Path, train_root: Path) -> None:
    files = sorted(str(p.relative_to(ids_root)) for p in ids_root.rglob("*") if p.is_file())
    expected = []
    for i in range(N):
        city = ("aachen", "bochum")[i * 2 // N]  # contiguous blocks per city
        stem = f"{city}_{i:06d}_000019"
        expected += [
            f"leftImg8bit/train/{city}/{stem}_leftImg8bit.png",
            f"gtFine/train/{city}/{stem}_gtFine_labelIds.png",
            f"gtFine/train/{city}/{stem}_gtFine_color.png",
        ]
    assert files == sorted(expected)
    extra = {str(p.relative_to(train_root)) for p in train_root.rglob("*_labelTrainIds.png")}
    assert extra == {e.replace("_labelIds", "_labelTrainIds") for e in expected if "labelIds" in e}
    with Image.open(ids_root / expected[0]) as im:
        assert im.mode == "RGB" and im.size == (SIZE[1], SIZE[0])
    with Image.open(ids_root / expected[1]) as lb:
        assert lb.mode == "L"
        ids = np.asarray(lb)
    assert set(np.unique(ids)) <= {1, 7, 8, 11, 21, 23, 24, 26}  # ego vehicle + our 7 classes
    assert (ids[-EGO:] == 1).all()


@pytest.mark.parametrize("which", ["ids_root", "train_root"])
def test_loader_reads_back_identical_pairs(which: str, request) -> None:
    root = request.getfixturevalue(which)
    ds = CityscapesSegmentation(root, "train")
    assert len(ds) == N and ds.num_classes == 19
    kinds = {kind for _, _, kind in ds.files}
    assert kinds == ({"labelIds"} if which == "ids_root" else {"labelTrainIds"})
    scenes = SyntheticScenes(N, SIZE, 0)
    for i in range(N):
        image, label = ds[i]
        assert image.dtype == np.float32 and image.shape == (3, *SIZE)
        assert label.dtype == np.int64 and label.shape == SIZE
        np.testing.assert_array_equal(image, scenes[i][0])  # 8-bit exact
        np.testing.assert_array_equal(label, expected_train_ids(i))


def test_auto_falls_back_per_file_and_explicit_kinds(tmp_path: Path) -> None:
    paths = make_cityscapes_fixture(tmp_path, 3, SIZE, seed=1, write_train_ids=True)
    gt = Path(str(paths[1]).replace("leftImg8bit", "gtFine", 1))
    gt.with_name(gt.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")).unlink()
    ds = CityscapesSegmentation(tmp_path)
    assert [k for _, _, k in ds.files] == ["labelTrainIds", "labelIds", "labelTrainIds"]
    for i in range(3):
        np.testing.assert_array_equal(ds[i][1], expected_train_ids(i, 3, seed=1, ego=0))
    ids_only = CityscapesSegmentation(tmp_path, labels="labelIds")
    assert {k for _, _, k in ids_only.files} == {"labelIds"}
    with pytest.raises(FileNotFoundError, match="labelTrainIds"):
        CityscapesSegmentation(tmp_path, labels="labelTrainIds")


def test_resize_and_square_crop(train_root: Path) -> None:
    ds = CityscapesSegmentation(train_root, size=(16, 32))
    image, label = ds[0]
    assert image.shape == (3, 16, 32) and label.shape == (16, 32)
    full = expected_train_ids(0)
    assert set(np.unique(label)) <= set(np.unique(full))  # nearest: no new ids
    np.testing.assert_array_equal(label, full[1::2, 1::2])  # PIL nearest, exact halving
    sq = CityscapesSegmentation(train_root, crop=True)
    image, label = sq[0]
    assert image.shape == (3, 32, 32)
    np.testing.assert_array_equal(label, full[:, 16:48])  # centred
    rnd = CityscapesSegmentation(train_root, crop=24, crop_mode="random", seed=3)
    a, b = rnd[1], CityscapesSegmentation(train_root, crop=24, crop_mode="random", seed=3)[1]
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (3, 24, 24)
    lab1 = expected_train_ids(1)
    hits = [
        (t, left)
        for t in range(SIZE[0] - 23)
        for left in range(SIZE[1] - 23)
        if np.array_equal(lab1[t : t + 24, left : left + 24], a[1])
    ]
    assert hits  # the crop is a window of the full label
    with pytest.raises(ValueError):
        CityscapesSegmentation(train_root, crop=100)[0]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesSegmentation(tmp_path)
    make_cityscapes_fixture(tmp_path, 2, SIZE, seed=0)
    for p in (tmp_path / "gtFine").rglob("*_labelIds.png"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="without"):
        CityscapesSegmentation(tmp_path)
    with pytest.raises(ValueError):
        CityscapesSegmentation(tmp_path, labels="colour")  # type: ignore[arg-type]


def test_cities_filter(ids_root: Path) -> None:
    ds = CityscapesSegmentation(ids_root, cities=["bochum"])
    assert len(ds) == sum(i * 2 // N == 1 for i in range(N))
    assert all(p.parent.name == "bochum" for p, _, _ in ds.files)
