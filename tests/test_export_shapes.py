"""export.shapes: sizes followed through the graph as expressions in the input's sizes.

The audit's broadcast rules rest on them, so each is checked against what runs:
random size arithmetic against Python's integers, and every tensor of the shipped
model against the shapes ONNX Runtime gives it at sizes of every residue mod 8.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.shapes import Dim, derive_shapes

STREET = Path(__file__).resolve().parents[1] / "certseg" / "weights" / "street" / "model.onnx"


def evaluate(d: Dim, env: dict[str, int]) -> int:
    """A Dim's value for given input sizes (test-side, by the atoms' meaning)."""
    total = d.const
    for atom, coeff in d.terms:
        kind = atom[0]
        if kind == "size":
            v = env[atom[1]]
        elif kind == "mod":
            v = evaluate(atom[1], env) % atom[2]
        elif kind == "div":
            v = evaluate(atom[1], env) // atom[2]
        elif kind == "mul":
            v = evaluate(atom[1], env) * evaluate(atom[2], env)
        else:
            raise KeyError(f"an unknown size has no value: {atom}")
        total += coeff * v
    return total


def _random_expr(rng: random.Random, depth: int):
    """(Dim, the same as a Python function of h and w)."""
    if depth == 0 or rng.random() < 0.25:
        pick = rng.randrange(3)
        if pick == 0:
            return Dim.atom(("size", "h")), lambda e: e["h"]
        if pick == 1:
            return Dim.atom(("size", "w")), lambda e: e["w"]
        c = rng.randint(-9, 9)
        return Dim(c), lambda e, c=c: c
    a, fa = _random_expr(rng, depth - 1)
    op = rng.randrange(6)
    if op == 0:
        b, fb = _random_expr(rng, depth - 1)
        return a + b, lambda e: fa(e) + fb(e)
    if op == 1:
        b, fb = _random_expr(rng, depth - 1)
        return a - b, lambda e: fa(e) - fb(e)
    if op == 2:
        k = rng.randint(-3, 4)
        return a.scale(k), lambda e: k * fa(e)
    if op == 3:
        k = rng.randint(1, 16)
        return a.mod(k), lambda e: fa(e) % k
    if op == 4:
        k = rng.randint(1, 16)
        return a.floordiv(k), lambda e: fa(e) // k
    b, fb = _random_expr(rng, depth - 1)
    return a * b, lambda e: fa(e) * fb(e)


def test_size_arithmetic_matches_python_integers_and_its_bounds_hold():
    rng = random.Random(0)
    for _ in range(400):
        d, f = _random_expr(rng, 4)
        lo, hi = d.bounds()
        for _ in range(8):
            # sizes >= 1: an input's size atom is bounded below by 1 (an empty image
            # has no pixel to certify, and the server refuses one)
            env = {"h": rng.randint(1, 300), "w": rng.randint(1, 300)}
            v = evaluate(d, env)
            assert v == f(env), (str(d), env)
            assert lo <= v <= hi, (str(d), env, lo, hi)


def test_one_size_by_two_routes_compares_equal():
    h = Dim.atom(("size", "h"))
    padded = h + (8 - h.mod(8)).mod(8)  # how the exporter pads to a multiple of 8
    assert padded == h + (h.scale(-1)).mod(8) == (h.scale(7)).mod(8) + h
    assert padded.floordiv(2).floordiv(2) == padded.floordiv(4)
    assert (padded + 2 - 3 - 1).floordiv(2) + 1 == padded.floordiv(2)  # conv k4 s2 p1
    assert (h.scale(2) + 1).floordiv(2) == h
    assert padded.mod(8) == Dim(0)
    assert Dim.unknown() != Dim.unknown()


def test_an_op_of_another_domain_is_not_read_as_the_onnx_op():
    """'Add' of a custom domain may compute anything: the Pad it sizes has unknown sizes
    (the audit then refuses the broadcasts that would need them)."""
    h = onnx.helper
    nodes = [
        h.make_node("Shape", ["image"], ["s1"]),
        h.make_node("Concat", ["s1", "s1"], ["s"], axis=0),  # 8 pads: before, after
        h.make_node("Add", ["s", "zero"], ["same"]),
        h.make_node("Add", ["s", "zero"], ["other"], domain="custom.ops"),
        h.make_node("Pad", ["image", "same"], ["a"]),
        h.make_node("Pad", ["image", "other"], ["b"]),
    ]
    img = h.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, "H", "W"])
    zero = onnx.numpy_helper.from_array(np.zeros(8, np.int64), "zero")
    g = h.make_graph(nodes, "g", [img], [onnx.ValueInfoProto(name="b")], initializer=[zero])
    table = derive_shapes(h.make_model(g))
    a = [evaluate(d, {"H": 5, "W": 7}) for d in table.shapes["a"]]
    assert a == [3, 9, 15, 21]  # every size padded by itself on both sides: Add is read
    assert table.shapes["b"] is None


def _all_tensors_as_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {o.name for o in m.graph.output}
    del m.graph.value_info[:]  # the declarations play no part (nor do they here)
    for node in m.graph.node:
        for out in node.output:
            if out and out not in names:
                m.graph.output.append(onnx.ValueInfoProto(name=out))
                names.add(out)
    return m


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """The graph as written (no fusions that drop tensors), one thread, errors only."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def street():
    model = onnx.load(STREET)
    return model, _session(_all_tensors_as_outputs(model))


