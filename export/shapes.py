"""Tensor shapes derived from the graph alone, as expressions in the input's sizes.

The audit's broadcast rules ask whether an image-dependent tensor may be repeated
when it meets another (Add of a (1, 1, H, W) tensor to a (1, 8, H, W) one repeats
each element 8 times: gain sqrt 8, not 1). The sizes a file declares (value_info)
are claims: ONNX Runtime runs a graph whose declarations are wrong (it warns and
merges leniently), so a file declaring (1, 8, H, W) for a (1, 1, H, W) tensor had
its gain undercounted. ONNX's own shape inference loses every size after a Pad whose
amounts are computed from the image's size (the exporter pads to a multiple of 8).
This module follows those sizes through the graph exactly, from the input's sizes.

A size is a `Dim`: an integer linear form over atoms (an input size, ``x mod k``,
``x // k``, a product, or a fresh unknown), kept canonical so that two sizes the
graph computes by the same arithmetic, in any order, compare equal. Equal `Dim`s
are equal at run time for every input; unequal ones may still be equal (the rules
then assume the worst). A size nothing here can derive is a fresh unknown, equal
only to itself; a tensor whose rank is unknown has shape None.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from certseg.sizes import SIZE_MAX
from export.head_check import ONNX_DOMAINS

__all__ = ["Dim", "ShapeTable", "derive_shapes"]

_fresh = itertools.count()
_INF = math.inf
_INT64 = (-(2**63), 2**63 - 1)
#: Larger than any size: Slice ends at or past it mean "to the end".
_BIG = 2**62


@dataclass(frozen=True)
class Dim:
    """const + sum(coeff * atom); atoms are hashable tuples, sorted by repr."""

    const: int = 0
    terms: tuple[tuple[tuple, int], ...] = ()

    # -- construction
    @staticmethod
    def of(x: int | Dim) -> Dim:
        return x if isinstance(x, Dim) else Dim(int(x))

    @staticmethod
    def atom(a: tuple) -> Dim:
        return Dim(0, ((a, 1),))

    @staticmethod
    def unknown() -> Dim:
        return Dim.atom(("unknown", next(_fresh)))

    @staticmethod
    def _make(const: int, terms: dict[tuple, int]) -> Dim:
        items = tuple(sorted(((a, c) for a, c in terms.items() if c), key=lambda t: repr(t[0])))
        return Dim(int(const), items)

    @property
    def is_const(self) -> bool:
        return not self.terms

    def value(self) -> int | Dim:
        """An int where the size is a constant (what the audit's rules compare), else self."""
        return self.const if self.is_const else self

    # -- arithmetic
    def __add__(self, other: int | Dim) -> Dim:
        o = Dim.of(other)
        terms = dict(self.terms)
        for a, c in o.terms:
            terms[a] = terms.get(a, 0) + c
        return Dim._make(self.const + o.const, terms)

    __radd__ = __add__

    def __neg__(self) -> Dim:
        return Dim._make(-self.const, {a: -c for a, c in self.terms})

    def __sub__(self, other: int | Dim) -> Dim:
        return self + (-Dim.of(other))

    def __rsub__(self, other: int | Dim) -> Dim:
        return Dim.of(other) - self

    def scale(self, k: int) -> Dim:
        return Dim._make(self.const * k, {a: c * k for a, c in self.terms})

    def __mul__(self, other: int | Dim) -> Dim:
        o = Dim.of(other)
        if o.is_const:
            return self.scale(o.const)
        if self.is_const:
            return o.scale(self.const)
        pair = tuple(sorted((self, o), key=repr))
        return Dim.atom(("mul", *pair))

    __rmul__ = __mul__

    def mod(self, k: int) -> Dim:
        """self mod k (k > 0; the sign of k, as ONNX Mod with fmod 0 and Python)."""
        if k == 1:
            return Dim(0)
        const, terms = self.const % k, {}
        for a, c in self.terms:
            if a[0] == "mod" and a[2] % k == 0:  # (x mod mk) mod k = x mod k
                inner = a[1].scale(c)
                const = (const + inner.const) % k
                for b, d in inner.terms:
                    terms[b] = (terms.get(b, 0) + d) % k
            else:
                terms[a] = (terms.get(a, 0) + c) % k
        reduced = Dim._make(const, terms)
        if reduced.is_const:
            return Dim(reduced.const % k)
        return Dim.atom(("mod", reduced, k))

    def floordiv(self, k: int) -> Dim:
        """floor(self / k) for an int k > 0."""
        if k == 1:
            return self
        if self.is_const:
            return Dim(self.const // k)
        whole = {a: c // k for a, c in self.terms}  # floor((k q + r) / k) = q + floor(r / k)
        rest = Dim._make(self.const % k, {a: c % k for a, c in self.terms})
        q = Dim._make(self.const // k, whole)
        if rest.is_const:
            return q + rest.const // k
        if len(rest.terms) == 1 and rest.const == 0 and rest.terms[0][1] == 1:
            a = rest.terms[0][0]
            if a[0] == "div":  # floor(floor(x / m) / k) = floor(x / mk)
                return q + a[1].floordiv(a[2] * k)
        return q + Dim.atom(("div", rest, k))

    # -- bounds
    def bounds(self) -> tuple[float, float]:
        lo = hi = float(self.const)
        for a, c in self.terms:
            alo, ahi = _atom_bounds(a)
            lo_c, hi_c = (c * alo, c * ahi) if c > 0 else (c * ahi, c * alo)
            lo, hi = lo + lo_c, hi + hi_c
        return lo, hi

    def __str__(self) -> str:
        parts = [] if not self.const and self.terms else [str(self.const)]
        for a, c in self.terms:
            text = _atom_str(a)
            parts.append(text if c == 1 else f"{c}*{text}")
        return " + ".join(parts).replace("+ -", "- ")


def _atom_bounds(a: tuple) -> tuple[float, float]:
    kind = a[0]
    if kind == "mod":
        return 0.0, float(a[2] - 1)
    if kind == "div":
        lo, hi = a[1].bounds()
        return math.floor(lo / a[2]) if lo > -_INF else -_INF, (
            math.floor(hi / a[2]) if hi < _INF else _INF
        )
    if kind == "size":  # an input's size: an empty input has no pixels to certify
        return 1.0, float(SIZE_MAX)
    if kind == "mul":
        (alo, ahi), (blo, bhi) = a[1].bounds(), a[2].bounds()
        products = [x * y for x in (alo, ahi) for y in (blo, bhi) if not (x == 0 or y == 0)]
        products += [0.0] if 0 in (alo, ahi, blo, bhi) else []
        return min(products), max(products)
    return -_INF, _INF


def _atom_str(a: tuple) -> str:
    kind = a[0]
    if kind == "size":
        return a[1]
    if kind == "mod":
        return f"({a[1]} mod {a[2]})"
    if kind == "div":
        return f"(({a[1]}) // {a[2]})"
    if kind == "mul":
        return f"({a[1]})*({a[2]})"
    return "?"


Shape = tuple[Dim, ...]


@dataclass
class ShapeTable:
    """Per tensor: its shape (None: rank unknown), and for small int tensors their
    entries as Dims (what Pad, Resize, Slice and Reshape read)."""

    shapes: dict[str, Shape | None]
    values: dict[str, np.ndarray]  # object arrays of Dim

    def shape(self, name: str) -> tuple | None:
        """The shape as the audit's rules read it: ints where constant, else Dims."""
        s = self.shapes.get(name)
        return None if s is None else tuple(d.value() for d in s)


def _broadcast(shapes: Sequence[Shape]) -> Shape:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        others = [d for d in dims if d != Dim(1)]
        if not others:
            out.append(Dim(1))
        elif all(d == others[0] for d in others):
            out.append(others[0])
        else:  # a constant > 1 decides (the others must be 1 or it); else unknown
            fixed = {d.const for d in others if d.is_const}
            out.append(Dim(fixed.pop()) if len(fixed) == 1 else Dim.unknown())
    return tuple(out)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Deriver:
    def __init__(self, model: onnx.ModelProto, input_name: str) -> None:
        self.graph = model.graph
        self.shapes: dict[str, Shape | None] = {"": None}
        self.values: dict[str, np.ndarray] = {}
        self.consts: dict[str, np.ndarray] = {}
        for init in self.graph.initializer:
            arr = numpy_helper.to_array(init)
            self.consts[init.name] = arr
            self.shapes[init.name] = tuple(Dim(int(d)) for d in arr.shape)
            self._value_from_const(init.name, arr)
        named = [d.dim_param for vi in self.graph.input for d in vi.type.tensor_type.shape.dim]
        for vi in self.graph.input:
            if vi.name in self.consts:
                continue
            t = vi.type.tensor_type
            if not t.HasField("shape"):
                self.shapes[vi.name] = None
                continue
            dims = []
            for i, d in enumerate(t.shape.dim):
                if d.HasField("dim_value"):  # ONNX Runtime refuses an input of another size
                    dims.append(Dim(d.dim_value))
                else:
                    # ONNX Runtime does not check that sizes of one name agree: a name
                    # used twice (or none) gives each axis its own size
                    name = d.dim_param
                    if not name or named.count(name) > 1:
                        name = f"{vi.name}[{i}]"
                    elif vi.name != input_name:
                        name = f"{vi.name}.{name}"
                    dims.append(Dim.atom(("size", name)))
            self.shapes[vi.name] = tuple(dims)

    def _value_from_const(self, name: str, arr: np.ndarray) -> None:
        # int64 only: the shape arithmetic followed is ONNX Runtime's int64 (narrower
        # types wrap around where Python's integers do not)
        if arr.dtype == np.int64 and arr.ndim <= 1 and arr.size <= 64:
            self.values[name] = np.array([Dim(int(v)) for v in arr.ravel()], dtype=object).reshape(
                arr.shape
            )

    def ints(self, name: str) -> list[Dim] | None:
        """A small int tensor's entries, where they are followed."""
        v = self.values.get(name)
        return None if v is None else [Dim.of(d) for d in v.ravel()]

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def run(self) -> ShapeTable:
        for node in self.graph.node:
            try:
                outs = self.node(node)
            except Exception:  # a node the rules below do not read: its shapes unknown
                outs = None
            if outs is None:
                outs = [None] * len(node.output)
            for name, shape in zip(node.output, outs, strict=False):
                self.shapes[name] = shape
        return ShapeTable(self.shapes, self.values)

    # -- one node
    def node(self, node: onnx.NodeProto) -> list[Shape | None] | None:
        op = node.op_type
        if node.domain not in ONNX_DOMAINS:  # an ONNX op's name, other semantics
            return None
        ins = [self.shapes.get(n) for n in node.input]
        x = ins[0] if ins else None
        if op in _RULE_OPS:  # the method `_<op in lower case>`
            rule: Callable = getattr(self, f"_{op.lower()}")
            return rule(node, ins)
        if op in _SAME_SHAPE:
            return [x]
        if op in _BROADCAST:
            if any(s is None for s in ins):
                return None
            out = _broadcast(ins)
            self._fold(node, op)
            return [out]
        return None

    def _fold(self, node: onnx.NodeProto, op: str) -> None:
        """Integer arithmetic on Dim entries (shape arithmetic)."""
        vals = [self.values.get(n) for n in node.input]
        if any(v is None for v in vals) or len(vals) != 2:
            return
        a, b = np.broadcast_arrays(*vals)
        fn = {
            "Add": lambda p, q: p + q,
            "Sub": lambda p, q: p - q,
            "Mul": lambda p, q: p * q,
            "Mod": _mod,
            "Div": _div,
        }.get(op)
        if fn is None or (op == "Mod" and _attr(node, "fmod", 0)):
            return
        try:
            out = [fn(Dim.of(p), Dim.of(q)) for p, q in zip(a.ravel(), b.ravel(), strict=True)]
        except _Unknown:
            return
        if not all(_INT64[0] <= d.bounds()[0] and d.bounds()[1] <= _INT64[1] for d in out):
            return  # it may wrap around at run time: the exact value is not what runs
        self.values[node.output[0]] = np.array(out, dtype=object).reshape(a.shape)

    def _constant(self, node, ins):
        for a in node.attribute:
            if a.name == "value":
                arr = numpy_helper.to_array(a.t)
            elif a.name in ("value_int", "value_float"):
                arr = np.asarray(onnx.helper.get_attribute_value(a))
            elif a.name in ("value_ints", "value_floats"):
                arr = np.asarray(list(onnx.helper.get_attribute_value(a)))
            else:
                continue
            self.consts[node.output[0]] = arr
            self._value_from_const(node.output[0], arr)
            return [tuple(Dim(int(d)) for d in arr.shape)]
        return None

    def _shape(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        dims = list(x)[slice(start, end)]
        self.values[node.output[0]] = np.array(dims, dtype=object).reshape(len(dims))
        return [(Dim(len(dims)),)]

    def _size(self, node, ins):
        if ins[0] is not None:
            total = Dim(1)
            for d in ins[0]:
                total = total * d
            self.values[node.output[0]] = np.array([total], dtype=object).reshape(())
        return [()]

    def _cast(self, node, ins):
        v = self.values.get(node.input[0])
        to = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
        if v is not None and np.dtype(to) == np.int64:
            self.values[node.output[0]] = v
        return [ins[0]]

    def _identity(self, node, ins):
        if node.input[0] in self.values:
            self.values[node.output[0]] = self.values[node.input[0]]
        return [ins[0]]

    def _axes(self, node, index: int, rank: int | None) -> list[int] | None:
        if len(node.input) > index and node.input[index]:
            raw = self.ints(node.input[index])
            if raw is None or any(not d.is_const for d in raw):
                raise _Unknown
            raw = [d.const for d in raw]
        else:
            raw = _attr(node, "axes", None)
            if raw is None:
                return None
            raw = list(raw)
        if rank is None and any(a < 0 for a in raw):
            raise _Unknown
        return [a % rank if a < 0 else a for a in raw] if rank is not None else raw

    def _squeeze(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        axes = self._axes(node, 1, len(x))
        if axes is None:  # every size 1 goes: only where every size is known
            if not all(d.is_const for d in x):
                return [None]
            axes = [i for i, d in enumerate(x) if d == Dim(1)]
        out = tuple(d for i, d in enumerate(x) if i not in axes)
        self._carry_values(node, out)
        return [out]

    def _unsqueeze(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        rank = len(x) + len(self._axes(node, 1, None) or [])
        axes = sorted(self._axes(node, 1, rank) or [])
        out = list(x)
        for a in axes:
            out.insert(a, Dim(1))
        self._carry_values(node, tuple(out))
        return [tuple(out)]

    def _reshape(self, node, ins):
        x, target = ins[0], self.ints(node.input[1])
        if target is None:
            return [None]
        out: list[Dim | None] = []
        for i, t in enumerate(target):
            if t == Dim(0) and not _attr(node, "allowzero", 0):
                if x is None or i >= len(x):
                    return [None]
                out.append(x[i])
            elif t == Dim(-1):
                out.append(None)
            elif t.is_const or t.bounds()[0] >= 1:
                out.append(t)
            else:  # may be 0 (copy) or -1 (infer) at run time: not the size it reads as
                out.append(Dim.unknown())
        if None in out:
            if x is None:
                return [None]
            rest = [d for d in out if d is not None]
            out[out.index(None)] = _quotient(x, rest)
        shape = tuple(out)
        self._carry_values(node, shape)
        return [shape]

    def _carry_values(self, node, shape: Shape) -> None:
        """A small int tensor's entries through a change of shape alone."""
        v = self.values.get(node.input[0])
        if v is not None and all(d.is_const for d in shape):
            self.values[node.output[0]] = v.reshape([d.const for d in shape])

    def _flatten(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        axis = _attr(node, "axis", 1)
        axis = axis + len(x) if axis < 0 else axis  # (axis r is allowed: (prod, 1))
        lead, tail = Dim(1), Dim(1)
        for d in x[:axis]:
            lead = lead * d
        for d in x[axis:]:
            tail = tail * d
        return [(lead, tail)]

    def _transpose(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        perm = _attr(node, "perm", None) or list(range(len(x)))[::-1]
        return [tuple(x[p] for p in perm)]

    def _concat(self, node, ins):
        if any(s is None for s in ins):
            return [None]
        rank = len(ins[0])
        axis = _attr(node, "axis") % rank
        total = Dim(0)
        for s in ins:
            total = total + s[axis]
        out = list(ins[0])
        out[axis] = total
        vals = [self.values.get(n) for n in node.input]
        if axis == 0 and rank == 1 and all(v is not None for v in vals):
            self.values[node.output[0]] = np.concatenate([v.reshape(-1) for v in vals])
        return [tuple(out)]

    def _gather(self, node, ins):
        data, idx = ins[0], ins[1]
        if data is None or idx is None:
            return [None]
        axis = _attr(node, "axis", 0) % len(data)
        out = (*data[:axis], *idx, *data[axis + 1 :])
        v, i = self.values.get(node.input[0]), self.consts.get(node.input[1])
        if v is not None and i is not None and v.ndim == 1:
            self.values[node.output[0]] = np.asarray(v[np.asarray(i, np.int64)], dtype=object)
        return [out]

    def _slice(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        starts, ends = self.ints(node.input[1]), self.ints(node.input[2])
        if starts is None or ends is None:
            return [None]
        axes = self._axes(node, 3, len(x))
        axes = list(range(len(starts))) if axes is None else axes
        steps = self.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        steps = steps or [Dim(1)] * len(starts)
        out = list(x)
        v = self.values.get(node.input[0])
        plain = v is not None and v.ndim == 1
        for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
            dim = x[a]
            if dim.is_const and s.is_const and e.is_const and st.is_const:
                idx = onnx_slice_indices(dim.const, s.const, e.const, st.const)
                out[a] = Dim(len(idx))
                if plain:
                    v = v[np.asarray(idx, dtype=np.int64)]
                continue
            plain = False
            out[a] = _slice_len(dim, s, e, st)
        if plain:
            self.values[node.output[0]] = v
        return [tuple(out)]

    def _split(self, node, ins):
        x = ins[0]
        if x is None:
            return None
        axis = _attr(node, "axis", 0) % len(x)
        n = len(node.output)
        sizes = self.ints(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if sizes is None:
            sizes = _attr(node, "split", None)
            sizes = [Dim(s) for s in sizes] if sizes is not None else None
        if sizes is None:
            d = x[axis]
            if not d.is_const:
                return None
            chunk = -(-d.const // n)  # the last part is the smaller one
            sizes = [Dim(min(chunk, d.const - i * chunk)) for i in range(n)]
        outs = []
        for s in sizes:
            shape = list(x)
            shape[axis] = s
            outs.append(tuple(shape))
        return outs

    def _pad(self, node, ins):
        x = ins[0]
        pads = self.ints(node.input[1]) if len(node.input) > 1 else None
        if x is None or pads is None:
            return [None]
        axes = self._axes(node, 3, len(x))
        axes = list(range(len(x))) if axes is None else axes
        n = len(axes)
        out = list(x)
        for i, a in enumerate(axes):
            out[a] = x[a] + pads[i] + pads[i + n]
        return [tuple(out)]

    def _conv(self, node, ins, transpose: bool = False):
        x, w = ins[0], ins[1]
        if x is None or w is None:
            return [None]
        if not all(d.is_const for d in w):
            return [None]
        k = [d.const for d in w[2:]]
        if list(_attr(node, "kernel_shape", k)) != k:
            return [None]
        nd = len(k)
        strides = list(_attr(node, "strides", [1] * nd))
        dil = list(_attr(node, "dilations", [1] * nd))
        pads = list(_attr(node, "pads", [0] * 2 * nd))
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        group = _attr(node, "group", 1)
        out = [x[0], w[1].scale(group) if transpose else w[0]]
        for i in range(nd):
            size, s, span = x[2 + i], strides[i], dil[i] * (k[i] - 1) + 1
            if transpose:
                if _attr(node, "output_shape", None) is not None or auto != "NOTSET":
                    return [None]
                extra = list(_attr(node, "output_padding", [0] * nd))[i]
                out.append((size - 1).scale(s) + extra + span - pads[i] - pads[i + nd])
            elif auto in ("SAME_UPPER", "SAME_LOWER"):
                out.append((size + (s - 1)).floordiv(s))
            elif auto == "VALID":
                out.append((size - span).floordiv(s) + 1)
            else:
                out.append((size + pads[i] + pads[i + nd] - span).floordiv(s) + 1)
        return [tuple(out)]

    def _convtranspose(self, node, ins):
        return self._conv(node, ins, transpose=True)

    def _resize(self, node, ins):
        x = ins[0]
        if x is None:
            return [None]
        if len(node.input) > 3 and node.input[3]:
            sizes = self.ints(node.input[3])
            if sizes is None or _attr(node, "keep_aspect_ratio_policy", b"stretch") not in (
                b"stretch",
                "stretch",
            ):
                return [None]
            axes = self._axes(node, 99, len(x))
            axes = list(range(len(x))) if axes is None else axes
            out = list(x)
            for a, s in zip(axes, sizes, strict=True):
                out[a] = s
            return [tuple(out)]
        scales = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scales is None:
            return [None]
        out = []
        for d, s in zip(x, np.ravel(scales), strict=True):
            # ONNX Runtime sizes the output as int64(float32(d) * float32(s)), in float32:
            # 25 * 0.08f is 2 there and 1 in float64. Exact only below 2^24.
            s32 = np.float32(s)
            if float(s32) == 1.0:
                out.append(d)
            elif d.is_const:
                out.append(Dim(int(np.float32(d.const) * s32)))
            elif float(s32).is_integer() and d.bounds()[1] * float(s32) <= 2.0**24:
                out.append(d.scale(int(s32)))
            else:
                out.append(Dim.unknown())
        return [tuple(out)]

    def _argmax(self, node, ins):
        return self._reduce(node, ins, [_attr(node, "axis", 0)])

    _argmin = _argmax

    def _reducemax(self, node, ins):
        x = ins[0]
        axes = self._axes(node, 1, None if x is None else len(x))
        if not axes and _attr(node, "noop_with_empty_axes", 0):
            return [x]
        return self._reduce(node, ins, axes)

    _reducemin = _reducesum = _reducemean = _reducel2 = _reducemax

    def _reduce(self, node, ins, axes):
        x = ins[0]
        if x is None:
            return [None]
        axes = list(range(len(x))) if not axes else [a % len(x) for a in axes]
        keep = _attr(node, "keepdims", 1)
        out = [Dim(1) if i in axes else d for i, d in enumerate(x) if keep or i not in axes]
        return [tuple(out)]

    def _topk(self, node, ins):
        x, k = ins[0], self.ints(node.input[1])
        if x is None or k is None:
            return None
        axis = _attr(node, "axis", -1) % len(x)
        out = list(x)
        out[axis] = k[0]
        return [tuple(out), tuple(out)]

    def _expand(self, node, ins):
        x, target = ins[0], self.ints(node.input[1])
        if x is None or target is None:
            return [None]
        return [_broadcast([x, tuple(target)])]

    def _constantofshape(self, node, ins):
        target = self.ints(node.input[0])
        return [None if target is None else tuple(target)]

    def _where(self, node, ins):
        return [None if any(s is None for s in ins) else _broadcast(ins)]

    def _matmul(self, node, ins):
        a, b = ins
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return [None]
        batch = _broadcast([a[:-2], b[:-2]]) if len(a) > 2 or len(b) > 2 else ()
        return [(*batch, a[-2], b[-1])]

    def _gemm(self, node, ins):
        a, b = ins[0], ins[1]
        if a is None or b is None:
            return [None]
        m = a[1] if _attr(node, "transA", 0) else a[0]
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return [(m, n)]

    def _batchnormalization(self, node, ins):
        return [ins[0]] + [None] * (len(node.output) - 1)

    def _depthtospace(self, node, ins):
        x, b = ins[0], _attr(node, "blocksize")
        if x is None:
            return [None]
        n, c, h, w = x
        return [(n, c.floordiv(b * b), h.scale(b), w.scale(b))]

    def _spacetodepth(self, node, ins):
        x, b = ins[0], _attr(node, "blocksize")
        if x is None:
            return [None]
        n, c, h, w = x
        return [(n, c.scale(b * b), h.floordiv(b), w.floordiv(b))]


class _Unknown(Exception):
    pass


def _mod(p: Dim, q: Dim) -> Dim:
    if not q.is_const or q.const <= 0:
        raise _Unknown
    return p.mod(q.const)


def _div(p: Dim, q: Dim) -> Dim:
    """ONNX integer Div truncates toward zero: floor only where p >= 0 is proved."""
    if not q.is_const or q.const <= 0:
        raise _Unknown
    if p.is_const:
        quotient = abs(p.const) // q.const
        return Dim(quotient if p.const >= 0 else -quotient)
    if p.bounds()[0] < 0:
        raise _Unknown
    return p.floordiv(q.const)


def _quotient(x: Shape, rest: list[Dim]) -> Dim:
    """The -1 of a Reshape: prod(x) / prod(rest), where the division is evident."""
    left = [d for d in x]
    for r in rest:
        if r in left:
            left.remove(r)
        elif r.is_const and r.const == 1:
            continue
        else:
            consts = [d for d in left if d.is_const]
            total = math.prod(d.const for d in consts)
            if r.is_const and total % r.const == 0:
                for d in consts:
                    left.remove(d)
                left.append(Dim(total // r.const))
            else:
                return Dim.unknown()
    out = Dim(1)
    for d in left:
        out = out * d
    return out


def onnx_slice_indices(dim: int, start: int, end: int, step: int) -> range:
    """The indices ONNX's Slice takes along an axis of size `dim`, not Python's.

    They differ for negative steps: ONNX clamps a start below -dim to 0 (one element
    taken) where Python's slice takes none, so x[-100::-1] of 8 rows was derived as
    empty while ONNX Runtime ran 1, and a Mul then broadcast it uncounted."""
    if step == 0:
        raise ValueError("Slice step 0")
    start += dim if start < 0 else 0
    end += dim if end < 0 else 0
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return range(start, end, step)


def _slice_len(dim: Dim, start: Dim, end: Dim, step: Dim) -> Dim:
    """Length of x[start:end:step] along a size-`dim` axis, where it is evident."""
    if not (step.is_const and step.const == 1):
        return Dim.unknown()
    if start.bounds()[0] < 0 or (not end.is_const and end.bounds()[0] < 0):
        return Dim.unknown()  # a negative index counts from the end
    if end.is_const and end.const >= _BIG:
        stop = dim
    elif end.is_const and end.const < 0:
        return Dim.unknown()
    elif (dim - end).bounds()[0] >= 0:  # end <= dim for every input
        stop = end
    else:
        return Dim.unknown()
    length = stop - start
    return length if length.bounds()[0] >= 0 else Dim.unknown()


#: The ops with a rule of their own (the ONNX domain only; helpers such as `_reduce`
#: are not reachable by an op's name).
_RULE_OPS = frozenset(
    {"Constant", "Shape", "Size", "Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape"}
    | {"Flatten", "Transpose", "Concat", "Gather", "Slice", "Split", "Pad", "Conv"}
    | {"ConvTranspose", "Resize", "ArgMax", "ArgMin", "ReduceMax", "ReduceMin", "ReduceSum"}
    | {"ReduceMean", "ReduceL2", "TopK", "Expand", "ConstantOfShape", "Where", "MatMul"}
    | {"Gemm", "BatchNormalization", "DepthToSpace", "SpaceToDepth"}
)
_SAME_SHAPE = {"Relu", "Neg", "Abs", "Tanh", "Sigmoid", "Softplus", "LeakyRelu", "Clip"}
_SAME_SHAPE |= {"Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign"}
_SAME_SHAPE |= {"Not", "IsNaN", "IsInf"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Mod", "Pow", "Max", "Min", "Equal", "Less"}
_BROADCAST |= {"Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor"}


def derive_shapes(model: onnx.ModelProto, input_name: str = "image") -> ShapeTable:
    """Every tensor's shape from the graph and the input's declared sizes alone."""
    return _Deriver(model, input_name).run()
