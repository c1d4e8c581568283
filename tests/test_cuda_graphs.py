"""CUDA graphs of the torch backend: outputs equal to eager, one capture per shape,
a bounded cache. The replay needs a GPU (marked gpu); the cache policy is plain
Python and is checked here with the capture step replaced by a CPU stand-in (a
capture cannot happen without CUDA, so this is the one way to test the policy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.backends.cuda_graphs import GraphCache, bucket_of


class _CpuGraphs(GraphCache):
    """Capture replaced: the 'graph' re-runs fn on the static input (policy test only)."""

    def _capture(self, static_in):
        class _Replay:
            def __init__(self, fn):
                self.fn, self.out = fn, {}

            def replay(self):
                self.out.update(self.fn(static_in))

        graph = _Replay(self.fn)
        return graph, graph.out


def test_graph_cache_is_bounded_and_least_recently_used():
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return {"y": x * 2}

    cache = _CpuGraphs(torch, fn, size=2)
    a, b, c = torch.ones(1, 2), torch.ones(2, 2), torch.ones(3, 2)
    assert torch.equal(cache(a)["y"], a * 2)
    cache(b)
    cache(a)  # a is now the most recent
    cache(c)  # evicts b, the least recently used
    assert len(cache) == 2 and cache.captures == 3
    cache(a)
    assert cache.captures == 3  # still cached
    cache(b)
    assert cache.captures == 4  # b had been evicted
    assert torch.equal(cache(torch.full((1, 2), 5.0))["y"], torch.full((1, 2), 10.0))
    with pytest.raises(ValueError):
        GraphCache(torch, fn, size=0)


def test_a_batch_runs_on_the_graph_of_the_next_power_of_two():
    """Batches 3 and 4 share one graph (4's), 5 to 8 another: the batcher's every size
    up to 8 fits the default 4 graphs. A smaller batch gets its own rows, not the stale
    ones of the batch before it."""
    seen = []

    def fn(x):
        seen.append(tuple(x.shape))
        return {"y": x * 2, "s": x.sum(dim=1)}

    assert [bucket_of(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    with pytest.raises(ValueError):
        bucket_of(0)
    cache = _CpuGraphs(torch, fn, size=4)
    four = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(cache(four)["y"], four * 2)
    three = torch.full((3, 2), 7.0)
    out = cache(three)
    assert cache.captures == 1 and seen[-1] == (4, 2)  # run on 4's graph
    assert out["y"].shape == (3, 2) and torch.equal(out["y"], three * 2)
    assert torch.equal(out["s"], torch.full((3,), 14.0))
    for n in range(1, 9):
        got = cache(torch.full((n, 2), float(n)))["y"]
        assert got.shape == (n, 2) and torch.equal(got, torch.full((n, 2), 2.0 * n))
    assert cache.captures == 4 and len(cache) == 4  # graphs of 4, 1, 2 and 8
    # the batcher's limit for the size caps the bucket (it bounds a pass's memory):
    # a limit of 5 runs 5 on 5 rows and 3 on 4, never 8
    capped = _CpuGraphs(torch, fn, size=4, cap=lambda h, w: 5)
    for n in (5, 3):
        assert capped(torch.ones(n, 2))["y"].shape == (n, 2)
    assert seen[-2:] == [(5, 2), (4, 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replay_equals_eager(precision):
    from server.backends import ModelSpec, create_engine
    from server.settings import Settings, default_model_path

    checkpoint = default_model_path().with_name("model.pt")
    kw = {"backend": "torch", "precision": precision, "margin_error": 0.01, "cuda_graph_cache": 2}
    eager = create_engine(ModelSpec(None, checkpoint), Settings(**kw))
    graphed = create_engine(ModelSpec(None, checkpoint), Settings(cuda_graphs=True, **kw))
    eager.load()
    graphed.load()
    rng = np.random.default_rng(0)
    shapes = [(1, 3, 96, 192), (2, 3, 96, 192), (1, 3, 61, 93), (1, 3, 96, 192), (3, 3, 61, 93)]
    for shape in shapes:
        x = rng.integers(0, 256, shape).astype(np.uint8)
        a, b = eager.infer(x, ["mask", "logits"]), graphed.infer(x, ["mask", "logits"])
        for k in ("margin", "radius", "logits"):  # same kernels; allow summation-order noise
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)
        sure = a["margin"] > 1e-4
        np.testing.assert_array_equal(a["mask"][sure], b["mask"][sure])
    cache = graphed._graphs
    # the first re-captured; batch 3 ran on a graph of 4 (its outputs cut to 3 above)
    assert cache is not None and len(cache) == 2 and cache.captures == 5
