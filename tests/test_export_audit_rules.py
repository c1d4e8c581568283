"""The ONNX audit's rules, one hand-built graph at a time (no torch export needed).

Each sound case is also checked empirically: ||f(x) - f(y)|| / ||x - y|| over random
pairs, run by ONNX Runtime, never exceeds the audited L.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper

from certseg.certify.operator_norm import conv_norm_bound, matrix_norm_bound
from export.audit import AuditError, audit_onnx, format_table

RNG = np.random.default_rng(0)


def _graph(nodes, inits, in_shape=(1, 3, 8, 8), out="logits", extra_inputs=()):
    g = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("image", TP.FLOAT, list(in_shape)), *extra_inputs],
        [oh.make_tensor_value_info(out, TP.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _empirical(model, in_shape=(1, 3, 8, 8), pairs=30) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    worst = 0.0
    for _ in range(pairs):
        x = RNG.random(in_shape, dtype=np.float32)
        y = x + RNG.normal(scale=1e-2, size=in_shape).astype(np.float32)
        fx, fy = (sess.run(None, {"image": v})[0].astype(np.float64) for v in (x, y))
        worst = max(worst, np.linalg.norm(fx - fy) / np.linalg.norm((x - y).astype(np.float64)))
    return worst


def _w(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def test_conv_chain_uses_operator_norm_bounds():
    w1, w2 = _w(8, 3, 3, 3), _w(4, 8, 4, 4)
    nodes = [
        oh.make_node("Conv", ["image", "w1"], ["a"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["a"], ["b"]),
        oh.make_node("Conv", ["b", "w2"], ["logits"], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    model = _graph(nodes, {"w1": w1, "w2": w2})
    rep = audit_onnx(model)
    want = conv_norm_bound(w1).upper * conv_norm_bound(w2, stride=2).upper
    assert rep.lipschitz_audited == pytest.approx(want, rel=1e-12)
    assert [r.op for r in rep.layers] == ["Conv", "Relu", "Conv"]
    assert rep.layers[0].weight == "w1" and rep.layers[0].lower <= rep.layers[0].upper
    assert _empirical(model) <= rep.lipschitz_audited
    assert "audited L" in format_table(rep)


def _conv_split_sort() -> list:
    """c = Conv(image, w), split in halves a and b, sorted in pairs: hi, lo."""
    return [
        oh.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Split", ["c"], ["a", "b"], axis=1, num_outputs=2),
        oh.make_node("Max", ["a", "b"], ["hi"]),
        oh.make_node("Min", ["a", "b"], ["lo"]),
    ]


def test_maxmin_concat_scale_and_branches():
    """Split -> Max/Min -> Concat is 1; a Concat of branches times s is s*sqrt(sum L^2)."""
    w = _w(4, 3, 3, 3)
    nodes = [
        *_conv_split_sort(),
        oh.make_node("Concat", ["hi", "lo"], ["mm"], axis=1),
        oh.make_node("Concat", ["mm", "c", "image"], ["cat"], axis=1),
        oh.make_node("Mul", ["cat", "s"], ["logits"]),
    ]
    model = _graph(nodes, {"w": w, "s": np.float32(0.25)})
    rep = audit_onnx(model)
    lw = conv_norm_bound(w).upper
    assert rep.lipschitz_audited == pytest.approx(0.25 * math.sqrt(lw**2 + lw**2 + 1), rel=1e-12)
    assert _empirical(model) <= rep.lipschitz_audited


@pytest.mark.parametrize(
    ("parts", "squares"),
    [
        (["a", "b"], 1),  # each part once: no longer than the split tensor
        (["a", "a", "b"], 3),  # a twice: its gain counts twice
        (["hi", "lo", "hi"], 3),  # a sorted pair used twice is no longer a permutation
        (["hi", "a"], 2),  # a sorted pair and a raw part of the same split overlap
    ],
)
def test_concat_of_one_splits_parts_is_one_only_when_each_is_used_once(parts, squares):
    """Concat of a Split's parts (raw, or sorted by Max/Min in pairs) is bounded by the
    split tensor alone only if no part is used twice: Concat(a, a) doubles a's energy
    (sqrt 2), and bounding it at 1 would under-bound L."""
    w = _w(4, 3, 3, 3)
    nodes = [
        *_conv_split_sort(),
        oh.make_node("Concat", parts, ["logits"], axis=1),
    ]
    model = _graph(nodes, {"w": w})
    rep = audit_onnx(model)
    lw = conv_norm_bound(w).upper
    assert rep.lipschitz_audited == pytest.approx(math.sqrt(squares) * lw, rel=1e-12)
    assert _empirical(model) <= rep.lipschitz_audited


def test_gather_is_a_restriction_only_without_repeated_or_negative_indices():
    """Gather of distinct indices drops coordinates (gain 1); repeated ones copy an
    element (gain sqrt 2 for a pair) and negative ones may alias a positive one:
    refused, not bounded at 1."""
    w = _w(3, 3, 3, 3)

    def gather(indices):
        nodes = [
            oh.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Gather", ["c", "idx"], ["logits"], axis=1),
        ]
        return _graph(nodes, {"w": w, "idx": np.array(indices, np.int64)})

    assert audit_onnx(gather([2, 0])).lipschitz_audited == pytest.approx(
        conv_norm_bound(w).upper, rel=1e-12
    )
    for indices in ([0, 0], [1, 2, 1], [0, -3]):
        with pytest.raises(AuditError, match="may repeat elements"):
            audit_onnx(gather(indices))


@pytest.mark.parametrize("op", ["Exp", "Log", "Sqrt", "Reciprocal", "Pow"])
def test_elementwise_ops_without_a_lipschitz_bound_are_refused(op):
    """Only elementwise maps with a known bound (Relu, Tanh, ...) pass; exp and its
    like have none on the image's range and must never be taken as 1-Lipschitz."""
    inputs = ["image", "two"] if op == "Pow" else ["image"]
    nodes = [oh.make_node(op, inputs, ["logits"])]
    with pytest.raises(AuditError, match=op):
        audit_onnx(_graph(nodes, {"two": np.float32(2.0)} if op == "Pow" else {}))


