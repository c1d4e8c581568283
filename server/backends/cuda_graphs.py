"""Captured CUDA graphs of a forward pass: one per input shape, a bounded few.

Why: a segmentation net is a hundred-odd small kernels; at video sizes on a fast GPU
their launch overhead is a visible share of the frame time. A graph replays all of
them with one launch. It is captured per (shape, dtype) (the server sees few sizes:
a camera's), and at most `size` are kept, least recently used out first, since each
holds its own activation memory: nothing grows without bound.

A batch runs on the graph of the next power of two (3 on 4's, its last row a stale
input whose outputs are dropped): the dynamic batcher gives every size up to its
limit, and a graph per size would recapture (a warm-up and a capture, hundreds of
ms) whenever sizes outnumber the cache; buckets of 1, 2, 4, 8 hold any batch up to 8
at one camera size in the default 4 graphs, for at most twice the compute of a
batch. A bucket never passes the batcher's own limit for the size (`cap`: max_batch,
max_pass_pixels), which bounds a pass's memory: a batch of 5 where 5 is the limit
runs on 5 rows. Sound as long as images in a batch do not interact, as in an
inference-mode net (no batch statistics).

The outputs of a replay are the graph's own static tensors (their first rows, the
batch's), overwritten by the next replay of the same graph: callers copy them out
first (the torch backend copies every requested plane to the host before it returns).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["GraphCache", "bucket_of"]


class GraphCache:
    """`fn(x) -> dict of tensors`, replayed from a captured CUDA graph per input shape."""

    def __init__(
        self,
        torch: Any,
        fn: Callable[[Any], dict[str, Any]],
        size: int = 4,
        cap: Callable[[int, int], int] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a graph cache needs room for at least one graph")
        self.torch, self.fn, self.size = torch, fn, size
        #: most images a pass of (height, width) may hold (the batcher's own limit,
        #: max_batch and max_pass_pixels): no bucket runs more rows than a batch could
        self.cap = cap
        self._graphs: OrderedDict[tuple, tuple[Any, Any, dict[str, Any]]] = OrderedDict()
        self.captures = 0  # how many graphs were captured (for tests and metrics)

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, x: Any) -> dict[str, Any]:
        n = int(x.shape[0])
        bucket = bucket_of(n)
        if self.cap is not None:  # 5 of a limit of 5 run on 5 rows, not 8
            bucket = max(n, min(bucket, self.cap(int(x.shape[-2]), int(x.shape[-1]))))
        key = ((bucket, *x.shape[1:]), x.dtype)
        entry = self._graphs.pop(key, None)
        if entry is None:
            while len(self._graphs) >= self.size:
                self._graphs.popitem(last=False)  # least recently used
            static_in = x.new_zeros(key[0])  # rows past the batch: zeros until reused
            static_in[:n].copy_(x)
            entry = (static_in, *self._capture(static_in))
            self.captures += 1
        self._graphs[key] = entry
        static_in, graph, outputs = entry
        static_in[:n].copy_(x)
        graph.replay()
        return outputs if n == bucket else {k: v[:n] for k, v in outputs.items()}

    def _capture(self, static_in: Any) -> tuple[Any, dict[str, Any]]:  # pragma: no cover - GPU
        """(graph, its output tensors) of fn on `static_in`: warmed up on a side stream
        (kernel choice, allocator), then captured."""
        torch = self.torch
        current = torch.cuda.current_stream(static_in.device)
        side = torch.cuda.Stream(device=static_in.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_in)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(static_in)
        return graph, outputs


def bucket_of(batch: int) -> int:
    """The batch size whose graph runs a batch of `batch`: the next power of two."""
    if batch < 1:
        raise ValueError(f"a batch holds at least one image, got {batch}")
    return 1 << (batch - 1).bit_length()
