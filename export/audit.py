"""Audit an exported ONNX file: recompute its Lipschitz constant from the bytes that run.

numpy and the `onnx` package only (the server audits at load time, without torch).

The audit is a small abstract interpretation of the graph. Every tensor gets one of

- static: does not depend on the image's values (initializers, constants, shape
  arithmetic such as Shape -> Mod -> Pad amounts); kept with its value when known;
- lip(L): an L-Lipschitz function (l2 -> l2, whole tensor) of the input `image`;
- unsupported: depends on the image through an op the audit cannot bound.

Linear operators get their guaranteed operator-norm bound from the weights in the
file (certseg.certify.operator_norm: Conv through its polyphase / undilated kernel,
ConvTranspose as the adjoint, Gemm/MatMul by SVD); translations (Add/Sub of a
constant), restrictions and embeddings (Slice, Split, Pad with a constant) and
permutations (Reshape, Transpose, DepthToSpace) are 1; Mul/Div by constants are
max|c| and max|1/c|; Max/Min of the two halves of one Split concatenated back
(MaxMin) sort pairs of coordinates and are 1 jointly; a Concat of branches is
sqrt(sum L_i^2), a residual Add is L_a + L_b. Anything else on the way from
`image` to the logits is refused by name, never guessed.

The logits are the input of the head's ArgMax (found from the graph, not from the
metadata), and the head must be a function of the logits alone, and proved to
compute mask, margin and radius exactly (export.head_check). The artifact is
refused when the audited L exceeds the declared structural L by more than `rtol`,
when the metadata claims an L smaller than the audited one, or when the radius
head divides by less than sqrt(2) times the audited L.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from certseg.certify.operator_norm import (
    conv_norm_bound,
    conv_transpose_norm_bound,
    matrix_norm_bound,
)
from export.head_check import ONNX_DOMAINS, check_head_semantics, node_ints
from export.shapes import Dim, derive_shapes

__all__ = [
    "HEAD_OPS",
    "META_CARD",
    "META_HEAD",
    "META_L_AUDITED",
    "META_L_STRUCTURAL",
    "AuditError",
    "AuditReport",
    "LayerBound",
    "audit_onnx",
    "find_logits",
    "format_table",
    "read_metadata",
]

META_CARD = "certseg.card"
META_L_AUDITED = "certseg.lipschitz_audited"
META_L_STRUCTURAL = "certseg.lipschitz_structural"
META_HEAD = "certseg.head"

#: Ops allowed after the logits (the certificate head and the final crop).
HEAD_OPS = frozenset(
    {
        "ArgMax",
        "Cast",
        "Concat",
        "ConstantOfShape",
        "Equal",
        "Expand",
        "Gather",
        "Identity",
        "Max",
        "Min",
        "Mul",
        "ReduceMax",
        "Reshape",
        "Shape",
        "Slice",
        "Split",
        "Squeeze",
        "Sub",
        "TopK",
        "Unsqueeze",
        "Where",
    }
)

#: Ops whose output is a new random draw at every run.
_RANDOM = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike"}
_RANDOM |= {"Bernoulli", "Multinomial", "Dropout"}

#: The smallest nonzero gain image -> tensor the audit takes: below it float32 values
#: reach the subnormal range, whose absolute rounding (2^-149) a later gain can undo.
_TINY_GAIN = 2.0**-60

#: The largest constant the audit lets be added to a signal of gain L: 2^10 L.
_ABSORPTION = 2.0**10

#: float32 division rounds by at most 2^-24 relative; the torch side counts 2^-23.
_DIV_ROUNDING = 1.0 + 2.0**-23
#: BatchNormalization's float32 sqrt, reciprocal and products: up to ~2^-22 relative.
_BN_ROUNDING = 1.0 + 2.0**-21

_PERMUTATIONS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"}
_PERMUTATIONS |= {"DepthToSpace", "SpaceToDepth"}
# 1-Lipschitz elementwise maps (per coordinate, so also on the whole tensor).
_ELEMENTWISE = {"Relu": 1.0, "Neg": 1.0, "Abs": 1.0, "Tanh": 1.0, "Sigmoid": 0.25}
_ELEMENTWISE |= {"Softplus": 1.0}


class AuditError(ValueError):
    """The file cannot be certified (unsupported op, or a bound above the declared one)."""


@dataclass
class LayerBound:
    """One node on the path image -> logits."""

    node: str
    op: str
    shape: str
    upper: float  # guaranteed bound of this node's own gain
    lower: float  # a gain this node actually attains (NaN where not computed)
    method: str
    lipschitz: float  # bound of the whole map image -> this node's output
    weight: str | None = None  # initializer name for Conv/ConvTranspose/Gemm/MatMul


@dataclass
class AuditReport:
    path: str | None
    lipschitz_audited: float
    lipschitz_declared: float | None
    lipschitz_metadata: float | None
    logits_tensor: str
    layers: list[LayerBound]
    head_scale: float | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    rtol: float = 1e-3
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def ratio(self) -> float | None:
        """audited / declared (1 + a few 1e-6 for a healthy orthogonal net)."""
        if not self.lipschitz_declared:
            return None
        return self.lipschitz_audited / self.lipschitz_declared

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"], out["ratio"] = self.ok, self.ratio
        for row in out["layers"]:
            if isinstance(row["lower"], float) and math.isnan(row["lower"]):
                row["lower"] = None
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class _Static:
    value: np.ndarray | None = None
    magnitude: float | None = None  # a bound of |value| where the value is not known


@dataclass(frozen=True)
class _Lip:
    L: float
    # ("part", split_id, index) for Split outputs;
    # ("sorted", split_id, frozenset({i, j}), "Max" | "Min") for Max/Min of two parts.
    origin: tuple | None = None


@dataclass(frozen=True)
class _Bad:
    op: str
    node: str
    reason: str


_Value = _Static | _Lip | _Bad


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _fmt_shape(shape: tuple | None) -> str:
    if shape is None:
        return "?"
    texts = (str(d) for d in shape)
    return "x".join(t if len(t) <= 8 else "?" for t in texts)


def _dims(vis: Iterable[onnx.ValueInfoProto]) -> dict[str, tuple]:
    out = {}
    for vi in vis:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.shape.dim
            )
    return out


def _check_declarations(model: onnx.ModelProto) -> dict[str, tuple]:
    """ONNX shape inference from the graph alone (declarations removed); a declared
    size that contradicts an inferred one is refused (a file that lies about a shape
    is not audited further). Returns the inferred shapes."""
    g = model.graph
    declared = _dims([*g.input, *g.value_info, *g.output])
    inferred: dict[str, tuple] = {}
    clean = onnx.ModelProto()
    clean.CopyFrom(model)
    del clean.graph.value_info[:]
    for out in clean.graph.output:
        out.type.tensor_type.ClearField("shape")
    with contextlib.suppress(Exception):  # unknown ops: nothing inferred
        done = onnx.shape_inference.infer_shapes(clean)
        inferred = _dims([*done.graph.value_info, *done.graph.output])
    for name, inf in inferred.items():
        dec = declared.get(name)
        if dec is None:
            continue
        if len(dec) != len(inf):
            raise AuditError(
                f"declared shape of {name!r} has rank {len(dec)}, graph gives {len(inf)}"
            )
        for a, b in zip(dec, inf, strict=True):
            if isinstance(a, int) and isinstance(b, int) and a != b:
                raise AuditError(
                    f"declared shape of {name!r} {_fmt_shape(dec)} contradicts the graph's "
                    f"{_fmt_shape(inf)}"
                )
    return inferred


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _check_structure(model: onnx.ModelProto, input_name: str) -> None:
    """Every tensor defined once, before it is read, and stored in the file.

    The passes below read the graph in file order, one name to one value. ONNX Runtime
    sorts the graph itself and lets a later definition win: a Constant written after
    its reader, or an initializer named as the image, would be audited as one tensor
    and run as another. External data is resolved against a directory the audit does
    not know (ONNX Runtime's is the model's, onnx's the process's): another file.
    """
    graph = model.graph
    _check_schemas(model)
    if graph.sparse_initializer:  # ORT prefers them to a same-named initializer
        raise AuditError("sparse initializers are not audited")
    inputs = [i.name for i in graph.input]
    inits = [t.name for t in graph.initializer]
    for name, n in Counter(inits).items():
        if n > 1:
            raise AuditError(f"initializer {name!r} is defined {n} times")
    if input_name in inits:
        raise AuditError(f"an initializer is named {input_name!r}, as the image input")
    if any(_external(t) for t in graph.initializer):
        raise AuditError(
            "initializers with external data are not audited (save the weights in the file)"
        )
    defined = set(inputs) | set(inits)
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                raise AuditError(
                    f"node {node.name!r} ({node.op_type}) reads {name!r} before it is "
                    "defined (nodes must come in topological order)"
                )
        for attr in node.attribute:
            tensors = [attr.t] if attr.HasField("t") else list(attr.tensors)
            if any(_external(t) for t in tensors):
                raise AuditError(f"node {node.name!r} ({node.op_type}) has external data")
        if node.op_type == "Split" and not all(node.output):
            # (ONNX Runtime crashes running one)
            raise AuditError(f"Split node {node.name!r} leaves an output unnamed")
        for name in node.output:
            if name in defined:
                raise AuditError(
                    f"node {node.name!r} ({node.op_type}) redefines {name!r} (each tensor "
                    "must be defined once)"
                )
            if name:
                defined.add(name)


def _check_schemas(model: onnx.ModelProto) -> None:
    """Each ONNX node against its op schema at the file's opset, as ONNX Runtime checks
    it at load: the rules read attributes and inputs as the schema defines them (a
    Squeeze with an `axes` attribute at opset 18, which ONNX Runtime refuses, had its
    axes honoured here). Nodes of other domains are the rules' own concern."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
    local = {(f.domain, f.name) for f in model.functions}
    for node in model.graph.node:
        if node.domain not in ONNX_DOMAINS or (node.domain, node.op_type) in local:
            continue
        if any(_has_subgraph(a) for a in node.attribute):  # refused by name, below
            continue
        try:
            onnx.checker.check_node(node, ctx)
        except Exception as exc:  # ValidationError (or a schema the onnx build lacks)
            why = str(exc).splitlines()[0][:200]
            raise AuditError(
                f"node {node.name!r} ({node.op_type}) does not match its ONNX schema ({why})"
            ) from None