def test_max_of_unrelated_tensors_is_root_sum_square():
    w = _w(3, 3, 1, 1)
    nodes = [
        oh.make_node("Conv", ["image", "w"], ["c"]),
        oh.make_node("Max", ["c", "image"], ["logits"]),
    ]
    rep = audit_onnx(_graph(nodes, {"w": w}))
    assert rep.lipschitz_audited == pytest.approx(
        math.hypot(matrix_norm_bound(w[:, :, 0, 0]).upper, 1)
    )


def test_residual_add_gemm_and_normalization():
    mean = np.array([0.4, 0.5, 0.6], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2, 0.25, 0.3], np.float32).reshape(1, 3, 1, 1)
    w = _w(3, 3, 3, 3)
    g = _w(5, 192)
    nodes = [
        oh.make_node("Sub", ["image", "mean"], ["a"]),
        oh.make_node("Div", ["a", "std"], ["n"]),
        oh.make_node("Conv", ["n", "w"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Add", ["n", "c"], ["r"]),
        oh.make_node("Reshape", ["r", "shape"], ["flat"]),
        oh.make_node("Gemm", ["flat", "g"], ["logits"], transB=1, alpha=0.5),
    ]
    model = _graph(nodes, {"mean": mean, "std": std, "w": w, "g": g, "shape": np.array([1, 192])})
    rep = audit_onnx(model)
    want = (1 / float(std.min())) * (1 + 2**-23) * (1 + conv_norm_bound(w).upper) * 0.5
    want *= matrix_norm_bound(g).upper
    assert rep.lipschitz_audited == pytest.approx(want, rel=1e-12)  # the 2^-23 counts
    assert _empirical(model) <= rep.lipschitz_audited


def test_grouped_and_strided_1x1_and_transposed():
    wg = _w(6, 1, 3, 3)  # depthwise-ish: 3 groups of 2 outputs
    w1 = _w(4, 6, 1, 1)
    wt = _w(4, 2, 2, 2)
    nodes = [
        oh.make_node("Conv", ["image", "wg"], ["a"], group=3, pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["a", "w1"], ["b"], strides=[2, 2]),
        oh.make_node("ConvTranspose", ["b", "wt"], ["logits"], strides=[2, 2]),
    ]
    model = _graph(nodes, {"wg": wg, "w1": w1, "wt": wt})
    rep = audit_onnx(model)
    groups = max(conv_norm_bound(wg[2 * i : 2 * i + 2]).upper for i in range(3))
    want = groups * matrix_norm_bound(w1[:, :, 0, 0]).upper
    want *= conv_norm_bound(wt, stride=2).upper
    assert rep.lipschitz_audited == pytest.approx(want, rel=1e-12)
    assert _empirical(model) <= rep.lipschitz_audited


def test_broadcast_duplication_is_counted():
    # (1,1,8,8) + (1,4,1,1) repeats every pixel 4 times: factor sqrt(4).
    nodes = [
        oh.make_node("ReduceMean", ["image", "ax"], ["m"], keepdims=1),
    ]
    # ReduceMean is not a supported op: refused by name.
    with pytest.raises(AuditError, match="ReduceMean"):
        audit_onnx(
            _graph([*nodes, oh.make_node("Identity", ["m"], ["logits"])], {"ax": np.array([1])})
        )
    nodes = [
        oh.make_node("Slice", ["image", "s0", "s1", "ax"], ["one"]),
        oh.make_node("Add", ["one", "c"], ["logits"]),
    ]
    inits = {
        "s0": np.array([0]),
        "s1": np.array([1]),
        "ax": np.array([1]),
        "c": np.zeros((1, 4, 1, 1), np.float32),
    }
    model = _graph(nodes, inits)
    rep = audit_onnx(model)
    assert rep.lipschitz_audited == pytest.approx(2.0)
    assert _empirical(model) <= rep.lipschitz_audited


def test_gemm_counts_a_broadcast_image_dependent_bias():
    # C = the first pixel, (1, 1), added to all 4 outputs: its gain is sqrt(4), not 1.
    g = _w(4, 192)
    nodes = [
        oh.make_node("Reshape", ["image", "shape"], ["flat"]),
        oh.make_node("Slice", ["flat", "s0", "s1", "ax"], ["c"]),
        oh.make_node("Gemm", ["flat", "g", "c"], ["logits"], transB=1),
    ]
    inits = {"g": g, "shape": np.array([1, 192]), "s0": np.array([0]), "s1": np.array([1])}
    rep = audit_onnx(_graph(nodes, {**inits, "ax": np.array([1])}))
    assert rep.lipschitz_audited == pytest.approx(matrix_norm_bound(g).upper + 2.0)


def test_an_op_of_another_domain_is_not_taken_for_the_onnx_op():
    g = oh.make_graph(
        [oh.make_node("Relu", ["image"], ["logits"], domain="com.example")],
        "g",
        [oh.make_tensor_value_info("image", TP.FLOAT, [1, 3, 8, 8])],
        [oh.make_tensor_value_info("logits", TP.FLOAT, [1, 3, 8, 8])],
    )
    opsets = [oh.make_opsetid("", 18), oh.make_opsetid("com.example", 1)]
    model = oh.make_model(g, opset_imports=opsets)
    with pytest.raises(AuditError, match=r"domain 'com\.example'"):
        audit_onnx(model)


_BN = {k: np.ones(3, np.float32) for k in ("scale", "bias", "mean", "var")}


def _if_reading_the_image():
    """An If whose branches read `image` from the outer scope (no inputs of their own)."""
    branch = oh.make_graph(
        [oh.make_node("Mul", ["image", "big"], ["s"])],
        "branch",
        [],
        [oh.make_tensor_value_info("s", TP.FLOAT, None)],
    )
    return [
        oh.make_node("If", ["cond"], ["s_out"], then_branch=branch, else_branch=branch),
        oh.make_node("Add", ["image", "s_out"], ["logits"]),
    ]


def test_ops_that_mix_the_images_of_a_batch_are_refused():
    """The batcher stacks different clients' images: an op that moves axis 0 or combines
    along it makes one image's answer depend on another's (gain 1 by every other rule)."""
    batch = ("N", 3, 8, 8)
    w = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    cases = [
        (  # the red-team's: the batch moved to a spatial axis, where a conv mixes it
            [
                oh.make_node("Transpose", ["image"], ["t"], perm=[2, 1, 0, 3]),
                oh.make_node("Conv", ["t", "w3"], ["c"], pads=[1, 0, 1, 0]),
                oh.make_node("Transpose", ["c"], ["logits"], perm=[2, 1, 0, 3]),
            ],
            {"w3": np.ones((3, 3, 3, 1), np.float32) / 9},
            "Transpose",
        ),
        (  # image i + 1's pixels answered as image i's
            [oh.make_node("Slice", ["image", "s", "e", "ax"], ["logits"])],
            {"s": i64(1), "e": i64(9), "ax": i64(0)},
            "Slice along the batch",
        ),
        (
            [
                oh.make_node("Split", ["image"], ["a", "b"], axis=1, num_outputs=2),
                oh.make_node("Concat", ["image", "image"], ["logits"], axis=0),
            ],
            {},
            "Concat along the batch",
        ),
        (
            [oh.make_node("Pad", ["image", "p"], ["logits"])],
            {"p": i64(1, 0, 0, 0, 0, 0, 0, 0)},
            "Pad of the batch",
        ),
        (
            [
                oh.make_node("Reshape", ["image", "sh"], ["r"]),
                oh.make_node("Conv", ["r", "w"], ["c"]),
                oh.make_node("Reshape", ["c", "sh2"], ["logits"]),
            ],
            {
                "sh": i64(1, -1, 8, 8),
                "sh2": i64(-1, 3, 8, 8),
                "w": np.ones((3, 6, 1, 1), np.float32),
            },
            "Reshape",
        ),
    ]
    for nodes, inits, match in cases:
        with pytest.raises(AuditError, match=match):
            audit_onnx(_graph(nodes, inits, in_shape=batch))
    # Per-image ops pass, with the batch symbolic: conv, a residual, a pad of H and W.
    ok = [
        oh.make_node("Pad", ["image", "p"], ["x"]),
        oh.make_node("Conv", ["x", "w"], ["c"]),
        oh.make_node("Add", ["x", "c"], ["logits"]),
    ]
    rep = audit_onnx(_graph(ok, {"p": i64(0, 0, 1, 1, 0, 0, 1, 1), "w": w}, in_shape=batch))
    assert rep.lipschitz_audited == pytest.approx(2.0)


def _repeat_graph(target: str) -> tuple[list, dict]:
    """xr: za (1, 1, 8, 8) reshaped to `target`'s value, then added to y (1, 8, 8, 8):
    Add repeats each element of xr 8 times (gain sqrt 8 on that branch, not 1)."""
    nodes = [
        oh.make_node("Conv", ["image", "w1"], ["za"]),
        oh.make_node("Shape", ["za"], ["sz"]),
        oh.make_node("Reshape", ["za", target], ["xr"]),
        oh.make_node("Conv", ["image", "w8"], ["y"]),
        oh.make_node("Add", ["xr", "y"], ["logits"]),
    ]
    w1 = (np.ones((1, 3, 1, 1)) / np.sqrt(3)).astype(np.float32)  # gain 1
    inits = {"w1": w1, "w8": np.full((8, 3, 1, 1), 1e-3, np.float32)}
    return nodes, inits


def test_a_size_the_graph_does_not_fix_is_not_taken_for_any_other():
    """The Reshape's target goes through float arithmetic (Shape -> Cast -> Mul 1.0 ->
    Cast): no rule follows it, so xr's shape is unknown and the Add is refused."""
    nodes, inits = _repeat_graph("sz2")
    nodes[2:2] = [
        oh.make_node("Cast", ["sz"], ["szf"], to=TP.FLOAT),
        oh.make_node("Mul", ["szf", "one"], ["szm"]),
        oh.make_node("Cast", ["szm"], ["sz2"], to=TP.INT64),
    ]
    model = _graph(nodes, {**inits, "one": np.float32(1.0)})
    with pytest.raises(AuditError, match="unknown shapes"):
        audit_onnx(model, check_head=False)


def test_two_sizes_not_proved_equal_are_not_taken_for_equal():
    """x[:, :, :1000] of an image of height H is min(1000, H) rows: not proved to be H,
    so its Add to a tensor of H rows is refused, not taken for an Add of equals."""
    nodes = [
        oh.make_node("Conv", ["image", "w8"], ["x"]),
        oh.make_node("Slice", ["x", "zero", "end", "two"], ["xs"]),
        oh.make_node("Conv", ["image", "w8"], ["y"]),
        oh.make_node("Add", ["xs", "y"], ["logits"]),
    ]
    inits = {"w8": np.full((8, 3, 1, 1), 0.2, np.float32)}
    inits |= {k: np.array([v], np.int64) for k, v in (("zero", 0), ("end", 1000), ("two", 2))}
    model = _graph(nodes, inits, in_shape=(1, 3, "H", "W"))
    with pytest.raises(AuditError, match="cannot prove shapes"):
        audit_onnx(model, check_head=False)


@pytest.mark.parametrize("in_shape", [(1, 3, 8, 8), (1, 3, "H", "W")])
def test_a_declared_size_is_never_trusted(in_shape):
    """A file that declares xr (1, 8, H, W) where the graph makes it (1, 1, H, W): ONNX
    inference cannot follow a Reshape to a computed shape, ONNX Runtime runs the file
    anyway (it warns), and the audit that took the declaration gave L = 1.005 to a
    graph whose measured gain was 1.83. Sizes come from the graph alone."""
    nodes, inits = _repeat_graph("sz")
    model = _graph(nodes, inits, in_shape=in_shape)
    h, w = (8, 8) if in_shape[2] == 8 else ("H", "W")
    del model.graph.value_info[:]
    model.graph.value_info.append(oh.make_tensor_value_info("xr", TP.FLOAT, [1, 8, h, w]))
    rep = audit_onnx(model, check_head=False)
    y_gain = matrix_norm_bound(inits["w8"][:, :, 0, 0]).upper
    assert rep.lipschitz_audited >= math.sqrt(8) + y_gain * 0.99
    assert rep.lipschitz_audited >= _empirical(model)


def test_what_the_audit_cannot_read_as_onnx_runtime_runs_it_is_refused():
    """Red-team cases that passed: each fools a rule that reads the file, not the math."""
    cases = [
        # inf * 0 = NaN: every later comparison with NaN was false (passed as any L)
        (
            [oh.make_node("Relu", ["image"], ["r0"])]
            + [oh.make_node("LeakyRelu", [f"r{i}"], [f"r{i + 1}"], alpha=3e38) for i in range(9)]
            + [
                oh.make_node("Mul", ["r9", "zero"], ["z"]),
                oh.make_node("Add", ["image", "z"], ["logits"]),
            ],
            {"zero": np.float32(0)},
            "not finite",
        ),
        # x 2^-149 (subnormal: rounds to a step), then back up: gain 1 on paper
        (
            [
                oh.make_node("Mul", ["image", "tiny"], ["t"]),
                oh.make_node("Mul", ["t", "big"], ["u"]),
                oh.make_node("Mul", ["u", "big2"], ["logits"]),
            ],
            {
                "tiny": np.float32(2.0**-149),
                "big": np.float32(2.0**100),
                "big2": np.float32(2.0**49),
            },
            "underflows",
        ),
        # + 2^40 - 2^40 rounds the image to multiples of 2^17: absorption
        (
            [
                oh.make_node("Add", ["image", "huge"], ["t"]),
                oh.make_node("Sub", ["t", "huge"], ["logits"]),
            ],
            {"huge": np.float32(2.0**40)},
            "absorption",
        ),
        # a subgraph reads the image though the node's own inputs are all static
        (_if_reading_the_image(), {"cond": np.array(True), "big": np.float32(20)}, "subgraph"),
        # a fresh random draw is not a constant
        (
            [
                oh.make_node("RandomUniform", [], ["u"], shape=[1, 3, 1, 1], dtype=TP.FLOAT),
                oh.make_node("Add", ["image", "u"], ["logits"]),
            ],
            {},
            "random draw",
        ),
        # numpy reads "7_0e-3" as 0.07, ONNX Runtime as 7.0: strings are no constants
        (
            [
                oh.make_node("Cast", ["s"], ["c"], to=TP.FLOAT),
                oh.make_node("Mul", ["image", "c"], ["logits"]),
            ],
            {"s": np.array(["7_0e-3"], dtype=object)},
            "not a constant",
        ),
        # opset < 14's training form: asking for the running statistics
        (
            [
                oh.make_node(
                    "BatchNormalization",
                    ["image", "scale", "bias", "mean", "var"],
                    ["logits", "rm", "rv"],
                )
            ],
            _BN,
            "training mode",
        ),
        # Max of three: the constant's broadcast (x8 here) was not counted
        (
            [oh.make_node("Max", ["image", "image", "c"], ["logits"])],
            {"c": np.zeros((1, 8, 1, 1), np.float32)},
            "only 2",
        ),
    ]
    for nodes, inits, match in cases:
        with pytest.raises(AuditError, match=match):
            audit_onnx(_graph(nodes, inits))
    sparse = _graph([oh.make_node("Mul", ["image", "c"], ["logits"])], {"c": np.float32(0.1)})
    values = numpy_helper.from_array(np.array([10.0], np.float32), "c")
    indices = numpy_helper.from_array(np.array([0], np.int64), "c_idx")
    sparse.graph.sparse_initializer.append(oh.make_sparse_tensor(values, indices, [1]))
    with pytest.raises(AuditError, match="sparse"):  # ONNX Runtime takes it over "c"
        audit_onnx(sparse)


@pytest.mark.parametrize(
    ("nodes", "inits", "match"),
    [
        ([oh.make_node("Softmax", ["image"], ["logits"], axis=1)], {}, "Softmax"),
        (
            [
                oh.make_node(
                    "BatchNormalization",
                    ["image", "scale", "bias", "mean", "var"],
                    ["logits"],
                    training_mode=1,
                )
            ],
            _BN,
            "training mode",
        ),
        (
            [oh.make_node("Resize", ["image", "", "sc"], ["logits"])],
            {"sc": np.array([1, 1, 2, 2], np.float32)},
            "Resize",
        ),
        (
            [oh.make_node("Pad", ["image", "p"], ["logits"], mode="reflect")],
            {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1])},
            "reflect",
        ),
        ([oh.make_node("Mul", ["image", "image"], ["logits"])], {}, "two image-dependent"),
        ([oh.make_node("Div", ["one", "image"], ["logits"])], {"one": np.float32(1)}, "Div by"),
        (
            [
                oh.make_node("Mul", ["w", "k"], ["w2"]),
                oh.make_node("Conv", ["image", "w2"], ["logits"]),
            ],
            {"w": np.ones((2, 3, 1, 1), np.float32), "k": np.float32(1.01)},
            "not a constant",
        ),
        (
            [oh.make_node("Expand", ["image", "sh"], ["logits"])],
            {"sh": np.array([2, 3, 8, 8])},
            "Expand",
        ),
    ],
)
def test_unsupported_paths_are_refused_by_name(nodes, inits, match):
    with pytest.raises(AuditError, match=match):
        audit_onnx(_graph(nodes, inits))