@pytest.mark.parametrize("h, w", [(8, 8), (9, 15), (13, 22), (20, 11), (31, 40), (1, 3)])
def test_every_shape_of_the_shipped_model_is_the_one_onnx_runtime_computes(street, h, w):
    model, sess = street
    table = derive_shapes(model)
    x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    outs = sess.run(None, {"image": x})
    env = {"batch": 1, "height": h, "width": w}
    checked = 0
    for meta, value in zip(sess.get_outputs(), outs, strict=True):
        shape = table.shapes.get(meta.name)
        assert shape is not None, f"no shape derived for {meta.name}"
        derived = tuple(evaluate(d, env) for d in shape)
        assert derived == np.shape(value), (meta.name, [str(d) for d in shape])
        checked += 1
    assert checked > 200


# ------------------------------------------------------------------ random graphs


class _RandomGraph:
    """A random graph of the ops derive_shapes follows, on an image (1, 3, H, W)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.tensors = [("image", 3)]  # (name, channels) of float tensors (N, C, h, w)

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def const(self, value, dtype=np.int64) -> str:
        name = self.name("k")
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(onnx.helper.make_node(op, inputs, outs, **attrs))
        return outs

    def size_of(self, x: str, axis: int) -> str:
        """Shape(x)[axis] as a 1-element int64 tensor."""
        (s,) = self.node("Shape", [x])
        return self.node("Slice", [s, self.const([axis]), self.const([axis + 1])])[0]

    def arith(self, v: str) -> str:
        """Some shape arithmetic on a 1-element size (+ c, * c, mod c, // c), then + 1:
        a size of at least 1, which every op takes."""
        for _ in range(int(self.rng.integers(1, 4))):
            op = ["Add", "Mul", "Mod", "Div"][int(self.rng.integers(4))]
            c = int(self.rng.integers(1, 9)) if op != "Add" else int(self.rng.integers(0, 9))
            (v,) = self.node(op, [v, self.const([c])])
        return self.node("Add", [v, self.const([1])])[0]

    def step(self) -> None:
        x, c = self.tensors[int(self.rng.integers(len(self.tensors)))]
        kind = int(self.rng.integers(9))
        if kind == 0:  # pad to a multiple of m, as the exporter does
            m = int(self.rng.integers(2, 9))
            pads = []
            for axis in (2, 3):
                h = self.size_of(x, axis)
                (r,) = self.node("Mod", [h, self.const([m])])
                (s,) = self.node("Sub", [self.const([m]), r])
                pads.append(self.node("Mod", [s, self.const([m])])[0])
            (p,) = self.node("Concat", [self.const([0, 0, 0, 0, 0, 0]), *pads], axis=0)
            self.tensors.append((self.node("Pad", [x, p])[0], c))
        elif kind in (1, 2):  # conv, stride 1 or 2
            k, s = int(self.rng.choice([1, 3, 4])), int(self.rng.integers(1, 3))
            pad = k // 2  # an output of at least 1 at any size
            out = int(self.rng.integers(1, 5))
            w = self.const(self.rng.normal(size=(out, c, k, k)), np.float32)
            y = self.node("Conv", [x, w], strides=[s, s], pads=[pad] * 4)[0]
            self.tensors.append((y, out))
        elif kind == 3:  # transposed conv, stride 2
            w = self.const(self.rng.normal(size=(c, 2, 4, 4)), np.float32)
            y = self.node("ConvTranspose", [x, w], strides=[2, 2], pads=[1, 1, 1, 1])[0]
            self.tensors.append((y, 2))
        elif kind == 4:  # resize to sizes computed from another tensor's shape
            other, _ = self.tensors[int(self.rng.integers(len(self.tensors)))]
            hw = [self.arith(self.size_of(other, a)) for a in (2, 3)]
            sizes = self.node("Concat", [self.const([1, c]), *hw], axis=0)[0]
            y = self.node("Resize", [x, "", "", sizes], mode="nearest")[0]
            self.tensors.append((y, c))
        elif kind == 5:  # slice a computed end along H
            end = self.arith(self.size_of(x, 2))
            y = self.node("Slice", [x, self.const([0]), end, self.const([2])])[0]
            self.tensors.append((y, c))
        elif kind == 6:  # broadcast with a per-channel constant, then with itself
            b = self.const(self.rng.normal(size=(1, c, 1, 1)), np.float32)
            (y,) = self.node("Add", [x, b])
            self.tensors.append((self.node("Max", [y, x])[0], c))
        elif kind == 7 and c >= 2:  # split in two channel halves, concat back
            h = c // 2
            a, b = self.node("Split", [x, self.const([h, c - h])], n_out=2, axis=1)
            self.tensors.append((self.node("Concat", [b, a], axis=1)[0], c))
        elif kind == 8:  # scale by 2 (Resize scales) or fold the channels into H
            if self.rng.random() < 0.5:
                scales = self.const([1, 1, 2, 2], np.float32)
                self.tensors.append((self.node("Resize", [x, "", scales])[0], c))
            else:
                shape = self.const([0, 1, -1, 0])
                self.tensors.append((self.node("Reshape", [x, shape])[0], 1))

    def model(self) -> onnx.ModelProto:
        for _ in range(12):
            self.step()
        img = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, "H", "W"])
        outs = [onnx.ValueInfoProto(name=o) for n in self.nodes for o in n.output]
        g = onnx.helper.make_graph(self.nodes, "g", [img], outs, initializer=self.inits)
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)])


@pytest.mark.parametrize("seed", range(40))
def test_random_graphs_shapes_are_the_ones_onnx_runtime_computes(seed):
    """Every tensor whose shape is derived (no unknown size in it) has that shape in
    ONNX Runtime, at sizes of several residues (all three run: a failing run is a
    failure, not a size left out)."""
    model = _RandomGraph(seed).model()
    table = derive_shapes(model)
    sess = _session(model)
    compared = 0
    for h, w in [(7, 12), (16, 9), (21, 30)]:
        x = np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32)
        outs = sess.run(None, {"image": x})  # the generator keeps every op valid here
        env = {"H": h, "W": w}
        for meta, value in zip(sess.get_outputs(), outs, strict=True):
            shape = table.shapes.get(meta.name)
            try:
                derived = tuple(evaluate(d, env) for d in shape)
            except (KeyError, TypeError):  # an unknown size, or an unknown rank
                continue
            assert derived == np.shape(value), (meta.name, [str(d) for d in shape])
            compared += 1
    assert compared > 0
