"""Torch backend: a fused certseg checkpoint (.pt) run by torch, on the CPU or a GPU.

The certificate head is the exported one (`export.graph_head.CertifiedSegmenter`),
so the answers match the ONNX graph's. torch is imported when an engine is created;
without it that raises BackendUnavailable.

On a GPU this is the backend that needs nothing beyond torch (no TensorRT, no
onnxruntime-gpu), and its hot path keeps host-device traffic to the minimum: the
batch is staged in pinned host memory and copied asynchronously, the net, the
certificate head and (for fp16/bf16) the margin correction run on the device, and
only the requested planes come back, with one synchronisation per batch.

Precision. fp32 runs with TF32 switched off (`certseg.inference.set_exact_fp32`):
torch's default TF32 convolutions would change the logits the certificate speaks
of. fp16 and bf16 run the net in that dtype (the head in fp32 on its logits) and
certify only with a measured margin error bound (`Settings.margin_error`).

The device part is `served_forward`: the 8-bit table (eager), then the net, head and
correction (`device_forward`) eager, or with ``torch_compile`` compiled by inductor
per input size (`server.backends.compiled`), and with ``cuda_graphs`` replayed from a
CUDA graph captured per input shape (`server.backends.cuda_graphs`), of the compiled
function when both are on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from certseg.certify.numerics import certified_margins
from certseg.errors import EXTRA_OF_MODULE, install_command
from server.backends.base import BaseEngine, check_precision
from server.backends.compiled import CompiledForward
from server.backends.cuda_graphs import GraphCache
from server.batcher import images_per_pass
from server.decode import chw8_to_float
from server.engine import CardInfo, file_sha256, info_from_card
from server.errors import BackendUnavailable, ModelError
from server.settings import Settings

__all__ = ["TorchEngine"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            f"the torch backend needs torch ({install_command(EXTRA_OF_MODULE['torch'])})"
        ) from exc
    return torch


class TorchEngine(BaseEngine):
    """A fused checkpoint with the export's pad -> net -> crop -> certificate head."""

    corrects_margins = True  # on the device, in device_forward
    converts_uint8 = True  # through a 256-entry table, on the device

    def __init__(
        self, name: str | None, path: Path, settings: Settings, calibrating: bool = False
    ) -> None:
        self._torch = torch = _torch()
        from certseg.inference import set_exact_fp32
        from certseg.models import load_checkpoint

        precision = settings.precision
        check_precision(
            "torch", precision, ("fp32", "fp16", "bf16"), settings.margin_error, calibrating
        )
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
            precision=precision,
        )
        info.accepts_uint8 = True
        super().__init__(info, settings.margin_error, calibrating)
        from export.graph_head import CertifiedSegmenter

        if settings.intra_op_threads:
            torch.set_num_threads(settings.intra_op_threads)
        set_exact_fp32()
        self._device = torch.device(device)
        self.precision = precision
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            precision
        ]
        self._model = CertifiedSegmenter(
            net, card.num_classes, lipschitz, card.pad_multiple, with_logits=True
        )
        self._model.eval().to(self._device)
        self._model.net.to(self._dtype)
        if use_cuda:  # cuDNN's fastest layout for convolutions, tensor cores included
            self._model.to(memory_format=torch.channels_last)
        self._staging: Any = None  # pinned host buffer for the batch (CUDA only)
        # float32 value of each 8-bit level, on the device (made here: a compiled or
        # captured forward must not create it on its first call)
        table = chw8_to_float(np.arange(256, dtype=np.uint8))
        self._levels = torch.from_numpy(table).to(self._device)
        self._batch_limit = settings.batch_limit(device)
        self._xp = array_namespace(self._levels)  # torch's, for certified_margins
        # What is compiled and captured takes float32: 8-bit frames are converted before
        # it (an exact table gather), so one graph per size serves both kinds of input,
        # and warm-up and calibration (float32) run the graph that serves 8-bit frames.
        forward = self.device_forward
        self.compiled: CompiledForward | None = None
        if settings.torch_compile:
            forward = self.compiled = CompiledForward(torch, forward)
        self._graphs: GraphCache | None = None
        if settings.cuda_graphs and use_cuda:
            pass_pixels, pad = settings.pass_pixels(device), card.pad_multiple

            def cap(height: int, width: int) -> int:
                return images_per_pass(self._batch_limit, pass_pixels, height, width, pad)

            forward = self._graphs = GraphCache(torch, forward, settings.cuda_graph_cache, cap)
        self._forward = forward

    def warmup(self, sizes: Sequence[tuple[int, int, int]]) -> None:
        """A compiled engine also warms batch 2 of each size when it serves batches: one
        graph covers every batch of 2 or more, and its compile belongs before ready."""
        sizes = list(sizes)
        if self.compiled is not None and self._batch_limit > 1:
            sizes += [(2, h, w) for n, h, w in sizes if n == 1]
        super().warmup(sizes)

    def upload(self, images: np.ndarray) -> Any:
        """The batch on the device as float32 in [0, 1] (see `stage`, `_to_float`)."""
        return self._to_float(self.stage(images))

    def served_forward(self, raw: Any) -> dict[str, Any]:
        """Every output of a staged batch (`stage`) on the device, as served: eager,
        compiled and/or replayed from a CUDA graph (the outputs of a replay are
        overwritten by the next one)."""
        return self._forward(self._to_float(raw))

    def stage(self, images: np.ndarray) -> Any:
        """The batch on the device: on CUDA as it came (uint8 or float32) through a reused
        pinned buffer and an async copy, uint8 as bytes, a quarter of float32's; on the
        CPU already converted to float32."""
        torch = self._torch
        if self._device.type != "cuda":  # numpy's conversion: exact, and 9x a CPU gather
            x = np.ascontiguousarray(images)
            return torch.from_numpy(chw8_to_float(x) if x.dtype == np.uint8 else x)
        host = torch.from_numpy(np.ascontiguousarray(images))
        need = host.numel()
        staging = self._staging
        if staging is None or staging.numel() < need or staging.dtype != host.dtype:
            self._staging = torch.empty(need, dtype=host.dtype, pin_memory=True)
        staged = self._staging[:need].view(host.shape)
        staged.copy_(host)
        return staged.to(self._device, non_blocking=True)

    def _to_float(self, x: Any) -> Any:
        """uint8 levels become v / 255 through a 256-entry table of the CPU conversion's
        own values (`server.decode.chw8_to_float`): exact by construction, whatever the
        device's division does with a scalar divisor."""
        torch = self._torch
        if x.dtype != torch.uint8:
            return x.to(torch.float32)
        return self._levels[x.to(torch.int32)]

    def device_logits(self, x: Any) -> Any:
        """Padded fp32 logits of a device batch x (float32, in [0, 1]): the net alone."""
        if self._device.type == "cuda":
            x = x.contiguous(memory_format=self._torch.channels_last)
        return self._model.padded_logits(x.to(self._dtype)).float()

    def device_forward(self, x: Any) -> dict[str, Any]:
        """Every output of a device batch x as device tensors (nothing copied back).

        For callers that keep results on the GPU, and for timing the net and the
        certificate head apart (benchmarks/gpu.py)."""
        h, w = x.shape[-2], x.shape[-1]
        logits = self.device_logits(x)
        mask, margin, radius = self._model.head(logits, h, w)
        if self.margin_error > 0:
            margin, radius = certified_margins(
                margin, self.margin_error, self.info.lipschitz, self._xp
            )
        return {"mask": mask, "margin": margin, "radius": radius, "logits": logits[:, :, :h, :w]}

    def _run(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            got = self.served_forward(self.stage(images))
            if self._device.type != "cuda":
                return {n: got[n].numpy() for n in names}
            host = {n: got[n].to("cpu", non_blocking=True) for n in names}
            torch.cuda.current_stream(self._device).synchronize()
        return {n: t.numpy() for n, t in host.items()}

    def close(self) -> None:
        self._model = self._staging = None
        super().close()
