"""ONNX Runtime backend: CPU, CUDA or TensorRT execution providers.

The CUDA provider is asked for full fp32 (``use_tf32=0``): TF32 convolutions would
give logits that differ from the fp32 evaluation the certificate speaks of. The
TensorRT provider has no such option: TensorRT enables TF32 by default and ONNX
Runtime's provider options cannot clear it (onnxruntime issue #26029), so at fp32 the
server sets ``NVIDIA_TF32_OVERRIDE=0`` in its environment before the session (and
TensorRT) starts, which makes the NVIDIA libraries run fp32 as fp32
(`tf32_override`); a value the operator set otherwise is refused at fp32 unless a
measured margin error covers it. The TensorRT provider runs fp16 when ``precision``
is fp16, which needs a margin error bound (`Settings.margin_error`) to stay sound;
CPU and CUDA run fp32 only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.base import BaseEngine, check_precision
from server.engine import info_from_card, read_onnx_artifact
from server.errors import BackendUnavailable, ModelError
from server.settings import Settings

__all__ = ["OnnxRuntimeEngine", "apply_tf32_override", "choose_providers", "tf32_override"]

log = logging.getLogger("certseg.server")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
#: Read by cuBLAS, cuDNN and TensorRT when they start: "0" keeps fp32 from TF32 cores.
TF32_ENV = "NVIDIA_TF32_OVERRIDE"
#: Passes an arena keeps its size for after the largest pass that needed it.
ARENA_WINDOW_PASSES = 8


class ArenaShrinkPolicy:
    """When a session's CPU memory arena should give back what it grew by.

    onnxruntime's arena keeps every chunk a pass grew it by, for good; a shrink (a run
    option) hands the free ones back after that run, and the next pass regrows, paying
    its page faults again: repeated 1024x2048 passes of the shipped model took 3.07 s
    instead of 2.11 when each shrank, one after 8 small ones 3.13 s instead of 1.94.
    So the arena keeps what the largest of the last `window` passes needed, never less
    than `steady_pixels` (a full batch of the card's or the largest warm-up size:
    `keep`), and shrinks at the end of the pass after which the pass that grew it has
    left the window: a stream of large frames keeps its memory, a one-off large image
    is given back `window` passes later."""

    def __init__(
        self, steady_pixels: int, batch: int = 1, window: int = ARENA_WINDOW_PASSES
    ) -> None:
        self.steady_pixels = steady_pixels
        self._batch = batch  # images per pass: a steady size counts a full batch of it
        self._recent: deque[int] = deque(maxlen=window)
        self._grown = 0  # pixels of the largest pass since the arena last shrank
        self._lock = threading.Lock()

    def keep(self, height: int, width: int) -> None:
        """Never give back what a full batch of this (warm-up) size needs."""
        self.steady_pixels = max(self.steady_pixels, self._batch * height * width)

    def shrink_after(self, pixels: int) -> bool:
        """Record a pass of `pixels`; True when the arena should shrink at its end."""
        with self._lock:
            self._recent.append(pixels)
            self._grown = max(self._grown, pixels)
            if self._grown <= max(self.steady_pixels, *self._recent):
                return False
            self._grown = 0  # a run's chunks are all free at its end: it gives back all
            return True


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise BackendUnavailable("the onnxruntime backend needs `pip install onnxruntime`") from exc
    return onnxruntime


def choose_providers(
    settings: Settings, available: list[str], calibrating: bool = False
) -> list[tuple[str, dict[str, str]]]:
    """Providers with their options: the requested ones, or CUDA (if present) then CPU."""
    wanted = settings.providers or ([CUDA, CPU] if CUDA in available else [CPU])
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendUnavailable(
            f"execution providers {missing} are not in this onnxruntime build "
            f"(available: {available}); onnxruntime-gpu brings CUDA and TensorRT"
        )
    supported = ("fp32", "fp16") if TRT in wanted else ("fp32",)
    check_precision(
        "onnxruntime", settings.precision, supported, settings.margin_error, calibrating
    )
    dev = str(settings.device_id)
    opts: dict[str, dict[str, str]] = {
        CUDA: {"device_id": dev, "use_tf32": "0"},
        TRT: {
            "device_id": dev,
            "trt_fp16_enable": "True" if settings.precision == "fp16" else "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(settings.trt_cache_dir or Path(".trt_cache")),
        },
    }
    return [(p, opts.get(p, {})) for p in wanted]


def tf32_override(
    providers: Sequence[str],
    precision: str,
    environ: Mapping[str, str],
    margin_error: float = 0.0,
    calibrating: bool = False,
) -> dict[str, str]:
    """The environment an fp32 TensorRT provider needs: {TF32_ENV: "0"} to set, or {}.

    TensorRT runs fp32 layers on TF32 tensor cores by default (inputs rounded to 10
    mantissa bits, ~1e-3 relative), and ONNX Runtime's TensorRT provider has no option
    to clear that flag; only the NVIDIA libraries' NVIDIA_TF32_OVERRIDE=0 does. Nothing
    to set without the TensorRT provider, at fp16 (its margin error covers it), or
    when the operator already set "0". Another value the operator set leaves TF32 on:
    refused at fp32 unless a measured margin error (> 0) covers it, or when
    calibrating (the raw margins of that engine are what is measured)."""
    if TRT not in providers or precision != "fp32":
        return {}
    value = environ.get(TF32_ENV)
    if value is None:
        return {TF32_ENV: "0"}
    if value.strip() != "0" and margin_error <= 0 and not calibrating:
        raise ModelError(
            f"{TF32_ENV}={value!r} lets TensorRT run fp32 layers in TF32, and the radii of an "
            f"fp32 engine assume fp32 logits: unset it (the server then sets it to 0), set it "
            f"to 0, or measure a margin error (`certseg calibrate`) and serve with --margin-error"
        )
    return {}


def apply_tf32_override(
    providers: Sequence[str],
    precision: str,
    margin_error: float = 0.0,
    calibrating: bool = False,
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, str]:
    """Set what `tf32_override` asks in `environ` (default: os.environ), logged; returns it.

    Process-wide and read when the NVIDIA libraries load, so it must happen before the
    first session with the TensorRT provider: set it in the server's environment
    yourself to be sure when another library may have started CUDA in the process."""
    env = os.environ if environ is None else environ
    changes = tf32_override(providers, precision, env, margin_error, calibrating)
    for key, value in changes.items():
        env[key] = value
        log.info(
            "%s=%s set: ONNX Runtime's TensorRT provider would run fp32 in TF32 "
            "(TensorRT's default, no provider option clears it)",
            key,
            value,
        )
    return changes


class OnnxRuntimeEngine(BaseEngine):
    """One InferenceSession of an exported certseg graph."""

    def __init__(
        self, name: str | None, path: Path, settings: Settings, calibrating: bool = False
    ) -> None:
        ort = _ort()
        artifact = read_onnx_artifact(path, settings.audit)
        card = artifact.card
        self._model_bytes = artifact.data  # every session is built from the audited bytes
        self._providers = choose_providers(settings, ort.get_available_providers(), calibrating)
        apply_tf32_override(
            [p for p, _ in self._providers], settings.precision, settings.margin_error, calibrating
        )
        first = self._providers[0][0]
        device = f"cuda:{settings.device_id}" if first in (CUDA, TRT) else "cpu"
        info = info_from_card(
            name or card.name,
            path,
            card,
            artifact.lipschitz,
            backend="onnxruntime",
            platform="onnxruntime_onnx",
            device=device,
            has_logits="logits" in artifact.outputs,
            sha256=artifact.sha256,
            precision=settings.precision,
        )
        # On the CPU, routes send 8-bit frames as they are and the base converts each batch
        # in the worker thread: a queued 2048x2048 frame holds 12 MB, not 48, and the
        # conversion (5 ms at 1024x2048) is a sliver of a CPU pass. A GPU provider gets
        # float32 made in the request's thread, off its one worker.
        info.accepts_uint8 = first == CPU
        super().__init__(info, settings.margin_error, calibrating)
        self._threads = settings.intra_op_threads
        self._session: Any = None
        # Sessions specialised to a warm-up size, batch 1 (CPU only: measured there;
        # other providers plan shapes themselves).
        self._sized: dict[tuple[int, int], Any] = {}
        self._specialize = settings.ort_specialize and first == CPU
        self._free_dims: list[str] = []  # the input's symbolic dims: batch, height, width
        # The dynamic session's CPU arena gives back what a large pass grew it by (the
        # warm-up sizes' own sessions run those sizes only and keep theirs).
        self._arena: ArenaShrinkPolicy | None = None
        if first == CPU:
            self._arena = ArenaShrinkPolicy(0, settings.batch_limit("cpu"))
            self._arena.keep(*card.input_size)

    def session_options(self, fixed: dict[str, int] | None = None) -> Any:
        """The options of every session: threads, no spinning, `fixed` dims."""
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # No busy-waiting between runs: decoding, certifying and encoding of other
        # requests need those cores (measured: certify 39 -> ~10 ms at 256x512, 2 CPUs).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self._providers[0][0] == CPU:
            # The memory pattern (one block planned from the first run of a shape) comes
            # on top of the arena's chunks from that run: peak RSS nearly doubled on the
            # second pass of a size (shipped model, 1024x2048: 5.70 GiB, 3.19 without),
            # for about 3% of speed (1762 vs 1811 ms in turns; benchmarks/engine_memory.py).
            so.enable_mem_pattern = False
        for name, value in (fixed or {}).items():
            so.add_free_dimension_override_by_name(name, value)
        return so

    def _new_session(self, fixed: dict[str, int] | None = None) -> Any:
        ort = _ort()
        so = self.session_options(fixed)
        try:
            return ort.InferenceSession(
                self._model_bytes,
                sess_options=so,
                providers=[p for p, _ in self._providers],
                provider_options=[o for _, o in self._providers],
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"{self.info.path}: onnxruntime cannot load it ({exc})") from exc

    def load(self) -> None:
        self._session = self._new_session()
        dims = self._session.get_inputs()[0].shape  # e.g. ['batch', 3, 'height', 'width']
        self._free_dims = [d if isinstance(d, str) else "" for d in dims]
        named = [d for d in self._free_dims if d]
        if len(dims) != 4 or not named or len(set(named)) < len(named):
            self._specialize = False  # one fixed shape, or dims that share a name
        super().load()

    def warmup(self, sizes: Sequence[tuple[int, int, int]]) -> None:
        """Each warm-up size of batch 1 gets a session whose graph knows it: with every
        shape fixed, onnxruntime folds at load what depends on the size alone (the
        positional biases' Resize; on the shipped model 15 Resize and 15 Concat nodes
        gone, answers bit-identical). Only the warm-up sizes, which the operator names
        (`--warmup-sizes`): each such session holds its folded maps and its own memory
        arena, so sizes that clients choose must not add them."""
        for n, h, w in sizes:
            if self._arena is not None:
                self._arena.keep(h, w)
            if self._specialize and n == 1 and (h, w) not in self._sized:
                values = dict(zip(self._free_dims, (1, 3, h, w), strict=True))
                self._sized[(h, w)] = self._new_session({d: v for d, v in values.items() if d})
        super().warmup(sizes)

    def _session_for(self, images: np.ndarray) -> Any:
        """The warm-up size's own session for a batch of one of that size, else the
        dynamic session."""
        if images.shape[0] != 1:
            return self._session
        return self._sized.get((int(images.shape[2]), int(images.shape[3])), self._session)

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses (a missing GPU falls back to CPU)."""
        return list(self._session.get_providers()) if self._session is not None else []

    @property
    def sized_sessions(self) -> list[tuple[int, int]]:
        """The frame sizes that have a session of their own."""
        return list(self._sized)

    def run_options(self, images: np.ndarray) -> Any:
        """The dynamic session's options after this pass (`ArenaShrinkPolicy` records
        every pass, whichever session runs it): None, or a shrink of its CPU arena.
        Without the shrink one 1024x2048 image left the shipped model's server at 3.19
        GiB RSS for good; 8 small passes later, 0.44 GiB with it
        (benchmarks/engine_memory.py)."""
        n, _, h, w = images.shape
        if self._arena is None or not self._arena.shrink_after(n * h * w):
            return None
        options = _ort().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options

    def _run(self, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        session = self._session_for(images)
        feed = {"image": np.ascontiguousarray(images, dtype=np.float32)}
        options = self.run_options(images)
        if session is self._session:
            got = session.run(names, feed, options)
        else:  # a warm-up size's own session, whose arena is steady
            got = session.run(names, feed)
            if options is not None:  # the dynamic session's turn to give back: a pass
                # of one padded pixel carries the shrink (traffic at warm-up sizes alone
                # had kept a one-off large image's 3 GiB there for good)
                self._shrink_dynamic(options)
        return dict(zip(names, got, strict=True))

    def _shrink_dynamic(self, options: Any) -> None:
        """The shrink pass: the request it follows is answered whatever it does (a net
        that cannot run one padded pixel gets a warning, once, and keeps its arena)."""
        if self._arena is None:
            return
        try:
            self._session.run(["mask"], {"image": self._least_input()}, options)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            log.warning("%s: no arena shrink (%s); it keeps its memory", self.info.name, exc)
            self._arena = None

    def _least_input(self) -> np.ndarray:
        """The smallest image the net runs: one pixel, padded to its multiple."""
        side = max(self.info.card.pad_multiple, 1)
        return np.zeros((1, 3, side, side), np.float32)

    def close(self) -> None:
        self._session = None
        self._sized.clear()
        super().close()
