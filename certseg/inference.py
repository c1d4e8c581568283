"""Run a fused torch model at an image's own resolution.

Nets are fully convolutional: we zero-pad to the stride multiple and crop the output.
Zero padding is an isometric embedding and cropping a projection, so the composed map
keeps the model's Lipschitz constant and the certificate speaks of the image as sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from certseg.errors import UserError

__all__ = [
    "exact_fp32",
    "pad_to_multiple",
    "padded_forward",
    "pick_device",
    "predict_logits",
    "set_exact_fp32",
]


def pick_device(name: str) -> torch.device:
    """The --device of training and evaluation: auto (CUDA when there is one) or a
    device this machine has; a misspelt or absent one is a UserError, not torch's
    assertion deep in the first .to()."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def _tf32_holders() -> list[tuple[object, str]]:
    """torch's TF32 switches, through the boolean (legacy) API.

    Why not torch >= 2.9's fp32_precision strings: in torch 2.13, once cuDNN conv and
    RNN are set to "ieee" that way, reading torch.backends.cudnn.allow_tf32 raises,
    and torch.export (the ONNX exporter) reads it. allow_tf32 = False sets both to
    "none" (inherit: IEEE), which every reader accepts.
    """
    b = torch.backends
    return [(b.cudnn, "allow_tf32"), (b.cuda.matmul, "allow_tf32")]


def set_exact_fp32() -> list[tuple[object, str, object]]:
    """Switch TF32 off for cuDNN convolutions and CUDA matmuls; returns the old flags.

    Why: torch runs float32 convolutions in TF32 on Ampere and later by default
    (torch 2.13: torch.backends.cudnn.allow_tf32 is True), rounding their inputs to 10
    mantissa bits. Logits computed so differ from the fp32 evaluation a certificate
    speaks of by ~1e-3 relative: a radius from them is not sound. Everything that
    certifies on a GPU (the torch backend, evaluate, certify) runs under this.
    """
    old = []
    for holder, attr in _tf32_holders():
        old.append((holder, attr, getattr(holder, attr)))
        setattr(holder, attr, False)
    return old


@contextmanager
def exact_fp32() -> Iterator[None]:
    """`set_exact_fp32` for the duration of a block, then the flags as they were."""
    old = set_exact_fp32()
    try:
        yield
    finally:
        for holder, attr, value in old:
            setattr(holder, attr, value)


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
    """Logits (N, K, H, W) float32 for images (N, C, H, W) or (C, H, W) in [0, 1].

    Computed in exact fp32 (no TF32), since certificates are read from them.
    """
    batch = torch.as_tensor(images, dtype=torch.float32, device=device)
    if batch.ndim == 3:
        batch = batch[None]
    with exact_fp32():
        return padded_forward(model, batch, pad_multiple).float().cpu().numpy()
