"""`certseg train` / `evaluate` / `export` refusals of what a user got wrong: model
arguments, a resume with changed settings, options the run would ignore, a class set
other than the model's, paths of the wrong kind. In process (typer's runner) on tiny
sizes: each says one sentence and writes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from certseg.cli import app
from certseg.data import SYNTHETIC_CLASSES, cityscapes_classes, make_cityscapes_fixture
from certseg.models import ModelCard, create_model, save_checkpoint

MODEL = ["--arch", "tiny", "--arch-kwarg", "width=4", "--height", "32", "--width", "64",
         "--batch-size", "4", "--device", "cpu"]  # fmt: skip
TINY = [*MODEL, "--num-images", "4", "--val-images", "2"]  # synthetic scenes


def _cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    # stdout and stderr, interleaved; typer's error box unwrapped to one line
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def _refused(*args: str | Path) -> str:
    code, said = _cli(*args)
    assert code == 2, said
    assert "Traceback" not in said, said
    return said


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-epoch run folder (model.pt, last.pt, card.json)."""
    out = tmp_path_factory.mktemp("run")
    code, said = _cli("train", "-o", out, *TINY, "--epochs", "1")
    assert code == 0, said
    return out


# ------------------------------------------------------------------ --arch-kwarg


@pytest.mark.parametrize(
    ("kwarg", "expected"),
    [
        ("widht=8", "lipunet_xs takes no argument 'widht' (did you mean width?); it takes width"),
        ("width=abc", "width must be int (its default is 16), got 'abc'"),
        ("position_grid=[8,16", "position_grid=[8,16 is not valid JSON"),
        ("mean=[0,0,0]", "takes no argument 'mean'"),  # training sets it from the data
    ],
)
def test_a_model_argument_mistake_is_one_sentence_and_writes_no_folder(tmp_path, kwarg, expected):
    out = tmp_path / "x"
    said = _refused("train", "-o", out, *TINY, "--arch", "lipunet_xs", "--arch-kwarg", kwarg)
    assert expected in said and "--arch-kwarg" in said, said
    assert not out.exists()


def test_a_model_that_fails_to_build_is_a_user_error_and_writes_no_folder(tmp_path):
    """A value of the right kind for no default (position_grid) fails in the factory."""
    out = tmp_path / "x"
    said = _refused("train", "-o", out, *TINY, "--arch-kwarg", "position_grid=abc")
    assert "certseg train: error: --arch tiny cannot be built with" in said, said
    assert "position_grid='abc'" in said, said
    assert not out.exists()


def test_presets_list_the_arguments_they_pass_on():
    from certseg.models.registry import model_arguments

    assert "size" not in model_arguments("lipdeeplab_xs")  # the preset sets it
    assert {"rates", "klip"} <= set(model_arguments("lipdeeplab_xs"))
    assert "klip" not in model_arguments("lipdeeplab_s_klip")
    assert {"width", "depth", "position_grid"} <= set(model_arguments("lipunet_s"))
    # with the preset's own values: lipunet_s builds at width 32 (it showed lipunet's 16)
    assert model_arguments("lipunet_s")["width"] == 32
    assert model_arguments("lipunet_xs")["width"] == 16


# ------------------------------------------------------------------ resume


def test_a_fine_tune_resumes_without_its_init_file(run, tmp_path, monkeypatch):
    """A resume starts from last.pt: it had to repeat --init (named as it was: ./a.pt
    was 'another setting' than a.pt), and the file had to exist, read only to be
    overwritten. The card still records what the run began from."""
    import json
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(run / "model.pt", tmp_path / "a.pt")
    code, said = _cli("train", "-o", "b", *TINY, "--epochs", "1", "--init", "a.pt")
    assert code == 0, said
    (tmp_path / "a.pt").unlink()
    code, said = _cli("train", "-o", "b", *TINY, "--epochs", "2")
    assert code == 0 and "resuming" in said, said
    card = json.loads((tmp_path / "b" / "card.json").read_text())
    assert card["training"]["init"] == "a.pt" and card["training"]["recipe"]["epochs"] == 2
    code, said = _cli("train", "-o", "b", *TINY, "--epochs", "2", "--init", "./a.pt")
    assert code == 0 and "nothing to do" in said, said


def test_a_resume_with_changed_settings_is_refused_naming_each(run):
    before = (run / "model.pt").read_bytes()
    said = _refused("train", "-o", run, *TINY, "--epochs", "3", "--height", "48",
                    "--seed", "3", "--batch-size", "2", "--num-images", "6",
                    "--arch-kwarg", "width=8")  # fmt: skip
    for change in ("--height/--width [32, 64] -> [48, 64]", "--seed 0 -> 3",
                   "--batch-size 4 -> 2", "--num-images 4 -> 6",
                   "--arch-kwarg {'width': 4} -> {'width': 8}"):  # fmt: skip
        assert change in said, said
    said = _refused("train", "-o", run, *TINY, "--epochs", "3", "--lr", "0.5")
    assert "--lr 0.001 -> 0.5" in said, said
    assert (run / "model.pt").read_bytes() == before


@pytest.mark.parametrize("epochs", ["1", "0"])
def test_a_finished_run_has_nothing_to_do_and_keeps_its_model(run, epochs):
    before = {n: (run / n).read_bytes() for n in ("model.pt", "card.json", "last.pt")}
    code, said = _cli("train", "-o", run, *TINY, "--epochs", epochs)
    assert code == 0, said
    assert f"already trained 1 epochs (>= --epochs {epochs}): nothing to do" in said, said
    assert {n: (run / n).read_bytes() for n in before} == before


