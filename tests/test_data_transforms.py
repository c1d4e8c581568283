"""Paired augmentation (seeded) and the numpy -> torch bridge."""

from __future__ import annotations

import numpy as np
import pytest

from certseg.data import (
    Augmented,
    CenterCrop,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    SyntheticScenes,
    as_torch_dataset,
)
from certseg.data.transforms import hflip_pair, resize_pair


def pair(h: int = 6, w: int = 8) -> tuple[np.ndarray, np.ndarray]:
    image = np.arange(3 * h * w, dtype=np.float32).reshape(3, h, w) / (3 * h * w)
    label = np.arange(h * w, dtype=np.int64).reshape(h, w) % 7
    return image, label


def test_flip_moves_image_and_label_together() -> None:
    image, label = pair()
    fi, fl = hflip_pair(image, label)
    np.testing.assert_array_equal(fi[:, :, 0], image[:, :, -1])
    np.testing.assert_array_equal(fl[:, 0], label[:, -1])
    assert fi.flags.c_contiguous and fl.flags.c_contiguous
    always = RandomHorizontalFlip(p=1.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(always[1], fl)
    never = RandomHorizontalFlip(p=0.0)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(never[1], label)


def test_random_crop_is_an_aligned_window_and_pads_with_ignore() -> None:
    image, label = pair(6, 8)
    ci, cl = RandomCrop((4, 5))(image, label, np.random.default_rng(1))
    assert ci.shape == (3, 4, 5) and cl.shape == (4, 5)
    hits = [
        (t, left)
        for t in range(3)
        for left in range(4)
        if np.array_equal(image[:, t : t + 4, left : left + 5], ci)
        and np.array_equal(label[t : t + 4, left : left + 5], cl)
    ]
    assert len(hits) == 1
    pi, pl = RandomCrop(10)(image, label, np.random.default_rng(0))
    assert pi.shape == (3, 10, 10) and (pl == 255).sum() == 100 - 48
    assert (pi[:, 6:, :] == 0).all()
    ci, cl = CenterCrop((2, 4))(image, label)
    np.testing.assert_array_equal(cl, label[2:4, 2:6])


def test_resize_pair() -> None:
    image, label = pair(6, 8)
    ri, rl = resize_pair(image, label, (3, 4))
    assert ri.shape == (3, 3, 4) and ri.dtype == np.float32 and rl.dtype == np.int64
    assert set(np.unique(rl)) <= set(np.unique(label))


def test_augmented_is_deterministic_per_seed_epoch_and_index() -> None:
    ds = SyntheticScenes(4, (32, 64), seed=0)
    t = Compose([RandomHorizontalFlip(), RandomCrop(24)])
    a, b = Augmented(ds, t, seed=7), Augmented(ds, t, seed=7)
    for i in (3, 0, 2):  # order of access does not matter
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], b[i][1])
    assert a[0][0].shape == (3, 24, 24)
    first = [a[i][1] for i in range(4)]
    a.set_epoch(1)
    assert any(not np.array_equal(first[i], a[i][1]) for i in range(4))
    other = Augmented(ds, t, seed=8)
    assert any(not np.array_equal(first[i], other[i][1]) for i in range(4))
    assert a.classes == ds.classes and len(a) == 4


def test_dataloader_batches_numpy_pairs_and_torch_bridge() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ds = SyntheticScenes(4, (16, 32), seed=0)
    x, y = next(iter(DataLoader(ds, batch_size=2)))  # default collate, numpy in
    assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 32)
    assert y.dtype == torch.int64 and y.shape == (2, 16, 32)
    tds = as_torch_dataset(Augmented(ds, RandomHorizontalFlip(), seed=0))
    xt, yt = tds[1]
    assert isinstance(xt, torch.Tensor) and xt.dtype == torch.float32
    assert yt.dtype == torch.int64 and len(tds) == 4 and tds.num_classes == 7
    xb, yb = next(iter(DataLoader(tds, batch_size=4)))
    assert xb.shape == (4, 3, 16, 32) and yb.shape == (4, 16, 32)
