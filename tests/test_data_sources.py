"""open_split: the one entry point training and evaluation use to open data."""

from __future__ import annotations

import numpy as np
import pytest

from certseg.data import (
    CityscapesSegmentation,
    SyntheticScenes,
    make_cityscapes_fixture,
    open_split,
)


def test_synthetic_split_is_selected_by_seed():
    ds = open_split("synthetic", "val", (32, 64), num_images=3, seed=5)
    assert isinstance(ds, SyntheticScenes) and len(ds) == 3
    np.testing.assert_array_equal(ds[1][1], SyntheticScenes(3, (32, 64), seed=5)[1][1])


def test_cityscapes_split(tmp_path):
    pytest.importorskip("cityscapesscripts")
    make_cityscapes_fixture(tmp_path, num_images=2, size=(32, 64), split="val")
    ds = open_split("cityscapes", "val", None, root=tmp_path)
    assert isinstance(ds, CityscapesSegmentation) and len(ds) == 2


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown data source"):
        open_split("imagenet", "val", None, root="x")
    with pytest.raises(ValueError, match="--root is required"):
        open_split("folder", "val", None)
