"""A folder of image/mask pairs: the simplest way to bring your own labelled data.

    root/images/<stem>.png|.jpg|.jpeg    RGB (or grey/palette; converted to RGB)
    root/masks/<stem>.png                single-channel class ids (L, P or I), 255 = ignore

Pairs are matched by file stem. Any image without a mask, mask without an image, or
stem present twice is an error listing the offending names: silently dropping files
would train or certify on a different set than the user thinks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from certseg.data.images import checked_index, exact_grey, refuse_wide_colour, to_chw_float
from certseg.sizes import format_size

__all__ = ["FolderSegmentation"]

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MASK_EXTENSIONS = (".png",)


def _listing(folder: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    found: dict[str, Path] = {}
    dupes: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in extensions:
            if p.stem in found:
                dupes.append(f"{found[p.stem].name} / {p.name}")
            found[p.stem] = p
    if dupes:
        raise ValueError(f"{what} with the same stem in {folder}: {', '.join(dupes[:10])}")
    return found


def _names(stems: list[str], limit: int = 10) -> str:
    more = f" ... ({len(stems)} in all)" if len(stems) > limit else ""
    return ", ".join(stems[:limit]) + more


class FolderSegmentation:
    """(image float32 (3, H, W) in [0, 1], label int64 (H, W)) pairs from two folders.

    size: resize each pair to (H, W) (image bilinear, mask nearest). num_classes: if
    given, every mask value must be < num_classes or == ignore_index (checked on
    load, with the file named). classes/palette are optional metadata for display.
    """

    def __init__(
        self,
        root: str | Path,
        images: str = "images",
        masks: str = "masks",
        *,
        size: tuple[int, int] | None = None,
        num_classes: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        classes: Sequence[str] | None = None,
        palette: Sequence[tuple[int, int, int]] | None = None,
    ) -> None:
        self.root = Path(root)
        image_files = _listing(self.root / images, IMAGE_EXTENSIONS, "images")
        mask_files = _listing(self.root / masks, MASK_EXTENSIONS, "masks")
        no_mask = sorted(set(image_files) - set(mask_files))
        no_image = sorted(set(mask_files) - set(image_files))
        if no_mask or no_image:
            parts = []
            if no_mask:
                parts.append(f"{len(no_mask)} image(s) without a mask: {_names(no_mask)}")
            if no_image:
                parts.append(f"{len(no_image)} mask(s) without an image: {_names(no_image)}")
            raise ValueError(f"unmatched files under {self.root}: " + "; ".join(parts))
        if not image_files:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise FileNotFoundError(f"no images ({exts}) in {self.root / images}")
        self.files: list[tuple[Path, Path]] = [
            (image_files[s], mask_files[s]) for s in sorted(image_files)
        ]
        self.size = None if size is None else (int(size[0]), int(size[1]))
        if classes is not None and num_classes is None:
            num_classes = len(classes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.classes = tuple(classes) if classes is not None else None
        self.palette = tuple(tuple(c) for c in palette) if palette is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        i = checked_index(index, len(self), "pairs")
        img_path, mask_path = self.files[i]
        with Image.open(img_path) as im:
            refuse_wide_colour(im, img_path)
            grey = exact_grey(im)  # 16-bit grey as float in [0, 1] ("F"), not cut to 8 bits
            image = Image.fromarray(grey) if grey is not None else im.convert("RGB")
        with Image.open(mask_path) as mk:
            if mk.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(
                    f"{mask_path}: mask mode {mk.mode} is not single-channel; masks must hold "
                    "class ids (not colours)"
                )
            mask = np.asarray(mk).astype(np.int64)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"{mask_path} is {format_size(*mask.shape)} but {img_path.name} is "
                f"{format_size(image.height, image.width)}"
            )
        if self.size is not None and mask.shape != self.size:
            h, w = self.size
            image = image.resize((w, h), Image.BILINEAR)
            mask = np.asarray(
                Image.fromarray(mask.astype(np.int32), mode="I").resize((w, h), Image.NEAREST)
            ).astype(np.int64)
        if self.num_classes is not None:
            bad = ((mask >= self.num_classes) & (mask != self.ignore_index)) | (mask < 0)
            if bad.any():
                vals = np.unique(mask[bad])[:10].tolist()
                raise ValueError(
                    f"{mask_path}: values {vals} are neither class ids < {self.num_classes} "
                    f"nor ignore ({self.ignore_index})"
                )
        return to_chw_float(image), mask

    def __repr__(self) -> str:
        return f"FolderSegmentation(root={str(self.root)!r}, n={len(self)}, size={self.size})"
