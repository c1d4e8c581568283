"""What routers talk to: the `Engine` protocol and the model's description.

Triton's habit: the HTTP surfaces know nothing of ONNX Runtime, TensorRT or torch;
they call `Engine.infer` on a batch and read `Engine.metadata()`. Backends live in
`server.backends` and are imported lazily (none of them may pull torch into a base
install).

The exported artifact is read in ONE place, `read_onnx_artifact`, with the keys
export defines (`export.audit.META_*`), and re-audited there at load; backends run
the bytes it audited, never the file read again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict

from server.errors import ModelError

__all__ = [
    "CORE_OUTPUTS",
    "CardInfo",
    "Engine",
    "ModelInfo",
    "OnnxArtifact",
    "TensorSpec",
    "file_sha256",
    "info_from_card",
    "read_onnx_artifact",
]

#: Outputs every certseg graph has; `logits` is optional.
CORE_OUTPUTS = ("mask", "margin", "radius")


class CardInfo(BaseModel):
    """The ModelCard as the server sees it: a torch-free mirror of certseg.models.ModelCard."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    arch: str = "unknown"
    num_classes: int
    classes: list[str]
    palette: list[tuple[int, int, int]]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    input_size: tuple[int, int] = (64, 64)
    pad_multiple: int = 1
    lipschitz: float = 1.0
    lipschitz_audited: float | None = None
    default_eps: float = 0.1
    ignore_index: int = 255
    training: dict[str, Any] = {}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output in Open Inference Protocol terms."""

    name: str
    datatype: str  # "FP32", "INT32", ...
    shape: tuple[int, ...]  # -1 for dynamic


@dataclass
class ModelInfo:
    """Everything the routes need to know of one served model."""

    name: str
    path: Path
    card: CardInfo
    lipschitz: float  # the audited constant certificates use
    backend: str
    platform: str
    device: str = "cpu"
    version: str = "1"
    sha256: str = ""
    has_logits: bool = False
    #: Send the engine uint8 images (0..255, meaning v / 255): it converts them itself,
    #: so queues and batches hold a quarter of float32's bytes.
    accepts_uint8: bool = False
    #: The engine's bound on |its margin - the fp32 margin| (0 for fp32 ONNX Runtime):
    #: already taken off the margins it returns; worst-case metrics computed from its
    #: logits shrink every flip cost by it too.
    margin_error: float = 0.0
    #: The arithmetic the engine runs: fp32, or fp16/bf16 (whose radii rest on
    #: `margin_error`, a bound measured by `certseg calibrate`).
    precision: str = "fp32"
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


@runtime_checkable
class Engine(Protocol):
    """A loaded model on one device. `infer` is blocking and runs in the device's worker
    thread; everything else is cheap and may be called from the event loop."""

    @property
    def ready(self) -> bool:
        """Loaded and warmed up: /v2/health/ready is false until every engine is."""
        ...

    def metadata(self) -> ModelInfo: ...

    def load(self) -> None:
        """Create sessions/engines (slow; run off the event loop)."""
        ...

    def warmup(self, sizes: Sequence[tuple[int, int, int]]) -> None:
        """Run (batch, H, W) shapes once so the first request pays no JIT/alloc cost."""
        ...

    def infer(self, images: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """images float32 (N, 3, H, W) in [0, 1], or uint8 (v / 255) -> the named outputs,
        each with N first."""
        ...

    def close(self) -> None: ...


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_lipschitz(value: float, where: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ModelError(f"{where}: Lipschitz constant must be finite and > 0, got {value}")
    return value


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported model.onnx as read once: its card, the L to certify with, its
    outputs and the bytes that were audited (what a session must be built from: a
    file replaced after the audit would otherwise serve unaudited weights)."""

    card: CardInfo
    lipschitz: float
    outputs: list[str]
    data: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_onnx_artifact(path: Path, audit: bool = True) -> OnnxArtifact:
    """Read an exported model.onnx once, with its card and the L for certificates.

    The one reader of export's metadata keys (`export.audit.META_*`). With `audit`,
    the file's Lipschitz constant is recomputed from the weights that will run
    (`export.audit.audit_onnx`: numpy + onnx, no torch) and the artifact is refused
    if its metadata, card or radius head claim less; the certificate then uses the
    larger of the audited and the declared value (they agree to 1e-9 for a healthy
    export, and the in-graph radius head was built from the declared one).
    """
    import onnx

    from export.audit import META_CARD, META_L_AUDITED, AuditError, audit_onnx

    try:
        data = Path(path).read_bytes()
        proto = onnx.load_model_from_string(data)  # external data: refused by the audit
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelError(f"{path}: not a readable ONNX file ({exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if META_CARD not in props:
        raise ModelError(f"{path}: no '{META_CARD}' metadata; export it with `certseg export`")
    try:
        card = CardInfo.model_validate(json.loads(props[META_CARD]))
    except ValueError as exc:
        raise ModelError(f"{path}: invalid model card metadata ({exc})") from exc
    raw = props.get(META_L_AUDITED)
    declared = float(raw) if raw is not None else card.lipschitz_audited
    if declared is None:
        raise ModelError(f"{path}: no audited Lipschitz constant in the metadata")
    lipschitz = _check_lipschitz(float(declared), str(path))
    if audit:
        try:
            report = audit_onnx(proto, check_head=True, strict=True)
        except AuditError as exc:
            raise ModelError(f"{path}: refused by the Lipschitz audit ({exc})") from exc
        lipschitz = max(lipschitz, _check_lipschitz(report.lipschitz_audited, str(path)))
    outputs = [o.name for o in proto.graph.output]
    missing = [n for n in CORE_OUTPUTS if n not in outputs]
    if missing or [i.name for i in proto.graph.input][:1] != ["image"]:
        raise ModelError(
            f"{path}: a certseg graph takes `image` and gives {CORE_OUTPUTS}; missing {missing}"
        )
    return OnnxArtifact(card, lipschitz, outputs, data)


def info_from_card(
    name: str,
    path: Path,
    card: CardInfo,
    lipschitz: float,
    backend: str,
    platform: str,
    device: str,
    has_logits: bool,
    sha256: str = "",
    precision: str = "fp32",
) -> ModelInfo:
    """ModelInfo with the V2 tensor specs every certseg graph has."""
    outputs = [
        TensorSpec("mask", "INT32", (-1, -1, -1)),
        TensorSpec("margin", "FP32", (-1, -1, -1)),
        TensorSpec("radius", "FP32", (-1, -1, -1)),
    ]
    if has_logits:
        outputs.append(TensorSpec("logits", "FP32", (-1, card.num_classes, -1, -1)))
    return ModelInfo(
        name=name,
        path=path,
        card=card,
        lipschitz=_check_lipschitz(lipschitz, str(path)),
        backend=backend,
        platform=platform,
        device=device,
        sha256=sha256,
        has_logits=has_logits,
        precision=precision,
        inputs=[TensorSpec("image", "FP32", (-1, 3, -1, -1))],
        outputs=outputs,
    )
