"""Server overhead and batching: raw ONNX Runtime vs REST end to end, and WebSocket fps.

For one exported model and one image size (default 512x1024, a Cityscapes half-frame):

- raw: an onnxruntime session on the decoded image, batch 1 (the floor);
- REST: POST /v1/segment (PNG in; mask + radius + overlay out, JSON) at concurrency 1
  and 8, p50/p99 latency and throughput, with dynamic batching on (max batch 8) and
  off (max batch 1);
- stream: WS /v1/stream (max batch 1, the CPU default) with the overlay per frame,
  lockstep (next frame after each answer) and then at each --depths d with d + 1
  frames unanswered (the most the server never drops): fps and latency as the
  stream's stages overlap.

The server runs as `python -m server.cli serve` in a subprocess (as deployed); the
client runs here, on the same machine: on a small CPU box they compete for cores, so
read the REST figures as an upper bound on overhead. Without a model argument an
untrained model of --arch is exported to a temporary folder (needs torch).

    python benchmarks/server_overhead.py                          # 512x1024, tiny, 200 requests
    python benchmarks/server_overhead.py exported_dir --size 256x512 --requests 40
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from _common import percentiles, print_table, street_like, write_result
from PIL import Image

from server.launch import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("decode", "queue", "infer", "certify", "encode", "total")


def export_untrained(arch: str, out: Path) -> Path:
    """An untrained (seeded) model of `arch`, exported with the real exporter."""
    import torch

    from certseg.models import ModelCard, create_model, save_checkpoint
    from export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = create_model(arch, num_classes=19)
    card = ModelCard(
        name=arch,
        arch=arch,
        num_classes=19,
        classes=[f"c{i}" for i in range(19)],
        palette=[((37 * i) % 256, (91 * i) % 256, (151 * i) % 256) for i in range(19)],
        pad_multiple=8,
    )
    save_checkpoint(out / "model.pt", model, card)
    export_onnx(out / "model.pt", out / arch)
    return out / arch


def raw_ort(model: Path, x: np.ndarray, n: int, threads: int) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"image": x})
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, {"image": x})
        times.append((time.perf_counter() - t) * 1000)
    p50, p99 = percentiles(times)
    return {"p50_ms": p50, "p99_ms": p99, "per_s": 1000 / float(np.mean(times))}


def serve(
    model: Path, max_batch: int, threads: int, max_delay_ms: float, stream_depth: int = 2
) -> ServeProcess:
    """The server on `model` with these batching settings, ready."""
    args = [str(model), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms)]
    args += ["--intra-op-threads", str(threads), "--max-queue", "256", "--log-level", "warning"]
    args += ["--stream-depth", str(stream_depth)]
    return ServeProcess(args).wait_ready()


async def rest_load(base: str, body: bytes, requests: int, concurrency: int) -> dict:
    """`requests` POSTs from `concurrency` workers; latency percentiles and throughput."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    stages: dict[str, list[float]] = {}
    todo = iter(range(requests))

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await client.post("/v1/segment", content=body)  # warm the connection and caches

        async def worker() -> None:
            for _ in todo:
                t = time.perf_counter()
                r = await client.post("/v1/segment", content=body)
                latencies.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                ans = r.json()
                batch_sizes.append(ans["batch_size"])
                for stage, ms in ans["timings_ms"].items():
                    stages.setdefault(stage, []).append(ms)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    p50, p99 = percentiles(latencies)
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "per_s": requests / wall,
        "mean_batch": float(np.mean(batch_sizes)),
        "server_stage_p50_ms": {k: percentiles(v)[0] for k, v in stages.items()},
    }


