"""Shared test setup.

Torch runs single-threaded in tests: the models are tiny, and on a busy 2-core
machine intra-op threads spin against each other (measured ~100x slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
