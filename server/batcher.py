"""Dynamic batching: one worker per device, requests of the same shape run together.

Every image of every surface (REST, V2, stream) goes through `Batcher.submit`. The
worker takes the oldest waiting image and gathers the others of the same (model,
H, W, logits-or-not) until the batch is full or the oldest has waited `max_delay_ms`.
Full is `max_batch` images, fewer where they would pass `max_pass_pixels` (the
engine's working memory grows with the pixels of a pass, not with the images).
Images of other shapes wait their own turn, in arrival order. The forward pass runs
in the device's single worker thread, so the event loop never blocks and a device
never runs two batches at once (a GPU gains nothing from that, a CPU loses). The
queue is bounded: past `max_queue` images, `Overloaded` (503 with Retry-After from
the measured throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from certseg.sizes import padded_pixels
from server.engine import Engine
from server.errors import BackendError, CertSegError, Overloaded

__all__ = ["BatchResult", "Batcher", "images_per_pass"]

log = logging.getLogger("certseg.server")


def images_per_pass(
    max_batch: int, max_pass_pixels: int | None, height: int, width: int, pad_multiple: int = 1
) -> int:
    """The one rule of a pass's size: max_batch images, fewer where they would pass
    max_pass_pixels counted as the net runs them (never fewer than one)."""
    if max_pass_pixels is None:
        return max_batch
    pixels = padded_pixels(height, width, pad_multiple)
    return max(1, min(max_batch, max_pass_pixels // pixels))


@dataclass
class BatchResult:
    """One image's outputs and what it went through."""

    outputs: dict[str, np.ndarray]  # each without the batch axis
    queue_ms: float
    infer_ms: float
    batch_size: int


@dataclass
class _Item:
    model: str
    image: np.ndarray  # (3, H, W): float32 in [0, 1], or uint8 for engines that take it
    names: tuple[str, ...]
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[str, int, int, tuple[str, ...], str]:
        # dtype too: uint8 images (0..255) and float32 ones ([0, 1]) never share a batch
        return (
            self.model,
            self.image.shape[1],
            self.image.shape[2],
            self.names,
            self.image.dtype.str,
        )