def test_overridable_weight_is_refused():
    """An initializer that is also a graph input can be swapped at run time."""
    nodes = [oh.make_node("Conv", ["image", "w"], ["logits"])]
    extra = [oh.make_tensor_value_info("w", TP.FLOAT, [2, 3, 1, 1])]
    model = _graph(nodes, {"w": np.ones((2, 3, 1, 1), np.float32)}, extra_inputs=extra)
    with pytest.raises(AuditError, match="not a constant"):
        audit_onnx(model)


def test_declared_bound_check_and_head_checks():
    w = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1) * np.float32(1.01)
    model = _graph([oh.make_node("Conv", ["image", "w"], ["logits"])], {"w": w})
    assert audit_onnx(model, declared=1.0, rtol=0.02).ok
    with pytest.raises(AuditError, match="exceeds the declared"):
        audit_onnx(model, declared=1.0)
    rep = audit_onnx(model, declared=1.0, strict=False)
    assert not rep.ok and rep.ratio == pytest.approx(1.01)

    # A head that reads the image directly (not only through the logits) is refused.
    nodes = [
        oh.make_node("Conv", ["image", "w"], ["z"]),
        oh.make_node("ArgMax", ["z"], ["am"], axis=1, keepdims=0),
        oh.make_node("Cast", ["am"], ["mask"], to=TP.INT32),
        oh.make_node("ReduceMax", ["z", "ax"], ["t1"], keepdims=0),
        oh.make_node("ReduceMax", ["image", "ax"], ["t2"], keepdims=0),
        oh.make_node("Sub", ["t1", "t2"], ["margin"]),
        oh.make_node("Mul", ["margin", "s"], ["radius"]),
    ]
    g = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("image", TP.FLOAT, [1, 3, 8, 8])],
        [
            oh.make_tensor_value_info("mask", TP.INT32, None),
            oh.make_tensor_value_info("margin", TP.FLOAT, None),
            oh.make_tensor_value_info("radius", TP.FLOAT, None),
        ],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([1]), "ax"),
            numpy_helper.from_array(np.float32(0.9), "s"),
        ],
    )
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)])
    with pytest.raises(AuditError, match="not the logits"):
        audit_onnx(model)
    rep = audit_onnx(model, strict=False)
    assert rep.logits_tensor == "z" and rep.head_scale == pytest.approx(0.9)
    assert any("radius head" in p for p in rep.problems)  # 0.9 > 1 / (sqrt(2) * 1.01)


