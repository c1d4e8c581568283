"""Shared test setup.

Torch runs single-threaded in tests: the models are tiny, and on a busy 2-core
machine intra-op threads spin against each other (measured ~100x slower)."""

from __future__ import annotations

import os
import re

import httpx
import pytest
import torch

#: What a skip may stand for in CI (CI=true): a GPU and its libraries, which CI never
#: has. The dev extra and .ci/run bring every other real part the tests use (selenium,
#: PyAV, tritonclient, cityscapesscripts, hadolint, chromium), so in CI any other skip
#: is a failure: a missing part must not pass as a skipped test.
_GPU_SKIP = re.compile(r"cuda|gpu|tensorrt", re.IGNORECASE)


def _fail_a_ci_skip(report) -> None:
    """Turn `report`'s skip into a failure when running in CI and it is not a GPU's."""
    if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not _GPU_SKIP.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every non-GPU part is installed: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_a_ci_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_a_ci_skip(outcome.get_result())


@pytest.fixture(scope="module")
def client(server):
    """An httpx client of the module's `server` fixture (a LiveServer)."""
    with httpx.Client(base_url=server.base, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_tiny():
    """A tiny 1-Lipschitz net trained ~10 s on synthetic scenes, fused, plus held-out data.

    Returns (fused model, its audited L, held-out images (24,3,32,64), labels (24,32,64)).
    """
    import numpy as np

    from certseg.data import SyntheticScenes
    from certseg.models import create_model
    from certseg.nn import certified_lipschitz, fuse_module
    from certseg.train import Recipe, fit

    torch.set_num_threads(1)
    train = SyntheticScenes(192, (32, 64), seed=1)
    xs = torch.from_numpy(np.stack([train[i][0] for i in range(len(train))]))
    ys = torch.from_numpy(np.stack([train[i][1] for i in range(len(train))]))
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=7, width=16)
    batches = [(xs[i : i + 16], ys[i : i + 16]) for i in range(0, len(xs), 16)]
    fit(model, batches, Recipe(epochs=12, lr=3e-3, tau=8.0))
    fused = fuse_module(model).eval()
    held = SyntheticScenes(24, (32, 64), seed=2)
    images = torch.from_numpy(np.stack([held[i][0] for i in range(len(held))]))
    labels = torch.from_numpy(np.stack([held[i][1] for i in range(len(held))]))
    return fused, certified_lipschitz(fused), images, labels
