"""Export: fused model -> ONNX with the certificate head in the graph -> audit ->
Triton repository / TensorRT engine.

`export.audit` needs numpy and onnx only (the server imports it without torch); the
exporter itself imports torch, so it is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from export.audit import AuditError, AuditReport, LayerBound, audit_onnx

if TYPE_CHECKING:
    from export.onnx_export import ExportResult, export_onnx
    from export.triton import export_triton

__all__ = [
    "AuditError",
    "AuditReport",
    "ExportResult",
    "LayerBound",
    "audit_onnx",
    "export_onnx",
    "export_triton",
]


def __getattr__(name: str) -> Any:
    if name in ("export_onnx", "ExportResult"):
        from export import onnx_export

        return getattr(onnx_export, name)
    if name == "export_triton":
        from export.triton import export_triton

        return export_triton
    raise AttributeError(f"module 'export' has no attribute {name!r}")
