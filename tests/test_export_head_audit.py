"""The audit proves what the exported head computes (export/head_check.py): mask =
argmax, margin = top1 - top2, radius = margin * c. Every formulation passes; a file
edited to report larger radii, another class or another pixel's value is refused,
although its Lipschitz bound and radius constant are untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper as oh
from onnx import numpy_helper

from certseg.certify import radius_scale_for
from export.audit import META_CARD, AuditError, audit_onnx
from export.graph_head import HEAD_FORMULATIONS, CertifiedSegmenter
from export.onnx_export import RADIUS_SCALE, _set_initializer, export_graph


def _export(form: str, k: int) -> onnx.ModelProto:
    torch.manual_seed(k)
    net = torch.nn.Conv2d(3, k, 1, bias=False)
    proto = export_graph(CertifiedSegmenter(net, k, 1.0, pad_multiple=4, head=form).eval())
    L = audit_onnx(proto, check_head=False).lipschitz_audited
    _set_initializer(proto, RADIUS_SCALE, np.asarray(radius_scale_for(L), np.float32))
    return proto


@pytest.fixture(scope="module")
def heads() -> dict[tuple[str, int], onnx.ModelProto]:
    cases = [(f, k) for f in HEAD_FORMULATIONS for k in (1, 2, 3) if not (f == "topk" and k < 2)]
    return {case: _export(*case) for case in cases}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _node(model: onnx.ModelProto, op: str, index: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == op][index]


def _add_init(model: onnx.ModelProto, name: str, value) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _insert_after(model: onnx.ModelProto, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
    """Route node's first output through `new` (whose input is `node.output[0]`)."""
    old = node.output[0]
    for n in model.graph.node:
        n.input[:] = [new.output[0] if i == old else i for i in n.input]
    new.input[0] = old
    nodes = list(model.graph.node)
    nodes.insert(nodes.index(node) + 1, new)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def test_every_formulation_is_proved(heads):
    for (form, k), model in heads.items():
        report = audit_onnx(model, strict=False)
        assert report.problems == [], (form, k)
        assert report.head_scale == pytest.approx(1 / (2**0.5 * report.lipschitz_audited), 1e-6)


def _scaled_margin(model):
    m = _copy(model)
    _insert_after(
        m,
        _node(m, "Sub"),
        oh.make_node("Mul", ["", _add_init(m, "x50", np.float32(50))], ["sub_x50"]),
    )
    return m


def _swapped_sub(model):
    m = _copy(model)
    sub = _node(m, "Sub")
    sub.input[:] = [sub.input[1], sub.input[0]]
    return m


def _max_as_min(model):
    m = _copy(model)
    _node(m, "Max").op_type = "Min"
    return m


def _last_index(model):
    m = _copy(model)
    argmax = _node(m, "ArgMax")
    kept = [a for a in argmax.attribute if a.name != "select_last_index"]
    del argmax.attribute[:]
    argmax.attribute.extend([*kept, oh.make_attribute("select_last_index", 1)])
    return m


def _dropped_class(model):
    """chain, 3 classes: top1 from the first two planes only."""
    m = _copy(model)
    last_max = _node(m, "Max", 2)
    first_max = _node(m, "Max", 0)
    for n in m.graph.node:
        if n.op_type == "Squeeze" and n.input[0] == last_max.output[0]:
            n.input[0] = first_max.output[0]
    return m


def _shifted_crop(model):
    m = _copy(model)
    crop = next(n for n in m.graph.node if "margin" in n.output)
    crop.input[1] = _add_init(m, "one", np.array([1], np.int64))
    return m


def _first_row_of(op: str):
    """An edit that crops the first output of the `op` node to its first row, which
    broadcasting then repeats over every row."""

    def edit(model):
        m = _copy(model)
        bounds = [
            _add_init(m, n, np.array([v], np.int64)) for n, v in (("z0", 0), ("e1", 1), ("ax2", 2))
        ]
        _insert_after(m, _node(m, op), oh.make_node("Slice", ["", *bounds], [f"{op}_row0"]))
        return m

    edit.__name__ = f"_first_row_of_{op}"
    return edit


_one_row_operand = _first_row_of("Split")  # a plane before the Min/Max sweep
_one_row_condition = _first_row_of("Equal")  # argmax_where's class test, used by Where


def _negative_scale(model):
    m = _copy(model)
    c = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == RADIUS_SCALE))
    _set_initializer(m, RADIUS_SCALE, -c)
    return m


def _permuted_classes(model):
    m = _copy(model)
    _set_initializer(m, "head.class_index", np.array([1, 0, 2], np.int64).reshape(1, 3, 1, 1))
    return m


def _finite_fill(model):
    m = _copy(model)
    where = _node(m, "Where")
    where.input[1] = _add_init(m, "minus_1e3", np.float32(-1e3))
    return m


def _second_as_first(model):
    m = _copy(model)
    gathers = [n for n in m.graph.node if n.op_type == "Gather"]
    second = next(
        n
        for n in gathers
        if numpy_helper.to_array(
            next(i for i in m.graph.initializer if i.name == n.input[1])
        ).item()
        == 1
    )
    second.input[1] = _add_init(m, "zero", np.int64(0))
    return m


