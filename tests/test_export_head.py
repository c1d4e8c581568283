"""The certificate head (torch side of the exported graph): exact top1/top2 with ties,
the radius factor's rounding, and pad -> net -> crop at any size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certseg.certify import margins, radius_scale_for
from export.graph_head import HEAD_FORMULATIONS, CertificateHead, CertifiedSegmenter


@pytest.mark.parametrize("form", HEAD_FORMULATIONS)
@pytest.mark.parametrize("k", [2, 3, 7])
def test_head_matches_certify_margins(form, k):
    gen = torch.Generator().manual_seed(k)
    z = torch.randn(3, k, 6, 5, generator=gen)
    z = torch.round(z * 4) / 4  # many exact ties
    mask, margin, radius = CertificateHead(k, 2.0, form)(z)
    pred, ref = margins(z)
    assert torch.equal(margin, ref)
    # torch.topk breaks ties in no specified order (ONNX TopK: lowest index first); the
    # mask can differ only on ties for first place, whose margin is 0 (never certified).
    same = margin > 0 if form == "topk" else torch.ones_like(margin, dtype=torch.bool)
    assert torch.equal(mask[same], pred.to(torch.int32)[same])
    assert (margin == 0).any()  # ties were there, and gave margin 0
    assert torch.all(radius <= margin / (math.sqrt(2) * 2.0))


@pytest.mark.parametrize("form", HEAD_FORMULATIONS)
def test_tie_for_first_place(form):
    z = torch.randn(2, 4, 5, 6)
    z[:, 1] = z[:, 3] = z.amax(1) + 1
    mask, margin, radius = CertificateHead(4, 2.0, form)(z)
    assert torch.all(margin == 0) and torch.all(mask == 1) and torch.all(radius == 0)


def test_single_class_has_infinite_margin():
    mask, margin, _ = CertificateHead(1, 1.0, "chain")(torch.randn(1, 1, 3, 3))
    assert torch.all(mask == 0) and torch.all(torch.isinf(margin))


@pytest.mark.parametrize("L", [1.0, 4.0000123, 3.7, 1e-3, 1e3])
def test_radius_scale_is_rounded_down(L):
    c = radius_scale_for(L)
    assert np.float32(c) == c
    exact = 1 / (math.sqrt(2) * L)
    assert c <= exact and c > exact * (1 - 1e-6)
    m = np.random.default_rng(0).random(10000, dtype=np.float32) * 10
    r = m * np.float32(c)  # what the graph computes in float32
    assert np.all(r.astype(np.float64) <= m.astype(np.float64) * exact)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_radius_scale_rejects_bad_L(bad):
    with pytest.raises(ValueError):
        radius_scale_for(bad)


def test_segmenter_pads_and_crops():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.cat([x[:, :1], -x[:, :1]], dim=1)

    seg = CertifiedSegmenter(Probe(), 2, 1.0, pad_multiple=8, with_logits=True)
    x = torch.rand(2, 3, 13, 21)
    mask, margin, _, logits = seg(x)
    assert seen == [(16, 24)]
    assert logits.shape == (2, 2, 13, 21) and mask.shape == (2, 13, 21)
    assert torch.equal(logits[:, 0], x[:, 0])
    assert torch.equal(margin, 2 * x[:, 0].abs())
    assert CertifiedSegmenter(Probe(), 2, 1.0, head="logits")(x).shape == (2, 2, 13, 21)
    with pytest.raises(ValueError):
        CertifiedSegmenter(Probe(), 2, 1.0, pad_multiple=0)
    with pytest.raises(ValueError):
        CertificateHead(2, 1.0, "sort")


def test_resolve_model_from_a_module():
    from certseg.models import ModelCard, create_model
    from certseg.nn import certified_lipschitz
    from export.onnx_export import resolve_model

    torch.manual_seed(0)
    model = create_model("tiny", num_classes=2, width=4).eval()
    card = ModelCard("t", "tiny", 2, ["a", "b"], [(0, 0, 0)] * 2, pad_multiple=2)
    fused, card2, lip = resolve_model(model, card)
    assert not any("parametrizations" in n for n, _ in fused.named_parameters())
    assert not any("parametrizations" in n for n, _ in fused.named_buffers())
    assert lip == certified_lipschitz(fused) and 4.0 <= lip < 4.0 * (1 + 1e-5)
    assert card2.lipschitz == pytest.approx(4.0) and card.lipschitz == 1.0  # card copied
    x = torch.rand(1, 3, 8, 10)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="ModelCard"):
        resolve_model(model)
