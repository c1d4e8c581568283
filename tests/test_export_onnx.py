"""Export to ONNX: parity with the parametrized torch model at any size, metadata,
the audit against power iteration, tampering, the op whitelist, Triton, the CLI.

Models are random (no training): a `tiny` net (pad multiple 2), a `lipdeeplab_xs`
(pad multiple 8: strides, dilations 6/12/18, the ASPP concat) and a `tiny` with
position-dependent biases (a Resize of constants added to the image path), each put
through a couple of train-mode forwards so the centering shifts are not zero. Each is exported
once per session (the dynamo exporter takes seconds).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch.nn import functional as F
from typer.testing import CliRunner

from certseg.models import ModelCard, create_model, load_checkpoint, save_checkpoint
from certseg.nn.estimate import linear_norm_estimate
from export.audit import (
    META_CARD,
    META_HEAD,
    META_L_AUDITED,
    META_L_STRUCTURAL,
    AuditError,
    audit_onnx,
    read_metadata,
)
from export.cli import app
from export.onnx_export import export_onnx
from export.triton import check_config, export_triton, parse_pbtxt

#: Every op the exported graphs may contain (the net, padding/cropping arithmetic on
#: shapes, the head). No linalg / QR / matrix_exp / control flow / custom domains.
OP_WHITELIST = {
    "Add",
    "ArgMax",
    "Cast",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Div",
    "Max",
    "Min",
    "Mod",
    "Mul",
    "Pad",
    "Reshape",
    "Resize",  # only of constant position-bias grids; the audit refuses it on the image path
    "Shape",
    "Slice",
    "Split",
    "Squeeze",
    "Sub",
    "Unsqueeze",
    "Gather",
    "Identity",
    "Constant",
}


def _card(arch: str, k: int, pad: int, kwargs: dict) -> ModelCard:
    return ModelCard(
        arch_kwargs=kwargs,
        name=f"test-{arch}",
        arch=arch,
        num_classes=k,
        classes=[f"c{i}" for i in range(k)],
        palette=[(10 * i, 20 * i, 30 * i) for i in range(k)],
        pad_multiple=pad,
    )


def _model(arch: str, k: int, seed: int, kwargs: dict):
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=k, **kwargs)
    model.train()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("position.bias"):  # zero at init: make them count
                param.normal_()
        for _ in range(2):  # non-zero running means in the centering layers
            model(torch.rand(2, 3, 32, 48))
    return model.eval()


class Exported:
    def __init__(self, tmp, arch, k, pad, seed, with_logits, via_cli=False, **kwargs):
        self.model = _model(arch, k, seed, kwargs)  # parametrized (reference)
        self.card = _card(arch, k, pad, kwargs)
        self.tmp = tmp
        ckpt = tmp / f"{arch}.pt"
        save_checkpoint(ckpt, self.model, self.card)
        self.fused, _ = load_checkpoint(ckpt)
        if via_cli:
            args = ["export", str(ckpt), "-o", str(tmp / "out"), "--triton", str(tmp / "repo")]
            res = CliRunner().invoke(app, args + (["--logits"] if with_logits else []))
            assert res.exit_code == 0, res.output
            self.cli_output = res.output
            self.path = tmp / "out" / "model.onnx"
            self.result = None
        else:
            self.stages: list[str] = []  # what a CLI shows while it waits
            self.result = export_onnx(
                ckpt, tmp / "out", with_logits=with_logits, progress=self.stages.append
            )
            self.path = self.result.onnx_path
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.pad = pad
        self.k = k

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Parametrized torch logits at the image's own size (pad, run, crop)."""
        h, w = x.shape[-2:]
        m = self.pad
        xp = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m))
        with torch.no_grad():
            return self.model(xp)[:, :, :h, :w]

    def run(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {"image": x.numpy()}), strict=True))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("tiny"), "tiny", 4, 2, 0, with_logits=True)


@pytest.fixture(scope="session")
def xs(tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("xs"), "lipdeeplab_xs", 5, 8, 1, with_logits=True)


@pytest.fixture(scope="session")
def pos(tmp_path_factory):
    return Exported(
        tmp_path_factory.mktemp("pos"), "tiny", 4, 2, 3, with_logits=True, position_grid=(3, 4)
    )


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory):
    """The default export (no logits), through the CLI, with a Triton repository."""
    return Exported(
        tmp_path_factory.mktemp("tiny0"), "tiny", 3, 2, 2, with_logits=False, via_cli=True
    )


