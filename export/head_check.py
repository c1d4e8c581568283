"""What the certificate head of an ONNX file computes, proved from its nodes.

The Lipschitz audit bounds image -> logits. The radius is sound only if the head
then computes exactly mask = argmax (first maximal class), margin = top1 - top2
and radius = margin * c, pixel by pixel: a head that scales the margin, shifts a
crop or drops a class would pass any check of L and report radii too large.

So every tensor downstream of the logits z (N, K, H, W) gets a meaning, derived
node by node from its inputs' meanings by rules that hold under ONNX semantics:

- max(S): the largest of the planes z_k, k in S (a Split output is max({k}));
- second(S): the second largest of S counted with ties (-inf for one class);
- low(S, k): min(max(S), z_k) for k not in S, so that
  max(second(S), low(S, k)) = second(S + {k})  (the `chain` sweep);
- pred: the first index of the largest plane (ArgMax, select_last_index 0, or
  TopK's first index: ONNX puts the lower index first on ties);
- without_pred: z with the plane of pred set to -inf (`argmax_where`);
- margin: max(all) - second(all).

Each meaning also carries its layout: `keep` (class axis kept with size 1, or
squeezed) and whether it was cropped. Binary ops only combine uncropped values of
the same layout, so no broadcast can move a value to another pixel; a crop is a
Slice starting at 0 with step 1 off the class axis, which keeps every pixel's
index. A node no rule covers gives "unknown", and an output that is unknown, or
not what its name says, is refused; so is an optional `logits` output that is not
a crop of the logits (the server's worst-case metrics and gains read it). K comes
from ONNX shape inference (the audit's caller), never from a declared size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["ONNX_DOMAINS", "check_head_semantics", "node_ints"]

_INT_TYPES = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)

#: The ops with a rule (method `_<op in lower case>`); the default ONNX domain only.
_RULE_OPS = frozenset(
    {"ArgMax", "Cast", "ConstantOfShape", "Equal", "Expand", "Gather", "Identity", "Max"}
    | {"Min", "ReduceMax", "Shape", "Slice", "Split", "Squeeze", "Sub", "TopK", "Unsqueeze"}
    | {"Where"}
)
ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class _Sym:
    """The meaning of one head tensor (see the module docstring)."""

    kind: str  # logits | max | second | low | pred | is_pred | without_pred | topk_values
    #            | topk_indices | margin | neginf | shape_of
    classes: frozenset = frozenset()
    keep: bool = True  # class axis kept (size 1; K for logits) or squeezed away
    cropped: bool = False
    low_class: int | None = None  # the k of low(S, k)
    layout: str | None = None  # for shape_of: the layout whose shape it is


class _NoRule(Exception):
    pass


#: Tensors that do not depend on the image's values -> their value where the file fixes it.
Statics = dict[str, np.ndarray | None]


def _static_array(statics: Statics, name: str) -> np.ndarray | None:
    value = statics.get(name)
    return None if value is None else np.asarray(value)


def _is_static(statics: Statics, name: str) -> bool:
    return name in statics


def node_ints(
    node: onnx.NodeProto, index: int, attr: str, const: Callable[[str], np.ndarray]
) -> list[int] | None:
    """An int list a node takes as input `index` (newer opsets: its value from `const`,
    which refuses what is not a constant) or as attribute `attr` (older); None: absent."""
    if len(node.input) > index and node.input[index]:
        return [int(v) for v in np.ravel(const(node.input[index]))]
    for a in node.attribute:
        if a.name == attr:
            return [int(v) for v in np.ravel(onnx.helper.get_attribute_value(a))]
    return None


class _HeadInterpreter:
    def __init__(self, model: onnx.ModelProto, values: Statics, logits: str, classes: int):
        self.model = model
        self.values = values
        self.K = classes
        self.all = frozenset(range(classes))
        self.syms: dict[str, _Sym | None] = {logits: _Sym("logits")}

    # -- inputs
    def sym(self, name: str) -> _Sym:
        s = self.syms.get(name)
        if s is None:
            raise _NoRule(f"input {name!r} has no known meaning")
        return s

    def const(self, name: str, what: str) -> np.ndarray:
        if not _is_static(self.values, name):
            raise _NoRule(f"{what} {name!r} is not a constant")
        arr = _static_array(self.values, name)
        if arr is None:
            raise _NoRule(f"{what} {name!r} has no value in the file")
        return arr

    def ints(self, node: onnx.NodeProto, index: int, attr: str) -> list[int] | None:
        return node_ints(node, index, attr, lambda name: self.const(name, attr))

    # -- the pass
    def run(self) -> None:
        for node in self.model.graph.node:
            if not any(n in self.syms for n in node.input):
                continue
            try:
                outs = self.rule(node)
            except _NoRule:
                outs = [None] * len(node.output)
            for name, s in zip(node.output, outs, strict=False):
                self.syms[name] = s

    def rule(self, node: onnx.NodeProto) -> list[_Sym | None]:
        if node.op_type not in _RULE_OPS or node.domain not in ONNX_DOMAINS:
            raise _NoRule(node.op_type)  # (no op with a rule takes a subgraph)
        handler: Callable[[onnx.NodeProto, dict], list[_Sym | None]]
        handler = getattr(self, f"_{node.op_type.lower()}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return handler(node, attrs)

    def _plain(self, name: str) -> _Sym:
        """An uncropped operand of a binary op (a crop may shrink it to one row, which
        would broadcast one pixel's value over the others)."""
        s = self.sym(name)
        if s.cropped:
            raise _NoRule("a cropped operand")
        return s

    def _class_axis(self, s: _Sym) -> int | None:
        """The class axis of a value's layout (None once squeezed away)."""
        return 1 if s.kind == "logits" or s.keep else None

    # -- rules, one per op
    def _identity(self, node, a):
        return [self.sym(node.input[0])]

    def _cast(self, node, a):
        s = self.sym(node.input[0])
        if s.kind == "pred" and a.get("to") in _INT_TYPES:
            return [s]
        if s.kind != "pred" and a.get("to") == onnx.TensorProto.FLOAT:
            return [s]
        raise _NoRule("cast")

    def _split(self, node, a):
        s = self._plain(node.input[0])
        sizes = self.ints(node, 1, "split")
        if (
            s.kind != "logits"
            or a.get("axis", 0) not in (1, -3)
            or len(node.output) != self.K
            or (sizes is not None and any(v != 1 for v in sizes))
        ):
            raise _NoRule("split")
        return [_Sym("max", frozenset({k})) for k in range(self.K)]

    def _slice(self, node, a):
        s = self.sym(node.input[0])
        starts = self.ints(node, 1, "starts") or []
        ends = node.input[2] if len(node.input) > 2 else ""  # "" : the attribute form
        if ends and not _is_static(self.values, ends):  # any fixed length: a prefix crop
            raise _NoRule("slice ends depend on the values")
        axes = self.ints(node, 3, "axes")
        steps = self.ints(node, 4, "steps")
        rank = 4 if (s.kind == "logits" or s.keep) else 3
        axes = list(range(len(starts))) if axes is None else [x % rank for x in axes]
        if (
            s.kind in ("shape_of", "neginf")
            or any(v != 0 for v in starts)
            or (steps is not None and any(v != 1 for v in steps))
            or self._class_axis(s) in axes
        ):
            raise _NoRule("slice")
        return [replace(s, cropped=True)]

    def _squeeze(self, node, a):
        s = self.sym(node.input[0])
        axes = self.ints(node, 1, "axes")
        if s.kind == "logits" or not s.keep or axes is None or [x % 4 for x in axes] != [1]:
            raise _NoRule("squeeze")
        return [replace(s, keep=False)]

    def _unsqueeze(self, node, a):
        s = self.sym(node.input[0])
        axes = self.ints(node, 1, "axes")
        if s.kind == "logits" or s.keep or axes is None or [x % 4 for x in axes] != [1]:
            raise _NoRule("unsqueeze")
        return [replace(s, keep=True)]

    def _pair(self, node) -> tuple[_Sym, _Sym]:
        if len(node.input) != 2:
            raise _NoRule("arity")
        x, y = (self._plain(n) for n in node.input)
        if x.keep != y.keep or "logits" in (x.kind, y.kind):
            raise _NoRule("layouts")
        return x, y

    def _max(self, node, a):
        x, y = self._pair(node)
        if x.kind == y.kind == "max":
            return [_Sym("max", x.classes | y.classes, x.keep)]
        for s, t in ((x, y), (y, x)):
            if (
                s.kind == "second"
                and t.kind == "low"
                and t.classes == s.classes
                and t.low_class not in s.classes
            ):
                return [_Sym("second", s.classes | {t.low_class}, s.keep)]
        raise _NoRule("max")

    def _min(self, node, a):
        x, y = self._pair(node)
        for s, t in ((x, y), (y, x)):
            if s.kind == t.kind == "max" and len(t.classes) == 1 and not (s.classes & t.classes):
                (k,) = t.classes
                if len(s.classes) == 1:  # min of two planes: the runner-up of the two
                    return [_Sym("second", s.classes | t.classes, s.keep)]
                return [_Sym("low", s.classes, s.keep, low_class=k)]
        raise _NoRule("min")

    def _sub(self, node, a):
        x, y = (self._plain(n) for n in node.input)
        full_max = x.kind == "max" and x.classes == self.all
        runner_up = (y.kind == "second" and y.classes == self.all) or (
            y.kind == "neginf" and self.K == 1
        )
        if full_max and runner_up and x.keep == y.keep:
            return [_Sym("margin", keep=x.keep)]
        raise _NoRule("sub")

    def _argmax(self, node, a):
        s = self._plain(node.input[0])
        if s.kind != "logits" or a.get("axis", 0) not in (1, -3) or a.get("select_last_index", 0):
            raise _NoRule("argmax")
        return [_Sym("pred", keep=bool(a.get("keepdims", 1)))]

    def _reducemax(self, node, a):
        s = self._plain(node.input[0])
        axes = self.ints(node, 1, "axes")
        if axes is None or [x % 4 for x in axes] != [1]:
            raise _NoRule("reducemax axes")
        keep = bool(a.get("keepdims", 1))
        if s.kind == "logits":
            return [_Sym("max", self.all, keep)]
        if s.kind == "without_pred":
            return [_Sym("second", self.all, keep)]
        raise _NoRule("reducemax")

    def _equal(self, node, a):
        for own, other in ((0, 1), (1, 0)):
            s = self.syms.get(node.input[own])
            if s is None or s.kind != "pred" or not s.keep or s.cropped:
                continue
            index = self.const(node.input[other], "class index")
            want = np.arange(self.K).reshape(self.K, 1, 1)
            if index.shape in ((1, self.K, 1, 1), (self.K, 1, 1)) and np.array_equal(
                index.reshape(self.K, 1, 1), want
            ):
                return [_Sym("is_pred")]
        raise _NoRule("equal")

    def _where(self, node, a):
        cond, fill = self.syms.get(node.input[0]), node.input[1]
        z = self._plain(node.input[2])
        value = self.const(fill, "fill")
        if (
            cond is None
            or cond.kind != "is_pred"
            or cond.cropped
            or z.kind != "logits"
            or value.size != 1
            or not np.all(np.isneginf(value))
        ):
            raise _NoRule("where")
        return [_Sym("without_pred")]

    def _topk(self, node, a):
        s = self._plain(node.input[0])
        k = self.ints(node, 1, "k")
        if (
            s.kind != "logits"
            or k != [2]
            or a.get("axis", -1) not in (1, -3)
            or a.get("largest", 1) != 1
            or a.get("sorted", 1) != 1
        ):
            raise _NoRule("topk")
        return [_Sym("topk_values"), _Sym("topk_indices")]

    def _gather(self, node, a):
        s = self._plain(node.input[0])
        index = self.const(node.input[1], "index")
        if a.get("axis", 0) not in (1, -3) or index.size != 1 or index.ndim > 1:
            raise _NoRule("gather")
        i, keep = int(index.ravel()[0]), index.ndim == 1
        if s.kind == "topk_values" and i in (0, 1):
            return [_Sym("max" if i == 0 else "second", self.all, keep)]
        if s.kind == "topk_indices" and i == 0:
            return [_Sym("pred", keep=keep)]
        raise _NoRule("gather")

    def _shape(self, node, a):
        s = self._plain(node.input[0])
        if a.get("start", 0) != 0 or "end" in a or s.kind in ("shape_of", "neginf"):
            raise _NoRule("shape")
        layout = "logits" if s.kind == "logits" else ("kept" if s.keep else "squeezed")
        return [_Sym("shape_of", layout=layout)]

    def _neginf(self, shape_name: str, value: np.ndarray) -> _Sym:
        shape = self.sym(shape_name)
        if shape.kind != "shape_of" or shape.layout == "logits":
            raise _NoRule("shape")
        if value.size != 1 or not np.all(np.isneginf(value)):
            raise _NoRule("fill")
        return _Sym("neginf", keep=shape.layout == "kept")

    def _expand(self, node, a):
        return [self._neginf(node.input[1], self.const(node.input[0], "fill"))]

    def _constantofshape(self, node, a):
        value = a.get("value")
        return [self._neginf(node.input[0], numpy_helper.to_array(value) if value else None)]


def _radius_scale(model: onnx.ModelProto, values: Statics) -> float | None:
    """c where radius = Mul(the margin output, c), c one float constant."""
    node = next((n for n in model.graph.node if "radius" in n.output), None)
    if node is None or node.op_type != "Mul" or "margin" not in node.input:
        return None
    (other,) = [n for n in node.input if n != "margin"] or [None]
    if other is None or not _is_static(values, other):
        return None
    value = _static_array(values, other)
    if value is None or value.size != 1:
        return None
    return float(np.asarray(value, dtype=np.float64).ravel()[0])


def check_head_semantics(
    model: onnx.ModelProto, statics: Statics, logits: str, classes: object
) -> tuple[float | None, list[str]]:
    """(radius scale c, problems): mask must be argmax, margin top1 - top2, radius
    margin * c, each per pixel of the logits (module docstring). `statics`: the
    tensors the Lipschitz walk found independent of the image, with known values."""
    values = statics
    problems: list[str] = []
    scale = _radius_scale(model, values)
    if scale is None or not scale > 0:
        problems.append("the radius output is not the margin output times a positive constant")
    if not isinstance(classes, int) or classes < 1:
        return scale, [*problems, f"the logits' class count is not fixed ({classes!r})"]
    interp = _HeadInterpreter(model, values, logits, classes)
    interp.run()
    want = {"mask": ("pred", "the argmax"), "margin": ("margin", "top1 - top2")}
    outputs = {o.name for o in model.graph.output}
    if "logits" in outputs:  # the worst-case metrics and gains are computed from it
        want["logits"] = ("logits", "a crop")
    for name, (kind, what) in want.items():
        s = interp.syms.get(name)
        squeezed = s is not None and (s.kind == "logits" or not s.keep)
        if s is None or s.kind != kind or not squeezed:
            problems.append(f"the {name!r} output is not proved to be {what} of the logits")
    return scale, problems
