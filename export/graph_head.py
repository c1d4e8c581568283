"""The exported network: pad -> fused net -> certificate head -> crop (torch).

What goes into model.onnx (and what the server's eager backend runs) is
`CertifiedSegmenter`: it takes an image (N, 3, H, W) in [0, 1] of any H, W, pads it
with zeros at the bottom/right to the model's stride multiple, runs the fused
1-Lipschitz net, turns the logits into the certificate: mask (int32), margin =
top1 - top2 (float32) and radius = margin / (sqrt(2) L) with L the audited
constant, and crops those planes back to H x W. (The head is per pixel, so cropping
its three output planes instead of the K logit planes gives the same result for
less memory traffic.)

Why padding and cropping keep the certificate: zero padding is an isometric
embedding (||pad(x) - pad(y)|| = ||x - y||) and cropping is a coordinate
projection (norm 1), so pad -> f -> crop is L-Lipschitz whenever f is, and the
radius speaks of the image the user sent, at its own resolution.

The head runs on every pixel of every call, so it must be cheap. All formulations
here are exact: a tie for first place gives margin 0, and the mask is the first
maximal class, as argmax is everywhere else in certseg. `chain` (the default) sweeps
the K class planes once keeping the running pair (top1, top2) with three plane-sized
Max/Min per class (ONNX Runtime turns the per-class slices into one Split), plus
ArgMax for the mask. `argmax_where` (ArgMax + ReduceMax + a K-plane Equal/Where +
ReduceMax) pays for ONNX Runtime's slow Where; `topk` (TopK k=2 on the class axis)
for its slow non-last-axis kernel. benchmarks/export_parity.py measures them; on
lipdeeplab_xs (7 classes) at 512x1024, ORT CPU, one thread, over the logits-only
graph: chain +4..+10%, argmax_where +12..+23%, topk +9..+20% (shared 2-core machine;
figures in benchmarks/results/export_parity.json).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from certseg.certify.numerics import radius_scale_for
from certseg.inference import pad_to_multiple

__all__ = [
    "DEFAULT_HEAD",
    "HEAD_FORMULATIONS",
    "CertificateHead",
    "CertifiedSegmenter",
]

#: Exact top1/top2 formulations the exporter knows, cheapest (measured) first.
HEAD_FORMULATIONS = ("chain", "argmax_where", "topk")
DEFAULT_HEAD = "chain"


class CertificateHead(nn.Module):
    """logits (N, K, H, W) -> mask int32 (N, H, W), margin, radius float32 (N, H, W)."""

    def __init__(self, num_classes: int, lipschitz: float, formulation: str = DEFAULT_HEAD):
        super().__init__()
        if formulation not in HEAD_FORMULATIONS:
            raise ValueError(f"unknown head {formulation!r}; known: {HEAD_FORMULATIONS}")
        self.num_classes = num_classes
        self.formulation = formulation
        # A buffer, so it is one named initializer in the ONNX file ("head.radius_scale")
        # that the exporter can set to the value the ONNX audit computes.
        self.register_buffer(
            "radius_scale", torch.tensor(radius_scale_for(lipschitz), dtype=torch.float32)
        )
        self.register_buffer(
            "class_index", torch.arange(num_classes, dtype=torch.int64).view(1, -1, 1, 1)
        )

    def _top2(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(pred int64, top1, top2), each (N, H, W)."""
        if self.formulation == "topk":
            # (Only for comparison. ONNX TopK puts the lowest index first on ties, as
            # argmax does; torch.topk in eager mode does not promise an order.)
            if self.num_classes < 2:
                raise ValueError("the topk head needs at least 2 classes")
            vals, idx = torch.topk(logits, 2, dim=1)
            return idx[:, 0], vals[:, 0], vals[:, 1]
        if self.formulation == "argmax_where":
            # The runner-up is the max over the classes other than the argmax. Excluding
            # by index, not by value, keeps ties exact (top2 == top1, margin 0).
            pred = logits.argmax(dim=1)
            others = torch.where(self.class_index == pred.unsqueeze(1), -math.inf, logits)
            return pred, logits.amax(dim=1), others.amax(dim=1)
        # chain: one sweep over the class planes with the running pair (t1, t2):
        # t2 <- max(t2, min(t1, z_k)), t1 <- max(t1, z_k). Three plane-sized Max/Min per
        # class and no K-sized temporaries; a tie gives min(t1, z_k) == t1, margin 0.
        planes = logits.split(1, dim=1)
        top1, top2 = planes[0], None
        for z in planes[1:]:
            low = torch.minimum(top1, z)
            top2 = low if top2 is None else torch.maximum(top2, low)
            top1 = torch.maximum(top1, z)
        if top2 is None:  # one class: no runner-up, infinite margin
            top2 = torch.full_like(top1, -math.inf)
        return logits.argmax(dim=1), top1.squeeze(1), top2.squeeze(1)

    def forward(self, logits: Tensor, h=None, w=None) -> tuple[Tensor, Tensor, Tensor]:
        """Certificate of the (padded) logits, cropped to h x w at the end: the head is
        per pixel, so cropping its three planes instead of the K logit planes is the
        same result for less memory traffic."""
        pred, top1, top2 = self._top2(logits)
        margin = top1 - top2
        mask = pred.to(torch.int32)
        if h is not None:
            mask, margin = mask[:, :h, :w], margin[:, :h, :w]
        return mask, margin, margin * self.radius_scale


class CertifiedSegmenter(nn.Module):
    """image (N, 3, H, W) in [0, 1] -> (mask, margin, radius[, logits]) at H x W.

    head="logits" gives a logits-only graph (used to measure the head's cost).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        lipschitz: float,
        pad_multiple: int = 1,
        with_logits: bool = False,
        head: str = DEFAULT_HEAD,
    ) -> None:
        super().__init__()
        if pad_multiple < 1:
            raise ValueError("pad_multiple must be >= 1")
        self.net = net
        self.pad_multiple = int(pad_multiple)
        self.with_logits = with_logits
        self.logits_only = head == "logits"
        self.head = None if self.logits_only else CertificateHead(num_classes, lipschitz, head)

    def output_names(self) -> list[str]:
        if self.logits_only:
            return ["logits"]
        return ["mask", "margin", "radius"] + (["logits"] if self.with_logits else [])

    def padded_logits(self, image: Tensor) -> Tensor:
        """Logits of the image zero-padded at the bottom/right to the stride multiple.

        Zero padding is an isometric embedding (norm 1) and the crop that follows is a
        coordinate projection (norm 1): the composition keeps the net's constant L.
        """
        return self.net(pad_to_multiple(image, self.pad_multiple))

    def forward(self, image: Tensor):
        h, w = image.shape[-2], image.shape[-1]
        logits = self.padded_logits(image)
        if self.head is None:
            return logits[:, :, :h, :w]
        mask, margin, radius = self.head(logits, h, w)
        if self.with_logits:
            return mask, margin, radius, logits[:, :, :h, :w]
        return mask, margin, radius
