"""Checkpoint -> model.onnx with the certificate head in the graph, audited.

Pipeline (export_onnx):

1. fuse: load_checkpoint gives the fused, frozen model (plain Conv weights computed
   once in fp64 from a freshly built model, never a deepcopy with parametrizations
   stripped) and the torch-side guaranteed bound L_torch;
2. wrap it in CertifiedSegmenter (pad -> net -> head -> crop) and export with the
   dynamo exporter (torch.onnx.export(..., dynamo=True, external_data=False)) with
   dynamic batch, height and width. The legacy exporter is not used: it bakes the
   trace's H and W into reshapes and is silently wrong at other sizes;
3. audit the ONNX graph itself (export/audit.py: numpy + onnx only, from the
   float32 weights in the file) -> L_onnx;
4. write L_onnx into the head's radius factor (one initializer) and into the
   metadata, then audit the final bytes again (head included) before saving.

Why audit the ONNX and not reuse L_torch: the file is the artifact that runs, and
the audit is what a server re-runs at load time without torch; deriving the head's
constant from that same computation makes the two agree by construction. L_torch is
recorded next to it in audit.json ("agree" says whether they match to 1e-9).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from certseg.certify import radius_scale_for
from certseg.models import ModelCard, load_checkpoint, require_lipschitz
from certseg.nn import certified_lipschitz, fuse_module, structural_lipschitz
from export.audit import (
    META_CARD,
    META_HEAD,
    META_L_AUDITED,
    META_L_STRUCTURAL,
    AuditReport,
    audit_onnx,
    find_logits,
)
from export.graph_head import DEFAULT_HEAD, CertifiedSegmenter

__all__ = ["ExportResult", "build_segmenter", "export_graph", "export_onnx", "resolve_model"]

RADIUS_SCALE = "head.radius_scale"
FORMAT_VERSION = "1"


@dataclass
class ExportResult:
    onnx_path: Path
    card_path: Path
    audit_path: Path
    card: ModelCard
    lipschitz_audited: float
    lipschitz_structural: float
    lipschitz_torch: float
    outputs: list[str]
    report: AuditReport
    extra: dict = field(default_factory=dict)


def resolve_model(
    checkpoint_or_model: str | Path | nn.Module, card: ModelCard | None = None
) -> tuple[nn.Module, ModelCard, float]:
    """(fused eval model, card, torch-side guaranteed L) from a checkpoint or a module."""
    if isinstance(checkpoint_or_model, str | Path):
        model, loaded = load_checkpoint(checkpoint_or_model, fused=True)
        card = card or loaded
        return model, card, require_lipschitz(loaded, checkpoint_or_model)
    if card is None:
        raise ValueError("exporting a module needs its ModelCard (card=...)")
    model = fuse_module(checkpoint_or_model).eval()
    card = replace(card, lipschitz=structural_lipschitz(model))
    return model, card, certified_lipschitz(model)


def build_segmenter(
    model: nn.Module,
    card: ModelCard,
    lipschitz: float,
    with_logits: bool = False,
    head: str = DEFAULT_HEAD,
) -> CertifiedSegmenter:
    return CertifiedSegmenter(
        model,
        card.num_classes,
        lipschitz,
        pad_multiple=card.pad_multiple,
        with_logits=with_logits,
        head=head,
    ).eval()


def export_graph(
    segmenter: CertifiedSegmenter, opset: int | None = None, in_channels: int = 3
) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of a CertifiedSegmenter with dynamic N, H, W."""
    m = segmenter.pad_multiple
    # Generic example sizes: not multiples of the stride, batch > 1, H != W, so that
    # nothing is specialised on them.
    example = torch.rand(2, in_channels, 4 * m + 3, 6 * m + 5)
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height"),
        3: torch.export.Dim("width"),
    }
    kwargs = {} if opset is None else {"opset_version": opset}
    # torch's exporter logs a warning per torchvision op it cannot register ("torchvision
    # is not installed. Skipping torchvision::nms", four lines per export): not ours
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                segmenter,
                (example,),
                None,
                dynamo=True,
                external_data=False,
                input_names=["image"],
                output_names=segmenter.output_names(),
                dynamic_shapes={"image": dims},
                verbose=False,
                **kwargs,
            )
    finally:
        registry.setLevel(level)
    proto = program.model_proto
    _name_output_dims(proto, segmenter.output_names())
    return proto


