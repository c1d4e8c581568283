"""Server configuration: one pydantic-settings model, env prefix ``CERTSEG_``.

The CLI flags of ``certseg serve`` carry the same names (``--max-batch`` is
``CERTSEG_MAX_BATCH`` is ``Settings.max_batch``), so a deployment can be described
by flags, by environment (containers, k8s) or by both; flags win.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from certseg.sizes import SIZE_MAX, parse_size

__all__ = ["BackendName", "Precision", "Settings", "default_model_path"]

BackendName = Literal["auto", "onnxruntime", "tensorrt", "torch"]
Precision = Literal["fp32", "fp16", "bf16"]

#: Where the lead ships the default model (certseg/weights/*.onnx or */model.onnx).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "certseg" / "weights"
#: Images of the largest size one GPU pass takes by default (batch size and pixel budget).
GPU_IMAGES_PER_PASS = 8


def default_model_path(weights_dir: Path = WEIGHTS_DIR) -> Path | None:
    """The shipped default model, if the package carries one (first .onnx by name)."""
    if not weights_dir.is_dir():
        return None
    found = sorted(weights_dir.glob("*.onnx")) + sorted(weights_dir.glob("*/model.onnx"))
    return found[0] if found else None


class Settings(BaseSettings):
    """Everything ``certseg serve`` can be told. Defaults suit one CPU node."""

    model_config = SettingsConfigDict(env_prefix="CERTSEG_", env_file=None, extra="ignore")

    # models
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to serve: PATH or NAME=PATH (exported dir, .onnx, .pt for torch). "
        "Empty: the default model.",
    )
    default_model: Path | None = Field(
        default=None,
        description="Model path served when no models are given (default: the one shipped "
        "in certseg/weights/).",
    )
    backend: BackendName = "auto"
    providers: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="ONNX Runtime execution providers in order (e.g. CUDAExecutionProvider, "
        "CPUExecutionProvider); default: CUDA when available, then CPU.",
    )
    device_id: int = 0
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime/torch intra-op threads (0: library default)."
    )
    audit: bool = Field(
        default=True,
        description="Re-run the Lipschitz audit of each ONNX file at load and refuse it "
        "if its metadata claims less than its weights give.",
    )
    margin_error: float = Field(
        default=0.0,
        ge=0.0,
        description="Bound on the numerical error of each margin, subtracted before radii "
        "are reported (needed for fp16/TensorRT engines; 0 for fp32 ONNX Runtime).",
    )
    precision: Precision = Field(
        default="fp32",
        description="Arithmetic of the engine: fp32 (certificates exactly as exported), or "
        "fp16 (torch, TensorRT, ONNX Runtime's TensorRT provider) / bf16 (torch), which "
        "certify only with a margin error bound (--margin-error).",
    )
    cuda_graphs: bool = Field(
        default=False,
        description="torch backend on a GPU: replay each input shape's forward pass from a "
        "captured CUDA graph (one launch instead of one per kernel).",
    )
    cuda_graph_cache: int = Field(
        default=4,
        ge=1,
        description="Captured CUDA graphs kept (one per input size and power-of-two batch).",
    )
    torch_compile: bool = Field(
        default=False,
        description="torch backend: run the forward pass compiled by torch.compile "
        "(inductor), per input size, at most 4 sizes; the warm-up sizes are compiled "
        "before ready.",
    )
    ort_specialize: bool = Field(
        default=True,
        description="ONNX Runtime on the CPU: give each warm-up size (batch 1) a session "
        "of its own, in which what depends on the size alone is computed once, at load "
        "(each holds its own memory too; other sizes use the one dynamic session).",
    )
    trt_cache_dir: Path | None = None
    trt_max_side: int = Field(default=2048, ge=32, description="Native TensorRT: max H and W.")

    # http
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(
        default=None,
        description="Key required on every route but health, docs and the viewer page: "
        "Authorization: Bearer, X-API-Key, or ?api_key= on the WebSocket.",
    )
    log_level: str = "info"
    log_json: bool = True
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS (e.g. https://app.example.org, or *). Empty: "
        "CORS off, browsers on other origins cannot read answers.",
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        gt=0,
        description="On SIGTERM: stop accepting, let in-flight requests finish for at "
        "most this long, then exit.",
    )

    # streams (WS /v1/stream)
    max_streams: int = Field(
        default=64, ge=1, description="Open streams; beyond it the handshake gets 503."
    )
    stream_idle_s: float = Field(
        default=60.0, gt=0, description="Close a stream that sent nothing for this long."
    )
    stream_depth: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Frames one stream works on at once (decode, infer, certify and encode "
        "of consecutive frames overlap; answers keep frame order). A stream may ask for "
        'fewer with {"depth": n}; 1 gives the lowest latency, more the higher fps.',
    )
    stream_send_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Close a stream whose client has not taken an answer for this long "
        "(a client that stops reading must not hold server memory).",
    )

    # batching
    max_batch: int | None = Field(
        default=None,
        ge=1,
        le=SIZE_MAX,
        description="Images per forward pass. Default: 1 on CPU (measured: batching cut "
        "throughput 2.40 -> 1.52 req/s on 2 cores), 8 on a GPU.",
    )
    max_delay_ms: float = Field(default=2.0, ge=0.0)
    max_queue: int = Field(
        default=64, ge=1, le=SIZE_MAX, description="Images waiting; beyond it: 503."
    )
    warmup: bool = True
    warmup_sizes: Annotated[list[tuple[PositiveInt, PositiveInt]], NoDecode] = Field(
        default_factory=list,
        description="Input sizes HxW each model is warmed up at before ready (kernel choice, "
        "compiled graphs, TensorRT profiles). Empty: the model card's input size.",
    )

    # input limits
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(
        default=2048 * 2048,
        ge=1,
        le=SIZE_MAX,  # every axis within what the ONNX audit's shape proofs assume
        description="Largest image in pixels, height x width, counted as the network runs it "
        "(each side padded to the model card's pad_multiple, 8 for the shipped model: 1xN "
        "runs as 8xN); above it: 413 before any decode. The "
        "engine's working memory grows with the pixels of a pass (shipped model, ONNX Runtime "
        "CPU: peak RSS 6.1 GiB at 2048x2048), so a bound on it is what keeps one legal image "
        "from exhausting the host.",
    )
    max_source_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="Largest image a client may send with resize=fit or a scale: decoded, "
        "then shrunk by area averaging to at most max_pixels (the certificate folds the "
        "shrink's operator norm in). Above it: 413 before any decode.",
    )
    max_pass_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Most pixels (images x height x width) in one forward pass: a batch of "
        "large images is cut to fit. Default: max_pixels on a CPU (one image of the largest "
        "size), 8 x max_pixels on a GPU.",
    )
    max_tensor_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="V2 infer bodies (raw tensors, JSON)."
    )
    max_body_bytes_in_flight: int = Field(
        default=1024 * 1024 * 1024,
        ge=1024,
        description="Request bodies held by all connections at once; a request that would "
        "pass it: 503 + Retry-After (each body has its own cap, the connections have none).",
    )
    body_idle_s: float = Field(
        default=30.0,
        gt=0,
        description="A request whose body sends no byte for this long: 408 (a slow but "
        "steady upload is fine; a stalled one does not hold its connection and bytes).",
    )
    max_json_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="The JSON part of a V2 infer body. Parsed JSON numbers take about 5x "
        "their text in memory and the parser holds the GIL (a 59 MB tensor: 1.5 s, +300 MB), "
        "so large tensors must come as binary data.",
    )

    @field_validator("models", "providers", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Accept "a,b" from the environment as well as JSON lists."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator(
        "max_delay_ms", "shutdown_grace_s", "stream_idle_s", "stream_send_timeout_s", "body_idle_s"
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> object:
        """ "HxW" strings (flags, environment) or (H, W) pairs."""
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [parse_size(v) if isinstance(v, str) else v for v in value]
        return value

    def warmup_hw(self, card_size: tuple[int, int]) -> list[tuple[int, int]]:
        """The (H, W) to warm a model up at: the configured sizes, else its card's."""
        return list(self.warmup_sizes) or [tuple(card_size)]

    def batch_limit(self, device: str) -> int:
        """Images per forward pass on `device`: max_batch, else 1 on a CPU, 8 on a GPU."""
        return self.max_batch or (1 if device == "cpu" else GPU_IMAGES_PER_PASS)

    def image_pixels(self) -> int:
        """Largest image accepted: max_pixels, or a smaller explicit max_pass_pixels (an
        image must fit one pass)."""
        return min(self.max_pixels, self.max_pass_pixels or self.max_pixels)

    def pass_pixels(self, device: str) -> int:
        """Most pixels in one forward pass on `device` (see `max_pass_pixels`)."""
        per_pass = 1 if device == "cpu" else GPU_IMAGES_PER_PASS
        return self.max_pass_pixels or self.max_pixels * per_pass

    def api_key_bytes(self) -> bytes | None:
        """The key as bytes for hmac.compare_digest, or None when auth is off."""
        if self.api_key is None or not self.api_key.get_secret_value():
            return None
        return self.api_key.get_secret_value().encode()
