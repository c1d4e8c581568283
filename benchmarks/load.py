"""Load, overload and soak of `certseg serve` (127.0.0.1 only, bounded in count and time).

Phases, one server process (server.launch.ServeProcess) for all of them:

1. warm-up: the soak mix for --warm-seconds; the server's RSS after it is the baseline;
2. REST sweep: closed-loop POST /v1/segment at each concurrency in --levels for
   --seconds each: p50/p99 latency of the answers, throughput, shed rate (503, each
   must carry Retry-After), error rate (anything else that is not 200);
3. streams: --streams WebSockets, each with its depth + 1 frames unanswered (none
   dropped, the stages of its frames overlap);
4. soak: REST at --soak-concurrency plus --soak-streams streams for --soak-seconds;
   RSS after it vs the baseline.

Peak RSS is sampled every 50 ms throughout. The server's queue is short (--max-queue)
so that overload is shed with 503 + Retry-After instead of queued without bound.

    python benchmarks/load.py                         # shipped model, 192x384, ~5 min
    python benchmarks/load.py MODEL --levels 1,8,64 --seconds 3 --soak-seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import percentiles, print_table, street_like, write_result
from PIL import Image

from server.launch import ServeProcess
from server.settings import default_model_path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Tally:
    """What a phase's clients saw."""

    ok_ms: list[float] = field(default_factory=list)
    shed: int = 0  # 503 with Retry-After
    shed_without_retry_after: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status (or exception) -> count

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    @property
    def total(self) -> int:
        return (
            len(self.ok_ms) + self.shed + self.shed_without_retry_after + sum(self.errors.values())
        )

    def summary(self, seconds: float) -> dict:
        p50, p99 = percentiles(self.ok_ms) if self.ok_ms else (float("nan"),) * 2
        n = max(self.total, 1)
        return {
            "requests": self.total,
            "ok": len(self.ok_ms),
            "p50_ms": p50,
            "p99_ms": p99,
            "ok_per_s": len(self.ok_ms) / seconds,
            "shed_rate": (self.shed + self.shed_without_retry_after) / n,
            "shed_without_retry_after": self.shed_without_retry_after,
            "error_rate": sum(self.errors.values()) / n,
            "errors": self.errors,
            "server_5xx_not_503": sum(
                c for k, c in self.errors.items() if k.isdigit() and int(k) >= 500
            ),
        }


class RssSampler:
    """Peak resident memory of the server process, sampled in a thread."""

    def __init__(self, srv: ServeProcess, every_s: float = 0.05) -> None:
        self.srv, self.every_s, self.peak = srv, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.srv.rss_bytes())
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def rest_clients(base: str, body: bytes, concurrency: int, seconds: float) -> Tally:
    """`concurrency` closed-loop clients posting `body` until `seconds` have passed."""
    tally = Tally()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/segment?outputs=mask", content=body)
                except httpx.HTTPError as exc:
                    tally.error(type(exc).__name__)
                    continue
                if r.status_code == 200:
                    tally.ok_ms.append((time.perf_counter() - t) * 1000)
                elif r.status_code == 503 and "retry-after" in r.headers:
                    tally.shed += 1
                    # a well-behaved client backs off as told (capped: a benchmark)
                    await asyncio.sleep(min(float(r.headers["retry-after"]), 1.0) * 0.1)
                elif r.status_code == 503:
                    tally.shed_without_retry_after += 1
                else:
                    tally.error(str(r.status_code))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


async def stream_clients(base: str, frame: bytes, streams: int, seconds: float) -> dict:
    """`streams` WebSockets for `seconds`, each keeping its depth + 1 frames unanswered
    (the most the server never drops, as the SDK's "lossless"): answers per second."""
    import websockets

    url = base.replace("http://", "ws://") + "/v1/stream"
    counts = {"frames": 0, "shed": 0, "errors": 0, "closed": 0, "dropped": 0}
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        try:
            async with websockets.connect(url, max_size=2**26, open_timeout=60) as ws:
                window = json.loads(await ws.recv())["depth"] + 1
                unanswered, dropped = 0, 0
                while True:
                    while unanswered < window and time.perf_counter() < deadline:
                        await ws.send(frame)
                        unanswered += 1
                    if not unanswered:
                        break
                    msg = json.loads(await ws.recv())
                    unanswered -= 1
                    dropped = msg.get("dropped", dropped)
                    if msg["type"] == "result":
                        counts["frames"] += 1
                    elif msg.get("status") == 503:  # overloaded: the frame was shed
                        counts["shed"] += 1
                        await asyncio.sleep(0.01)
                    else:
                        counts["errors"] += 1
                counts["dropped"] += dropped
        except (OSError, websockets.WebSocketException):
            counts["closed"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(streams)))
    wall = time.perf_counter() - t0
    return {**counts, "streams": streams, "fps": counts["frames"] / wall}


async def mix(base: str, body: bytes, concurrency: int, streams: int, seconds: float) -> dict:
    rest, ws = await asyncio.gather(
        rest_clients(base, body, concurrency, seconds),
        stream_clients(base, body, streams, seconds),
    )
    return {"rest": rest.summary(seconds), "stream": ws}