def _example_size(pad: int) -> tuple[int, int]:
    return 4 * pad + 3, 6 * pad + 5  # what export_graph traces with


# ------------------------------------------------------------------------- parity


@pytest.mark.parametrize("which", ["tiny", "xs", "pos"])
def test_parity_with_parametrized_torch(which, request):
    ex = request.getfixturevalue(which)
    L = ex.result.lipschitz_audited
    export_hw = _example_size(ex.pad)
    sizes = [export_hw, (2 * export_hw[0] + 1, export_hw[1] - 2), (40, 24)]
    assert any(h % 2 or w % 2 for h, w in sizes)
    gen = torch.Generator().manual_seed(5)
    for h, w in sizes:
        x = torch.rand(20, 3, h, w, generator=gen)
        out = ex.run(x)
        ref = ex.reference(x)
        assert out["logits"].shape == (20, ex.k, h, w)
        assert out["mask"].shape == out["margin"].shape == out["radius"].shape == (20, h, w)
        assert out["mask"].dtype == np.int32 and out["margin"].dtype == np.float32
        assert np.abs(out["logits"] - ref.numpy()).max() < 1e-4
        top2 = ref.topk(2, dim=1).values
        margin_ref = (top2[:, 0] - top2[:, 1]).numpy()
        sure = margin_ref > 1e-4
        assert sure.mean() > 0.5
        assert np.array_equal(out["mask"][sure], ref.argmax(1).numpy()[sure])
        # The head computes exactly what certify.margins computes from ORT's own logits.
        lg = torch.from_numpy(out["logits"])
        own = lg.topk(2, dim=1).values
        assert np.array_equal(out["mask"], lg.argmax(1).numpy().astype(np.int32))
        assert np.array_equal(out["margin"], (own[:, 0] - own[:, 1]).numpy())
        # radius = margin / (sqrt(2) L_audited), never above it.
        exact = out["margin"].astype(np.float64) / (math.sqrt(2) * L)
        assert np.all(out["radius"] <= exact * (1 + 1e-12))
        np.testing.assert_allclose(out["radius"], exact, rtol=1e-5)
        np.testing.assert_allclose(out["radius"], margin_ref / (math.sqrt(2) * L), atol=1e-4)


def test_default_export_outputs(tiny_default):
    ex = tiny_default
    names = [o.name for o in ex.session.get_outputs()]
    assert names == ["mask", "margin", "radius"]
    out = ex.run(torch.rand(1, 3, 9, 13))
    assert out["mask"].shape == (1, 9, 13)
    assert out["mask"].max() < 3
    for o in onnx.load(str(ex.path)).graph.output:
        dims = [d.dim_param for d in o.type.tensor_type.shape.dim]
        assert dims == ["batch", "height", "width"]
    assert (ex.path.parent / "card.json").exists() and (ex.path.parent / "audit.json").exists()
    assert "L audited" in ex.cli_output
    assert (ex.tmp / "repo" / "certseg" / "1" / "model.onnx").read_bytes() == ex.path.read_bytes()


# ----------------------------------------------------------------------- metadata


def test_metadata_and_side_files(xs):
    model = onnx.load(str(xs.path))
    meta = read_metadata(model)
    lip = float(meta[META_L_AUDITED])
    assert xs.result.lipschitz_audited == lip
    assert float(meta[META_L_STRUCTURAL]) == pytest.approx(4.0)  # 1 / min(std)
    assert 4.0 <= lip <= 4.0 * (1 + 1e-4)
    card = json.loads(meta[META_CARD])
    assert card["lipschitz_audited"] == lip and card["pad_multiple"] == 8
    assert card["classes"] == xs.card.classes
    head = json.loads(meta[META_HEAD])
    assert head["formulation"] == "chain" and head["pad_multiple"] == 8
    assert head["radius_scale"] <= 1 / (math.sqrt(2) * lip)
    side = json.loads((xs.path.parent / "card.json").read_text())
    assert side == card
    audit = json.loads((xs.path.parent / "audit.json").read_text())
    assert audit["ok"] and audit["lipschitz_audited"] == lip
    # The ONNX audit and the torch-side fp64 bound of the same weights agree.
    assert audit["torch_onnx_agree"]
    assert xs.result.lipschitz_torch == pytest.approx(lip, rel=1e-9)