def _name_output_dims(proto: onnx.ModelProto, names: list[str]) -> None:
    """Readable dynamic dims: batch, height, width (the exporter writes expressions)."""
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        labels = {3: ["batch", "height", "width"], 4: ["batch", None, "height", "width"]}
        labels = labels.get(len(dims), [])
        for d, label in zip(dims, labels, strict=False):
            if label is not None and not d.HasField("dim_value"):
                d.dim_param = label


def _set_initializer(proto: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(f"initializer {name!r} not in the exported graph")


def _set_metadata(proto: onnx.ModelProto, items: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in items]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in items.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def export_onnx(
    checkpoint_or_model: str | Path | nn.Module,
    out_dir: str | Path,
    with_logits: bool = False,
    *,
    card: ModelCard | None = None,
    head: str = DEFAULT_HEAD,
    opset: int | None = None,
    rtol: float = 1e-3,
    filename: str = "model.onnx",
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export, audit and write out_dir/model.onnx, card.json and audit.json.

    Raises export.audit.AuditError (and writes nothing) when the audited L exceeds
    the card's structural L by more than `rtol` or the graph has an op the audit
    cannot bound. `progress` is told each stage as it starts (the CLI shows it: the
    stages take most of a minute for a large net on a CPU).
    """
    say = progress or (lambda _stage: None)
    out_dir = Path(out_dir)
    say("fusing the parametrizations into plain weights")
    model, card, l_torch = resolve_model(checkpoint_or_model, card)
    segmenter = build_segmenter(model, card, l_torch, with_logits, head)
    say("tracing to ONNX")
    proto = export_graph(segmenter, opset)

    # Audit the exported weights (the head's constant is still the torch-side one).
    say("auditing the Lipschitz constant of the exported weights")
    first = audit_onnx(proto, declared=card.lipschitz, rtol=rtol, check_head=False)
    l_onnx = first.lipschitz_audited
    scale = radius_scale_for(l_onnx)
    _set_initializer(proto, RADIUS_SCALE, np.asarray(scale, dtype=np.float32))

    card = replace(card, lipschitz_audited=l_onnx)
    head_info = {
        "formulation": head,
        "logits_tensor": find_logits(proto),
        "radius_scale": scale,
        "radius": "margin / (sqrt(2) * lipschitz_audited), rounded down",
        "pad_multiple": card.pad_multiple,
        "padding": "zeros at the bottom/right to pad_multiple, outputs cropped to H x W",
        "outputs": segmenter.output_names(),
        "input": {"name": "image", "dtype": "float32", "shape": ["N", 3, "H", "W"]},
        "input_range": [0.0, 1.0],
        "format_version": FORMAT_VERSION,
    }
    _set_metadata(
        proto,
        {
            META_CARD: card.to_json(),
            META_L_AUDITED: repr(l_onnx),
            META_L_STRUCTURAL: repr(float(card.lipschitz)),
            META_HEAD: json.dumps(head_info, sort_keys=True),
        },
    )
    proto.doc_string = (
        f"certseg {card.name} ({card.arch}): mask, margin and certified l2 radius per pixel; "
        f"L = {l_onnx:.9g} audited from this file's weights."
    )
    onnx.checker.check_model(proto)
    say("auditing the final graph, certificate head included")
    report = audit_onnx(proto, rtol=rtol, check_head=True)  # the final bytes, head included

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / filename
    onnx.save_model(proto, onnx_path)
    report.path = str(onnx_path)
    card_path = out_dir / "card.json"
    card_path.write_text(json.dumps(card.to_dict(), indent=2, sort_keys=True))
    audit_path = out_dir / "audit.json"
    agree = math.isclose(l_onnx, l_torch, rel_tol=1e-9)
    audit_path.write_text(
        json.dumps(
            {
                **report.to_dict(),
                "lipschitz_torch": l_torch,
                "torch_onnx_agree": agree,
                "head": head_info,
            },
            indent=2,
        )
    )
    return ExportResult(
        onnx_path=onnx_path,
        card_path=card_path,
        audit_path=audit_path,
        card=card,
        lipschitz_audited=l_onnx,
        lipschitz_structural=float(card.lipschitz),
        lipschitz_torch=l_torch,
        outputs=segmenter.output_names(),
        report=report,
        extra={"torch_onnx_agree": agree},
    )
