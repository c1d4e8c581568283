"""Training (single process, resumed, torchrun with gloo), evaluation and the smoothing
baseline, end to end through the CLI on tiny sizes."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from certseg.certify.smoothing import binomial_tail, holm_reject
from certseg.models import create_model, load_checkpoint
from certseg.train import Recipe, aim_cosine, make_optimizer
from server.launch import free_port

CLI = [sys.executable, "-m", "certseg.cli"]
TINY = ["--arch", "tiny", "--num-images", "8", "--val-images", "4", "--height", "32",
        "--width", "64", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAINED = ["--arch-kwarg", "width=6", "--train-eps", "0.05"]  # model kwargs, margin offset


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    _run([*CLI, "train", "-o", str(out), *TINY, "--epochs", "1", *TRAINED])
    return out


def test_train_writes_checkpoint_card_and_curves(trained):
    for name in ("model.pt", "last.pt", "card.json", "history.json", "curves.png"):
        assert (trained / name).stat().st_size > 0, name
    card = json.loads((trained / "card.json").read_text())
    assert card["arch"] == "tiny" and card["num_classes"] == 7 and card["pad_multiple"] == 2
    assert card["arch_kwargs"] == {"width": 6} and card["training"]["recipe"]["train_eps"] == 0.05
    assert card["lipschitz"] == pytest.approx(1 / min(card["std"]))
    _model, loaded = load_checkpoint(trained / "model.pt")
    assert loaded.certified_lipschitz == pytest.approx(card["lipschitz"], rel=1e-3)
    history = json.loads((trained / "history.json").read_text())
    assert len(history) == 1 and history[0]["lipschitz"] == pytest.approx(card["lipschitz"], 1e-3)


def test_a_set_smaller_than_a_batch_still_trains(tmp_path):
    """3 images at batch 4: a dropped ragged batch left no batch at all (loss 0, done)."""
    args = [*TINY, "--num-images", "3", "--val-images", "1"]  # later flags win
    _run([*CLI, "train", "-o", str(tmp_path), *args, "--epochs", "1"])
    (epoch,) = json.loads((tmp_path / "history.json").read_text())
    assert epoch["loss"] > 0, epoch


def test_training_resumes(tmp_path, trained):
    out = tmp_path / "resume"
    out.mkdir()
    for name in ("last.pt",):
        (out / name).write_bytes((trained / name).read_bytes())
    _run([*CLI, "train", "-o", str(out), *TINY, "--epochs", "2", *TRAINED])
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == json.loads((trained / "history.json").read_text())[0]
    # longer than first planned: the cosine anneals to lr_min at the new end (the saved
    # schedule of 1 epoch wrapped the lr back up to the start's over the second); how it
    # gets there is test_a_longer_resumed_run_follows_the_cosine_planned_for_its_new_end
    assert history[0]["lr"] == pytest.approx(1e-6) and history[1]["lr"] < 1e-5, history
    # a changed lr would be ignored (the optimiser's state is resumed): refused
    proc = subprocess.run([*CLI, "train", "-o", str(out), *TINY, "--epochs", "3", *TRAINED,
                           "--lr", "0.5"], capture_output=True, text=True, env=ENV)  # fmt: skip
    assert proc.returncode != 0 and "--lr 0.001 -> 0.5" in proc.stderr + proc.stdout, proc.stderr


def test_a_longer_resumed_run_follows_the_cosine_planned_for_its_new_end():
    """Re-aimed at 4x the steps after finishing 10, the lr is where a 40-step cosine
    stands at step 10 and steps along it to lr_min at 40. Setting T_max alone left a
    finished run at lr_min for all its added epochs (the lr is updated recursively)."""
    recipe = Recipe(lr=1e-3, lr_min=1e-6)
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, recipe, 10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-6)
    aim_cosine(sched, 40)

    def planned(t: int) -> float:
        return 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / 40)) / 2

    assert sched.get_last_lr()[0] == pytest.approx(planned(10))
    for t in range(11, 41):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(planned(t), rel=1e-6, abs=1e-12)


def test_fine_tune_keeps_the_normalization_its_weights_learned(tmp_path, trained):
    """--init on other images (another seed) keeps the init's mean/std: the weights
    were trained under them, and the card must describe the model that runs. The
    fine-tuned net may grow position biases (zero at init, trained from there)."""
    out = tmp_path / "ft"
    args = [*CLI, "train", "-o", str(out), *TINY, "--epochs", "1", *TRAINED, "--seed", "3"]
    _run([*args, "--arch-kwarg", "position_grid=[2,4]", "--init", str(trained / "model.pt")])
    before = json.loads((trained / "card.json").read_text())
    after = json.loads((out / "card.json").read_text())
    assert (after["mean"], after["std"]) == (before["mean"], before["std"])
    assert after["arch_kwargs"] == {"width": 6, "position_grid": [2, 4]}
    assert after["lipschitz"] == pytest.approx(before["lipschitz"])
    state = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    grown = [v for k, v in state.items() if k.endswith("position.bias")]
    assert grown and all(v.abs().max() > 0 for v in grown)  # they were trained


def test_distributed_training_with_gloo(tmp_path):
    out = tmp_path / "ddp"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
          "-m", "certseg.cli", "train", "-o", str(out), *TINY, "--epochs", "1"],
         timeout=300)  # fmt: skip
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["world_size"] == 2
    load_checkpoint(out / "model.pt")


def test_evaluate_writes_results_tables_and_plots(tmp_path, trained):
    out = tmp_path / "eval"
    proc = _run([*CLI, "evaluate", str(trained / "model.pt"), "-o", str(out),
                 "--num-images", "4", "--eps", "0", "--eps", "0.05", "--eps", "0.2",
                 "--device", "cpu"])  # fmt: skip
    assert "worst-case mIoU" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    rows = result["rows"]
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.2]
    assert rows[0]["worst_pixel_accuracy"] == rows[0]["pixel_accuracy"]
    assert rows[0]["worst_miou"] == pytest.approx(rows[0]["miou"])
    for a, b in itertools.pairwise(rows):
        assert b["worst_pixel_accuracy"] <= a["worst_pixel_accuracy"]
        assert b["certified_pixel_accuracy"] <= a["certified_pixel_accuracy"]
        assert b["worst_miou"] <= a["worst_miou"] + 1e-12
    # the REST answer's rows, less the pixel count (images differ in valid pixels)
    stab = result["stability"]
    assert [r["fraction"] for r in stab] == [0.01, 0.05, 0.1]
    assert all(set(r) == {"fraction", "eps"} for r in stab)
    assert [r["eps"] for r in stab] == sorted(r["eps"] for r in stab)
    for png in ("certified_vs_eps.png", "worst_iou.png", "example.png"):
        assert (out / png).stat().st_size > 5000, png
    assert (out / "table.md").read_text().count("\n|") >= 4


def test_evaluate_refuses_label_ids_the_model_does_not_have(tmp_path, trained):
    """A folder set's mask id 9 for a 7-class model was dropped from the figures unsaid."""
    from PIL import Image

    for sub in ("images", "masks"):
        (tmp_path / "data" / "val" / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "data/val/images/a.png")
    mask = np.zeros((32, 64), np.uint8)
    mask[3, 4] = 9
    Image.fromarray(mask).save(tmp_path / "data/val/masks/a.png")
    args = [*CLI, "evaluate", str(trained / "model.pt"), "-o", str(tmp_path / "out"), "--data",
            "folder", "--root", str(tmp_path / "data"), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0 and "values [9]" in proc.stderr + proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_smoothing_baseline_end_to_end(tmp_path):
    twin = tmp_path / "twin"
    _run([*CLI, "train", "-o", str(twin), *TINY, "--epochs", "1", "--unconstrained",
          "--noise-sigma", "0.25"])  # fmt: skip
    card = json.loads((twin / "card.json").read_text())
    assert math.isinf(card["lipschitz"])
    out = tmp_path / "smooth"
    proc = _run([*CLI, "evaluate", str(twin / "model.pt"), "-o", str(out), "--method", "smoothing",
          "--num-images", "2", "--n0", "4", "--n", "32", "--sigma", "0.25", "--eps", "0",
          "--eps", "0.1", "--device", "cpu"])  # fmt: skip
    rows = json.loads((out / "result.json").read_text())["rows"]
    assert rows[0]["tau"] == pytest.approx(0.5)
    # at eps 0.1 (tau 0.655) 32 unanimous votes give 1.3e-6 > 0.001 / 2048: said, and 0
    said = proc.stdout + proc.stderr
    assert "no pixel can be certified at eps 0.1:" in said, said[-2000:]
    assert rows[1]["certified_pixel_accuracy"] == 0
    assert rows[1]["certified_pixel_accuracy"] <= rows[0]["certified_pixel_accuracy"]
    for r in rows:
        assert 0 <= r["certified_pixel_accuracy"] <= 1 - r["abstain"] + 1e-12
    # one pass of the twin certifies nothing: said, where L = inf gave tracebacks
    from PIL import Image

    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    for cmd in (
        ["certify", str(tmp_path / "x.png"), "--checkpoint", str(twin / "model.pt")],
        ["evaluate", str(twin / "model.pt"), "-o", str(tmp_path / "e"), "--num-images", "1"],
        ["export", str(twin / "model.pt"), "-o", str(tmp_path / "onnx")],
    ):
        proc = subprocess.run([*CLI, *cmd], capture_output=True, text=True, env=ENV, timeout=300)
        said = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "unconstrained twin" in said, (cmd, said[-2000:])
        assert "Traceback" not in said, (cmd, said[-2000:])


def test_binomial_tail_matches_direct_sum():
    n, p = 30, 0.7
    tail = binomial_tail(n, p)
    for k in (0, 1, 15, 21, 30, 31):
        direct = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))
        assert tail[k] == pytest.approx(direct, abs=1e-12)