def test_declared_shapes_must_agree_with_the_graph():
    """A file cannot hide a broadcast by declaring a tensor bigger than it is."""
    nodes = [
        oh.make_node("Slice", ["image", "s0", "s1", "ax"], ["one"]),
        oh.make_node("Add", ["one", "c"], ["logits"]),
    ]
    inits = {
        "s0": np.array([0]),
        "s1": np.array([1]),
        "ax": np.array([1]),
        "c": np.zeros((1, 4, 1, 1), np.float32),
    }
    model = _graph(nodes, inits)
    del model.graph.value_info[:]
    model.graph.value_info.append(oh.make_tensor_value_info("one", TP.FLOAT, [1, 4, 8, 8]))
    with pytest.raises(AuditError, match="contradicts"):
        audit_onnx(model)


def test_shape_arithmetic_that_wraps_around_in_int64_is_not_followed():
    """end = ((H - 1) * 2^32 * 2^32) // 2^32 // 2^32 + 1 is H = 6 in Python's integers
    and 1 in ONNX Runtime's int64 (the product wraps to 0): x[:, :, :end] is one row,
    which Add repeats 6 times. The audit must not read end as 6."""
    c = np.array([2**32], np.int64)
    nodes = [
        oh.make_node("Conv", ["image", "w8"], ["x"]),
        oh.make_node("Conv", ["image", "w8"], ["y"]),
        oh.make_node("Shape", ["image"], ["s"]),
        oh.make_node("Slice", ["s", "two", "three"], ["h"]),
        oh.make_node("Sub", ["h", "one"], ["h1"]),
        oh.make_node("Mul", ["h1", "c"], ["m1"]),
        oh.make_node("Mul", ["m1", "c"], ["m2"]),
        oh.make_node("Div", ["m2", "c"], ["d1"]),
        oh.make_node("Div", ["d1", "c"], ["d2"]),
        oh.make_node("Add", ["d2", "one"], ["end"]),
        oh.make_node("Slice", ["x", "zero", "end", "two"], ["xs"]),
        oh.make_node("Add", ["xs", "y"], ["logits"]),
    ]
    i64 = lambda v: np.array([v], np.int64)  # noqa: E731
    inits = {"w8": np.full((8, 3, 1, 1), 0.2, np.float32), "c": c}
    inits |= {"zero": i64(0), "one": i64(1), "two": i64(2), "three": i64(3)}
    model = _graph(nodes, inits, in_shape=(1, 3, 6, 5))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.random((1, 3, 6, 5), dtype=np.float32)
    out = sess.run(None, {"image": x})[0]
    assert out.shape == (1, 8, 6, 5)
    conv = 0.2 * x.sum(axis=1)  # x and y alike, on each of the 8 channels
    row0 = np.broadcast_to(conv[:, :1], out[0].shape)
    np.testing.assert_allclose(out[0] - conv, row0, rtol=1e-5)  # xs: one row, repeated
    with pytest.raises(AuditError, match="unknown shapes"):
        audit_onnx(model, check_head=False)