def test_graph_has_only_whitelisted_ops(tiny, xs, tiny_default, pos):
    for ex in (tiny, xs, tiny_default, pos):
        model = onnx.load(str(ex.path))
        ops = {n.op_type for n in model.graph.node}
        assert ops <= OP_WHITELIST, ops - OP_WHITELIST
        assert not model.functions
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        # Weights are plain initializers in the file (no external data, no parametrization).
        assert all(not i.external_data for i in model.graph.initializer)
        assert not any("parametrizations" in i.name for i in model.graph.initializer)


# -------------------------------------------------------------------------- audit


def _audit_vs_power_iteration(ex: Exported) -> int:
    model = onnx.load(str(ex.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    report = audit_onnx(model)
    checked = 0
    for row in report.layers:
        if row.op not in ("Conv", "ConvTranspose"):
            continue
        layer = ex.fused.get_submodule(row.weight.removeprefix("net.").removesuffix(".weight"))
        assert np.array_equal(layer.weight.numpy(), inits[row.weight])
        layer = copy.deepcopy(layer).double()
        cin = layer.in_channels
        size = 8 if row.op == "Conv" else 4
        est = linear_norm_estimate(layer, (1, cin, size, size), steps=100)
        assert row.upper >= est, (row.node, row.upper, est)
        assert row.lower <= row.upper
        # Orthogonal layers: the guaranteed bound is tight. A dilated kernel has the norm
        # of its undilated self (independent sub-grids), which a small image can show.
        if getattr(layer, "dilation", (1,))[0] > 1:
            tight = copy.deepcopy(layer)
            tight.dilation, tight.padding = (1, 1), (1, 1)
            est = linear_norm_estimate(tight, (1, cin, size, size), steps=100)
            assert row.upper >= est
        assert row.upper <= est * (1 + 1e-2), (row.node, row.upper, est)
        checked += 1
    # The composed bound equals the torch-side one of the same fused weights.
    assert report.lipschitz_audited == pytest.approx(ex.result.lipschitz_torch, rel=1e-9)
    return checked


# torch.func.linearize (in linear_norm_estimate) trips torch's own jit deprecation.
_JIT_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(_JIT_WARNING)
def test_export_tells_each_stage_as_it_starts(tiny):
    """`certseg export` shows them (most of a minute for a large net on a CPU, with
    nothing on screen before): fuse, trace, the two audits, in that order."""
    assert [s.split()[0] for s in tiny.stages] == ["fusing", "tracing", "auditing", "auditing"]


def test_audit_bounds_vs_power_iteration_tiny(tiny):
    assert _audit_vs_power_iteration(tiny) == 5


@pytest.mark.filterwarnings(_JIT_WARNING)
def test_audit_bounds_vs_power_iteration_with_position_bias(pos):
    """Position biases are translations: the same 5 convs bound it, nothing else."""
    assert "Resize" in {n.op_type for n in onnx.load(str(pos.path)).graph.node}
    assert _audit_vs_power_iteration(pos) == 5


@pytest.mark.filterwarnings(_JIT_WARNING)
def test_audit_bounds_vs_power_iteration_xs(xs):
    # 6 encoder convs, 4 ASPP branches + 1x1 join, decoder conv, 3 up, classifier.
    assert _audit_vs_power_iteration(xs) == 16


def test_audit_table_covers_the_path(xs):
    report = audit_onnx(xs.path)
    ops = [r.op for r in report.layers]
    assert ops[0] == "Pad" and "Div" in ops and ops[-1] == "Conv"
    concat4 = [r for r in report.layers if r.op == "Mul"]
    assert len(concat4) == 1 and concat4[0].upper == 0.5  # the ASPP 1/sqrt(4)
    assert report.head_scale is not None and report.ok


def _tamper(ex, tmp_path, fn, name="bad.onnx"):
    model = onnx.load(str(ex.path))
    fn(model)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _scale_first_conv(model, factor=1.01):
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    for i, init in enumerate(model.graph.initializer):
        if init.name == conv.input[1]:
            w = numpy_helper.to_array(init) * np.float32(factor)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))


def test_tampered_weight_is_rejected(tiny, tmp_path):
    path = _tamper(tiny, tmp_path, _scale_first_conv)
    with pytest.raises(AuditError, match="exceeds the declared"):
        audit_onnx(path)
    res = CliRunner().invoke(app, ["audit", str(path)])
    assert res.exit_code == 1
    ok = CliRunner().invoke(app, ["audit", str(tiny.path)])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output


