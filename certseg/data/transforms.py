"""Paired image/label transforms, seeded augmentation, and the numpy -> torch bridge.

Why numpy: data sets here return numpy pairs (image float32 (3, H, W), label int64
(H, W)) so the data code runs on a base install without torch. Randomness always
comes from an explicit `np.random.Generator`, and `Augmented` derives one per
(seed, epoch, index): the same item gets the same augmentation whatever the worker
count or the order of access, and a new one each epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

__all__ = [
    "Augmented",
    "CenterCrop",
    "Compose",
    "PairTransform",
    "RandomCrop",
    "RandomHorizontalFlip",
    "TorchPairs",
    "as_torch_dataset",
    "crop_pair",
    "hflip_pair",
    "pad_pair",
    "resize_pair",
]

IGNORE_INDEX = 255
Pair = tuple[np.ndarray, np.ndarray]


class PairTransform(Protocol):
    """A transform of (image (3, H, W), label (H, W)) that draws randomness from rng."""

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair: ...


class SizedPairs(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Pair: ...


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def hflip_pair(image: np.ndarray, label: np.ndarray) -> Pair:
    """Mirror left-right (contiguous copies, so torch.from_numpy accepts them)."""
    return np.ascontiguousarray(image[..., ::-1]), np.ascontiguousarray(label[..., ::-1])


def pad_pair(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> Pair:
    """Pad bottom/right up to `size`: image with 0, label with ignore_index (not a class)."""
    H, W = label.shape
    ph, pw = max(0, size[0] - H), max(0, size[1] - W)
    if ph == 0 and pw == 0:
        return image, label
    image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    return image, label


def crop_pair(image: np.ndarray, label: np.ndarray, top: int, left: int, size) -> Pair:
    h, w = _hw(size)
    return (
        np.ascontiguousarray(image[:, top : top + h, left : left + w]),
        np.ascontiguousarray(label[top : top + h, left : left + w]),
    )


def resize_pair(image: np.ndarray, label: np.ndarray, size) -> Pair:
    """Resize to (H, W): image bilinear (per channel, float), label nearest (ids stay ids)."""
    h, w = _hw(size)
    if label.shape == (h, w):
        return image, label
    chans = [
        np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
        for c in image
    ]
    out = np.clip(np.stack(chans), 0.0, 1.0).astype(np.float32)
    lab = np.asarray(
        Image.fromarray(label.astype(np.int32), mode="I").resize((w, h), Image.NEAREST)
    ).astype(label.dtype)
    return out, lab


class Compose:
    """Apply transforms in order, all drawing from the same rng."""

    def __init__(self, transforms: Sequence[PairTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip:
    """Street scenes are left-right symmetric in distribution; vertical flips are not."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        if rng.random() < self.p:
            return hflip_pair(image, label)
        return image, label

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCrop:
    """A uniformly placed crop of `size` (int = square); smaller inputs are padded first
    (label padding is ignore_index, so padded pixels never count)."""

    def __init__(self, size: int | tuple[int, int], ignore_index: int = IGNORE_INDEX) -> None:
        self.size = _hw(size)
        self.ignore_index = ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Pair:
        image, label = pad_pair(image, label, self.size, self.ignore_index)
        H, W = label.shape
        top = int(rng.integers(0, H - self.size[0] + 1))
        left = int(rng.integers(0, W - self.size[1] + 1))
        return crop_pair(image, label, top, left, self.size)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size})"


class CenterCrop:
    """Deterministic central crop (evaluation counterpart of RandomCrop)."""

    def __init__(self, size: int | tuple[int, int], ignore_index: int = IGNORE_INDEX) -> None:
        self.size = _hw(size)
        self.ignore_index = ignore_index

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> Pair:
        image, label = pad_pair(image, label, self.size, self.ignore_index)
        H, W = label.shape
        top, left = (H - self.size[0]) // 2, (W - self.size[1]) // 2
        return crop_pair(image, label, top, left, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class Augmented:
    """`dataset` with `transform` applied; item i at epoch e uses rng (seed, e, i).

    Call `set_epoch(e)` between epochs for fresh augmentations (as with
    DistributedSampler). Attributes like `classes` pass through to the wrapped set.
    """

    def __init__(self, dataset: SizedPairs, transform: PairTransform, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Pair:
        i = int(index)
        if i < 0:
            i += len(self)
        image, label = self.dataset[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return self.transform(image, label, rng)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TorchPairs:
    """Map-style data set of torch tensors over a numpy pair data set (see as_torch_dataset).

    A plain module-level class (torch.utils.data.DataLoader needs only __len__ and
    __getitem__), so it pickles into spawned workers and imports torch lazily.
    """

    def __init__(self, dataset: SizedPairs) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import torch

        image, label = self.dataset[index]
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
        )

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def as_torch_dataset(dataset: SizedPairs) -> TorchPairs:
    """Tensors (float32 (3, H, W), int64 (H, W)) for torch's DataLoader.

    Not strictly needed (the default collate already turns numpy pairs into tensors),
    but it makes dtypes explicit and keeps torch out of the data modules' imports.
    """
    return TorchPairs(dataset)