_EYE = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)


def _shadowing_constant() -> onnx.ModelProto:
    """Conv reads w (an initializer, norm 1); a Constant after it writes w x100, which
    ONNX Runtime (sorting the graph, the later definition winning) runs."""
    late = oh.make_node("Constant", [], ["w"], value=numpy_helper.from_array(_EYE * 100))
    return _graph([oh.make_node("Conv", ["image", "w"], ["logits"]), late], {"w": _EYE})


def _image_initializer() -> onnx.ModelProto:
    """An initializer named image (1x3x1x1) fixed every derived size at 1: row 0 and the
    image looked alike, and Add's repeat of row 0 H times was not counted."""
    nodes = [
        oh.make_node("Slice", ["image", "zero", "one", "two"], ["row0"]),
        oh.make_node("Add", ["row0", "image"], ["logits"]),
    ]
    inits = {"image": np.zeros((1, 3, 1, 1), np.float32)}
    inits |= {k: np.array([v], np.int64) for k, v in (("zero", 0), ("one", 1), ("two", 2))}
    return _graph(nodes, inits, in_shape=(1, 3, "H", "W"))


def _external_weight() -> onnx.ModelProto:
    """w stored in w.bin: resolved against the process's directory by the audit's
    onnx, against the model's by ONNX Runtime: two files."""
    model = _graph([oh.make_node("Conv", ["image", "w"], ["logits"])], {"w": _EYE})
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in {"location": "w.bin", "offset": "0", "length": str(_EYE.nbytes)}.items():
        t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
    return model


