"""`certseg certify` on real files, through the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from certseg.certify import certified_radius, margins, max_flips, stability
from certseg.inference import predict_logits
from certseg.models import ModelCard, create_model, load_checkpoint, save_checkpoint


def _checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=3, width=8)
    card = ModelCard(
        name="tiny-test",
        arch="tiny",
        num_classes=3,
        classes=["a", "b", "c"],
        palette=[(255, 0, 0), (0, 255, 0), (0, 0, 255)],
        arch_kwargs={"width": 8},
        pad_multiple=2,
    )
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, card)
    return path


def test_certify_command_reports_radii(tmp_path):
    ckpt = _checkpoint(tmp_path)
    rng = np.random.default_rng(0)
    img_path = tmp_path / "odd.png"  # odd size: exercises pad-and-crop
    Image.fromarray((rng.random((21, 35, 3)) * 255).astype(np.uint8)).save(img_path)
    exe = Path(sys.executable).with_name("certseg")
    out = subprocess.run(
        [
            str(exe),
            "certify",
            str(img_path),
            "--checkpoint",
            str(ckpt),
            "--eps",
            "0",
            "--eps",
            "0.05",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (report,) = json.loads(out.stdout)
    assert (report["height"], report["width"]) == (21, 35)
    assert report["guaranteed_fraction"][0] == 1.0  # nothing can flip at eps = 0
    assert report["max_flips"][0] == 0 and report["max_flips_fraction"][0] == 0.0

    model, card = load_checkpoint(ckpt)
    assert report["lipschitz"] == card.certified_lipschitz
    assert abs(card.certified_lipschitz / card.lipschitz - 1) < 1e-3
    logits = predict_logits(
        model, np.asarray(Image.open(img_path), np.float32).transpose(2, 0, 1) / 255.0, 2
    )[0]
    radius = certified_radius(margins(logits)[1], card.certified_lipschitz)
    assert report["guaranteed_fraction"][1] == float((radius > 0.05).mean())
    assert report["radius_quantiles"]["median"] == float(np.quantile(radius, 0.5))
    margin = margins(logits)[1]
    flips = int(max_flips(margin, 0.05, card.certified_lipschitz))
    assert report["max_flips"][1] == flips
    assert report["max_flips_fraction"][1] == flips / (21 * 35)
    # named and shaped as the REST answer: the server's own rows for this margin
    from server.pipeline import stability_figures
    from server.routes.v1 import SegmentResponse, StabilityFigure

    assert {"max_flips", "max_flips_fraction", "stability"} <= set(SegmentResponse.model_fields)
    rows = stability_figures(SimpleNamespace(lipschitz=card.certified_lipschitz), margin)
    assert report["stability"] == rows and [r["pixels"] for r in rows] == [8, 37, 74]
    assert all(StabilityFigure(**r) for r in report["stability"])
    want = stability(margin, (0.01, 0.05, 0.1), card.certified_lipschitz).tolist()
    assert [r["eps"] for r in report["stability"]] == want

    def table(columns: int) -> str:
        return subprocess.run(
            [str(exe), "certify", str(img_path), "--checkpoint", str(ckpt)],
            env={**os.environ, "COLUMNS": str(columns)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    wide = table(200)
    assert "guaranteed" in wide and "odd.png" in wide
    assert "21x35" in wide  # HxW
    assert "1% flips at" in wide
    narrow = table(80)  # a default terminal: figures wrap, never cut to an ellipsis
    assert "…" not in narrow, narrow
    assert "21x35" in narrow


def test_certify_command_fails_clearly_on_missing_file(tmp_path):
    exe = Path(sys.executable).with_name("certseg")
    out = subprocess.run(
        [str(exe), "certify", str(tmp_path / "nope.png"), "--checkpoint", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0


def test_usage_errors_are_one_line_not_tracebacks(tmp_path):
    """Options the CLI can check up front are usage errors (exit 2) before any model is
    built; a file that is no ONNX model fails the audit with a sentence (exit 1)."""
    from typer.testing import CliRunner

    from certseg.cli import app

    runner = CliRunner()
    cases = [
        (["train", "-o", str(tmp_path / "r"), "--arch", "nope"], "registered"),
        (["train", "-o", str(tmp_path / "r"), "--data", "folder"], "--root"),
        (["train", "-o", str(tmp_path / "r"), "--data", "imagenet"], "synthetic"),
        (
            ["evaluate", str(tmp_path / "m.pt"), "-o", str(tmp_path / "e"), "--data", "cityscapes"],
            "--root",
        ),
    ]
    for args, says in cases:
        res = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 2 and says in res.output, (args, res.output)
        assert "Traceback" not in res.output
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"\x80\x02 not onnx at all")
    res = runner.invoke(app, ["audit", str(fake)])
    assert res.exit_code == 1 and "not a readable ONNX model" in res.output


def test_user_mistakes_are_one_stderr_line_with_exit_2(tmp_path):
    """A missing or foreign checkpoint, an unknown architecture, an image that does not
    decode, an empty data folder, a budget below 0 or a misspelt device: one sentence
    naming the culprit (`certseg <cmd>: error: ...` or a usage error), exit 2, and no
    traceback, from certify, evaluate, export and train alike."""
    from typer.testing import CliRunner

    from certseg.cli import app

    ckpt = _checkpoint(tmp_path)
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    no_card = tmp_path / "no_card.pt"
    torch.save({"weights": 1}, no_card)
    other_arch = tmp_path / "other_arch.pt"
    blob = torch.load(ckpt, weights_only=False)
    torch.save({**blob, "card": {**blob["card"], "arch": "tiny_v9"}}, other_arch)
    wider = tmp_path / "wider.pt"
    torch.save({**blob, "card": {**blob["card"], "arch_kwargs": {"width": 16}}}, wider)
    empty = tmp_path / "empty"
    for sub in ("images", "masks"):
        (empty / "val" / sub).mkdir(parents=True)
    text = tmp_path / "text.png"
    text.write_text("just text")
    out = str(tmp_path / "o")
    small = ["--arch", "tiny", "--num-images", "2", "--val-images", "1", "--height", "8",
             "--width", "8", "--epochs", "0", "--device", "cpu"]  # fmt: skip
    cases = [
        (["certify", str(img), "--checkpoint", str(tmp_path / "none.pt")], "no such checkpoint"),
        (["certify", str(img), "--checkpoint", str(junk)], "junk.pt is not a certseg checkpoint"),
        (["certify", str(img), "--checkpoint", str(no_card)], "(no card, state_dict)"),
        (["certify", str(img), "--checkpoint", str(tmp_path)], "no such model (a checkpoint .pt"),
        (["certify", str(img), "--checkpoint", str(other_arch)], "unknown model 'tiny_v9'"),
        (["certify", str(img), "--checkpoint", str(wider)], "weights do not fit the card"),
        (["certify", str(tmp_path / "none.png"), "--checkpoint", str(ckpt)], "none.png"),
        (["certify", str(text), "--checkpoint", str(ckpt)], "text.png: cannot read the image"),
        (["certify", str(img), "--checkpoint", str(ckpt), "--eps", "-0.1"], "must be >= 0"),
        (["certify", str(img), "--checkpoint", str(ckpt), "--eps", "nan"], "must be >= 0"),
        (["evaluate", str(junk), "-o", out], "junk.pt is not a certseg checkpoint"),
        (["evaluate", str(ckpt), "-o", out, "--data", "folder", "--root", str(empty)],
         "--data folder: no images"),
        (["evaluate", str(ckpt), "-o", out, "--method", "smoothng"], "lipschitz or smoothing"),
        (["evaluate", str(ckpt), "-o", out, "--device", "cpus"], "--device cpus: not a device"),
        # options this run would ignore, silently: they would look applied
        (["evaluate", str(ckpt), "-o", out, "--sigma", "0.5"], "--sigma applies to --method"),
        (["evaluate", str(ckpt), "-o", out, "--split", "test"], "--split applies to --data"),
        (["evaluate", str(ckpt), "-o", out, "--data", "folder", "--root", str(empty),
          "--num-images", "3"], "--num-images applies to --data synthetic"),
        (["export", str(no_card), "-o", out], "no_card.pt is not a certseg checkpoint"),
        (["train", "-o", out, *small, "--init", str(tmp_path / "none.pt")], "no such checkpoint"),
        (["train", "-o", out, *small, "--init", str(ckpt)], "--init"),
        (["train", "-o", out, *small, "--eps", "-1"], "must be >= 0"),
        (["train", "-o", out, *small, "--epochs", "-1"], "--epochs"),
    ]  # fmt: skip
    for args, says in cases:
        res = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        assert res.exit_code == 2, (args, res.output, res.exception)
        assert says in res.stderr and "Traceback" not in res.output, (args, res.output)
        if "Usage:" not in res.stderr:  # not argparse's: the one-line form of the server CLI
            (line,) = res.stderr.splitlines()
            assert line.startswith(f"certseg {args[0]}: error: "), line


@pytest.mark.parametrize(
    ("blocked", "args", "extra"),
    [
        ("torch", ["certify", "docs/example_street.png", "--checkpoint", "m.pt"], "train"),
        ("tqdm", ["evaluate", "m.pt", "-o", "out", "--num-images", "1"], "train"),
        ("torch", ["export", "m.pt", "-o", "out"], "train"),
        ("av", ["client", "stream", "clip.mp4"], "client"),
    ],
)
def test_a_command_of_an_extra_not_installed_says_which_in_one_line(tmp_path, blocked, args, extra):
    """The quickstart installs no extra. A module made unimportable (`without_module`:
    torch and PyAV are installed here, so their absence is simulated) gave a 42-line
    traceback ending in ModuleNotFoundError; now one line, exit 2."""
    (tmp_path / "m.pt").write_bytes(b"")
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "docs").mkdir()
    street = Path(__file__).parents[1] / "docs" / "example_street.png"
    (tmp_path / "docs" / "example_street.png").write_bytes(street.read_bytes())
    from server_support import without_module

    code = (
        without_module(blocked)
        + f"sys.argv = ['certseg', *{args!r}]\nfrom certseg.cli import app; app()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install -e '.[{extra}]'" in lines[0], proc.stderr[-2000:]
