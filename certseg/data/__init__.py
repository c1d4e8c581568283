"""Data: image files, Cityscapes-format sets, synthetic scenes."""

from certseg.data.images import load_image, to_chw_float

__all__ = ["load_image", "to_chw_float"]
