"""Run a fused torch model at an image's own resolution.

Nets are fully convolutional: we zero-pad to the stride multiple and crop the output.
Zero padding is an isometric embedding and cropping a projection, so the composed map
keeps the model's Lipschitz constant and the certificate speaks of the image as sent.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["pad_to_multiple", "predict_logits"]


def pad_to_multiple(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (bottom/right) so H and W are multiples of `multiple`."""
    h, w = batch.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return nn.functional.pad(batch, (0, pw, 0, ph)) if ph or pw else batch


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    pad_multiple: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Logits (N, K, H, W) float32 for images (N, C, H, W) or (C, H, W) in [0, 1]."""
    batch = torch.as_tensor(images, dtype=torch.float32, device=device)
    if batch.ndim == 3:
        batch = batch[None]
    h, w = batch.shape[-2:]
    return model(pad_to_multiple(batch, pad_multiple))[..., :h, :w].float().cpu().numpy()