def _unnamed_split() -> onnx.ModelProto:
    """Splits whose first outputs are unnamed shared one split id: parts of two
    tensors were taken for disjoint parts of one (and ONNX Runtime crashes on them)."""
    nodes = [
        oh.make_node("Split", ["image", "ones"], ["", "a", ""], axis=1),
        oh.make_node("Split", ["image", "ones"], ["", "b", ""], axis=1),
        oh.make_node("Concat", ["a", "b"], ["logits"], axis=1),
    ]
    return _graph(nodes, {"ones": np.ones(3, np.int64)})


def _two_writers() -> onnx.ModelProto:
    nodes = [
        oh.make_node("Mul", ["image", "k1"], ["t"]),
        oh.make_node("Mul", ["image", "k2"], ["t"]),
        oh.make_node("Identity", ["t"], ["logits"]),
    ]
    return _graph(nodes, {"k1": np.float32(1), "k2": np.float32(100)})


def _out_of_order() -> onnx.ModelProto:
    nodes = [
        oh.make_node("Identity", ["t"], ["logits"]),
        oh.make_node("Mul", ["image", "k"], ["t"]),
    ]
    return _graph(nodes, {"k": np.float32(100)})


def _duplicate_initializer() -> onnx.ModelProto:
    model = _graph([oh.make_node("Conv", ["image", "w"], ["logits"])], {"w": _EYE})
    model.graph.initializer.append(numpy_helper.from_array(_EYE * 100, "w"))
    return model


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_shadowing_constant, "redefines 'w'"),
        (_image_initializer, "initializer is named 'image'"),
        (_external_weight, "external data"),
        (_unnamed_split, "leaves an output unnamed"),
        (_two_writers, "redefines 't'"),
        (_out_of_order, "before it is defined"),
        (_duplicate_initializer, "defined 2 times"),
    ],
)
def test_a_graph_read_otherwise_than_onnx_runtime_runs_it_is_refused(make, match, tmp_path):
    """Each tensor is defined once, before it is read, inside the file: red-team files
    that passed the audit with L about 1 while ONNX Runtime ran a larger gain."""
    model = make()
    with pytest.raises(AuditError, match=match):
        audit_onnx(model, check_head=False)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=False)
    with pytest.raises(AuditError, match=match):  # from the file, as `certseg audit` reads it
        audit_onnx(tmp_path / "m.onnx", check_head=False)