def _folder(root: Path, top_id: int) -> Path:
    """A folder set of two 32x64 pairs whose masks use ids 0..top_id."""
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(np.full((32, 64, 3), 40 * i, np.uint8)).save(
                root / split / "images" / f"{i}.png"
            )
            mask = np.zeros((32, 64), np.uint8)
            mask[:, : top_id + 1] = np.arange(top_id + 1)
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def test_a_resume_on_data_of_other_classes_names_them(tmp_path):
    data, out = _folder(tmp_path / "data", 2), tmp_path / "run"
    args = ["train", "-o", out, *MODEL, "--data", "folder", "--root", data]
    code, said = _cli(*args, "--epochs", "1")
    assert code == 0, said
    _folder(data, 4)  # same settings, but the masks now hold 5 classes
    said = _refused(*args, "--epochs", "2")
    assert "trained on 3 classes (class0, class1, class2)" in said, said
    assert "now has 5 classes" in said and "another model than" not in said, said
    # an older last.pt (no config, no classes) names the tensor that does not fit
    state = torch.load(out / "last.pt", weights_only=False)
    del state["config"], state["classes"]
    torch.save(state, out / "last.pt")
    said = _refused(*args, "--epochs", "2")
    assert "does not fit --arch tiny" in said and "size mismatch" in said, said


# ------------------------------------------------------------------ unused options


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "-o", "{out}", "--root", "{tmp}"], "--data synthetic renders its scenes"),
        (["evaluate", "x.pt", "-o", "{out}", "--root", "{tmp}"], "reads no --root"),
        (["train", "-o", "{out}", "--data", "cityscapes", "--root", "{tmp}", "--num-images", "3"],
         "--num-images applies to --data synthetic only"),
        (["train", "-o", "{out}", "--data", "folder", "--root", "{tmp}", "--val-images", "3"],
         "--val-images applies to --data synthetic only"),
        (["train", "-o", "{out}", "--arch", "tiny", "--unconstrained", "--train-eps", "0.1",
          "--num-images", "2", "--val-images", "1", "--height", "8", "--width", "8"],
         "--train-eps > 0 needs a Lipschitz model"),
    ],
)  # fmt: skip
def test_options_the_run_would_ignore_are_refused(tmp_path, args, expected):
    out = tmp_path / "out"
    said = _refused(*[a.format(out=out, tmp=tmp_path) for a in args])
    assert expected in said, said
    assert not out.exists()


# ------------------------------------------------------------------ class sets


def _checkpoint(path: Path, classes: tuple[str, ...]) -> Path:
    n = len(classes)
    card = ModelCard(name="c", arch="tiny", num_classes=n, classes=list(classes),
                     palette=[(0, 0, 0)] * n, arch_kwargs={"width": 4}, pad_multiple=2,
                     input_size=(32, 64))  # fmt: skip
    save_checkpoint(path, create_model("tiny", num_classes=n, width=4), card)
    return path


def test_evaluate_refuses_data_of_another_class_set(tmp_path):
    synthetic = _checkpoint(tmp_path / "syn.pt", SYNTHETIC_CLASSES)
    cityscapes = _checkpoint(tmp_path / "cs.pt", cityscapes_classes())
    root = tmp_path / "cs"
    make_cityscapes_fixture(root, num_images=1, size=(32, 64), split="val")
    out = tmp_path / "ev"
    said = _refused("evaluate", synthetic, "-o", out, "--data", "cityscapes", "--root", root,
                    "--device", "cpu")  # fmt: skip
    assert "predicts 7 classes (" + ", ".join(SYNTHETIC_CLASSES) + ")" in said, said
    assert "--data cityscapes has 19 classes (road, sidewalk" in said, said
    said = _refused("evaluate", cityscapes, "-o", out, "--num-images", "1", "--device", "cpu")
    assert "predicts 19 classes" in said and "--data synthetic has 7 classes" in said, said
    assert not out.exists()


# ------------------------------------------------------------------ paths


def test_a_run_folder_stands_for_its_model_pt(run, tmp_path):
    code, said = _cli("evaluate", run, "-o", tmp_path / "ev", "--num-images", "1", "--eps", "0",
                      "--device", "cpu")  # fmt: skip
    assert code == 0, said
    assert (tmp_path / "ev" / "result.json").is_file()


def test_an_onnx_export_named_as_a_checkpoint_says_so(tmp_path):
    export = tmp_path / "onnx"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")  # a ModelProto's opening
    (tmp_path / "renamed.bin").write_bytes((export / "model.onnx").read_bytes())
    for cmd, path in [("export", export), ("export", export / "model.onnx"),
                      ("evaluate", export), ("evaluate", tmp_path / "renamed.bin")]:  # fmt: skip
        said = _refused(cmd, path, "-o", tmp_path / "out")
        assert "is an ONNX export, not a training checkpoint: name the run's model.pt" in said
        assert "Is a directory" not in said and "invalid load key" not in said, said
    said = _refused("evaluate", tmp_path, "-o", tmp_path / "out")
    assert "is a folder without model.pt" in said, said


# ------------------------------------------------------------------ install hints


@pytest.mark.parametrize(
    ("module", "make", "extra"),
    [
        ("torch", "server.backends.torch_eager:_torch", "train"),
        ("tensorrt", "server.backends.tensorrt:_imports", "gpu"),
    ],
)
def test_backends_name_the_extra_to_install_from_the_checkout(monkeypatch, module, make, extra):
    """certseg is not on PyPI: `pip install 'certseg[gpu]'` finds nothing."""
    import importlib

    from server.errors import BackendUnavailable

    name, fn = make.split(":")
    target = getattr(importlib.import_module(name), fn)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(BackendUnavailable, match=rf"pip install -e '\.\[{extra}\]'"):
        target()
