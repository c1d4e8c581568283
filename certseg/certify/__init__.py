"""Certificates for 1-Lipschitz segmentation nets: numpy-only, torch tensors welcome.

From one forward pass (logits) and the net's l2 Lipschitz bound L: per-pixel
margins and certified radii, the guaranteed region at a given eps, the joint
budget (how many pixels one attack of norm eps can flip), and worst-case pixel
accuracy, IoU, Dice, FNR per image and over a whole data set. Every function is
written once against the array API: numpy in, numpy out; torch in, torch out.
torch is never imported here (the server runs without it).
"""

from .budget import (
    STABILITY_FRACTIONS,
    attack_budget,
    flip_costs,
    fraction_counts,
    frontier_min_ratio,
    max_flips,
    max_flips_by_class,
    max_gains_by_class,
    split_frontier,
    stability,
    stability_rows,
    worst_ratio,
)
from .dataset import DatasetCertificate, DatasetCertifier, dinkelbach_min_ratio
from .metrics import (
    certified_pixel_accuracy,
    worst_case_dice,
    worst_case_fnr,
    worst_case_fwiou,
    worst_case_iou,
    worst_case_miou,
    worst_case_pixel_accuracy,
)
from .numerics import certified_margins, float16_down, radius_scale_for
from .pixelwise import certified_radius, guaranteed_region, margins

__all__ = [
    "STABILITY_FRACTIONS",
    "DatasetCertificate",
    "DatasetCertifier",
    "attack_budget",
    "certified_margins",
    "certified_pixel_accuracy",
    "certified_radius",
    "dinkelbach_min_ratio",
    "flip_costs",
    "float16_down",
    "fraction_counts",
    "frontier_min_ratio",
    "guaranteed_region",
    "margins",
    "max_flips",
    "max_flips_by_class",
    "max_gains_by_class",
    "radius_scale_for",
    "split_frontier",
    "stability",
    "stability_rows",
    "worst_case_dice",
    "worst_case_fnr",
    "worst_case_fwiou",
    "worst_case_iou",
    "worst_case_miou",
    "worst_case_pixel_accuracy",
    "worst_ratio",
]
