"""Cityscapes-format data sets and a tiny on-disk fixture of that format.

Layout (as distributed by cityscapes-dataset.com):

    root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png   (0..18, 255)
    root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png        (ids 0..33)

The download ships labelIds; labelTrainIds are made by cityscapesscripts'
createTrainIdLabelImgs. We read labelTrainIds where present and otherwise map labelIds
through the official table. The label definitions (names, ids, train ids, colours)
come from `cityscapesscripts.helpers.labels`, imported lazily so that importing
certseg.data does not need the package (the `train` extra brings it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from certseg.data.images import checked_index, to_chw_float
from certseg.data.synthetic import SyntheticScenes
from certseg.errors import install_command
from certseg.sizes import format_size

__all__ = [
    "SYNTHETIC_TO_CITYSCAPES_TRAIN_ID",
    "CityscapesSegmentation",
    "cityscapes_classes",
    "cityscapes_labels",
    "cityscapes_palette",
    "label_ids_to_train_ids",
    "make_cityscapes_fixture",
    "train_ids_to_label_ids",
]

IGNORE_INDEX = 255
#: Our synthetic train ids (road, sidewalk, building, vegetation, sky, car, person)
#: -> Cityscapes train ids.
SYNTHETIC_TO_CITYSCAPES_TRAIN_ID: tuple[int, ...] = (0, 1, 2, 8, 10, 13, 11)

_IMAGE_SUFFIX = "_leftImg8bit.png"
_NAME_RE = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<frame>\d+)$")


def cityscapes_labels() -> list:
    """The official `Label` namedtuples (name, id, trainId, ..., color) from cityscapesscripts."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as err:  # pragma: no cover - depends on the environment
        # a ModuleNotFoundError by name: the CLI says it in one line (certseg.errors)
        raise ModuleNotFoundError(
            "Cityscapes label definitions need the 'cityscapesscripts' package, from the "
            f"`train` extra: {install_command('train')}",
            name="cityscapesscripts",
        ) from err
    return list(labels)


@functools.cache
def _train_table() -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    by_train: dict[int, object] = {}
    for lab in cityscapes_labels():
        if 0 <= lab.trainId < IGNORE_INDEX and lab.trainId not in by_train:
            by_train[lab.trainId] = lab
    n = len(by_train)
    if sorted(by_train) != list(range(n)):
        raise RuntimeError("cityscapesscripts train ids are not contiguous")
    names = tuple(by_train[t].name for t in range(n))  # type: ignore[attr-defined]
    colours = tuple(tuple(by_train[t].color) for t in range(n))  # type: ignore[attr-defined]
    return names, colours  # type: ignore[return-value]


def cityscapes_classes() -> tuple[str, ...]:
    """Names of train ids 0..18 ('road', 'sidewalk', ..., 'bicycle')."""
    return _train_table()[0]


def cityscapes_palette() -> tuple[tuple[int, int, int], ...]:
    """RGB colour of each train id, as in the official colour images."""
    return _train_table()[1]


@functools.cache
def _id_to_train_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, np.uint8)  # ids not in the table are ignored
    for lab in cityscapes_labels():
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < IGNORE_INDEX else IGNORE_INDEX
    lut.setflags(write=False)
    return lut


@functools.cache
def _train_to_id_lut() -> np.ndarray:
    """Inverse map as cityscapesscripts defines it: the first label listed with that train id
    (255 -> 'unlabeled', id 0)."""
    lut = np.zeros(256, np.uint8)
    seen: set[int] = set()
    for lab in cityscapes_labels():
        t = lab.trainId if 0 <= lab.trainId < 256 else IGNORE_INDEX
        if t not in seen and 0 <= lab.id < 256:
            seen.add(t)
            lut[t] = lab.id
    lut.setflags(write=False)
    return lut


