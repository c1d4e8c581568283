"""Torch eager backend: a fused certseg checkpoint (.pt) run by torch itself.

For checking an export against the model it came from, and for architectures the
exporter cannot handle yet. torch is imported when an engine is created; without it
that raises BackendUnavailable. The certificate head is the exported one
(`export.graph_head.CertificateHead`), so the answers match the ONNX graph's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.backends.base import BaseEngine
from server.engine import CardInfo, file_sha256, info_from_card
from server.errors import BackendUnavailable, ModelError
from server.settings import Settings

__all__ = ["TorchEngine"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            "the torch backend needs torch (pip install 'certseg[train]')"
        ) from exc
    return torch


class TorchEngine(BaseEngine):
    """A fused checkpoint with the export's pad -> net -> crop -> certificate head."""

    def __init__(self, name: str | None, path: Path, settings: Settings) -> None:
        self._torch = torch = _torch()
        from certseg.models import load_checkpoint

        try:
            net, card = load_checkpoint(path, fused=True)
        except Exception as exc:  # torch.load / state_dict errors of many kinds
            raise ModelError(f"{path}: cannot load the checkpoint ({exc})") from exc
        lipschitz = card.certified_lipschitz
        use_cuda = torch.cuda.is_available()
        device = f"cuda:{settings.device_id}" if use_cuda else "cpu"
        info = info_from_card(
            name or card.name,
            path,
            CardInfo.model_validate(card.to_dict()),
            lipschitz,
            backend="torch",
            platform="pytorch_libtorch",
            device=device,
            has_logits=True,
            sha256=file_sha256(path),
        )
        super().__init__(info, settings.margin_error)
        from export.graph_head import CertifiedSegmenter

        if settings.intra_op_threads:
            torch.set_num_threads(settings.intra_op_threads)
        self._device = torch.device(device)
        self._model = CertifiedSegmenter(
            net, card.num_classes, lipschitz, card.pad_multiple, with_logits=True
        )
        self._model.eval().to(self._device)

    def _run(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self._device)
            mask, margin, radius, logits = self._model(x)
        got = {"mask": mask, "margin": margin, "radius": radius, "logits": logits}
        return {n: got[n].cpu().numpy() for n in names}

    def close(self) -> None:
        self._model = None
        super().close()