def test_a_computed_reshape_size_that_may_mean_copy_or_infer_is_not_taken_as_a_size():
    """The target [0, 0, e, 0] with e = (H mod 2) - 1: ONNX Runtime reads e = -1 as
    'infer' and 0 as 'copy', so row 0 (1 row) and the image (H rows) both pass
    through. Taken as the size e for both, their Add (row 0 repeated H times, gain
    sqrt(H + 3)) audited at L = 2."""
    nodes = [
        oh.make_node("Shape", ["image"], ["s"]),
        oh.make_node("Slice", ["s", "two", "three"], ["h"]),
        oh.make_node("Mod", ["h", "two"], ["hm"]),
        oh.make_node("Sub", ["hm", "one"], ["e"]),
        oh.make_node("Concat", ["zero", "zero", "e", "zero"], ["target"], axis=0),
        oh.make_node("Slice", ["image", "zero", "one", "two"], ["row0"]),
        oh.make_node("Reshape", ["row0", "target"], ["a"]),
        oh.make_node("Reshape", ["image", "target"], ["b"]),
        oh.make_node("Add", ["a", "b"], ["logits"]),
    ]
    inits = {k: np.array([v], np.int64) for k, v in (("zero", 0), ("one", 1), ("two", 2))}
    inits["three"] = np.array([3], np.int64)
    model = _graph(nodes, inits, in_shape=(1, 3, "H", "W"))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.random((1, 3, 16, 8), dtype=np.float32)
    d = np.zeros_like(x)
    d[:, :, 0] = 1e-2  # on row 0, which the Add repeats
    fx, fy = (sess.run(None, {"image": v})[0].astype(np.float64) for v in (x, x + d))
    assert np.linalg.norm(fy - fx) / np.linalg.norm(d) > 4  # sqrt(19) = 4.36: real
    with pytest.raises(AuditError, match="cannot prove shapes"):
        audit_onnx(model, check_head=False)