def _stack_and_infer(
    engine: Engine, images: list[np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """In the device's worker thread: the batch copy (200 MB at 8 x 1024x2048 float32)
    must not stall the event loop."""
    return engine.infer(np.stack(images), list(names))


class Batcher:
    """The queue and worker of one device; models on that device share it."""

    def __init__(
        self,
        engines: dict[str, Engine],
        device: str = "cpu",
        max_batch: int = 8,
        max_pass_pixels: int | None = None,
        max_delay_ms: float = 2.0,
        max_queue: int = 64,
        on_batch: Callable[[str, int, float], None] | None = None,
        on_queue: Callable[[str, int], None] | None = None,
    ) -> None:
        self.engines = engines
        self.device = device
        self.max_batch = max_batch
        self.max_pass_pixels = max_pass_pixels
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"certseg-{device}")
        self._task: asyncio.Task[None] | None = None
        self._ms_per_image = 50.0  # running estimate, for Retry-After
        self._running: Future[Any] | None = None  # the worker thread's current job

    # lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(BackendError("server shutting down"))
        self._pending.clear()
        # A forward pass cannot be interrupted: the worker thread is left to finish it
        # while the process exits (waiting for it held a SIGTERM'd server 10 s past its
        # grace, and kills come after the grace).
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> bool:
        """Device work (a pass, a load, a warm-up) is running on the worker thread."""
        return self._running is not None and not self._running.done()

    def _in_worker(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """`fn(*args)` on the device's thread, remembered as the running work."""
        self._running = self._executor.submit(fn, *args)
        return asyncio.wrap_future(self._running)

    async def run_in_worker(self, fn: Callable[[], object]) -> object:
        """Run blocking device work (load, warm-up) on the device's thread."""
        return await self._in_worker(fn)

    # submitting -----------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._pending)

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained, at the measured speed."""
        return max(1.0, math.ceil(self.depth * self._ms_per_image / 1000.0))

    def check_capacity(self) -> None:
        """Overloaded (503 + Retry-After) when the queue is full. Routes call it before
        decoding too, so shedding under overload costs no decode."""
        if self.depth >= self.max_queue:
            raise Overloaded(
                f"inference queue full ({self.max_queue} images waiting)",
                retry_after=self.retry_after(),
            )

    async def submit(
        self, model: str, image: np.ndarray, outputs: Sequence[str] = ()
    ) -> BatchResult:
        """Queue one (3, H, W) image; wait for its outputs (margin and radius always)."""
        (result,) = await self.submit_all(model, [image], outputs)
        return result

    async def submit_all(
        self, model: str, images: Sequence[np.ndarray], outputs: Sequence[str] = ()
    ) -> list[BatchResult]:
        """Queue images all at once or none (Overloaded if they do not all fit: a request
        half queued computes images nobody reads); wait for all their outputs. The check
        and the queueing have no await between them, so two requests cannot both pass it."""
        if self.depth + len(images) > self.max_queue:
            raise Overloaded(
                f"inference queue full ({self.depth} of {self.max_queue} images waiting; "
                f"this request holds {len(images)})",
                retry_after=self.retry_after(),
            )
        names = tuple(sorted({*outputs, "mask", "margin", "radius"}))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[BatchResult]] = [loop.create_future() for _ in images]
        for image, fut in zip(images, futures, strict=True):
            self._pending.append(_Item(model, image, names, fut))
        self._report_depth()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*futures))
        finally:
            # A client that left, or a sibling that failed: images not yet run leave the
            # queue now (its depth and the 503s it gives count only work someone awaits).
            for fut in futures:
                fut.cancel()  # a no-op on a done one; gather cancelled them already if cancelled
            left = {id(fut) for fut in futures if fut.cancelled()}
            if left:
                self._pending = deque(it for it in self._pending if id(it.future) not in left)
                self._report_depth()

    def _report_depth(self) -> None:
        if self._on_queue is not None:
            self._on_queue(self.device, self.depth)

    # the worker -----------------------------------------------------------------
    def batch_cap(self, height: int, width: int, pad_multiple: int = 1) -> int:
        """Images of this size per pass: max_batch, fewer to stay within max_pass_pixels
        counted as the net runs them, each side padded to `pad_multiple` (never fewer
        than one: a single image's size is bounded at decode)."""
        return images_per_pass(self.max_batch, self.max_pass_pixels, height, width, pad_multiple)

    def _take_batch(self) -> tuple[list[_Item], int]:
        """The oldest image's batch so far, and how many would make it full."""
        first = self._pending[0]
        multiple = self.engines[first.model].metadata().card.pad_multiple
        cap = self.batch_cap(first.image.shape[1], first.image.shape[2], multiple)
        return [it for it in self._pending if it.key == first.key][:cap], cap

    async def _next_batch(self) -> list[_Item]:
        """The oldest image's batch, once full or once the oldest has waited enough."""
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Drop images whose clients left before they ran.
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if not self._pending:
                continue
            batch, cap = self._take_batch()
            remaining = self._pending[0].enqueued + self.max_delay - time.perf_counter()
            if len(batch) >= cap or remaining <= 0:
                return batch
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _worker(self) -> None:
        while True:
            try:
                batch = await self._next_batch()
            except Exception as exc:  # a fault forming a batch must not stop the worker:
                if not self._pending:  # every image would wait forever
                    raise
                oldest = self._pending.popleft()
                log.error("cannot batch an image of %s: %s", oldest.model, exc, exc_info=exc)
                self._fail([oldest], BackendError(f"cannot batch for model '{oldest.model}'"))
                self._report_depth()
                continue
            taken = {id(it) for it in batch}
            self._pending = deque(it for it in self._pending if id(it) not in taken)
            self._report_depth()
            batch = [it for it in batch if not it.future.done()]
            if not batch:
                continue
            try:
                await self._run_batch(batch)
            except asyncio.CancelledError:
                self._fail(batch, BackendError("server shutting down"))
                raise
            except CertSegError as exc:
                self._fail(batch, exc)
            except Exception as exc:  # any backend fault: answer 503, keep serving
                log.error("inference failed on %s: %s", batch[0].model, exc, exc_info=exc)
                self._fail(batch, BackendError(f"inference failed on model '{batch[0].model}'"))

    async def _run_batch(self, batch: list[_Item]) -> None:
        first = batch[0]
        engine = self.engines[first.model]
        start = time.perf_counter()
        out = await self._in_worker(
            _stack_and_infer, engine, [it.image for it in batch], first.names
        )
        infer_ms = (time.perf_counter() - start) * 1000.0
        n = len(batch)
        per_image = {k: [out[k][i] for i in range(n)] for k in first.names}
        self._ms_per_image = 0.8 * self._ms_per_image + 0.2 * infer_ms / n
        if self._on_batch is not None:
            self._on_batch(first.model, n, infer_ms)
        for i, it in enumerate(batch):
            if not it.future.done():
                it.future.set_result(
                    BatchResult(
                        outputs={k: v[i] for k, v in per_image.items()},
                        queue_ms=(start - it.enqueued) * 1000.0,
                        infer_ms=infer_ms,
                        batch_size=n,
                    )
                )

    @staticmethod
    def _fail(batch: list[_Item], exc: Exception) -> None:
        for it in batch:
            if not it.future.done():
                it.future.set_exception(exc)