def run(args: argparse.Namespace) -> dict:
    h, w = (int(v) for v in args.size.lower().split("x"))
    buf = io.BytesIO()
    Image.fromarray(street_like(h, w)).save(buf, format="PNG")
    body = buf.getvalue()
    model = args.model or str(default_model_path())
    serve_args = [model, "--max-queue", str(args.max_queue), "--log-level", "warning"]
    serve_args += ["--intra-op-threads", str(args.threads), "--max-streams", str(args.streams)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(args.threads, 1))}
    result: dict = {"model": model, "size": [h, w], "png_bytes": len(body)}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    with ServeProcess(serve_args, env=env) as srv:
        srv.wait_ready()
        with RssSampler(srv) as rss:
            result["rss_start_mb"] = srv.rss_bytes() / 2**20
            result["warmup"] = asyncio.run(
                mix(srv.base, body, args.soak_concurrency, args.soak_streams, args.warm_seconds)
            )
            warm = srv.rss_bytes()
            result["rss_after_warmup_mb"] = warm / 2**20
            result["levels"] = {}
            for c in args.levels:
                tally = asyncio.run(rest_clients(srv.base, body, c, args.seconds))
                result["levels"][c] = {
                    **tally.summary(args.seconds),
                    "peak_rss_mb": rss.peak / 2**20,
                }
            result["streams"] = asyncio.run(
                stream_clients(srv.base, body, args.streams, args.stream_seconds)
            )
            result["soak"] = asyncio.run(
                mix(srv.base, body, args.soak_concurrency, args.soak_streams, args.soak_seconds)
            )
            after = srv.rss_bytes()
            result["rss_after_soak_mb"] = after / 2**20
            result["rss_soak_growth"] = after / warm - 1
            result["peak_rss_mb"] = rss.peak / 2**20
            ok = httpx.post(srv.base + "/v1/segment?outputs=mask", content=body, timeout=60)
            result["serves_after"] = ok.status_code == 200
    return result


def report(result: dict, plot: Path | None) -> None:
    rows = [
        [
            c,
            r["requests"],
            r["p50_ms"],
            r["p99_ms"],
            r["ok_per_s"],
            f"{100 * r['shed_rate']:.1f}%",
            f"{100 * r['error_rate']:.2f}%",
            r["peak_rss_mb"],
        ]
        for c, r in result["levels"].items()
    ]
    h, w = result["size"]
    print_table(
        f"REST /v1/segment, {h}x{w} PNG, closed loop",
        [
            "concurrency",
            "requests",
            "p50 ms",
            "p99 ms",
            "ok/s",
            "shed 503",
            "errors",
            "peak RSS MB",
        ],
        rows,
    )
    s, soak = result["streams"], result["soak"]
    print_table(
        "streams and soak",
        ["phase", "answered/s", "p99 ms", "shed", "errors", "RSS MB (warm -> after)"],
        [
            [
                f"{s['streams']} WebSocket streams",
                s["fps"],
                "-",
                s["shed"],
                s["errors"] + s["closed"],
                "-",
            ],
            [
                f"soak: REST c={result['args']['soak_concurrency']} + "
                f"{result['args']['soak_streams']} streams",
                soak["rest"]["ok_per_s"] + soak["stream"]["fps"],
                soak["rest"]["p99_ms"],
                f"{100 * soak['rest']['shed_rate']:.0f}% REST, {soak['stream']['shed']} frames",
                sum(soak["rest"]["errors"].values()) + soak["stream"]["errors"],
                f"{result['rss_after_warmup_mb']:.0f} -> {result['rss_after_soak_mb']:.0f} "
                f"({100 * result['rss_soak_growth']:+.1f}%)",
            ],
        ],
    )
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        levels = [int(c) for c in result["levels"]]
        stats = list(result["levels"].values())
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(levels, [r["p50_ms"] for r in stats], "o-", label="p50")
        ax1.plot(levels, [r["p99_ms"] for r in stats], "s-", label="p99")
        ax1.set(xscale="log", xlabel="concurrent clients", ylabel="latency of 200s (ms)")
        ax1.legend()
        ax2.plot(levels, [r["ok_per_s"] for r in stats], "o-", label="answered / s")
        ax2.set(xscale="log", xlabel="concurrent clients", ylabel="requests / s")
        ax3 = ax2.twinx()
        ax3.plot(levels, [100 * r["shed_rate"] for r in stats], "r^--", label="shed (503) %")
        ax3.set(ylabel="shed %")
        fig.suptitle(f"certseg serve under load, {h}x{w}")
        fig.tight_layout()
        fig.savefig(plot, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="Model to serve (default: the shipped one).")
    ap.add_argument("--size", default="192x384", help="HxW of the PNG posted.")
    ap.add_argument("--levels", default="1,2,4,8,16,32,64", help="REST concurrency levels.")
    ap.add_argument("--seconds", type=float, default=15, help="Seconds per level.")
    ap.add_argument("--streams", type=int, default=16, help="WebSocket streams.")
    ap.add_argument("--stream-seconds", type=float, default=30)
    ap.add_argument("--soak-seconds", type=float, default=120)
    ap.add_argument("--soak-concurrency", type=int, default=16)
    ap.add_argument("--soak-streams", type=int, default=4)
    ap.add_argument("--warm-seconds", type=float, default=20)
    ap.add_argument("--max-queue", type=int, default=16, help="Server queue (beyond: 503).")
    ap.add_argument("--threads", type=int, default=1, help="Server intra-op threads.")
    ap.add_argument("--name", default="load", help="Result file name.")
    ap.add_argument("--out", type=Path, help="Write the JSON here instead of results/.")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "load.png")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    result = run(args)
    report(result, args.plot)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(args.out)
    else:
        print(write_result(args.name, result))
    bad = [c for c, r in result["levels"].items() if r["server_5xx_not_503"]]
    if bad or not result["serves_after"]:
        raise SystemExit(f"server errors at concurrency {bad} or not serving after the run")


if __name__ == "__main__":
    main()
