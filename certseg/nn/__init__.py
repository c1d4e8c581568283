"""1-Lipschitz layers and their Lipschitz bookkeeping."""

from certseg.nn.activations import MaxMin
from certseg.nn.base import (
    LipschitzModule,
    LipSequential,
    certified_lipschitz,
    fuse_module,
    structural_lipschitz,
)
from certseg.nn.centering import BatchCentering2d, Shift2d
from certseg.nn.conv import (
    FusedConv2d,
    FusedConvTranspose2d,
    FusedLinear,
    OrthoConv2d,
    OrthoConvTranspose2d,
    OrthoLinear,
)
from certseg.nn.joins import AveragedResidual, ParallelConcat
from certseg.nn.normalization import InputNormalization
from certseg.nn.position import PositionalBias
from certseg.nn.sampling import InvertibleDownsample, InvertibleUpsample

__all__ = [
    "AveragedResidual",
    "BatchCentering2d",
    "FusedConv2d",
    "FusedConvTranspose2d",
    "FusedLinear",
    "InputNormalization",
    "InvertibleDownsample",
    "InvertibleUpsample",
    "LipSequential",
    "LipschitzModule",
    "MaxMin",
    "OrthoConv2d",
    "OrthoConvTranspose2d",
    "OrthoLinear",
    "ParallelConcat",
    "PositionalBias",
    "Shift2d",
    "certified_lipschitz",
    "fuse_module",
    "structural_lipschitz",
]
