"""Open a split of a named data source: one place for training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from certseg.data.cityscapes import CityscapesSegmentation
from certseg.data.folder import FolderSegmentation
from certseg.data.synthetic import SyntheticScenes
from certseg.errors import UserError

__all__ = [
    "SOURCES",
    "describe_classes",
    "open_split",
    "placeholder_classes",
    "refuse_other_classes",
]

SOURCES = ("synthetic", "cityscapes", "folder")


def open_split(
    source: str,
    split: str,
    size: tuple[int, int] | None,
    *,
    root: str | Path | None = None,
    num_images: int = 64,
    seed: int = 0,
    cache: bool = False,
    num_classes: int | None = None,
    ignore_index: int = 255,
):
    """A data set of `source`. Synthetic scenes have no named splits: `seed` selects
    the images (training uses seed s, held-out sets another seed); `num_images` only
    applies to them. Cityscapes reads root/{leftImg8bit,gtFine}/split, folder root/split;
    a folder missing, empty or unmatched is a UserError. `num_classes` (a model's, when
    evaluating it) makes a folder set refuse label ids that are neither a class nor
    `ignore_index`: they were dropped from the figures unsaid."""
    if source == "synthetic":
        return SyntheticScenes(num_images, size or (96, 192), seed=seed, cache=cache)
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r} ({', '.join(SOURCES)})")
    if root is None:
        raise ValueError(f"--root is required for --data {source}")
    try:
        if source == "cityscapes":
            return CityscapesSegmentation(root, split, size=size)
        return FolderSegmentation(
            Path(root) / split, size=size, num_classes=num_classes, ignore_index=ignore_index
        )
    except (OSError, ValueError) as exc:  # a missing or empty folder, unmatched files
        raise UserError(f"--data {source}: {exc}") from None


def placeholder_classes(n: int) -> list[str]:
    """Names for a set that has none (a folder of ids): class0, class1, ..."""
    return [f"class{i}" for i in range(n)]


def describe_classes(classes: Sequence[str], limit: int = 20) -> str:
    """'7 classes (road, sidewalk, ...)': how a refusal shows a class set."""
    names = ", ".join(list(classes)[:limit]) + (", ..." if len(classes) > limit else "")
    return f"{len(classes)} classes ({names})"


def refuse_other_classes(checkpoint: str | Path, model_classes: Sequence[str], source: str,
                         dataset) -> None:  # fmt: skip
    """A UserError when `dataset` names classes other than the model's: scored against
    another class set (a 7-class synthetic model on 19-class Cityscapes) its figures
    compare unrelated ids. A set without names (a folder) checks its ids per mask;
    a model whose names are placeholders (trained on one) is held to the count only."""
    names = getattr(dataset, "classes", None)
    if names is None:
        return
    ours, theirs = list(model_classes), list(names)
    if ours == theirs or (ours == placeholder_classes(len(ours)) and len(ours) == len(theirs)):
        return
    raise UserError(
        f"{checkpoint} predicts {describe_classes(ours)} but --data {source} has "
        f"{describe_classes(theirs)}: evaluate it on data of the classes it was trained on"
    )
