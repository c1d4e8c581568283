"""White-box l2 attacks used to test the soundness and tightness of certificates.

All attacks take a model mapping images (N, C, H, W) in [0, 1] to logits
(N, K, H, W), measure perturbations in l2 over the whole image tensor, keep
adversarial images in the [0, 1] box and follow the input's device.
"""

from certseg.attacks.minnorm import (
    MinNormImageAttack,
    MinNormPixelAttack,
    min_norm_image,
    min_norm_pixel,
)
from certseg.attacks.pgd import (
    ImageAttack,
    PixelAttack,
    l2_norms,
    pgd_image,
    pgd_image_sweep,
    pgd_pixel,
)

__all__ = [
    "ImageAttack",
    "MinNormImageAttack",
    "MinNormPixelAttack",
    "PixelAttack",
    "l2_norms",
    "min_norm_image",
    "min_norm_pixel",
    "pgd_image",
    "pgd_image_sweep",
    "pgd_pixel",
]
