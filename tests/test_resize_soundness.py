"""Soundness through the area resize: attacks on the image sent never beat the
certificates the server gives for a shrunk image.

The attacked function is the whole path, source image -> area shrink D -> tiny
1-Lipschitz net (conftest.trained_tiny), so the attacker perturbs the image the
client sent (45x90, shrunk to the net's 32x64: ||D|| = 0.84), and the certificate
is the server's own (`server.pipeline.certify` with the resize).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from certseg.attacks import min_norm_pixel, pgd_image_sweep, pgd_pixel
from certseg.certify import certified_radius, margins
from certseg.certify.resize import AreaResize
from server.pipeline import FIGURES, certify

SOURCE, NETWORK = (45, 90), (32, 64)
N_IMAGES = 12


class Shrunk(torch.nn.Module):
    """The server's answer as a function of the image sent: the net behind the area
    shrink D, its logits brought back to the source grid as the answer's mask is."""

    def __init__(self, model: torch.nn.Module, plan: AreaResize) -> None:
        super().__init__()
        rh, rw = plan.matrices()
        self.model = model
        self.register_buffer("rh", torch.from_numpy(rh).float())
        self.register_buffer("rw", torch.from_numpy(rw).float())
        self.register_buffer("rows", torch.from_numpy(plan.row_map))
        self.register_buffer("cols", torch.from_numpy(plan.col_map))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(torch.einsum("ij,ncjk,lk->ncil", self.rh, x, self.rw))
        return logits.index_select(2, self.rows).index_select(3, self.cols)


class _Info:
    """What `certify` reads of a served model."""

    def __init__(self, lipschitz: float, num_classes: int) -> None:
        self.lipschitz = lipschitz
        self.margin_error = 0.0  # fp32 torch: the reference evaluation itself
        self.card = SimpleNamespace(
            num_classes=num_classes, classes=[f"c{k}" for k in range(num_classes)]
        )


@pytest.fixture(scope="module")
def setting(trained_tiny):
    model, lip, images, labels = trained_tiny
    plan = AreaResize(SOURCE, NETWORK)
    # source images: the held-out scenes at 45x90 (any image in [0, 1] would do)
    src = torch.nn.functional.interpolate(
        images[:N_IMAGES], size=SOURCE, mode="bilinear", align_corners=False
    ).clamp(0, 1)
    shrunk = Shrunk(model, plan).eval()
    certs = []
    for x in src.numpy():
        net_in = plan.apply(x)  # what the server feeds the engine
        with torch.no_grad():
            logits = model(torch.from_numpy(net_in)[None]).numpy()[0]
        mask, margin = margins(logits)
        outputs = {
            "mask": mask,
            "margin": margin.astype(np.float32),
            "radius": certified_radius(margin, lip).astype(np.float32),
            "logits": logits.astype(np.float32),
        }
        certs.append((logits, outputs))
    return shrunk, lip, plan, src, certs, labels[:N_IMAGES]


def _cert(setting, i: int, eps: float):
    _, _, plan, _, certs, _ = setting
    logits, outputs = certs[i]
    return certify(_Info(setting[1], logits.shape[0]), outputs, eps, None, 1, plan, FIGURES)


def test_pixel_attacks_on_the_source_never_beat_its_radius(setting):
    shrunk, _, _, src, _, _ = setting
    rng = np.random.default_rng(0)
    picks = []
    for i in range(N_IMAGES):
        c = _cert(setting, i, 0.0)
        assert c.radius.shape == c.mask.shape == SOURCE
        candidates = np.argwhere(c.radius > 1e-3)
        for r, col in candidates[rng.choice(len(candidates), 6, replace=False)]:
            picks.append((i, r, col, c.mask[r, col], c.radius[r, col]))
    n, r, col, label, rad = (np.array(v) for v in zip(*picks, strict=True))
    x = src[n]
    pixels = torch.from_numpy(np.stack([r, col], 1))
    labels = torch.from_numpy(label.astype(np.int64))
    rad = torch.from_numpy(rad.astype(np.float32))
    below = pgd_pixel(shrunk, x, pixels, labels, 0.99 * rad, steps=30, restarts=1)
    assert not bool(below.success.any()), "a pixel flipped below its source radius"
    found = min_norm_pixel(shrunk, x, pixels, labels, steps=40)
    ok = found.success
    assert int(ok.sum()) >= 0.8 * len(picks), "the attack should find flips for most"
    assert bool((found.norms[ok] >= rad.double()[ok] * (1 - 1e-5)).all())
    ratio = (found.norms[ok] / rad.double()[ok]).numpy()
    print(f"min-norm flip / source radius: median {np.median(ratio):.2f}, min {ratio.min():.3f}")
    assert np.median(ratio) < 50  # the radius is not vacuous


