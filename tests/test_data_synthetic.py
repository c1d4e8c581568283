"""Synthetic street scenes: determinism, value ranges, class coverage, a visual preview."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certseg.data import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticScenes,
    contact_sheet,
    render_scene,
)
from certseg.data.synthetic import colorize_label

SIZE = (96, 192)
PERSON, CAR = SYNTHETIC_CLASSES.index("person"), SYNTHETIC_CLASSES.index("car")


@pytest.fixture(scope="module")
def scenes32() -> list[tuple[np.ndarray, np.ndarray]]:
    ds = SyntheticScenes(32, SIZE, seed=0)
    return [ds[i] for i in range(len(ds))]


def test_classes_and_palette() -> None:
    assert SYNTHETIC_CLASSES == (
        "road",
        "sidewalk",
        "building",
        "vegetation",
        "sky",
        "car",
        "person",
    )
    assert len(SYNTHETIC_PALETTE) == 7
    assert len(set(SYNTHETIC_PALETTE)) == 7


def test_same_seed_same_arrays_and_different_seeds_differ() -> None:
    a, b = SyntheticScenes(3, (48, 96), seed=5), SyntheticScenes(3, (48, 96), seed=5)
    c = SyntheticScenes(3, (48, 96), seed=6)
    for i in range(3):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], b[i][1])
        assert not np.array_equal(a[i][0], c[i][0])
    assert not np.array_equal(a[0][0], a[1][0])  # items differ within a set
    # item i depends on (seed, i, size) only, not on the set's length or access order
    np.testing.assert_array_equal(SyntheticScenes(10, (48, 96), seed=5)[2][1], a[2][1])
    np.testing.assert_array_equal(a[-1][0], a[2][0])


def test_render_scene_is_a_pure_function_of_the_rng() -> None:
    x1, y1 = render_scene(np.random.default_rng(123), (40, 80))
    x2, y2 = render_scene(np.random.default_rng(123), (40, 80))
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_dtypes_shapes_and_ranges(scenes32) -> None:
    for image, label in scenes32[:8]:
        assert image.dtype == np.float32 and image.shape == (3, *SIZE)
        assert label.dtype == np.int64 and label.shape == SIZE
        assert image.flags.c_contiguous and label.flags.c_contiguous
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert label.min() >= 0 and label.max() < len(SYNTHETIC_CLASSES)
        # 8-bit levels: survives a PNG round trip exactly
        np.testing.assert_array_equal(np.round(image * 255) / np.float32(255), image)
        assert image.std() > 0.05  # not a flat picture


@pytest.mark.parametrize("size", [(8, 8), (32, 32), (50, 77), (128, 96), (256, 512)])
def test_other_sizes(size) -> None:
    image, label = render_scene(np.random.default_rng(0), size)
    assert image.shape == (3, *size) and label.shape == size


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), (4, 4))
    with pytest.raises(ValueError):
        SyntheticScenes(-1)
    with pytest.raises(IndexError):
        SyntheticScenes(2)[2]


def test_every_class_appears_and_small_classes_are_not_rare(scenes32) -> None:
    labels = np.stack([lab for _, lab in scenes32])
    present = np.array([(labels == c).any(axis=(1, 2)).mean() for c in range(7)])
    freq = np.bincount(labels.ravel(), minlength=7) / labels.size
    # each class in most images, so a trained model sees it often and no IoU is 0
    assert present.min() >= 0.7, dict(zip(SYNTHETIC_CLASSES, present.round(2), strict=True))
    assert freq[PERSON] >= 0.005, freq
    assert freq[CAR] >= 0.02, freq
    assert freq.max() <= 0.5, freq  # nothing swamps the rest


def test_colours_overlap_between_classes(scenes32) -> None:
    """No channel threshold separates classes: per-class colour ranges overlap."""
    images = np.stack([im for im, _ in scenes32]).transpose(0, 2, 3, 1).reshape(-1, 3)
    labels = np.stack([lab for _, lab in scenes32]).ravel()
    lo = np.array([np.percentile(images[labels == c], 10, axis=0) for c in range(7)])
    hi = np.array([np.percentile(images[labels == c], 90, axis=0) for c in range(7)])
    for a in range(7):
        overlapping = [
            b for b in range(7) if b != a and np.all(lo[a] < hi[b]) and np.all(lo[b] < hi[a])
        ]
        assert overlapping, SYNTHETIC_CLASSES[a]


def test_cache_returns_identical_items() -> None:
    plain, cached = (
        SyntheticScenes(2, (32, 64), seed=3),
        SyntheticScenes(2, (32, 64), seed=3, cache=True),
    )
    for _ in range(2):  # fill, then hit
        for i in range(2):
            np.testing.assert_array_equal(plain[i][0], cached[i][0])
            np.testing.assert_array_equal(plain[i][1], cached[i][1])


def test_colorize_label_maps_ignore_to_black() -> None:
    lab = np.array([[0, 6], [255, 3]])
    rgb = colorize_label(lab)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == SYNTHETIC_PALETTE[0] and tuple(rgb[0, 1]) == SYNTHETIC_PALETTE[6]
    assert tuple(rgb[1, 0]) == (0, 0, 0)


def test_contact_sheet_png(scenes32, tmp_path: Path) -> None:
    sheet = contact_sheet(scenes32[:6])
    assert sheet.dtype == np.uint8 and sheet.shape == (6 * (SIZE[0] + 2) - 2, 2 * SIZE[1] + 2, 3)
    Image.fromarray(sheet).save(tmp_path / "synthetic_preview.png")
    big = Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST)
    with contextlib.suppress(OSError):  # a copy for a human to look at; never fail over it
        big.save("/tmp/synthetic_preview.png")
    with Image.open(tmp_path / "synthetic_preview.png") as back:
        assert back.size == (sheet.shape[1], sheet.shape[0])