# (formulation, classes, edit, an input on which the edit changes the answer)
NORMAL, TIES, HUGE = "normal", "ties", "huge"
TAMPERS = [
    ("chain", 3, _scaled_margin, NORMAL),
    ("argmax_where", 3, _scaled_margin, NORMAL),
    ("topk", 3, _scaled_margin, NORMAL),
    ("chain", 3, _swapped_sub, NORMAL),
    ("chain", 3, _max_as_min, NORMAL),
    ("chain", 2, _last_index, TIES),
    ("chain", 3, _dropped_class, NORMAL),
    ("chain", 3, _shifted_crop, NORMAL),
    ("topk", 2, _shifted_crop, NORMAL),
    ("chain", 3, _one_row_operand, NORMAL),
    ("argmax_where", 3, _permuted_classes, NORMAL),
    ("argmax_where", 3, _one_row_condition, NORMAL),
    ("chain", 3, _negative_scale, NORMAL),
    ("argmax_where", 2, _finite_fill, HUGE),
    ("topk", 3, _second_as_first, NORMAL),
]


def _image(kind: str) -> np.ndarray:
    if kind == TIES:  # all logits 0: every class ties for first place
        return np.zeros((2, 3, 5, 7), np.float32)
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
    return x * np.float32(1e5 if kind == HUGE else 1.0)


@pytest.mark.parametrize(
    ("form", "k", "tamper", "image"), TAMPERS, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_a_tampered_head_is_refused(heads, form, k, tamper, image):
    model = tamper(heads[(form, k)])
    onnx.checker.check_model(model)
    # The edit changes what the file reports (it is not a no-op rewrite)...
    x = _image(image)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"image": x})

    before, after = run(heads[(form, k)]), run(model)
    assert any(
        a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )
    # ...and the audit refuses it, though its L and radius constant are unchanged.
    with pytest.raises(AuditError, match=r"not proved|not the margin output"):
        audit_onnx(model)


def test_an_unknown_op_reading_the_logits_is_reported_not_a_crash(heads):
    """Op names are matched to the rules exactly, in the ONNX domain only: an op named
    like one of the checker's own helpers ("Pair") is no rule."""
    m = _copy(heads[("chain", 2)])
    logits = _node(m, "ArgMax").input[0]
    m.graph.node.append(oh.make_node("Pair", [logits, logits], ["extra"], domain="com.example"))
    m.opset_import.append(oh.make_opsetid("com.example", 1))
    report = audit_onnx(m, strict=False)
    assert report.problems == ["head node '' has op Pair (not a head op)"]


def _with_logits(k: int) -> onnx.ModelProto:
    torch.manual_seed(k)
    net = torch.nn.Conv2d(3, k, 1, bias=False)
    seg = CertifiedSegmenter(net, k, 1.0, pad_multiple=4, with_logits=True).eval()
    proto = export_graph(seg)
    L = audit_onnx(proto, check_head=False).lipschitz_audited
    _set_initializer(proto, RADIUS_SCALE, np.asarray(radius_scale_for(L), np.float32))
    return proto


def test_the_logits_output_must_be_the_logits():
    """The server's worst-case metrics and gains are computed from it."""
    model = _with_logits(3)
    assert audit_onnx(model, strict=False).problems == []
    crop = next(n for n in model.graph.node if "logits" in n.output)
    crop.output[0] = "cropped"  # the "logits" output is now the crop times 2
    two = _add_init(model, "two", np.float32(2))
    model.graph.node.append(oh.make_node("Mul", ["cropped", two], ["logits"]))
    with pytest.raises(AuditError, match="'logits' output is not proved"):
        audit_onnx(model)


def test_the_card_class_count_must_match_the_graph(heads):
    m = _copy(heads[("chain", 3)])
    m.metadata_props.append(onnx.StringStringEntryProto(key=META_CARD, value='{"num_classes": 5}'))
    with pytest.raises(AuditError, match="card says 5 classes, the logits have 3"):
        audit_onnx(m)


def test_the_radius_constant_leaves_room_for_the_graph_rounding(heads):
    m = _copy(heads[("chain", 2)])
    L = audit_onnx(m).lipschitz_audited
    exact = np.float32(1 / (2**0.5 * L))  # to nearest, not shrunk by radius_scale_for
    _set_initializer(m, RADIUS_SCALE, np.nextafter(exact, np.float32(1)))
    with pytest.raises(AuditError, match="radius head uses"):
        audit_onnx(m)


def test_an_attribute_form_slice_is_refused_not_a_crash(heads):
    """Slice before opset 10 has its bounds as attributes: one input only (at this
    file's opset 13 that breaks the op's schema, as ONNX Runtime would say too)."""
    m = _copy(heads[("chain", 2)])
    crop = next(n for n in m.graph.node if "margin" in n.output)
    del crop.input[1:]
    crop.attribute.extend([oh.make_attribute("starts", [1]), oh.make_attribute("ends", [9])])
    crop.attribute.append(oh.make_attribute("axes", [1]))  # a shift by one row
    with pytest.raises(AuditError, match=r"not proved|ONNX schema"):  # (was an IndexError)
        audit_onnx(m)