def test_tampered_metadata_or_head_is_rejected(tiny, tmp_path):
    audited = tiny.result.lipschitz_audited
    for claim in (3.5, audited * (1 - 1e-7)):  # far below, and just below

        def lower_claim(model, claim=claim):
            for p in model.metadata_props:
                if p.key == META_L_AUDITED:
                    p.value = repr(claim)

        with pytest.raises(AuditError, match="metadata claims"):
            audit_onnx(_tamper(tiny, tmp_path, lower_claim, "meta.onnx"))

    def bigger_radius(model):
        for i, init in enumerate(model.graph.initializer):
            if init.name == "head.radius_scale":
                v = numpy_helper.to_array(init) * np.float32(1.1)
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(v, init.name))

    with pytest.raises(AuditError, match="radius head"):
        audit_onnx(_tamper(tiny, tmp_path, bigger_radius, "head.onnx"))

    # Weight scaled AND declared value raised to match: the audit follows the weights,
    # and the head (still using the old L) is caught.
    def both(model):
        _scale_first_conv(model)
        for p in model.metadata_props:
            if p.key == META_L_STRUCTURAL:
                p.value = "4.1"

    with pytest.raises(AuditError, match="radius head"):
        audit_onnx(_tamper(tiny, tmp_path, both, "both.onnx"))


def test_cli_audit_json(tiny):
    res = CliRunner().invoke(app, ["audit", str(tiny.path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["ok"] and data["lipschitz_audited"] == tiny.result.lipschitz_audited
    folder = CliRunner().invoke(app, ["audit", str(tiny.path.parent), "--json"])  # as serve
    assert folder.exit_code == 0 and json.loads(folder.output) == data, folder.output
    ckpt = str(tiny.tmp / "tiny.pt")
    onto_a_file = CliRunner().invoke(app, ["export", ckpt, "-o", str(tiny.path)])
    assert onto_a_file.exit_code == 2 and "is a file" in onto_a_file.output, onto_a_file.output
    negative = CliRunner().invoke(app, ["audit", str(tiny.path), "--rtol", "-1"])
    assert negative.exit_code == 2 and "--rtol" in negative.output  # a usage error


# ------------------------------------------------------------------------- triton


def test_triton_repository_matches_graph(xs, tmp_path):
    repo = export_triton(xs.path, tmp_path / "repo", "seg", max_batch_size=8)
    assert repo.onnx_path == tmp_path / "repo" / "seg" / "1" / "model.onnx"
    assert repo.onnx_path.read_bytes() == xs.path.read_bytes()
    cfg = parse_pbtxt(repo.config_path.read_text())
    check_config(cfg, onnx.load(str(repo.onnx_path)))
    assert cfg["platform"] == ["onnxruntime_onnx"] and cfg["max_batch_size"] == [8]
    ins = {e["name"][0]: (e["data_type"][0], e["dims"]) for e in cfg["input"]}
    outs = {e["name"][0]: (e["data_type"][0], e["dims"]) for e in cfg["output"]}
    assert ins == {"image": ("TYPE_FP32", [3, -1, -1])}
    assert outs == {
        "mask": ("TYPE_INT32", [-1, -1]),
        "margin": ("TYPE_FP32", [-1, -1]),
        "radius": ("TYPE_FP32", [-1, -1]),
        "logits": ("TYPE_FP32", [5, -1, -1]),
    }
    db = cfg["dynamic_batching"][0]
    assert db["preferred_batch_size"] == [4, 8] and db["max_queue_delay_microseconds"][0] > 0
    assert json.loads((repo.model_dir / "card.json").read_text())["num_classes"] == 5


def test_export_refuses_weights_above_the_declared_bound(tmp_path):
    """A fused model whose weights exceed what its structure declares is not written."""
    from certseg.nn import fuse_module

    model = _model("tiny", 2, 3, {})
    fused = fuse_module(model).eval()
    with torch.no_grad():
        fused[1].weight.mul_(1.01)  # the first conv, declared orthogonal (nominal 1)
    card = _card("tiny", 2, 2, {})
    with pytest.raises(AuditError, match="exceeds the declared"):
        export_onnx(fused, tmp_path / "out", card=card)
    assert not (tmp_path / "out").exists()
