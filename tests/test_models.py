"""Registry models: structural L equals the audited bound of the weights; estimates stay below."""

from __future__ import annotations

import pytest
import torch

from certseg.models import create_model, list_models
from certseg.models.checkpoint import load_grown
from certseg.nn import certified_lipschitz, fuse_module, structural_lipschitz
from certseg.nn.estimate import jacobian_norm_estimate

SMALL = {
    "tiny": 2,
    "lipdeeplab_xs": 8,
    "lipdeeplab_s": 8,
    "lipdeeplab_s_klip": 8,
    "lipunet_xs": 8,
    "lipunet_s": 8,
}
LARGE = {"lipdeeplab_m1": 8, "lipdeeplab_m2": 16}


GRID = {"position_grid": (3, 5)}  # position-dependent biases, set non-zero below


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(n, {}) for n in sorted(SMALL | LARGE)] + [("tiny", GRID), ("lipunet_xs", GRID)],
)
def test_structural_bound_matches_weights_and_estimates(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("position.bias"):
                param.normal_()
    fused = fuse_module(model)
    structural = structural_lipschitz(model)
    audited = certified_lipschitz(fused)
    assert audited == pytest.approx(structural, rel=1e-3)
    assert audited >= structural * (1 - 1e-6)  # rounding only ever pushes it up a hair
    if name in SMALL:
        side = 4 * (SMALL | LARGE)[name]
        x = torch.rand(1, 3, side, side, dtype=torch.float64)
        estimate = jacobian_norm_estimate(fused.double(), x, steps=100)
        assert estimate <= audited


def test_unknown_name_suggests_close_matches():
    with pytest.raises(KeyError, match="lipdeeplab_s"):
        create_model("lipdeeplab-s", num_classes=3)


@pytest.mark.parametrize("name", ["tiny", "lipdeeplab_xs"])
def test_unconstrained_twin_has_the_same_shape(name):
    torch.manual_seed(0)
    lip = create_model(name, num_classes=4)
    twin = create_model(name, num_classes=4, constrained=False)
    x = torch.rand(2, 3, 32, 32)
    assert lip(x).shape == twin(x).shape
    with pytest.raises(TypeError):
        structural_lipschitz(twin)


def test_every_registered_model_is_checked():
    assert set(list_models()) == set(SMALL | LARGE)


def test_grown_model_starts_as_the_same_function():
    """Fine-tuning with position biases (--init): every saved weight lands, only the
    zero-initialised biases are new, so the grown net computes what the old one did."""
    torch.manual_seed(0)
    small = create_model("lipunet_xs", num_classes=4, width=8).eval()
    grown = create_model("lipunet_xs", num_classes=4, width=8, position_grid=(4, 8)).eval()
    new = load_grown(grown, small.state_dict())
    assert new and all(k.endswith("position.bias") for k in new)
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(grown(x), small(x))
    for wrong in (create_model("lipunet_xs", num_classes=4, width=16), create_model("tiny", 4)):
        with pytest.raises(RuntimeError, match="does not fit"):
            load_grown(wrong, small.state_dict())
    other = create_model("lipunet_xs", num_classes=4, width=8, position_grid=(4, 8))
    with torch.no_grad():
        other.get_parameter(new[0]).fill_(1.0)
    with pytest.raises(RuntimeError, match="zero"):
        load_grown(other, small.state_dict())


def test_no_lipschitz_constant_is_taken_from_a_checkpoint_file(tmp_path):
    """A card is only a claim: an unconstrained net whose (hand-edited) card says L 1.0
    was certified with it (a pixel at radius 882 flipped by a perturbation of norm
    1.01); a Lipschitz net's card claiming less than its weights gives is not believed
    either. Both constants come from the model loaded."""
    import math

    from certseg.models import ModelCard, load_checkpoint, save_checkpoint

    card = ModelCard("t", "tiny", 3, list("abc"), [(0, 0, 0)] * 3, arch_kwargs={"width": 4})
    twin = create_model("tiny", num_classes=3, width=4, constrained=False)
    path = tmp_path / "twin.pt"
    save_checkpoint(path, twin, ModelCard(**{**card.to_dict(), "arch_kwargs": {
        "width": 4, "constrained": False}}))  # fmt: skip
    blob = torch.load(path, weights_only=False)
    blob["card"] = {**blob["card"], "lipschitz": 1.0, "lipschitz_audited": 1.0}
    torch.save(blob, path)
    for fused in (True, False):
        _, loaded = load_checkpoint(path, fused=fused)
        assert math.isinf(loaded.certified_lipschitz), fused
    net = create_model("tiny", num_classes=3, width=4)
    path = tmp_path / "lip.pt"
    save_checkpoint(path, net, card)
    blob = torch.load(path, weights_only=False)
    true_l = blob["card"]["lipschitz"]
    blob["card"] = {**blob["card"], "lipschitz": true_l / 10, "lipschitz_audited": true_l / 10}
    torch.save(blob, path)
    for fused in (True, False):
        _, loaded = load_checkpoint(path, fused=fused)
        assert loaded.certified_lipschitz >= true_l * (1 - 1e-6), (fused, loaded)


def test_a_fused_model_shares_no_module_with_its_source():
    """Weight-free modules (input normalisation, MaxMin, the invertible down/upsampling)
    were the source's own objects: the fused model's .double() broke the source, and an
    edit of its normalisation reached it."""
    torch.manual_seed(0)
    model = create_model("lipunet_xs", num_classes=3, width=4, depth=2).eval()
    fused = fuse_module(model)
    ours = {id(m) for m in model.modules()}
    assert not [type(m).__name__ for m in fused.modules() if id(m) in ours]
    x = torch.rand(1, 3, 16, 16)
    fused.double()
    with torch.no_grad():
        assert model(x).dtype == torch.float32
