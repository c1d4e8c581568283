"""The shipped default model, served with no model named (as `certseg serve` does),
answers the README's example pixel for pixel like a direct ONNX Runtime session."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_support import (
    LiveServer,
    answer_png,
    answer_radius,
    ort_session,
    to_input,
    without_module,
)

from certseg.certify import float16_down, guaranteed_region, max_flips
from server import Settings, create_app
from server.settings import default_model_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example_street.png"


@pytest.fixture(scope="module")
def default_server():
    srv = LiveServer(create_app(Settings(intra_op_threads=1, max_delay_ms=1))).start()
    yield srv
    srv.stop()


def test_default_model_is_the_shipped_one():
    path = default_model_path()
    assert path is not None and path.parent.name == "street"


def test_readme_example_matches_direct_session(default_server):
    body = EXAMPLE.read_bytes()
    with httpx.Client(base_url=default_server.base, timeout=60) as client:
        r = client.post(
            "/v1/segment",
            params={"eps": 0.05, "outputs": "mask,radius"},
            content=body,
            headers={"Content-Type": "image/png"},
        )
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["model"] == "certseg-street-s24p"
    session = ort_session(default_model_path().parent)
    mask, margin, radius = session.run(["mask", "margin", "radius"], {"image": to_input(body)})
    np.testing.assert_array_equal(answer_png(ans["mask"]), mask[0])
    got = answer_radius(ans["radius"])
    np.testing.assert_array_equal(got, float16_down(radius[0]).astype(np.float32))
    assert ans["guaranteed_fraction"] == pytest.approx(
        float(guaranteed_region(radius[0], 0.05).mean())
    )
    assert ans["max_flips"] == int(max_flips(margin[0], 0.05, ans["lipschitz"]))
    # A trained model: most of a street scene is certified at a small budget.
    assert ans["guaranteed_fraction"] > 0.05


def test_reproduction_script_ends_with_the_shipped_recipe():
    """scripts/train_default_model.sh is how the README says to rebuild the shipped
    model: its last stage must be the recipe recorded in the shipped card."""
    script = (ROOT / "scripts" / "train_default_model.sh").read_text()
    last = [line for line in script.splitlines() if line.startswith("stage ")][-1]
    fields = last.split("#")[0].split()
    _, _name, _init, seed, images, epochs, lr, train_eps, *extra = fields
    card = json.loads((default_model_path().parent / "card.json").read_text())
    training, recipe = card["training"], card["training"]["recipe"]
    assert (training["seed"], training["num_images"]) == (int(seed), int(images))
    assert (recipe["epochs"], recipe["lr"], recipe["train_eps"]) == (
        int(epochs),
        float(lr),
        float(train_eps),
    )
    assert card["name"] == extra[extra.index("--name") + 1]
    scale = float(extra[extra.index("--position-lr-scale") + 1])
    assert recipe["position_lr_scale"] == scale
    assert card["arch_kwargs"] == {"width": 24, "position_grid": [8, 16]}


def test_certify_without_torch_gives_the_servers_figures(default_server):
    """`certseg certify` on a base install (torch made unimportable, as the quickstart
    leaves it) certifies with the shipped export by default, audited as the server
    loads it: the joint budget and stability equal the REST answer's."""
    import subprocess
    import sys

    code = without_module("torch") + (
        f"sys.argv = ['certseg', 'certify', {str(EXAMPLE)!r}, '--eps', '0.05', '--json']\n"
        "from certseg.cli import app; app()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = json.loads(proc.stdout)
    r = httpx.post(
        default_server.base + "/v1/segment",
        params={"eps": 0.05, "outputs": "stability"},
        content=EXAMPLE.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    ans = r.json()
    assert report["lipschitz"] == ans["lipschitz"]
    assert report["max_flips"] == [ans["max_flips"]]
    assert report["stability"] == ans["stability"]
    # radii: margin * radius_scale_for(L) here, the graph's margin * c there (c is a
    # hair smaller): at most the pixels within a rounding of eps may differ
    pixels = report["height"] * report["width"]
    assert abs(report["guaranteed_fraction"][0] - ans["guaranteed_fraction"]) * pixels <= 2
