"""Captured CUDA graphs of a forward pass: one per input shape, a bounded few.

Why: a segmentation net is a hundred-odd small kernels; at video sizes on a fast GPU
their launch overhead is a visible share of the frame time. A graph replays all of
them with one launch. It is captured per (shape, dtype) (the server sees few sizes:
a camera's), and at most `size` are kept, least recently used out first, since each
holds its own activation memory: nothing grows without bound.

The outputs of a replay are the graph's own static tensors, overwritten by the next
replay of the same graph: callers copy them out first (the torch backend copies
every requested plane to the host before it returns).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["GraphCache"]


class GraphCache:
    """`fn(x) -> dict of tensors`, replayed from a captured CUDA graph per input shape."""

    def __init__(self, torch: Any, fn: Callable[[Any], dict[str, Any]], size: int = 4) -> None:
        if size < 1:
            raise ValueError("a graph cache needs room for at least one graph")
        self.torch, self.fn, self.size = torch, fn, size
        self._graphs: OrderedDict[tuple, tuple[Any, Any, dict[str, Any]]] = OrderedDict()
        self.captures = 0  # how many graphs were captured (for tests and metrics)

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, x: Any) -> dict[str, Any]:
        key = (tuple(x.shape), x.dtype)
        entry = self._graphs.pop(key, None)
        if entry is None:
            while len(self._graphs) >= self.size:
                self._graphs.popitem(last=False)  # least recently used
            entry = self._capture(x)
            self.captures += 1
        self._graphs[key] = entry
        static_in, graph, outputs = entry
        static_in.copy_(x)
        graph.replay()
        return outputs

    def _capture(self, x: Any) -> tuple[Any, Any, dict[str, Any]]:  # pragma: no cover - GPU
        """Warm up on a side stream (kernel choice, allocator), then capture."""
        torch = self.torch
        static_in = x.clone()
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_in)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(static_in)
        return static_in, graph, outputs
