"""numpy and torch give the same certificates; the package never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from certseg.certify import (
    DatasetCertifier,
    certified_pixel_accuracy,
    certified_radius,
    guaranteed_region,
    margins,
    max_flips,
    stability,
    worst_case_dice,
    worst_case_fnr,
    worst_case_fwiou,
    worst_case_iou,
    worst_case_miou,
    worst_case_pixel_accuracy,
)

ROOT = Path(__file__).resolve().parents[1]


def _data(seed: int, quantized: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (2, 2, 3, 5, 6)  # two batch dims, K = 3
    if quantized:
        z = rng.integers(-2, 3, size=shape).astype(np.float32) / 2
    else:
        z = rng.normal(size=shape).astype(np.float32)
    t = np.where(rng.random((2, 2, 5, 6)) < 0.6, z.argmax(-3), rng.integers(0, 3, (2, 2, 5, 6)))
    t = np.where(rng.random((2, 2, 5, 6)) < 0.1, 255, t).astype(np.int64)
    eps = np.array([[0.0, 0.2], [0.6, 1.5]])
    return z, t, eps


@pytest.mark.parametrize("quantized", [False, True])
def test_numpy_and_torch_agree(quantized: bool) -> None:
    torch = pytest.importorskip("torch")
    z, t, eps = _data(5, quantized)
    zt, tt, et = torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(eps)
    L = 1.7

    def same(a: object, b: object) -> None:
        assert isinstance(b, torch.Tensor), type(b)
        np.testing.assert_allclose(np.asarray(a, dtype=float), b.numpy().astype(float), atol=1e-6)

    pn, mn = margins(z)
    pt, mt = margins(zt)
    same(pn, pt)
    same(mn, mt)
    same(certified_radius(mn, L), certified_radius(mt, L))
    rad_n, rad_t = certified_radius(mn, L), certified_radius(mt, L)
    same(guaranteed_region(rad_n, eps), guaranteed_region(rad_t, et))
    valid_n, valid_t = t != 255, tt != 255
    same(max_flips(mn, eps, L, valid=valid_n), max_flips(mt, et, L, valid=valid_t))
    same(max_flips(mn, 0.3, L), max_flips(mt, 0.3, L))
    same(stability(mn, 0.3, L, valid=valid_n), stability(mt, 0.3, L, valid=valid_t))
    several = (0.01, 0.3, 1.0)
    same(stability(mn, several, L, valid=valid_n), stability(mt, several, L, valid=valid_t))
    for f in (
        worst_case_pixel_accuracy,
        certified_pixel_accuracy,
        worst_case_iou,
        worst_case_dice,
        worst_case_miou,
        worst_case_fwiou,
        worst_case_fnr,
    ):
        same(f(z, t, eps, L), f(zt, tt, et, L))
        same(f(z, t, 0.4, L), f(zt, tt, 0.4, L))
    acc_n, acc_t = DatasetCertifier(3, L), DatasetCertifier(3, L)
    acc_n.update(z, t, eps)
    acc_t.update(zt, tt, et)
    rn, rt = acc_n.compute(), acc_t.compute()
    for f in ("worst_pixel_accuracy", "certified_pixel_accuracy", "worst_miou", "worst_mdice"):
        assert getattr(rn, f) == pytest.approx(getattr(rt, f), abs=1e-12)
    np.testing.assert_allclose(rn.worst_iou, rt.worst_iou, atol=1e-12)
    np.testing.assert_allclose(rn.image_worst_miou, rt.image_worst_miou, atol=1e-12)


def test_torch_margins_keep_autograd() -> None:
    torch = pytest.importorskip("torch")
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    _, m = margins(z)
    m.sum().backward()
    assert z.grad is not None
    # the bounds accept graph-carrying tensors too
    assert worst_case_miou(z, torch.zeros(2, 4, 4, dtype=torch.int64), 0.1, 1.0).shape == (2,)


def test_package_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "class Block:  # any 'import torch' now raises, as on the server\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "import certseg.certify as cc\n"
        "z = np.random.default_rng(0).normal(size=(2, 3, 4, 4))\n"
        "t = z.argmax(1)\n"
        "_, m = cc.margins(z)\n"
        "cc.max_flips(m, 0.2, 1.0); cc.stability(m, 0.5, 1.0)\n"
        "cc.worst_case_miou(z, t, 0.2, 1.0); cc.worst_case_fnr(z, t, 0.2, 1.0)\n"
        "a = cc.DatasetCertifier(3, 1.0); a.update(z, t, 0.2); a.compute()\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