class _Walker:
    def __init__(self, model: onnx.ModelProto, input_name: str) -> None:
        self.graph = model.graph
        _check_structure(model, input_name)
        for node in self.graph.node:  # a subgraph may read the image from the outer scope
            if any(_has_subgraph(a) for a in node.attribute):
                raise AuditError(f"node {node.name!r} ({node.op_type}) has a subgraph")
        # Declared sizes are claims: checked against ONNX inference (a contradiction is
        # refused), never used. The rules read the sizes derive_shapes follows from
        # the input's; ONNX inference's own (`inferred`) name the head's classes.
        self.inferred = _check_declarations(model)
        table = derive_shapes(model, input_name)
        self.shapes: dict[str, tuple | None] = {n: table.shape(n) for n in table.shapes}
        self.values: dict[str, _Value] = {"": _Static()}
        for init in self.graph.initializer:
            arr = numpy_helper.to_array(init)
            # Numbers only: ONNX Runtime parses strings unlike numpy (std::stof).
            self.values[init.name] = _Static(arr if arr.dtype.kind in "biuf" else None)
        names = [i.name for i in self.graph.input]
        if input_name not in names:
            raise AuditError(f"the graph has no input {input_name!r} (inputs: {names})")
        for name in names:
            # An initializer that is also a graph input can be replaced at run time:
            # its value is not the one in the file, so it is unknown here.
            self.values[name] = _Lip(1.0) if name == input_name else _Static()
        # A batch fixed at 1 in the input's shape: ONNX Runtime refuses any other.
        self.single_image = (self.shapes.get(input_name) or (None,))[0] == 1
        self.rows: dict[str, LayerBound] = {}  # by first output name
        self.producer: dict[str, onnx.NodeProto] = {}

    # -- helpers
    def shape(self, name: str) -> tuple | None:
        if name in self.shapes:
            return self.shapes[name]
        v = self.values.get(name)
        if isinstance(v, _Static) and v.value is not None:
            return tuple(v.value.shape)
        return None

    def static_value(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        v = self.values.get(name)
        if not isinstance(v, _Static) or v.value is None:
            raise _Refuse(f"{what} of {node.op_type} node {node.name!r} is not a constant")
        return np.asarray(v.value, dtype=np.float64)

    def magnitude(self, name: str) -> float | None:
        """A bound of |x| for a static tensor x: from its value, or carried (Resize)."""
        v = self.values.get(name)
        if not isinstance(v, _Static):
            return None
        if v.value is not None:
            arr = np.asarray(v.value)
            if arr.dtype.kind not in "biuf":
                return None
            return float(np.max(np.abs(arr))) if arr.size else 0.0
        return v.magnitude

    def check_absorption(self, node, names: Iterable[str], L: float, factor: float = 1.0):
        """A constant added to the image's path must not dwarf the signal: float32
        keeps 24 bits of |signal + c|, so adding 2^40 and taking it away again rounds
        the signal to a step function the gains call Lipschitz. |c| <= 2^10 L (L: the
        bound image -> this node) keeps that rounding below 2^-14 of the gain."""
        for name in names:
            if not name:
                continue
            c = self.magnitude(name)
            if c is None:
                raise _Refuse(f"{node.op_type}: the size of constant {name!r} is unknown")
            if c * factor > _ABSORPTION * L:
                raise _Refuse(
                    f"{node.op_type} adds a constant of size {c * factor:.3g} to a signal of "
                    f"gain {L:.3g}: float32 rounds the signal away (absorption)"
                )

    def _check_attr_absorption(self, node, values: Iterable[float], L: float) -> None:
        """`check_absorption` for values given as attributes (older opsets)."""
        for c in values:
            if not abs(float(c)) <= _ABSORPTION * L:  # (NaN too)
                raise _Refuse(
                    f"{node.op_type} brings in a value of size {abs(float(c)):.3g} beside a "
                    f"signal of gain {L:.3g}: float32 rounds the signal away (absorption)"
                )

    def duplication(self, x: str, other_shape: tuple | None) -> float:
        """How many times broadcasting against `other_shape` may repeat each element of x."""
        xs = self.shape(x)
        if other_shape is None or xs is None:
            if other_shape is not None and all(d == 1 for d in other_shape):
                return 1.0
            raise _Refuse(f"cannot check that {x!r} is not broadcast (unknown shapes)")
        factor = 1.0
        lead = len(other_shape) - len(xs)
        for i, od in enumerate(other_shape):
            xd = xs[i - lead] if i >= lead else 1
            if isinstance(od, int) and od == 1:
                continue
            if isinstance(xd, int) and isinstance(od, int):
                factor *= od if xd == 1 else 1
            elif xd == od:  # one size by the same arithmetic (an unknown equals only itself)
                continue
            elif isinstance(xd, int) and xd > 1:
                continue  # od symbolic must equal xd to broadcast
            elif isinstance(xd, Dim) and xd.bounds()[0] >= 2:
                continue  # never 1: od must equal it
            elif isinstance(od, int):
                factor *= od  # xd symbolic: may be 1 at run time
            else:
                raise _Refuse(
                    f"cannot prove shapes {_fmt_shape(xs)} and {_fmt_shape(other_shape)} equal"
                )
        return factor

    def row(self, node, upper, lower, method, L, weight=None):
        out = node.output[0]
        self.rows[out] = LayerBound(
            node=node.name or out,
            op=node.op_type,
            shape=_fmt_shape(self.shape(out)),
            upper=float(upper),
            lower=float(lower),
            method=method,
            lipschitz=float(L),
            weight=weight,
        )

    # -- the walk
    def run(self) -> None:
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            ins = [
                self.values.get(n, _Bad("?", node.name, f"undefined input {n!r}"))
                for n in node.input
            ]
            if node.domain not in ONNX_DOMAINS:  # a name of the ONNX ops, other semantics
                why = f"{node.op_type} of domain {node.domain!r}, not the ONNX operator"
                for out in node.output:
                    static = all(isinstance(v, _Static) for v in ins)
                    self.values[out] = _Static() if static else _Bad(node.op_type, node.name, why)
                continue
            if node.op_type in _RANDOM:  # a new draw at every run: not a function of the image
                for out in node.output:
                    self.values[out] = _Bad(node.op_type, node.name, "a random draw")
                continue
            if node.op_type == "Constant":
                value = _constant_value(node)
                numeric = value is not None and value.dtype.kind in "biuf"
                self.values[node.output[0]] = _Static(value if numeric else None)
                continue
            if node.op_type in ("Shape", "Size"):  # shapes do not depend on pixel values
                self.values[node.output[0]] = _Static()
                continue
            if all(isinstance(v, _Static) for v in ins):
                self._static(node, ins)
                continue
            bad = next((v for v in ins if isinstance(v, _Bad)), None)
            if bad is not None:
                for out in node.output:
                    self.values[out] = bad
                continue
            try:
                outs = self._lip(node, ins)
            except _Refuse as err:
                outs = [_Bad(node.op_type, node.name, str(err))] * len(node.output)
            except Exception as err:  # a malformed node (missing inputs, odd attributes)
                why = f"cannot read the node ({type(err).__name__}: {err})"
                outs = [_Bad(node.op_type, node.name, why)] * len(node.output)
            outs = [self._in_range(node, v) for v in outs]
            for out, v in zip(node.output, outs, strict=False):
                self.values[out] = v

    @staticmethod
    def _in_range(node: onnx.NodeProto, v: _Value) -> _Value:
        """A bound the proof can use: finite (inf * 0 is NaN, which every later check
        would pass), and 0 or at least _TINY_GAIN, above which float32 keeps its
        relative precision; a graph scaled below it (x 2^-149, then back up) rounds to
        a step function at gain 1 on paper."""
        if not isinstance(v, _Lip):
            return v
        if not math.isfinite(v.L):
            return _Bad(node.op_type, node.name, "its bound is not finite")
        if 0 < v.L < _TINY_GAIN:
            why = f"a gain of {v.L:.3g}: float32 underflows there (rounds to steps)"
            return _Bad(node.op_type, node.name, why)
        return v

    def _static(self, node: onnx.NodeProto, ins: list[_Static]) -> None:
        """Fold the few shape-preserving ops that carry weights; others: value unknown."""
        vals = [v.value for v in ins]
        out: np.ndarray | None = None
        try:
            op = node.op_type
            if op == "Identity" and vals[0] is not None:
                out = vals[0]
            elif op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten") and vals[0] is not None:
                shape = self.shape(node.output[0])
                if shape is not None and all(isinstance(d, int) for d in shape):
                    out = vals[0].reshape(shape)
            elif op == "Resize" and _attrs(node).get("mode", b"nearest") in (b"nearest", b"linear"):
                # nearest and (bi)linear take convex combinations: |out| <= max |in|;
                # tf_crop_and_resize fills what falls outside its roi with
                # extrapolation_value, any number
                mag = self.magnitude(node.input[0])
                attrs = _attrs(node)
                if mag is not None and attrs.get("coordinate_transformation_mode") in (
                    b"tf_crop_and_resize",
                    "tf_crop_and_resize",
                ):
                    mag = max(mag, abs(float(attrs.get("extrapolation_value", 0.0))))
                for o in node.output:
                    self.values[o] = _Static(None, mag)
                return
            elif op == "Cast" and vals[0] is not None and vals[0].dtype.kind in "biuf":
                to = onnx.helper.tensor_dtype_to_np_dtype(_attrs(node)["to"])
                out = vals[0].astype(to) if np.dtype(to).kind in "biuf" else None
        except Exception:
            out = None
        for o in node.output:
            self.values[o] = _Static(out)

    def _lip(self, node: onnx.NodeProto, ins: list[_Value]) -> list[_Value]:
        op = node.op_type
        a = _attrs(node)
        x = ins[0]
        self._keeps_batch(node, a, ins)
        if op in _PERMUTATIONS:
            if not isinstance(x, _Lip) or any(isinstance(v, _Lip) for v in ins[1:]):
                raise _Refuse(f"{op}: image-dependent shape argument")
            self.row(node, 1, 1, "permutation", x.L)
            return [_Lip(x.L)]
        if op == "Cast":
            if a.get("to") != onnx.TensorProto.FLOAT:
                raise _Refuse("Cast of the image path to a non-float32 type (rounding)")
            return [_Lip(x.L)]
        if op in _ELEMENTWISE:
            g = _ELEMENTWISE[op]
            self.row(node, g, g, "elementwise", x.L * g)
            return [_Lip(x.L * g)]
        if op == "LeakyRelu":
            g = max(1.0, abs(float(a.get("alpha", 0.01))))
            self.row(node, g, g, "elementwise", x.L * g)
            return [_Lip(x.L * g)]
        if op == "Clip":
            if not isinstance(x, _Lip) or any(isinstance(v, _Lip) for v in ins[1:]):
                raise _Refuse("Clip with image-dependent bounds")
            # a bound is a value the output takes: Clip(x, min=2^23) then +x, -that
            # rounds x to integers at a counted gain of 3 (as an added constant would)
            self.check_absorption(node, node.input[1:3], x.L)
            self._check_attr_absorption(node, [a.get("min", 0.0), a.get("max", 0.0)], x.L)
            self.row(node, 1, 1, "elementwise", x.L)
            return [_Lip(x.L)]
        if op == "Pad":
            mode = a.get("mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode != "constant":
                raise _Refuse(f"Pad mode {mode!r} repeats pixels (only constant padding is 1)")
            if not isinstance(x, _Lip) or any(isinstance(v, _Lip) for v in ins[1:]):
                raise _Refuse("Pad with image-dependent pads")
            self.check_absorption(node, node.input[2:3], x.L)  # the pad value, opset >= 11
            self._check_attr_absorption(node, [a.get("value", 0.0)], x.L)
            self.row(node, 1, 1, "embedding", x.L)
            return [_Lip(x.L)]
        if op == "Slice":
            if not isinstance(x, _Lip) or any(isinstance(v, _Lip) for v in ins[1:]):
                raise _Refuse("Slice with image-dependent bounds")
            self.row(node, 1, 1, "restriction", x.L)
            return [_Lip(x.L)]
        if op == "Split":
            if not isinstance(x, _Lip) or any(isinstance(v, _Lip) for v in ins[1:]):
                raise _Refuse("Split with image-dependent sizes")
            self.row(node, 1, 1, "restriction", x.L)
            sid = node.output[0]
            return [_Lip(x.L, ("part", sid, i)) for i in range(len(node.output))]
        if op == "Gather":
            if not isinstance(x, _Lip) or isinstance(ins[1], _Lip):
                raise _Refuse("Gather with image-dependent indices")
            idx = self.static_value(node, node.input[1], "indices").astype(np.int64).ravel()
            if len(np.unique(idx)) != len(idx) or (idx < 0).any():
                raise _Refuse("Gather that may repeat elements")
            self.row(node, 1, 1, "restriction", x.L)
            return [_Lip(x.L)]
        if op in ("Conv", "ConvTranspose"):
            return [self._conv(node, ins, a)]
        if op in ("Gemm", "MatMul"):
            return [self._matmul(node, ins, a)]
        if op in ("Add", "Sub"):
            return [self._add(node, ins)]
        if op in ("Mul", "Div"):
            return [self._scale(node, ins)]
        if op in ("Max", "Min"):
            return [self._maxmin(node, ins)]
        if op == "Concat":
            return [self._concat(node, ins)]
        if op == "BatchNormalization":
            if not isinstance(x, _Lip) or any(isinstance(v, _Lip) for v in ins[1:5]):
                raise _Refuse("BatchNormalization with image-dependent statistics")
            if a.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
                # (before opset 14, asking for the running statistics means training)
                raise _Refuse("BatchNormalization in training mode (divides by the batch's spread)")
            scale = self.static_value(node, node.input[1], "scale")
            var = self.static_value(node, node.input[4], "variance").astype(np.float32)
            if not (var >= 0).all():  # a variance below zero cancels epsilon (or is NaN)
                raise _Refuse("BatchNormalization with a negative variance")
            # var + epsilon as ONNX Runtime forms it: float32 (1e-5 in float64 is another
            # number, and a variance of -eps32 + 1 ulp left 2^-40 there, 1.16e-12 here)
            denom = (var + np.float32(a.get("epsilon", 1e-5))).astype(np.float64)
            g = float(np.max(np.abs(scale.astype(np.float64) / np.sqrt(denom))))
            g *= _BN_ROUNDING
            shift = np.abs(self.static_value(node, node.input[2], "bias"))
            shift = shift + np.abs(self.static_value(node, node.input[3], "mean")) * g
            if float(np.max(shift, initial=0.0)) > _ABSORPTION * x.L * g:
                raise _Refuse("BatchNormalization whose shift dwarfs the signal (absorption)")
            self.row(node, g, g, "constant scale", x.L * g)
            return [_Lip(x.L * g)]
        hint = " (fold its operator norm into L first)" if op == "Resize" else ""
        raise _Refuse(f"no Lipschitz rule for op {op}{hint}")

    # -- the batch axis
    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def axes_of(self, node, index: int, attr: str, rank: int | None) -> list[int] | None:
        """A node's axes (input `index` or attribute `attr`), normalised; None: absent."""
        raw = node_ints(node, index, attr, lambda name: self.static_value(node, name, attr))
        if raw is None:
            return None
        if any(v < 0 for v in raw) and rank is None:
            raise _Refuse(f"{node.op_type}: negative axes of a tensor of unknown rank")
        return [v % rank if v < 0 else v for v in raw]

    def partial_ints(self, name: str, depth: int = 0) -> list[int | None] | None:
        """The entries of a 1-d int tensor where the file fixes them (None: computed),
        through Concat/Reshape/Unsqueeze of shape arithmetic; None if even its length
        is unknown. (Pad amounts are computed from the image's size: only some are fixed.)"""
        v = self.values.get(name)
        if isinstance(v, _Static) and v.value is not None:
            return [int(x) for x in np.asarray(v.value).ravel()]
        node = self.producer.get(name)
        if node is None or depth > 32:
            return None
        if node.op_type == "Concat":
            parts = [self.partial_ints(i, depth + 1) for i in node.input]
            return None if any(p is None for p in parts) else [x for p in parts for x in p]
        shape = self.shape(name)
        if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
            return [None] * shape[0]
        return None

    def _keeps_batch(self, node, a, ins) -> None:
        """Refuse an op that may move axis 0 (the batch) or combine values across it.

        L bounds the whole batch tensor, but each image's certificate must speak of
        that image alone: the batcher stacks different clients' images, and a
        Transpose + Conv that mixes them passes every other rule at gain 1.
        """
        if self.single_image:
            return
        op = node.op_type
        lips = [(n, v) for n, v in zip(node.input, ins, strict=False) if isinstance(v, _Lip)]
        r = self.rank(node.input[0]) if node.input else None
        if op == "Transpose":
            perm = list(a.get("perm", []))
            if not perm or perm[0] != 0:
                raise _Refuse("Transpose that moves the batch axis")
        elif op == "Reshape":
            target = self.partial_ints(node.input[1]) if len(node.input) > 1 else None
            if not target or target[0] != 0 or a.get("allowzero", 0):
                raise _Refuse("Reshape that does not keep the batch axis (its shape[0] must be 0)")
        elif op == "Flatten" and a.get("axis", 1) != 1:
            raise _Refuse("Flatten that merges the batch axis")
        elif op in ("Squeeze", "Unsqueeze"):
            axes = self.axes_of(node, 1, "axes", r if op == "Squeeze" else None)
            if not axes or 0 in axes:
                raise _Refuse(f"{op} of the batch axis (or of unnamed axes)")
        elif op in ("Concat", "Split", "Gather"):
            axis = int(a.get("axis", 0))
            if axis < 0:
                if r is None:
                    raise _Refuse(f"{op}: negative axis of a tensor of unknown rank")
                axis %= r
            if axis == 0:
                raise _Refuse(f"{op} along the batch axis")
        elif op == "Slice":
            starts = self.partial_ints(node.input[1]) if len(node.input) > 1 else None
            axes = self.axes_of(node, 3, "axes", r)
            if axes is None:
                axes = list(range(len(starts))) if starts is not None else [0]
            if 0 in axes:
                raise _Refuse("Slice along the batch axis")
        elif op == "Pad":
            pads = self.partial_ints(node.input[1]) if len(node.input) > 1 else None
            axes = self.axes_of(node, 3, "axes", r)
            n = len(axes) if axes is not None else (r or 0)
            first = 0 if axes is None else (axes.index(0) if 0 in axes else None)
            if pads is None or len(pads) != 2 * n or n == 0:
                raise _Refuse("Pad whose amounts cannot be read")
            if first is not None and (pads[first] != 0 or pads[first + n] != 0):
                raise _Refuse("Pad of the batch axis")
        elif op == "Gemm":
            if isinstance(ins[1], _Lip) or (isinstance(ins[0], _Lip) and a.get("transA", 0)):
                raise _Refuse("Gemm that contracts over the batch axis")
            if len(ins) > 2 and isinstance(ins[2], _Lip) and self.rank(node.input[2]) != 2:
                raise _Refuse("Gemm whose image-dependent C may broadcast its batch axis")
        elif op == "MatMul":
            (n, _), out_rank = lips[0], self.rank(node.output[0])
            lip_rank = self.rank(n)
            right = n == node.input[1]
            if lip_rank is None or lip_rank < (3 if right else 2) or lip_rank != out_rank:
                raise _Refuse("MatMul that contracts over or moves the batch axis")
        elif op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
            out_rank = self.rank(node.output[0])
            if out_rank is None or any(self.rank(n) != out_rank for n, _ in lips):
                raise _Refuse(f"{op} may broadcast the batch axis onto another (ranks differ)")

    def _conv(self, node, ins, a) -> _Lip:
        x, op = ins[0], node.op_type
        if not isinstance(x, _Lip) or any(isinstance(v, _Lip) for v in ins[1:]):
            raise _Refuse(f"{op} with an image-dependent weight or bias")
        w = self.static_value(node, node.input[1], "weight")
        if w.ndim != 4:
            raise _Refuse(f"{op}: only 2-d convolutions are audited (weight {w.shape})")
        strides = list(a.get("strides", [1, 1]))
        dilations = list(a.get("dilations", [1, 1]))
        groups = int(a.get("group", 1))
        one_by_one = w.shape[2] == 1 and w.shape[3] == 1
        if not one_by_one and (strides[0] != strides[1] or dilations[0] != dilations[1]):
            raise _Refuse(f"{op}: unequal strides {strides} or dilations {dilations}")
        if op == "ConvTranspose" and max(dilations) > 1:
            raise _Refuse("dilated ConvTranspose")
        bounds = []
        for g in range(groups):
            if op == "Conv":
                wg = w[g * w.shape[0] // groups : (g + 1) * w.shape[0] // groups]
                if one_by_one:  # a strided 1x1 conv subsamples, then mixes channels
                    bounds.append(matrix_norm_bound(wg[:, :, 0, 0]))
                else:
                    try:
                        bounds.append(conv_norm_bound(wg, stride=strides[0], dilation=dilations[0]))
                    except ValueError as err:
                        raise _Refuse(f"Conv: {err}") from None
            else:
                wg = w[g * w.shape[0] // groups : (g + 1) * w.shape[0] // groups]
                bounds.append(conv_transpose_norm_bound(wg, stride=strides[0]))
        upper = max(b.upper for b in bounds)
        lower = max(b.lower for b in bounds)
        method = bounds[0].method if groups == 1 else f"{bounds[0].method} x{groups} groups"
        L = x.L * upper
        self.check_absorption(node, node.input[2:3], L)  # the bias
        self.row(node, upper, lower, method, L, weight=node.input[1])
        return _Lip(L)

    def _matmul(self, node, ins, a) -> _Lip:
        op = node.op_type
        lips = [i for i, v in enumerate(ins[:2]) if isinstance(v, _Lip)]
        if len(lips) != 1:
            raise _Refuse(f"{op} of two image-dependent tensors")
        wi = 1 - lips[0]
        w = self.static_value(node, node.input[wi], "weight")
        if w.ndim != 2:
            raise _Refuse(f"{op}: only 2-d weights are audited (weight {w.shape})")
        b = matrix_norm_bound(w)
        alpha = abs(float(a.get("alpha", 1.0))) if op == "Gemm" else 1.0
        L = ins[lips[0]].L * b.upper * alpha
        if op == "Gemm" and len(ins) > 2 and isinstance(ins[2], _Lip):
            # C broadcasts to the (M, N) output: each of its elements may be repeated.
            dup = self.duplication(node.input[2], self.shape(node.output[0]))
            L += ins[2].L * abs(float(a.get("beta", 1.0))) * math.sqrt(dup)
        elif op == "Gemm" and len(ins) > 2:
            self.check_absorption(node, node.input[2:3], L, abs(float(a.get("beta", 1.0))))
        self.row(node, b.upper * alpha, b.lower * alpha, b.method, L, weight=node.input[wi])
        return _Lip(L)

    def _add(self, node, ins) -> _Lip:
        out_shape = self.shape(node.output[0])
        lips = [(n, v) for n, v in zip(node.input, ins, strict=True) if isinstance(v, _Lip)]
        if len(lips) == 1:
            n, v = lips[0]
            other = node.input[1] if n == node.input[0] else node.input[0]
            dup = self.duplication(n, self.shape(other))
            L = v.L * math.sqrt(dup)
            self.check_absorption(node, [other], L)
            self.row(node, math.sqrt(dup), math.sqrt(dup), "translation", L)
            return _Lip(L)
        L = 0.0
        for n, v in lips:
            other = [m for m in node.input if m != n]
            dup = self.duplication(n, self.shape(other[0]) if other else out_shape)
            L += v.L * math.sqrt(dup)
        self.row(node, L / max(v.L for _, v in lips), math.nan, "sum", L)
        return _Lip(L)

    def _scale(self, node, ins) -> _Lip:
        op = node.op_type
        x, c = ins
        if isinstance(x, _Lip) and isinstance(c, _Lip):
            raise _Refuse(f"{op} of two image-dependent tensors is not Lipschitz")
        if op == "Div" and not isinstance(x, _Lip):
            raise _Refuse("Div by an image-dependent tensor is not Lipschitz")
        li, ci = (0, 1) if isinstance(x, _Lip) else (1, 0)
        cval = self.static_value(node, node.input[ci], "factor")
        if op == "Div":
            if (cval == 0).any():
                raise _Refuse("Div by zero")
            g = float(np.max(np.abs(1.0 / cval))) * _DIV_ROUNDING
        else:
            g = float(np.max(np.abs(cval))) if cval.size else 0.0
        dup = self.duplication(node.input[li], tuple(cval.shape))
        L = ins[li].L * g * math.sqrt(dup)
        self.row(node, g * math.sqrt(dup), g, "constant scale", L)
        return _Lip(L)

    def _maxmin(self, node, ins) -> _Lip:
        if len(ins) != 2:  # (each operand may broadcast the others: not counted)
            raise _Refuse(f"{node.op_type} of {len(ins)} inputs (only 2 are audited)")
        lips = [(n, v) for n, v in zip(node.input, ins, strict=True) if isinstance(v, _Lip)]
        if len(lips) == 2:
            (na, va), (nb, vb) = lips
            oa, ob = va.origin, vb.origin
            if (
                oa is not None
                and ob is not None
                and oa[0] == ob[0] == "part"
                and oa[1] == ob[1]
                and oa[2] != ob[2]
                and self.shape(na) == self.shape(nb)
                and self.shape(na) is not None
            ):
                # max/min of two disjoint parts of one tensor: per coordinate pair,
                # (max, min) is a permutation of (a, b); alone each is <= ||(a, b)||.
                self.row(node, 1, 1, "sorting (MaxMin)", va.L)
                return _Lip(va.L, ("sorted", oa[1], frozenset((oa[2], ob[2])), node.op_type))
        if len(lips) == 1:
            n, v = lips[0]
            others = [m for m in node.input if m != n]
            self.check_absorption(node, others, v.L)  # max(x, 2^23) is 2^23: a value it takes
            dup = 1.0
            for m in others:
                dup = max(dup, self.duplication(n, self.shape(m)))
            L = v.L * math.sqrt(dup)
            self.row(node, math.sqrt(dup), 1, "elementwise", L)
            return _Lip(L)
        # |max(a, b) - max(a', b')| <= max(|da|, |db|) <= sqrt(da^2 + db^2) per coordinate.
        shapes = {self.shape(n) for n, _ in lips}
        if len(shapes) != 1 or None in shapes:
            raise _Refuse(f"{node.op_type} of image-dependent tensors of different shapes")
        L = math.sqrt(sum(v.L**2 for _, v in lips))
        self.row(node, L / max(v.L for _, v in lips), math.nan, "root-sum-square", L)
        return _Lip(L)

    def _concat(self, node, ins) -> _Lip:
        groups: dict[str, list[_Lip]] = {}
        loose: list[_Lip] = []
        for v in ins:
            if isinstance(v, _Static):
                continue
            if v.origin is not None:
                groups.setdefault(v.origin[1], []).append(v)
            else:
                loose.append(v)
        total = sum(v.L**2 for v in loose)
        for members in groups.values():
            if _disjoint_uses(members):
                # Parts of one Split (raw, or sorted in pairs) that use each part at
                # most once: jointly no longer than the split tensor itself.
                total += max(v.L for v in members) ** 2
            else:
                total += sum(v.L**2 for v in members)
        L = math.sqrt(total)
        lmax = max(v.L for v in ins if isinstance(v, _Lip))
        # constant parts sit beside the signal: a later conv adds them to it
        statics = [n for n, v in zip(node.input, ins, strict=True) if isinstance(v, _Static)]
        self.check_absorption(node, statics, L)
        self.row(node, L / lmax, math.nan, "concat (root-sum-square)", L)
        return _Lip(L)


class _Refuse(Exception):
    pass


def _disjoint_uses(members: list[_Lip]) -> bool:
    used: list[frozenset] = []
    pairs: Counter = Counter()
    for v in members:
        if v.origin[0] == "part":
            used.append(frozenset((v.origin[2],)))
        else:
            pairs[(v.origin[2], v.origin[3])] += 1
    if any(n > 1 for n in pairs.values()):
        return False
    used += list({idx for idx, _ in pairs})
    seen: set = set()
    for s in used:
        if seen & s:
            return False
        seen |= s
    return True


def _has_subgraph(attr: onnx.AttributeProto) -> bool:
    return attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.asarray(onnx.helper.get_attribute_value(attr))
        if attr.name in ("value_floats", "value_ints"):
            return np.asarray(list(onnx.helper.get_attribute_value(attr)))
    return None


# ----------------------------------------------------------------------------- public


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def find_logits(model: onnx.ModelProto) -> str:
    """The logits tensor: the input of the ArgMax that makes the mask, else the output
    named 'logits' (a logits-only graph). Read from the graph, never from metadata."""
    argmax = [n for n in model.graph.node if n.op_type in ("ArgMax", "TopK")]
    if len(argmax) == 1:
        return argmax[0].input[0]
    if len(argmax) > 1:
        raise AuditError(f"{len(argmax)} ArgMax/TopK nodes: cannot tell which reads the logits")
    outs = [o.name for o in model.graph.output]
    if "logits" in outs:
        return "logits"
    raise AuditError("no ArgMax head and no 'logits' output: cannot find the logits")


def _check_head(
    model: onnx.ModelProto, walker: _Walker, logits: str
) -> tuple[float | None, list[str]]:
    """The head must read the image only through the logits; returns the radius scale."""
    problems = []
    desc = {logits}
    for node in model.graph.node:
        if any(n in desc for n in node.input):
            for n in node.input:
                v = walker.values.get(n)
                if n not in desc and not isinstance(v, _Static):
                    problems.append(f"head node {node.name!r} reads {n!r}, which is not the logits")
            if node.op_type not in HEAD_OPS:
                problems.append(f"head node {node.name!r} has op {node.op_type} (not a head op)")
            desc.update(node.output)
    if "radius" not in {o.name for o in model.graph.output}:
        return None, problems
    statics = {n: v.value for n, v in walker.values.items() if isinstance(v, _Static)}
    shape = walker.inferred.get(logits)  # from the graph: a declared size may lie
    classes = shape[1] if shape is not None and len(shape) == 4 else None
    card = json.loads(read_metadata(model).get(META_CARD, "{}"))
    if "num_classes" in card and card["num_classes"] != classes:
        problems.append(f"the card says {card['num_classes']} classes, the logits have {classes}")
    try:
        scale, semantic = check_head_semantics(model, statics, logits, classes)
    except Exception as err:  # an odd node the rules did not expect: refused, not a crash
        scale, semantic = None, [f"the head could not be read ({type(err).__name__}: {err})"]
    return scale, problems + semantic


def audit_onnx(
    model: str | Path | onnx.ModelProto,
    *,
    declared: float | None = None,
    rtol: float = 1e-3,
    input_name: str = "image",
    check_head: bool = True,
    strict: bool = True,
) -> AuditReport:
    """Recompute the file's Lipschitz bound and check it; see the module docstring.

    `declared` defaults to the metadata's structural L. With `strict`, any problem
    raises AuditError (whose message lists them); otherwise it is in report.problems.
    """
    path = None
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        model = onnx.load(path, load_external_data=False)  # refused below, as the server does
    meta = read_metadata(model)
    if declared is None and META_L_STRUCTURAL in meta:
        declared = float(meta[META_L_STRUCTURAL])
    logits = find_logits(model)
    walker = _Walker(model, input_name)
    walker.run()
    value = walker.values.get(logits)
    if isinstance(value, _Bad):
        raise AuditError(
            f"cannot bound the path {input_name} -> logits: node {value.node!r} "
            f"({value.op}): {value.reason}"
        )
    if not isinstance(value, _Lip):
        raise AuditError(f"the logits {logits!r} do not depend on {input_name!r}")
    L = value.L
    needed = _ancestors(model, logits)
    layers = [row for out, row in walker.rows.items() if out in needed]
    problems: list[str] = []
    head_scale = None
    if check_head:
        head_scale, problems = _check_head(model, walker, logits)
        # The graph rounds margin * c (<= 2^-24 relative) and top1 - top2 (<= 2^-24):
        # c must leave room for both (the exporter's is below 1 / (sqrt(2) L) by 2^-22).
        if head_scale is not None and head_scale * math.sqrt(2.0) * L > 1.0 - 2.0**-23:
            problems.append(
                f"the radius head uses L = {1 / (math.sqrt(2) * head_scale):.9g}, "
                f"below the audited {L:.9g}"
            )
    if declared is not None and declared * (1.0 + rtol) < L:
        problems.append(
            f"audited L = {L:.9g} exceeds the declared {declared:.9g} "
            f"by {L / declared - 1:.3e} (> rtol {rtol:g})"
        )
    meta_l = float(meta[META_L_AUDITED]) if META_L_AUDITED in meta else None
    if check_head and meta_l is not None and meta_l < L * (1.0 - 1e-9):
        problems.append(f"metadata claims L = {meta_l:.9g} < audited {L:.9g}")
    if check_head and META_CARD in meta:
        card_l = json.loads(meta[META_CARD]).get("lipschitz_audited")
        if card_l is not None and float(card_l) < L * (1.0 - 1e-9):
            problems.append(f"the card claims L = {float(card_l):.9g} < audited {L:.9g}")
    report = AuditReport(
        path=path,
        lipschitz_audited=L,
        lipschitz_declared=declared,
        lipschitz_metadata=meta_l,
        logits_tensor=logits,
        layers=layers,
        head_scale=head_scale,
        op_counts=dict(Counter(n.op_type for n in model.graph.node)),
        rtol=rtol,
        problems=problems,
    )
    if strict and problems:
        raise AuditError("audit failed: " + "; ".join(problems))
    return report


def _ancestors(model: onnx.ModelProto, name: str) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = set(), [name]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is not None:
            stack.extend(node.input)
    return seen


def format_table(report: AuditReport, rows: Iterable[LayerBound] | None = None) -> str:
    """Plain-text per-layer table (the CLI renders the same rows with rich)."""
    rows = list(report.layers if rows is None else rows)
    head = (
        f"{'node':<28} {'op':<14} {'shape':<16} {'upper':>12} {'lower':>12} "
        f"{'L so far':>12}  method"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        low = "" if math.isnan(r.lower) else f"{r.lower:.8f}"
        lines.append(
            f"{r.node[:28]:<28} {r.op:<14} {r.shape[:16]:<16} {r.upper:>12.8f} {low:>12} "
            f"{r.lipschitz:>12.8f}  {r.method}"
        )
    lines.append(
        f"audited L = {report.lipschitz_audited:.9g}"
        + (f", declared {report.lipschitz_declared:.9g}" if report.lipschitz_declared else "")
    )
    return "\n".join(lines)
