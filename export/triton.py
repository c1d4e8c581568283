"""Triton Inference Server model repository for an exported model.onnx.

Layout (repo_dir/name/1/model.onnx + repo_dir/name/config.pbtxt, card.json beside
the config), platform onnxruntime_onnx, dynamic batching. Inputs and outputs are
read from the ONNX graph, so the config cannot drift from the file: image FP32
[3, -1, -1]; mask INT32, margin and radius FP32 [-1, -1]; logits FP32 [K, -1, -1]
when exported. Triton batches only requests of the same H x W.

No TensorRT execution accelerator is configured on purpose: an FP16 engine behind
the ONNX backend would return margins that are not the fp32 ones, and the radius
would no longer be a certificate (export/tensorrt.py measures and subtracts that
error; Triton's accelerator does not).

numpy + onnx only (no torch); `parse_pbtxt` is a small reader of the protobuf text
format used to check what we write.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from export.audit import META_CARD, META_HEAD, META_L_AUDITED, read_metadata

__all__ = [
    "TritonRepo",
    "check_config",
    "export_triton",
    "parse_pbtxt",
    "render_config",
    "triton_io",
]

_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass
class TritonRepo:
    repo_dir: Path
    model_dir: Path
    config_path: Path
    onnx_path: Path
    config_text: str


def triton_io(model: onnx.ModelProto, batched: bool = True) -> dict[str, list[dict[str, Any]]]:
    """{'input': [...], 'output': [...]}, each {name, data_type, dims} as Triton sees it
    (without the batch dimension when `batched`)."""

    def one(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        if t.elem_type not in _TRITON_TYPES:
            raise ValueError(f"{vi.name}: ONNX type {t.elem_type} has no Triton type here")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if batched:
            if not dims or dims[0] != -1:
                raise ValueError(f"{vi.name}: the first dimension must be a dynamic batch")
            dims = dims[1:]
        return {"name": vi.name, "data_type": _TRITON_TYPES[t.elem_type], "dims": dims}

    inits = {i.name for i in model.graph.initializer}
    return {
        "input": [one(v) for v in model.graph.input if v.name not in inits],
        "output": [one(v) for v in model.graph.output],
    }


def _io_block(key: str, items: list[dict[str, Any]]) -> str:
    parts = []
    for it in items:
        dims = ", ".join(str(d) for d in it["dims"])
        parts.append(
            f'  {{\n    name: "{it["name"]}"\n    data_type: {it["data_type"]}\n'
            f"    dims: [ {dims} ]\n  }}"
        )
    return f"{key} [\n" + ",\n".join(parts) + "\n]\n"


def render_config(
    model: onnx.ModelProto,
    name: str,
    max_batch_size: int = 8,
    preferred_batch_sizes: tuple[int, ...] = (4, 8),
    max_queue_delay_us: int = 2000,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
) -> str:
    """config.pbtxt text for the graph (protobuf text format of inference.ModelConfig)."""
    if instance_kind not in ("KIND_GPU", "KIND_CPU", "KIND_AUTO"):
        raise ValueError(
            f"instance_kind must be KIND_GPU, KIND_CPU or KIND_AUTO, not {instance_kind}"
        )
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1 (dynamic batching needs a batch dim)")
    preferred = sorted({b for b in preferred_batch_sizes if 1 <= b <= max_batch_size})
    io = triton_io(model, batched=True)
    meta = read_metadata(model)
    text = f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
    text += _io_block("input", io["input"]) + _io_block("output", io["output"])
    text += "dynamic_batching {\n"
    if preferred:
        text += f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
    text += f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"
    text += (
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {instance_kind}\n  }}\n]\n"
    )
    if instance_kind != "KIND_CPU":
        # ONNX Runtime's CUDA provider runs fp32 convolutions in TF32 by default (10
        # mantissa bits: logits ~1e-3 off), and Triton passes the provider's defaults:
        # the in-graph radii would not be the certified fp32 ones (certseg serve sets
        # use_tf32=0 itself, server/backends/ort.py).
        text += (
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n"
            '      {\n        name: "cuda"\n'
            '        parameters { key: "use_tf32" value: "0" }\n      }\n    ]\n  }\n}\n'
        )
    if META_L_AUDITED in meta:
        # Informational (backends ignore unknown keys); the file's metadata is the source.
        text += (
            'parameters {\n  key: "certseg.lipschitz_audited"\n'
            f'  value: {{ string_value: "{meta[META_L_AUDITED]}" }}\n}}\n'
        )
    return text


def export_triton(
    model_onnx: str | Path,
    repo_dir: str | Path,
    name: str = "certseg",
    *,
    version: int = 1,
    max_batch_size: int = 8,
    preferred_batch_sizes: tuple[int, ...] = (4, 8),
    max_queue_delay_us: int = 2000,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
) -> TritonRepo:
    """Write repo_dir/name/{version}/model.onnx and repo_dir/name/config.pbtxt."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.'")
    src = Path(model_onnx)
    model = onnx.load(str(src), load_external_data=False)
    text = render_config(
        model,
        name,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instance_kind=instance_kind,
        instance_count=instance_count,
    )
    check_config(parse_pbtxt(text), model)
    model_dir = Path(repo_dir) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    dst = version_dir / "model.onnx"
    shutil.copyfile(src, dst)
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(text)
    meta = read_metadata(model)
    if META_CARD in meta:
        card = json.loads(meta[META_CARD])
        (model_dir / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    if META_HEAD in meta:
        (model_dir / "head.json").write_text(json.dumps(json.loads(meta[META_HEAD]), indent=2))
    return TritonRepo(Path(repo_dir), model_dir, config_path, dst, text)


# ------------------------------------------------------------------ text-format check

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot read pbtxt at offset {pos}: {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.group(1):
            continue
        out.append(m.group(2) or m.group(3) or m.group(4))
    return out


def _scalar(tok: str) -> Any:
    if tok.startswith('"'):
        return json.loads(tok)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", tok):
        return float(tok)
    if tok in ("true", "false"):
        return tok == "true"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok):
        return tok  # enum value
    raise ValueError(f"bad scalar {tok!r}")


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Parse protobuf text format into {field: [values...]} (every field repeated;
    messages are nested dicts). Raises ValueError on malformed text."""
    toks = _tokens(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = toks[pos]
        if tok == "{":
            pos += 1
            msg = message("}")
            pos += 1
            return msg
        pos += 1
        return _scalar(tok)

    def message(end: str | None) -> dict[str, list[Any]]:
        nonlocal pos
        msg: dict[str, list[Any]] = {}
        while pos < len(toks) and toks[pos] != end:
            key = toks[pos]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"expected a field name, got {key!r}")
            pos += 1
            if pos < len(toks) and toks[pos] == ":":
                pos += 1
            elif pos >= len(toks) or toks[pos] not in ("{", "["):
                raise ValueError(f"expected ':', '{{' or '[' after {key!r}")
            if toks[pos] == "[":
                pos += 1
                items = []
                while toks[pos] != "]":
                    items.append(value())
                    if toks[pos] == ",":
                        pos += 1
                    elif toks[pos] != "]":
                        raise ValueError(f"expected ',' or ']' in list {key!r}")
                pos += 1
                msg.setdefault(key, []).extend(items)
            else:
                msg.setdefault(key, []).append(value())
            if pos < len(toks) and toks[pos] in (",", ";"):
                pos += 1
        if end is not None and pos >= len(toks):
            raise ValueError("unbalanced braces")
        return msg

    try:
        out = message(None)
    except IndexError:
        raise ValueError("truncated pbtxt") from None
    if pos != len(toks):
        raise ValueError(f"unexpected {toks[pos]!r}")
    return out


_KNOWN_FIELDS = {
    "name",
    "platform",
    "backend",
    "max_batch_size",
    "input",
    "output",
    "dynamic_batching",
    "instance_group",
    "parameters",
    "version_policy",
    "optimization",
}


def check_config(config: dict[str, list[Any]], model: onnx.ModelProto) -> None:
    """The parsed config names the ONNX graph's inputs/outputs with the same types and
    dims, and only ModelConfig fields we know. Raises ValueError otherwise."""
    unknown = set(config) - _KNOWN_FIELDS
    if unknown:
        raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    if config.get("platform") != ["onnxruntime_onnx"]:
        raise ValueError("platform must be onnxruntime_onnx")
    mbs = config.get("max_batch_size", [0])[0]
    io = triton_io(model, batched=mbs > 0)
    for key in ("input", "output"):
        got = {
            e["name"][0]: (e["data_type"][0], list(e.get("dims", []))) for e in config.get(key, [])
        }
        want = {e["name"]: (e["data_type"], e["dims"]) for e in io[key]}
        if got != want:
            raise ValueError(f"config {key}s {got} do not match the graph's {want}")
    for db in config.get("dynamic_batching", []):
        for b in db.get("preferred_batch_size", []):
            if not 1 <= b <= mbs:
                raise ValueError(f"preferred batch size {b} outside 1..{mbs}")
