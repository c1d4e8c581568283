"""The running server: engines by name, one batcher per device, readiness.

Loading and warm-up happen in the background after the app starts, on each
device's worker thread: the server is live at once (/v2/health/live) and ready
(/v2/health/ready) only when every model has run its warm-up pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from starlette.requests import HTTPConnection

from server.batcher import Batcher
from server.body_budget import BodyBudget
from server.decode import Limits
from server.engine import Engine, ModelInfo
from server.errors import ModelError, ModelNotFound, ModelNotReady, client_value
from server.metrics import Metrics
from server.settings import Settings

__all__ = ["ModelStatus", "ServerState", "get_state"]

log = logging.getLogger("certseg.server")

ModelStatus = Literal["loading", "ready", "failed"]


class ServerState:
    """What every route reads from ``app.state.server``."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limits = Limits(
            settings.max_body_bytes, settings.image_pixels(), settings.max_source_pixels
        )
        self.bodies = BodyBudget(settings.max_body_bytes_in_flight)
        metrics.body_bytes.set_function(lambda: self.bodies.used)
        self.engines: dict[str, Engine] = {}
        self.status: dict[str, ModelStatus] = {}
        self.errors: dict[str, str] = {}
        self.batchers: dict[str, Batcher] = {}  # by device
        self._by_model: dict[str, Batcher] = {}
        self._warmup_task: asyncio.Task[None] | None = None
        self.streams = 0  # open WebSocket streams
        # Set when the server starts shutting down: streams stop reading, answer what
        # they hold and close 1012 (server.shutdown.CertsegServer waits for them).
        self.stopping = asyncio.Event()
        #: Set when a model failed to load; with on_fatal set (by `certseg serve`) the
        #: server then shuts down and exits non-zero instead of staying live and unready.
        self.fatal: str | None = None
        self.on_fatal: Callable[[], None] | None = None

    # setup ----------------------------------------------------------------------
    @staticmethod
    def check_names(engines: list[Engine]) -> None:
        """Models are served by name: two of one name are a ModelError (before any load)."""
        seen: set[str] = set()
        for engine in engines:
            name = engine.metadata().name
            if name in seen:
                raise ModelError(f"two models are named '{name}'; name them with NAME=PATH")
            seen.add(name)

    def add_engines(self, engines: list[Engine]) -> None:
        """Register engines by their metadata name; names must be unique."""
        self.check_names([*self.engines.values(), *engines])
        multiple = max(
            [self.limits.pad_multiple, *(e.metadata().card.pad_multiple for e in engines)]
        )
        if multiple * multiple > self.limits.max_pixels:
            raise ModelError(
                f"max_pixels {self.limits.max_pixels} is under one {multiple}x{multiple} block, "
                f"the least a model that pads each side to a multiple of {multiple} runs on"
            )
        # every pixel limit counts what the nets run on: each side padded to the multiple
        self.limits = replace(self.limits, pad_multiple=multiple)
        for engine in engines:
            info = engine.metadata()
            self.engines[info.name] = engine
            self.status[info.name] = "loading"
            self.metrics.model_ready.labels(info.name).set(0)

    async def start(self) -> None:
        """Create one batcher per device and load + warm every model in the background."""
        s = self.settings
        for name, engine in self.engines.items():
            device = engine.metadata().device
            if device not in self.batchers:
                self.batchers[device] = Batcher(
                    {},
                    device=device,
                    max_batch=s.batch_limit(device),
                    max_pass_pixels=s.pass_pixels(device),
                    max_delay_ms=s.max_delay_ms,
                    max_queue=s.max_queue,
                    on_batch=self._on_batch,
                    on_queue=lambda dev, n: self.metrics.queue_depth.labels(dev).set(n),
                )
                self.batchers[device].start()
            self.batchers[device].engines[name] = engine
            self._by_model[name] = self.batchers[device]
        self._warmup_task = asyncio.get_running_loop().create_task(self._load_all())

    def _on_batch(self, model: str, size: int, infer_ms: float) -> None:
        self.metrics.batch_size.labels(model).observe(size)

    async def _load_all(self) -> None:
        await asyncio.gather(*(self._load(name) for name in self.engines))

    async def _load(self, name: str) -> None:
        engine = self.engines[name]
        info = engine.metadata()
        sizes = [(1, h, w) for h, w in self.settings.warmup_hw(info.card.input_size)]
        batcher = self._by_model[name]
        try:
            await batcher.run_in_worker(engine.load)
            await asyncio.to_thread(_warm_certify)
            warm = sizes if self.settings.warmup else []
            await batcher.run_in_worker(lambda: engine.warmup(warm))
        except Exception as exc:
            self.status[name] = "failed"
            self.errors[name] = str(exc)
            log.error("model %s failed to load: %s", name, exc, exc_info=exc)
            if self.on_fatal is not None:
                self.fatal = f"model {name} failed to load: {exc}"
                self.on_fatal()
            return
        self.status[name] = "ready"
        self.metrics.model_ready.labels(name).set(1)
        log.info("model %s ready (%s on %s)", name, info.backend, info.device)

    async def stop(self) -> None:
        if self._warmup_task is not None:
            self._warmup_task.cancel()
        for batcher in self.batchers.values():
            await batcher.stop()
        for name, engine in self.engines.items():
            batcher = self._by_model.get(name)
            if batcher is not None and batcher.busy:  # its thread still holds the engine
                log.warning("model %s: exiting with its device work still running", name)
                continue
            engine.close()

    # lookups ----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self.engines) and all(
            self.status[n] == "ready" and e.ready for n, e in self.engines.items()
        )

    def default_model(self) -> str:
        return next(iter(self.engines))

    def info(self, name: str | None) -> ModelInfo:
        """The model's metadata; unknown name -> 404 listing the known ones."""
        name = name or self.default_model()
        engine = self.engines.get(name)
        if engine is None:
            known = ", ".join(sorted(self.engines))
            raise ModelNotFound(f"no model named {client_value(name)} (served: {known})")
        return engine.metadata()

    def model_ready(self, name: str) -> bool:
        return self.status.get(name) == "ready" and self.engines[name].ready

    def batcher_for(self, name: str) -> Batcher:
        """The model's batcher, once it is ready (else 503 with Retry-After)."""
        self.info(name)
        if not self.model_ready(name):
            if self.status.get(name) == "failed":
                raise ModelNotReady(f"model '{name}' failed to load: {self.errors.get(name)}")
            raise ModelNotReady(f"model '{name}' is still loading", retry_after=1)
        return self._by_model[name]


def _warm_certify() -> None:
    """First calls into certseg.certify build array-API namespaces (~0.1 s): pay it here."""
    import numpy as np

    from certseg.certify import guaranteed_region, max_flips

    margin = np.ones((1, 4, 4), dtype=np.float32)
    guaranteed_region(margin, 0.1)
    max_flips(margin, 0.1, 1.0)


def get_state(conn: HTTPConnection) -> ServerState:
    """The ServerState of the app serving this request or WebSocket."""
    return conn.app.state.server