def label_ids_to_train_ids(ids: np.ndarray) -> np.ndarray:
    """labelIds image (uint8 ids 0..33) -> train ids (uint8, 255 = ignore)."""
    return _id_to_train_lut()[np.asarray(ids).astype(np.uint8)]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (0..18, 255) -> labelIds (uint8), e.g. to write ground truth files."""
    return _train_to_id_lut()[np.asarray(train_ids).astype(np.uint8)]


def _square_side(crop: int | bool | None, h: int, w: int) -> int | None:
    if crop is None or crop is False:
        return None
    side = min(h, w) if crop is True else int(crop)
    if not 0 < side <= min(h, w):
        raise ValueError(f"square crop {side} does not fit a {h}x{w} image")
    return side


class CityscapesSegmentation:
    """Cityscapes-format split as (image float32 (3, H, W) in [0, 1], label int64 (H, W)).

    size: resize every pair to (H, W) first (image bilinear, label nearest), e.g.
    (512, 1024) for half resolution. crop: then cut a square of that side (True: the
    largest square, side min(H, W)), centred, or at a position drawn from
    (seed, index) when crop_mode="random" (deterministic per item).
    labels: "auto" reads labelTrainIds where present and maps labelIds otherwise.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        size: tuple[int, int] | None = None,
        crop: int | bool | None = None,
        crop_mode: Literal["center", "random"] = "center",
        seed: int = 0,
        labels: Literal["auto", "labelTrainIds", "labelIds"] = "auto",
        annotation: str = "gtFine",
        cities: Sequence[str] | None = None,
    ) -> None:
        if labels not in ("auto", "labelTrainIds", "labelIds"):
            raise ValueError(f"labels must be auto, labelTrainIds or labelIds, not {labels!r}")
        if crop_mode not in ("center", "random"):
            raise ValueError(f"crop_mode must be 'center' or 'random', not {crop_mode!r}")
        self.root = Path(root)
        self.split = split
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.crop = crop
        self.crop_mode = crop_mode
        self.seed = int(seed)
        image_dir = self.root / "leftImg8bit" / split
        images = sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}"))
        if cities is not None:
            images = [p for p in images if p.parent.name in set(cities)]
        if not images:
            raise FileNotFoundError(
                f"no images matching {image_dir}/<city>/*{_IMAGE_SUFFIX}"
                + (f" for cities {list(cities)}" if cities is not None else "")
            )
        self.files: list[tuple[Path, Path, str]] = []
        missing: list[str] = []
        for img in images:
            stem = img.name[: -len(_IMAGE_SUFFIX)]
            if not _NAME_RE.match(stem):
                raise ValueError(f"{img} is not named <city>_<seq>_<frame>{_IMAGE_SUFFIX}")
            gt = self.root / annotation / split / img.parent.name
            train = gt / f"{stem}_{annotation}_labelTrainIds.png"
            ids = gt / f"{stem}_{annotation}_labelIds.png"
            if labels in ("auto", "labelTrainIds") and train.is_file():
                self.files.append((img, train, "labelTrainIds"))
            elif labels in ("auto", "labelIds") and ids.is_file():
                self.files.append((img, ids, "labelIds"))
            else:
                missing.append(str(train if labels == "labelTrainIds" else ids))
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(
                f"{len(missing)} image(s) without {labels if labels != 'auto' else 'any'} "
                f"ground truth, e.g. {', '.join(missing[:5])}{more}"
            )
        if any(kind == "labelIds" for _, _, kind in self.files):
            _id_to_train_lut()  # fail now, not in a worker, if cityscapesscripts is missing

    @property
    def classes(self) -> tuple[str, ...]:
        return cityscapes_classes()

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        return cityscapes_palette()

    @property
    def num_classes(self) -> int:
        return len(cityscapes_classes())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        i = checked_index(index, len(self), "images")
        img_path, lab_path, kind = self.files[i]
        with Image.open(img_path) as im:
            image = im.convert("RGB")
        with Image.open(lab_path) as lb:
            if lb.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{lab_path}: expected a single-channel id image, got {lb.mode}")
            label = np.asarray(lb)
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"{lab_path} is {format_size(*label.shape)}, "
                f"image is {format_size(image.height, image.width)}"
            )
        if kind == "labelIds":
            if label.max(initial=0) > 255:
                raise ValueError(f"{lab_path}: label ids above 255")
            label = label_ids_to_train_ids(label)
        label = label.astype(np.uint8)
        if self.size is not None and (image.height, image.width) != self.size:
            h, w = self.size
            image = image.resize((w, h), Image.BILINEAR)
            label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        chw = to_chw_float(image)
        H, W = label.shape
        side = _square_side(self.crop, H, W)
        if side is not None:
            if self.crop_mode == "random":
                rng = np.random.default_rng([self.seed, i])
                top, left = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
            else:
                top, left = (H - side) // 2, (W - side) // 2
            chw = np.ascontiguousarray(chw[:, top : top + side, left : left + side])
            label = label[top : top + side, left : left + side]
        return chw, label.astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"CityscapesSegmentation(root={str(self.root)!r}, split={self.split!r}, "
            f"n={len(self)}, size={self.size}, crop={self.crop})"
        )


def make_cityscapes_fixture(
    root: str | Path,
    num_images: int = 4,
    size: tuple[int, int] = (64, 128),
    seed: int = 0,
    *,
    split: str = "train",
    cities: Sequence[str] = ("aachen", "bochum"),
    write_train_ids: bool = False,
    ego_rows: int = 0,
) -> list[Path]:
    """Write a tiny Cityscapes-format split from synthetic scenes; returns the image paths
    in the order CityscapesSegmentation lists them.

    Image i is SyntheticScenes(num_images, size, seed)[i] (8-bit exact); its train ids
    are SYNTHETIC_TO_CITYSCAPES_TRAIN_ID[label], except the bottom `ego_rows` rows, which
    are labelled 'ego vehicle' (id 1, ignored: train id 255) as in the real data. Always
    writes labelIds (what the download ships) and the colour image; labelTrainIds only
    when write_train_ids. Images fill the cities (sorted) in contiguous blocks.
    """
    root = Path(root)
    cities = sorted(cities)
    if not cities:
        raise ValueError("need at least one city")
    syn_to_train = np.full(256, IGNORE_INDEX, np.uint8)
    syn_to_train[: len(SYNTHETIC_TO_CITYSCAPES_TRAIN_ID)] = SYNTHETIC_TO_CITYSCAPES_TRAIN_ID
    ego_id = next(lab.id for lab in cityscapes_labels() if lab.name == "ego vehicle")
    colour_lut = np.zeros((256, 3), np.uint8)
    colour_lut[: len(cityscapes_palette())] = cityscapes_palette()
    scenes = SyntheticScenes(num_images, size, seed)
    paths: list[Path] = []
    for i in range(num_images):
        city = cities[i * len(cities) // num_images]
        stem = f"{city}_{i:06d}_000019"
        img_dir = root / "leftImg8bit" / split / city
        gt_dir = root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        image, label = scenes[i]
        rgb = np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)
        train = syn_to_train[label]
        ids = train_ids_to_label_ids(train)
        if ego_rows > 0:
            train[-ego_rows:] = IGNORE_INDEX
            ids[-ego_rows:] = ego_id
        path = img_dir / f"{stem}{_IMAGE_SUFFIX}"
        Image.fromarray(rgb).save(path)
        Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(colour_lut[train]).save(gt_dir / f"{stem}_gtFine_color.png")
        if write_train_ids:
            Image.fromarray(train).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
        paths.append(path)
    return paths