def test_holm_step_down():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted: 0.005 <= .05/4, 0.01 <= .05/3, 0.03 > .05/2 -> stop
    assert holm_reject(p, 0.05).tolist() == [True, False, False, True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_and_evaluate_on_cuda(tmp_path):
    out = tmp_path / "cuda"
    args = [a if a != "cpu" else "cuda" for a in TINY]
    _run([*CLI, "train", "-o", str(out), *args, "--epochs", "1", "--amp"])
    _run([*CLI, "evaluate", str(out / "model.pt"), "-o", str(tmp_path / "ev"),
          "--num-images", "2", "--device", "cuda"])  # fmt: skip


def test_position_biases_get_their_own_learning_rate():
    model = create_model("tiny", num_classes=3, width=4, position_grid=(2, 3))
    opt, _ = make_optimizer(model, Recipe(lr=1e-3, position_lr_scale=20), total_steps=10)
    rest, position = opt.param_groups
    assert position["lr"] == pytest.approx(2e-2) and position["weight_decay"] == 0.0
    assert rest["lr"] == pytest.approx(1e-3) and rest["weight_decay"] > 0
    assert len(position["params"]) == 4  # one per centering layer
    assert len(rest["params"]) + 4 == len(list(model.parameters()))
    # The unconstrained twin holds its maps outside any centering layer: same groups.
    twin = create_model("tiny", num_classes=3, width=4, position_grid=(2, 3), constrained=False)
    opt, _ = make_optimizer(twin, Recipe(lr=1e-3, position_lr_scale=20), total_steps=10)
    assert len(opt.param_groups[1]["params"]) == 4
    plain, _ = make_optimizer(create_model("tiny", num_classes=3), Recipe(), total_steps=10)
    assert len(plain.param_groups) == 1


def test_smoothing_tests_give_numpy_answers_on_torch():
    """Holm's procedure and the per-pixel tests are array-API generic (they run on the
    GPU in the fair timing): torch tensors give exactly numpy's answers, and numpy's
    agree with the textbook step-down (cumulative product over sorted p-values)."""
    from certseg.certify.smoothing import SmoothingCertifier

    rng = np.random.default_rng(0)
    for _ in range(100):
        p = rng.random((3, 40)) ** rng.uniform(0.5, 8)
        order = np.argsort(p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        ok = np.cumprod(sorted_p <= 0.05 / (40 - np.arange(40)), axis=-1).astype(bool)
        expected = np.zeros_like(ok)
        np.put_along_axis(expected, order, ok, -1)
        np.testing.assert_array_equal(holm_reject(p, 0.05), expected)
        np.testing.assert_array_equal(holm_reject(torch.from_numpy(p), 0.05).numpy(), expected)
    cert = SmoothingCertifier(4, 0.25, 5, 30, 0.001, [0.05, 0.1, 0.2])
    votes, guess = rng.integers(0, 31, (2, 6, 7)), rng.integers(0, 4, (2, 6, 7))
    on_numpy = cert.certify_counts(guess, votes)
    on_torch = cert.certify_counts(torch.from_numpy(guess), torch.from_numpy(votes))
    assert sum(int(m.sum()) for m in on_numpy) > 0
    for a, b in zip(on_numpy, on_torch, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
