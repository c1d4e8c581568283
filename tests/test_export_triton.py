"""Triton config: rendered from the ONNX graph's signature, parsed back and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper

from export.triton import check_config, export_triton, parse_pbtxt, render_config


def _model(k=3, logits=True) -> onnx.ModelProto:
    """A stand-in with the exported signature (the real one is tested with export)."""
    dims = ["batch", "height", "width"]
    outs = [
        oh.make_tensor_value_info("mask", TP.INT32, dims),
        oh.make_tensor_value_info("margin", TP.FLOAT, dims),
        oh.make_tensor_value_info("radius", TP.FLOAT, dims),
    ]
    nodes = [
        oh.make_node("Conv", ["image", "w"], ["z"]),
        oh.make_node("ArgMax", ["z"], ["am"], axis=1, keepdims=0),
        oh.make_node("Cast", ["am"], ["mask"], to=TP.INT32),
        oh.make_node("ReduceMax", ["z", "ax"], ["margin"], keepdims=0),
        oh.make_node("Mul", ["margin", "s"], ["radius"]),
    ]
    if logits:
        outs.append(oh.make_tensor_value_info("logits", TP.FLOAT, ["batch", k, "height", "width"]))
        nodes.append(oh.make_node("Identity", ["z"], ["logits"]))
    g = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("image", TP.FLOAT, ["batch", 3, "height", "width"])],
        outs,
        initializer=[
            numpy_helper.from_array(np.ones((k, 3, 1, 1), np.float32), "w"),
            numpy_helper.from_array(np.array([1]), "ax"),
            numpy_helper.from_array(np.float32(0.1), "s"),
        ],
    )
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)])
    m.metadata_props.append(
        onnx.StringStringEntryProto(key="certseg.lipschitz_audited", value="4.0")
    )
    return m


def test_render_and_parse_roundtrip():
    model = _model()
    text = render_config(model, "seg", max_batch_size=16, preferred_batch_sizes=(2, 8, 64))
    cfg = parse_pbtxt(text)
    check_config(cfg, model)
    assert cfg["name"] == ["seg"] and cfg["max_batch_size"] == [16]
    assert cfg["dynamic_batching"][0]["preferred_batch_size"] == [2, 8]  # 64 > max dropped
    assert cfg["instance_group"][0]["kind"] == ["KIND_GPU"]
    outs = {o["name"][0]: (o["data_type"][0], o["dims"]) for o in cfg["output"]}
    assert outs["logits"] == ("TYPE_FP32", [3, -1, -1])
    assert outs["mask"] == ("TYPE_INT32", [-1, -1])
    assert cfg["parameters"][0]["value"][0]["string_value"] == ["4.0"]


def test_export_triton_layout(tmp_path):
    src = tmp_path / "model.onnx"
    onnx.save(_model(logits=False), src)
    repo = export_triton(src, tmp_path / "repo", "m1", version=3, instance_kind="KIND_CPU")
    assert (tmp_path / "repo" / "m1" / "3" / "model.onnx").read_bytes() == src.read_bytes()
    cfg = parse_pbtxt(repo.config_path.read_text())
    assert [o["name"][0] for o in cfg["output"]] == ["mask", "margin", "radius"]
    assert cfg["instance_group"][0]["kind"] == ["KIND_CPU"]
    with pytest.raises(ValueError):
        export_triton(src, tmp_path / "repo", "bad name")
    with pytest.raises(ValueError):
        export_triton(src, tmp_path / "repo", "m2", instance_kind="KIND_TPU")


def test_check_config_catches_drift():
    model = _model()
    cfg = parse_pbtxt(render_config(model, "seg"))
    cfg["output"][0]["data_type"] = ["TYPE_FP32"]  # mask is INT32 in the graph
    with pytest.raises(ValueError, match="outputs"):
        check_config(cfg, model)
    cfg = parse_pbtxt(render_config(model, "seg"))
    cfg["input"][0]["dims"] = [3, 512, -1]
    with pytest.raises(ValueError, match="inputs"):
        check_config(cfg, model)
    cfg = parse_pbtxt(render_config(model, "seg") + "bogus_field: 1\n")
    with pytest.raises(ValueError, match="unknown"):
        check_config(cfg, model)


def test_parser_syntax():
    cfg = parse_pbtxt(
        '# comment\nname: "a\\"b"\nx { y: 1 z: [ 1, 2 ] w { v: -2.5e-3 } }\n'
        "x { y: 2 }\nflag: true\n"
    )
    assert cfg["name"] == ['a"b']
    assert [m["y"][0] for m in cfg["x"]] == [1, 2]
    assert cfg["x"][0]["z"] == [1, 2] and cfg["x"][0]["w"][0]["v"] == [-2.5e-3]
    assert cfg["flag"] == [True]
    for bad in ["name: ", "x { y: 1", "x: [1, 2", "3: 4", "x { } }", 'name: "unterminated']:
        with pytest.raises(ValueError):
            parse_pbtxt(bad)


def _model_config_proto():
    """Triton's own ModelConfig message, from the tritonclient wheel's generated module
    (loaded by path: the tritonclient.grpc package itself needs grpcio)."""
    import importlib.util

    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip("this tritonclient has no model_config_pb2")
    spec = importlib.util.spec_from_file_location("certseg_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ModelConfig


def test_a_gpu_instance_runs_with_tf32_off_and_parses_as_triton_reads_it():
    """ONNX Runtime's CUDA provider runs fp32 convolutions in TF32 by default, and
    Triton passes the provider's defaults: the config asks use_tf32 0 for a GPU
    instance (logits ~1e-3 off would not certify). Triton's own ModelConfig parses it."""
    from google.protobuf import text_format

    model_config = _model_config_proto()
    model = _model()
    for kind, tf32 in (("KIND_GPU", ["0"]), ("KIND_AUTO", ["0"]), ("KIND_CPU", [])):
        text = render_config(model, "seg", instance_kind=kind)
        parsed = text_format.Parse(text, model_config())  # raises on an unknown field
        accelerators = parsed.optimization.execution_accelerators.gpu_execution_accelerator
        got = [a.parameters["use_tf32"] for a in accelerators if a.name == "cuda"]
        assert got == tf32, (kind, text)
        check_config(parse_pbtxt(text), model)
