"""Prometheus metrics, in a registry of the app's own (two apps in one process, as in
tests, never collide in the global registry), with the standard ``process_`` ones
(resident memory, CPU seconds, open files) beside ours."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

__all__ = ["Metrics"]

_MS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_FRACTION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_EPS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """Every metric the server exports; ours start with ``certseg_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_resident_memory_bytes is what host memory is sized by (a pass's memory
        # grows with its pixels; docs/reliability.md), so every scrape carries it.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "certseg_requests",
            "HTTP requests and WebSocket sessions by route template and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.stage_ms = Histogram(
            "certseg_stage_latency_ms",
            "Per-image latency of each stage (decode, prepare, queue, infer, certify, encode; "
            "a stream's pending and order; total), ms.",
            ["stage"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "certseg_batch_size",
            "Images per forward pass.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "certseg_queue_depth", "Images waiting for inference.", ["device"], registry=r
        )
        self.body_bytes = Gauge(
            "certseg_body_bytes_in_flight",
            "Request body bytes held by all requests (the max_body_bytes_in_flight budget).",
            registry=r,
        )
        self.stream_frames = Counter(
            "certseg_stream_frames",
            "Frames received on /v1/stream (each is answered or dropped).",
            registry=r,
        )
        self.dropped_frames = Counter(
            "certseg_stream_dropped_frames",
            "Stream frames replaced by a newer one before they ran.",
            registry=r,
        )
        self.stream_connections = Gauge(
            "certseg_stream_connections", "Open /v1/stream WebSockets.", registry=r
        )
        self.guaranteed_fraction = Histogram(
            "certseg_guaranteed_fraction",
            "Fraction of pixels certified at the request's eps.",
            ["model"],
            buckets=_FRACTION_BUCKETS,
            registry=r,
        )
        self.stability_eps = Histogram(
            "certseg_stability_eps",
            "Least l2 norm that may flip this fraction of an image's pixels (answers that "
            "asked for stability): its drift flags inputs the model is less sure of.",
            ["model", "fraction"],
            buckets=_EPS_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "certseg_backend_errors", "Batches that failed in the backend.", ["model"], registry=r
        )
        self.model_ready = Gauge(
            "certseg_model_ready", "1 once the model is loaded and warm.", ["model"], registry=r
        )

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_ms.labels(stage).observe(ms)
