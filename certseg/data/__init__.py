"""Data: image files, Cityscapes-format sets, synthetic scenes.

Everything here is numpy + Pillow (no torch): data sets return (image float32
(3, H, W) in [0, 1], label int64 (H, W), 255 = ignore) pairs that torch's DataLoader
collates as they are; `as_torch_dataset` makes the tensor dtypes explicit.
Cityscapes label tables come from the optional `cityscapesscripts` package.
"""

from certseg.data.cityscapes import (
    SYNTHETIC_TO_CITYSCAPES_TRAIN_ID,
    CityscapesSegmentation,
    cityscapes_classes,
    cityscapes_palette,
    label_ids_to_train_ids,
    make_cityscapes_fixture,
    train_ids_to_label_ids,
)
from certseg.data.folder import FolderSegmentation
from certseg.data.images import load_image, to_chw_float
from certseg.data.sources import SOURCES, open_split
from certseg.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_PALETTE,
    SyntheticScenes,
    colorize_label,
    contact_sheet,
    render_scene,
)
from certseg.data.transforms import (
    Augmented,
    CenterCrop,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    as_torch_dataset,
)

__all__ = [
    "SOURCES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "SYNTHETIC_TO_CITYSCAPES_TRAIN_ID",
    "Augmented",
    "CenterCrop",
    "CityscapesSegmentation",
    "Compose",
    "FolderSegmentation",
    "RandomCrop",
    "RandomHorizontalFlip",
    "SyntheticScenes",
    "as_torch_dataset",
    "cityscapes_classes",
    "cityscapes_palette",
    "colorize_label",
    "contact_sheet",
    "label_ids_to_train_ids",
    "load_image",
    "make_cityscapes_fixture",
    "open_split",
    "render_scene",
    "to_chw_float",
    "train_ids_to_label_ids",
]
