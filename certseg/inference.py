"""Run a fused torch model at an image's own resolution.

Nets are fully convolutional: we zero-pad to the stride multiple and crop the output.
Zero padding is an isometric embedding and cropping a projection, so the composed map
keeps the model's Lipschitz constant and the certificate speaks of the image as sent.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["pad_to_multiple", "padded_forward", "predict_logits"]


def pad_to_multiple(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (bottom/right) so H and W are multiples of `multiple`.

    Written without branches on the sizes, so it traces into the exported graph with
    symbolic H, W (export.graph_head uses it too).
    """
    if multiple <= 1:
        return batch
    h, w = batch.shape[-2], batch.shape[-1]
    m = multiple
    return nn.functional.pad(batch, (0, (m - w % m) % m, 0, (m - h % m) % m))


def padded_forward(model: nn.Module, batch: torch.Tensor, pad_multiple: int) -> torch.Tensor:
    """Logits at the batch's own H, W: pad, run, crop."""
    h, w = batch.shape[-2], batch.shape[-1]
    return model(pad_to_multiple(batch, pad_multiple))[..., :h, :w]


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
    return padded_forward(model, batch, pad_multiple).float().cpu().numpy()
