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
            env = {"h": rng.randint(0, 300), "w": rng.randint(0, 300)}
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


@pytest.fixture(scope="module")
def street():
    model = onnx.load(STREET)
    probe = _all_tensors_as_outputs(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return model, sess


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
