"""A forward pass compiled by torch.compile (inductor), per input size, a bounded few.

Why: eager torch runs each elementwise step of a 1-Lipschitz net (activations,
centering, residual sums, the certificate head) as a kernel of its own that reads
and writes whole activation planes; inductor fuses them into few kernels, and the
convolutions stay the vendor's (cuDNN, oneDNN). Measured on this project's CPU
machine (shipped model, 512x1024, 2 threads, timed in turns): 1901 ms eager -> 1137 ms
compiled (benchmarks/results/compile_cpu.json).

What is compiled, and when. Each input size (H, W, dtype) gets its own graph with H
and W fixed (inductor's fully dynamic spatial sizes fail on the padding arithmetic
in torch 2.13), and the batch dimension dynamic from batch 2 up: one graph for
batch 1 and one for every larger batch. A compile takes seconds to a minute, so the
engine compiles its warm-up sizes before it reports ready (`TorchEngine.warmup`);
a size first seen while serving is compiled then, once. At most `sizes` sizes are
compiled; later sizes run eagerly (the same function, uncompiled), so compiled code
and its memory do not grow with the sizes clients send.

The compiled function computes what the eager one does, with the same kernels for
the convolutions and fused, reordered arithmetic around them: its logits differ from
eager fp32 by float rounding (~1e-6 here), as every engine's differ from the
reference; `certseg calibrate --torch-compile` measures the margin error bound of the
engine exactly as served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CompiledForward"]

log = logging.getLogger("certseg.server")


class CompiledForward:
    """`fn(x) -> dict of tensors` compiled per input size (H, W, dtype), at most `sizes`."""

    def __init__(self, torch: Any, fn: Callable[[Any], dict[str, Any]], sizes: int = 4) -> None:
        if sizes < 1:
            raise ValueError("a compiled forward needs room for at least one size")
        self.torch, self.fn, self.sizes = torch, fn, sizes
        self.compiles = 0  # graphs inductor built (for tests, benchmarks and logs)
        self._compiled_sizes: set[tuple[int, int, Any]] = set()
        self._said_eager = False
        # dynamo keeps a function's graphs per code object, for every engine of the
        # process alike, and runs it eagerly past `recompile_limit` graphs (default 8):
        # give each compiled engine room for its own (two per size: batch 1 and > 1).
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, getattr(config, limit) + 2 * sizes)
        self._compiled = torch.compile(fn, backend=self._backend, dynamic=False)

    def _backend(self, graph: Any, example_inputs: list[Any]) -> Any:
        """inductor, counted."""
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(graph, example_inputs)

    @property
    def compiled_sizes(self) -> list[tuple[int, int]]:
        return sorted((h, w) for h, w, _ in self._compiled_sizes)

    def __call__(self, x: Any) -> dict[str, Any]:
        x = _canonical_strides(x)
        key = (int(x.shape[-2]), int(x.shape[-1]), x.dtype)
        if key not in self._compiled_sizes:
            if len(self._compiled_sizes) >= self.sizes:
                if not self._said_eager:  # once: sizes are the clients' to choose
                    self._said_eager = True
                    log.warning(
                        "size %dx%d and any further new size run eagerly: %d sizes are "
                        "compiled already (%s)",
                        key[0],
                        key[1],
                        self.sizes,
                        ", ".join(f"{h}x{w}" for h, w in self.compiled_sizes),
                    )
                return self.fn(x)
            self._compiled_sizes.add(key)
        if x.shape[0] > 1:  # one graph serves every batch of 2 or more
            self.torch._dynamo.mark_dynamic(x, 0)
        before, t0 = self.compiles, time.perf_counter()
        out = self._compiled(x)
        if self.compiles > before:  # a person waiting on a request wants to know why
            log.info(
                "compiled the forward pass for batch %s at %dx%d in %.1f s",
                "1" if x.shape[0] == 1 else ">= 2",
                key[0],
                key[1],
                time.perf_counter() - t0,
            )
        return out


def _canonical_strides(x: Any) -> Any:
    """x, contiguous, with the strides a fresh tensor of its shape has (a view, no copy).

    The stride of a dimension of size 1 is arbitrary (numpy's ``x[None]`` gives 0, a
    stacked batch of one the plane's size), and dynamo guards on strides: without this
    the same frame size would compile again for each way its batch of one was made.
    """
    if not x.is_contiguous():
        x = x.contiguous()
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= int(size)
    strides.reverse()
    return x if tuple(x.stride()) == tuple(strides) else x.as_strided(x.shape, strides)