async def stream_fps(
    base: str,
    frame: bytes,
    frames: int,
    depth: int | None = None,
    window: int | None = None,
    outputs: str = "overlay",
) -> dict:
    """One WebSocket kept `window` frames ahead (default: the stream's depth + 1, the
    most the server never drops), asking for `outputs` per frame -> fps and latency.

    Every answer must be a result and none may be dropped (a benchmark of a stream
    that loses frames would measure the drops)."""
    import json
    from urllib.parse import urlencode

    import websockets

    query = {"outputs": outputs, **({"depth": depth} if depth is not None else {})}
    url = base.replace("http://", "ws://") + "/v1/stream?" + urlencode(query)
    async with websockets.connect(url, max_size=2**26) as ws:
        config = json.loads(await ws.recv())
        assert config["type"] == "config", config
        window = window or config["depth"] + 1
        sent_at: list[float] = []
        latencies: list[float] = []

        async def send() -> None:
            sent_at.append(time.perf_counter())
            await ws.send(frame)

        async def answer() -> dict:
            msg = json.loads(await ws.recv())
            assert msg["type"] == "result", msg
            for _ in msg["binary"]:
                assert isinstance(await ws.recv(), bytes)
            latencies.append((time.perf_counter() - sent_at[msg["frame"]]) * 1000)
            return msg

        t0 = time.perf_counter()
        for _ in range(min(window, frames)):
            await send()
        for i in range(frames):
            last = await answer()
            if i + window < frames:
                await send()
        wall = time.perf_counter() - t0
    assert last["dropped"] == 0 and last["frame"] == frames - 1, last
    p50, p99 = percentiles(latencies)
    return {
        "fps": frames / wall,
        "ms_per_frame": wall * 1000 / frames,
        "depth": config["depth"],
        "window": window,
        "outputs": outputs,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
    }


def stream_rows(base: str, frame: bytes, frames: int, depths: list[int]) -> list[dict]:
    """Lockstep, then each depth with depth + 1 frames unanswered, on one server."""
    settings = [(1, 1), *((d, None) for d in depths)]
    return [asyncio.run(stream_fps(base, frame, frames, d, w)) for d, w in settings]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "model", nargs="?", help="Exported model dir or .onnx (default: export --arch)."
    )
    ap.add_argument("--arch", default="tiny", help="Architecture to export when no model given.")
    ap.add_argument("--size", default="512x1024", help="HxW of the test image.")
    ap.add_argument("--requests", type=int, default=200, help="REST requests per setting.")
    ap.add_argument("--frames", type=int, default=100, help="WebSocket frames.")
    ap.add_argument("--depths", default="1,2,3", help="Stream depths to compare.")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: auto).")
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--name", default="server", help="Result file name.")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    depths = [int(d) for d in args.depths.split(",")]

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else export_untrained(args.arch, Path(tmp.name))
    onnx_path = model / "model.onnx" if model.is_dir() else model

    pixels = street_like(h, w)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    body = buf.getvalue()
    x = (pixels.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy()

    rows: list[list] = []
    results: dict = {
        "size": [h, w],
        "model": str(model),
        "png_bytes": len(body),
        "cpus": os.cpu_count(),
    }
    raw = raw_ort(onnx_path, x, max(5, args.requests // 4), args.threads)
    results["raw_ort"] = raw
    rows.append(["raw ORT session", 1, "-", raw["p50_ms"], raw["p99_ms"], raw["per_s"], "-"])

    results["rest"] = {}
    for label, max_batch in (("batching", 8), ("no batching", 1)):
        srv = serve(model, max_batch, args.threads, args.max_delay_ms, max(depths))
        try:
            for conc in (1, 8):
                if label == "no batching" and conc == 1:
                    continue  # identical to batching at concurrency 1
                r = asyncio.run(rest_load(srv.base, body, args.requests, conc))
                results["rest"][f"{label}, c={conc}"] = r
                rows.append(
                    [
                        f"REST {label}",
                        conc,
                        max_batch,
                        r["p50_ms"],
                        r["p99_ms"],
                        r["per_s"],
                        r["mean_batch"],
                    ]
                )
            if max_batch == 1:  # the CPU default: a stream's frames are not batched
                results["stream"] = stream_rows(srv.base, body, args.frames, depths)
        finally:
            srv.close()
    tmp.cleanup()

    print_table(
        f"certseg server, {h}x{w} PNG, {os.cpu_count()} CPUs (client on the same machine)",
        ["path", "concurrency", "max batch", "p50 ms", "p99 ms", "per s", "mean batch"],
        rows,
    )
    stage_rows = [
        [key, *(round(v.get(s, float("nan")), 1) for s in STAGES)]
        for key, r in results["rest"].items()
        for v in [r["server_stage_p50_ms"]]
    ]
    print_table("server stages, p50 ms", ["REST", *STAGES], stage_rows)
    print_table(
        "WS /v1/stream, one stream, overlay per frame",
        ["depth", "frames unanswered", "fps", "latency p50 ms", "latency p99 ms"],
        [
            [s["depth"], s["window"], s["fps"], s["latency_p50_ms"], s["latency_p99_ms"]]
            for s in results["stream"]
        ],
    )
    print(write_result(args.name, results))


if __name__ == "__main__":
    main()