def test_image_attacks_on_the_source_never_beat_the_budget(setting):
    shrunk, _, plan, src, certs, labels = setting
    preds = np.stack([plan.upsample(c[1]["mask"]) for c in certs])
    radius = np.stack([c[1]["radius"] for c in certs])
    med = float(np.median(plan.source_radius(radius)))
    eps_values = [0.5 * med, 2 * med, 8 * med]
    attacks = pgd_image_sweep(
        shrunk, src, torch.from_numpy(preds).long(), eps_values, steps=60, restarts=1
    )
    # ground truth on the source grid: the scenes' labels, nearest-resized
    rows = np.minimum((np.arange(SOURCE[0]) * NETWORK[0]) // SOURCE[0], NETWORK[0] - 1)
    cols = np.minimum((np.arange(SOURCE[1]) * NETWORK[1]) // SOURCE[1], NETWORK[1] - 1)
    targets = labels.numpy()[:, rows][:, :, cols]
    total_flips, lost, below_stability, closest = 0, 0.0, 0, 0.0
    for eps, res in zip(eps_values, attacks, strict=True):
        with torch.no_grad():
            adv = shrunk(res.adv).argmax(1).numpy()
        assert ((res.adv - src).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
        for i in range(N_IMAGES):
            cert = _cert(setting, i, eps)
            changed = adv[i] != preds[i]
            assert not (changed & (cert.radius > eps)).any(), "a certified pixel flipped"
            assert int(changed.sum()) <= cert.max_flips
            for row in cert.classes:  # and per predicted class, out of it and into it
                c = row["id"]
                assert int((changed & (preds[i] == c)).sum()) <= row["max_flips"]
                assert int((changed & (adv[i] == c)).sum()) <= row["max_gains"]
            assert cert.guaranteed_fraction == float(np.mean(cert.radius > eps))
            for row in cert.stability:  # below its norm no attack flips that many pixels
                if row["eps"] > eps:
                    assert int(changed.sum()) < row["pixels"]
                    below_stability += int(changed.sum()) > 0
                    closest = max(closest, int(changed.sum()) / row["pixels"])
            total_flips += int(changed.sum())
            # the attacked accuracy on the source grid never goes below the bound
            outputs = certs[i][1]
            worst, clean = plan.worst_case_accuracy(
                outputs["mask"], outputs["margin"], targets[i], eps, setting[1]
            )
            valid = targets[i] != 255
            attacked = float(((adv[i] == targets[i]) & valid).sum() / valid.sum())
            assert attacked >= worst - 1e-12
            lost += clean - attacked
            # and so does every class's IoU
            iou_worst, _ = plan.worst_case_iou(
                outputs["mask"], outputs["margin"], certs[i][0], targets[i], eps, setting[1]
            )
            for c in np.flatnonzero(~np.isnan(iou_worst)):
                hit, truth = (adv[i] == c) & valid, targets[i] == c
                assert (hit & truth).sum() / (truth | hit).sum() >= iou_worst[c] - 1e-12
    print(f"source pixels flipped over {len(eps_values)} eps: {total_flips}")
    assert total_flips > 0 and lost > 0, "the attacks must do harm for this to test anything"
    print(f"attacks below a stability norm: {below_stability}, reaching {closest:.0%} of k")
    assert below_stability > 0, "some attack below a stability norm must flip pixels"