def _gain_of(model, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fx, fy = (sess.run(None, {"image": v})[0].astype(np.float64) for v in (x, y))
    return float(np.linalg.norm(fx - fy) / np.linalg.norm((x - y).astype(np.float64)))


_BIG = np.float32(2.0**23)  # x + 2^23 - 2^23 rounds x to an integer in float32


@pytest.mark.parametrize(
    "source",
    [
        [oh.make_node("Max", ["image", "big"], ["c"])],  # equal to 2^23: a value it takes
        [oh.make_node("Clip", ["image", "big", ""], ["c"])],
        # the pad value, taken back out by a 1x2 conv over the border
        [oh.make_node("Pad", ["image", "pads", "big"], ["c"], mode="constant")],
        # a constant part of a Concat, which a conv adds to the signal
        [oh.make_node("Concat", ["image", "bigmap"], ["c"], axis=1)],
        # a static Resize whose roi leaves samples to extrapolation_value, added
        [
            oh.make_node(
                "Resize",
                ["zeros", "roi", "scales"],
                ["r"],
                mode="linear",
                coordinate_transformation_mode="tf_crop_and_resize",
                extrapolation_value=float(_BIG),
            ),
            oh.make_node("Add", ["image", "r"], ["c"]),
        ],
    ],
    ids=["max", "clip", "pad-value", "concat", "resize-extrapolation"],
)
def test_a_huge_value_brought_in_beside_the_signal_is_refused(source):
    """Each source of 2^23 on the image's path, added to the image and taken away again,
    rounds it to integers (measured gain 50 where the audit counted 3): the absorption
    guard covers values an op brings in, not only constants added."""
    inits = {
        "big": _BIG,
        "pads": np.array([0, 0, 0, 0, 0, 0, 0, 0], np.int64),
        "bigmap": np.full((1, 3, 8, 8), _BIG),
        "zeros": np.zeros((1, 3, 8, 8), np.float32),
        "roi": np.array([0, 0, 0, 0, 1, 1, 0.5, 0.5], np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    model = _graph([*source, oh.make_node("Identity", ["c"], ["logits"])], inits)
    with pytest.raises(AuditError, match="absorption"):
        audit_onnx(model, check_head=False)


def test_slice_sizes_follow_onnx_for_negative_steps():
    """x[-100::-1] on 8 rows is 1 row in ONNX (the start clamps to 0), none in Python's
    slice: derived as empty, a Mul broadcasting it 128 times went uncounted (measured
    gain 11.3, audited 1)."""
    from export.shapes import onnx_slice_indices

    assert list(onnx_slice_indices(8, -100, -(2**63), -1)) == [0]
    assert list(onnx_slice_indices(8, 100, -(2**63), -1)) == list(range(7, -1, -1))
    assert list(onnx_slice_indices(8, -3, 100, 1)) == [5, 6, 7]
    c = np.ones((1, 2, 8, 8), np.float32)
    c[0, 1] = -1.0
    nodes = [
        oh.make_node("Slice", ["image", "st", "en", "ax", "sp"], ["t"]),
        oh.make_node("Mul", ["t", "c"], ["logits"]),
    ]
    inits = {
        "st": np.array([-100] * 3, np.int64),
        "en": np.array([-(2**63)] * 3, np.int64),
        "ax": np.array([1, 2, 3], np.int64),
        "sp": np.array([-1] * 3, np.int64),
        "c": c,
    }
    model = _graph(nodes, inits)
    x = np.full((1, 3, 8, 8), 0.5, np.float32)
    y = x.copy()
    y[0, 0, 0, 0] = 0.4
    assert audit_onnx(model, check_head=False).lipschitz_audited >= _gain_of(model, x, y) > 11


def test_resize_sizes_follow_onnx_runtimes_float32_arithmetic():
    """25 rows scaled by 0.08f: 2 in ONNX Runtime (float32 product), 1 in float64. Taken
    for 1, an Add copied the red channel twice uncounted (gain 1.41, audited 1)."""
    w = np.array([[1.0, 0.0], [0.0, -1.0]], np.float32).reshape(2, 2, 1, 1)
    nodes = [
        oh.make_node("Resize", ["zeros", "", "scales"], ["r"], mode="nearest"),
        oh.make_node("Slice", ["image", "s0", "s1", "s2"], ["red"]),
        oh.make_node("Add", ["red", "r"], ["u"]),
        oh.make_node("Conv", ["u", "w"], ["logits"]),
    ]
    inits = {
        "zeros": np.zeros((1, 25, 8, 8), np.float32),
        "scales": np.array([1, 0.08, 1, 1], np.float32),
        "s0": np.array([0], np.int64),
        "s1": np.array([1], np.int64),
        "s2": np.array([1], np.int64),
        "w": w,
    }
    model = _graph(nodes, inits)
    x = np.full((1, 3, 8, 8), 0.55, np.float32)
    y = x.copy()
    y[0, 0, 2, 2] = 0.49
    measured = _gain_of(model, x, y)
    assert measured > 1.4
    assert audit_onnx(model, check_head=False).lipschitz_audited >= measured * (1 - 1e-6)


def test_batchnorm_epsilon_is_added_as_onnx_runtime_adds_it():
    """ONNX Runtime adds float32(1e-5) to the variance in float32. A variance of
    -eps32 + 1 ulp left 2^-40 there and 1.16e-12 in the audit's float64: each layer
    audited 13% low (24 of them: audited 1.0, measured 18.9). Negative variances are
    refused; a tiny positive one is bounded as run."""
    eps32 = np.float32(1e-5)
    stats = {"b": np.zeros(3, np.float32), "m": np.zeros(3, np.float32)}
    bn = oh.make_node("BatchNormalization", ["image", "s", "b", "m", "v"], ["logits"])
    cancelling = np.full(3, np.nextafter(-eps32, np.float32(0)), np.float32)
    model = _graph([bn], {"s": np.full(3, 1e-6, np.float32), "v": cancelling, **stats})
    with pytest.raises(AuditError, match="negative variance"):
        audit_onnx(model, check_head=False)
    tiny = np.full(3, 2.0**-40, np.float32)  # float32 absorbs it: var + eps = eps32
    model = _graph([bn], {"s": np.full(3, 2.0, np.float32), "v": tiny, **stats})
    audited = audit_onnx(model, check_head=False).lipschitz_audited
    assert audited >= _empirical(model) and audited == pytest.approx(2 / np.sqrt(eps32), 1e-6)


@pytest.mark.parametrize(
    ("node", "inits"),
    [
        (oh.make_node("Squeeze", ["image"], ["logits"], axes=[0]), {}),  # axes: input at 13+
        (oh.make_node("LeakyRelu", ["image"], ["logits"], alpha=0.5), {}),
        (
            oh.make_node("Gemm", ["image", "w"], ["logits"], alpha=0),
            {"w": np.eye(3, dtype=np.float32)},
        ),
    ],
    ids=["squeeze-axes-attribute", "leakyrelu-alpha-twice", "gemm-alpha-int"],
)
def test_a_node_that_breaks_its_schema_is_refused(node, inits):
    """ONNX Runtime refuses these at load; the audit had computed bounds for them (an
    INT alpha read as 0, the last of two alphas, axes honoured against the opset)."""
    if node.op_type == "LeakyRelu":
        node.attribute.append(oh.make_attribute("alpha", 5.0))  # a second alpha
    with pytest.raises(AuditError, match="ONNX schema"):
        audit_onnx(_graph([node], inits, in_shape=(1, 3, 3, 3)), check_head=False)
