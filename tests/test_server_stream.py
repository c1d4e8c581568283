"""WS /v1/stream with a real `websockets` client against a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time

import numpy as np
import pytest
import websockets
from PIL import Image
from server_support import (
    ControlledEngine,
    LiveServer,
    encode,
    ort_engine,
    ort_session,
    random_image,
    tiny_model_dir,
    tiny_model_dir_without_logits,
    to_input,
)

from server import Settings, create_app


@pytest.fixture(scope="module")
def engine():
    return ControlledEngine(ort_engine(tiny_model_dir()))


@pytest.fixture(scope="module")
def server(engine):
    settings = Settings(intra_op_threads=1, max_delay_ms=1, api_key="k3y")
    srv = LiveServer(create_app(settings, engines=[engine])).start()
    yield srv
    srv.stop()


def _url(server, query: str = "") -> str:
    return f"{server.ws_base}/v1/stream?api_key=k3y{'&' + query if query else ''}"


async def _recv_json(ws) -> dict:
    msg = await asyncio.wait_for(ws.recv(), 30)
    assert isinstance(msg, str), "expected a JSON text message"
    return json.loads(msg)


async def _stream(server, frames: list[bytes], query: str = "") -> tuple[list[dict], dict]:
    """Send every frame at once, read until every frame is answered or dropped."""
    async with websockets.connect(_url(server, query), max_size=2**24) as ws:
        config = await _recv_json(ws)
        for f in frames:
            await ws.send(f)
        answers: list[dict] = []
        while True:
            msg = await _recv_json(ws)
            if msg["type"] in ("result", "error"):
                answers.append(msg)
                for _ in msg.get("binary", []):
                    assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
                if msg["frame"] == len(frames) - 1:
                    break
        await ws.close()
        assert ws.close_code == 1000
    return answers, config


def test_100_frames_answered_or_dropped(server):
    frames = [encode(random_image(24, 32, seed=i % 7), "JPEG", quality=85) for i in range(100)]
    answers, config = asyncio.run(_stream(server, frames))
    assert config["type"] == "config" and config["model"] == "tiny" and config["eps"] == 0.05
    ids = [a["frame"] for a in answers]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # increasing
    assert all(a["type"] == "result" for a in answers)
    dropped = answers[-1]["dropped"]
    assert dropped + len(answers) == 100
    assert [a["dropped"] for a in answers] == sorted(a["dropped"] for a in answers)
    a = answers[-1]
    assert set(a["timings_ms"]) >= {"pending", "decode", "queue", "infer", "certify", "total"}
    assert 0.0 <= a["guaranteed_fraction"] <= 1.0 and a["width"] == 32 and a["height"] == 24


def test_a_close_message_answers_what_was_sent_then_closes_1000(server, engine):
    """{"type": "close"} right after 6 frames, with a slow model: every frame sent is
    answered or counted dropped before the 1000 close (it used to close at once,
    frames in flight unanswered, and answered + dropped fell short of sent)."""
    frames = [encode(random_image(24, 32, seed=i)) for i in range(6)]
    engine.delay_s = 0.05

    async def main() -> tuple[list[dict], int | None]:
        async with websockets.connect(_url(server), max_size=2**24) as ws:
            await _recv_json(ws)  # config
            for f in frames:
                await ws.send(f)
            await ws.send(json.dumps({"type": "close"}))
            answers = []
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    msg = await _recv_json(ws)
                    answers.append(msg)
                    for _ in msg.get("binary", []):
                        await asyncio.wait_for(ws.recv(), 30)
            return answers, ws.close_code

    try:
        answers, code = asyncio.run(main())
    finally:
        engine.delay_s = 0.0
    assert code == 1000 and all(a["type"] == "result" for a in answers)
    assert answers[-1]["frame"] == 5  # the last frame sent is answered
    assert len(answers) + answers[-1]["dropped"] == 6


def test_latest_frame_wins_when_busy(server, engine):
    """With a slow model, frames sent meanwhile are replaced by newer ones and counted."""
    frames = [encode(random_image(24, 32, seed=i)) for i in range(30)]
    engine.delay_s = 0.05
    try:
        answers, _ = asyncio.run(_stream(server, frames))
    finally:
        engine.delay_s = 0.0
    dropped = answers[-1]["dropped"]
    assert dropped > 0 and dropped + len(answers) == 30
    assert answers[-1]["frame"] == 29  # the newest frame is never dropped


def test_depth_two_answers_in_order_and_loses_no_frame_of_a_window_of_three(server, engine):
    """Depth 2: the answers (a corrupt frame's error among them) keep frame order, and a
    client with depth + 1 frames unanswered loses none; at depth 1 the same client
    loses one (its second frame is replaced while the first is on the model)."""
    good = encode(random_image(24, 32, seed=5), "JPEG", quality=85)
    frames = [good, b"\x89PNG\r\n\x1a\n garbage", good, good]

    async def run(query: str, window: int = 3) -> list[dict]:
        async with websockets.connect(_url(server, query)) as ws:
            await _recv_json(ws)
            for f in frames[:window]:
                await ws.send(f)
            answers = []
            for f in frames[window:]:
                answers.append(await _recv_json(ws))
                await ws.send(f)
            while not answers or answers[-1]["frame"] < len(frames) - 1:
                answers.append(await _recv_json(ws))
            return answers

    engine.delay_s = 0.2
    try:
        deep, shallow = asyncio.run(run("")), asyncio.run(run("depth=1"))
    finally:
        engine.delay_s = 0.0
    assert [a["frame"] for a in deep] == [0, 1, 2, 3]
    assert [a["type"] for a in deep] == ["result", "error", "result", "result"]
    assert deep[1]["status"] == 422 and deep[-1]["dropped"] == 0
    assert [a["frame"] for a in shallow] == [0, 2, 3] and shallow[-1]["dropped"] == 1


def test_a_frame_s_total_runs_until_its_answer_leaves(server, engine):
    """At depth 2 a small frame sent after a large one may finish first and wait for
    it: that wait is its "order" stage, and its total runs until its answer is sent
    (it ended with the encode: a frame answered 466 ms after it was sent said 40)."""
    big = encode(random_image(512, 512, seed=8))  # PNG: decodes far slower than...
    small = encode(random_image(24, 32, seed=9), "JPEG", quality=85)  # ...this

    async def run() -> tuple[list[dict], float, float]:
        async with websockets.connect(_url(server), max_size=2**24) as ws:
            await _recv_json(ws)
            await ws.send(big)
            sent_small = time.perf_counter()
            await ws.send(small)
            first = await _recv_json(ws)
            first_at = time.perf_counter()
            return [first, await _recv_json(ws)], sent_small, first_at

    engine.delay_s = 0.3
    try:
        (a, b), sent_small, first_at = asyncio.run(run())
    finally:
        engine.delay_s = 0.0
    assert [a["frame"], b["frame"]] == [0, 1]
    for t in (a["timings_ms"], b["timings_ms"]):
        assert {"pending", "decode", "prepare", "queue", "infer", "certify", "encode"} < set(t)
        assert "order" in t and sum(v for k, v in t.items() if k != "total") <= t["total"] + 0.01
    # frame 1 left after frame 0's answer: its total covers that (less the transits)
    assert b["timings_ms"]["total"] >= (first_at - sent_small) * 1000 - 100, b["timings_ms"]


def test_shutdown_answers_the_frames_received_then_closes_1012(caplog):
    """SIGTERM's graceful stop (as LiveServer.stop asks it) with two frames on a slow
    model: both are answered, then the stream closes 1012. uvicorn closed the socket
    at once, and the frames received were lost ("3 frames, 0 answered")."""
    caplog.set_level(logging.INFO, logger="certseg.server")
    slow = ControlledEngine(ort_engine(tiny_model_dir()))
    slow.delay_s = 0.4
    settings = Settings(intra_op_threads=1, max_delay_ms=1, shutdown_grace_s=10)
    srv = LiveServer(create_app(settings, engines=[slow])).start()
    frame = encode(random_image(24, 32, seed=4))

    async def run() -> tuple[list[dict], int | None]:
        async with websockets.connect(f"{srv.ws_base}/v1/stream") as ws:
            await _recv_json(ws)
            await ws.send(frame)
            await ws.send(frame)
            while slow.calls == 0:
                await asyncio.sleep(0.01)  # frame 0 is on the model
            stopper = threading.Thread(target=srv.stop)
            stopper.start()
            answers = []
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    answers.append(await _recv_json(ws))
            await asyncio.to_thread(stopper.join)
            return answers, ws.close_code

    try:
        answers, code = asyncio.run(run())
    finally:
        srv.stop()
    assert [(a["type"], a["frame"]) for a in answers] == [("result", 0), ("result", 1)]
    assert code == 1012
    closes = [r.getMessage() for r in caplog.records if "stream closed" in r.getMessage()]
    # (another test's stream may log its own close while this one runs)
    assert "stream closed (server shutting down): 2 frames, 2 answered, 0 dropped" in closes


def test_depth_two_has_the_next_frame_queued_while_one_is_on_the_model(server, engine):
    """The overlap itself: while frame 0 is held on the model, frame 1 is decoded and
    waits in the batcher at depth 2; at depth 1 it does not start."""
    batcher = server.app.state.server.batcher_for("tiny")
    frame = encode(random_image(24, 32, seed=6))

    async def queued_while_held(query: str) -> int:
        engine.gate, calls = threading.Event(), engine.calls
        try:
            async with websockets.connect(_url(server, query)) as ws:
                await _recv_json(ws)
                await ws.send(frame)
                await ws.send(frame)
                deadline = time.monotonic() + 10
                while engine.calls == calls and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)  # frame 0 reaches the model
                most, until = 0, time.monotonic() + 1.0
                while time.monotonic() < until:
                    most = max(most, batcher.depth)
                    await asyncio.sleep(0.01)
                engine.gate.set()
                answers = [await _recv_json(ws), await _recv_json(ws)]
                assert [a["frame"] for a in answers] == [0, 1]
                return most
        finally:
            engine.gate.set()
            engine.gate = None

    assert asyncio.run(queued_while_held("")) == 1
    assert asyncio.run(queued_while_held("depth=1")) == 0


def test_backend_fault_mid_stream_answers_503_in_order_then_recovers(server, engine):
    """The engine fails (a mock fault injector: ONNX Runtime cannot be crashed on demand)
    while two frames are in flight: both get a 503 error naming their frame, in order,
    the stream stays open, and the next frames are answered."""
    frame = encode(random_image(24, 32, seed=8))

    async def run() -> list[dict]:
        async with websockets.connect(_url(server)) as ws:
            await _recv_json(ws)
            engine.fail = True
            try:
                for _ in range(2):
                    await ws.send(frame)
                answers = [await _recv_json(ws), await _recv_json(ws)]
            finally:
                engine.fail = False
            for _ in range(2):
                await ws.send(frame)
            answers += [await _recv_json(ws), await _recv_json(ws)]
            await ws.close()
            assert ws.close_code == 1000
            return answers

    answers = asyncio.run(run())
    assert [a["frame"] for a in answers] == [0, 1, 2, 3]
    assert [a["type"] for a in answers] == ["error", "error", "result", "result"]
    assert all(a["status"] == 503 and "injected" not in a["detail"] for a in answers[:2])


def test_control_overlay_ping_and_errors(server):
    session = ort_session(tiny_model_dir())
    frame = encode(random_image(24, 32, seed=1))

    async def run() -> None:
        async with websockets.connect(_url(server, "eps=0.01")) as ws:
            assert (await _recv_json(ws))["eps"] == 0.01
            await ws.send(
                json.dumps({"type": "config", "eps": 0.2, "outputs": ["overlay", "mask"]})
            )
            cfg = await _recv_json(ws)
            assert cfg == {
                "type": "config",
                "model": "tiny",
                "eps": 0.2,
                "outputs": ["overlay", "mask"],
                "overlay_style": "hatch",
                "depth": 2,
                "resize": None,
            }
            await ws.send(frame)
            res = await _recv_json(ws)
            assert res["type"] == "result" and res["eps"] == 0.2 and res["frame"] == 0
            assert res["binary"] == ["overlay", "mask"]
            overlay = Image.open(io.BytesIO(await ws.recv()))
            assert overlay.size == (32, 24) and overlay.mode == "P"  # indexed PNG
            mask = np.asarray(Image.open(io.BytesIO(await ws.recv())))
            expected = session.run(["mask"], {"image": to_input(frame)})[0][0]
            np.testing.assert_array_equal(mask, expected)
            # bad control messages are answered, the stream goes on
            bad_messages = (
                {"eps": "nan"},
                {"eps": -1},
                {"outputs": ["radius"]},
                {"type": "x"},
                {"depth": 0},
                {"depth": 3},  # over the server's stream_depth
                {"depth": True},
                {"depth": 1.5},
                {"depth": "²"},  # a digit to str.isdigit, not to int()
                {"eps": 10**400},  # past float's range
                {"resize": 10**400},
                {"eps": 10**4000},  # past the int-to-str limit: not echoed whole
                {"x" * 5000: 1},  # an unknown field's name is not echoed whole
                {"type": "y" * 5000},  # nor an unknown type
            )
            for bad in bad_messages:
                await ws.send(json.dumps(bad))
                err = await _recv_json(ws)
                assert err["type"] == "error" and err["status"] == 422 and err["frame"] is None
                assert len(err["detail"]) < 200
            # an unknown field (a typo) is refused, not echoed as if applied; nothing changes
            await ws.send(json.dumps({"type": "config", "ep": 0.1, "eps": 0.3}))
            err = await _recv_json(ws)
            assert err["type"] == "error" and err["status"] == 422 and err["frame"] is None
            assert "'ep'" in err["detail"]
            await ws.send(json.dumps({"type": "ping"}))  # the stream goes on
            assert (await _recv_json(ws))["type"] == "pong"
            await ws.send("[" * 20_000 + "]" * 20_000)  # nested past the JSON parser
            assert (await _recv_json(ws))["status"] == 422
            await ws.send(json.dumps({"depth": 1}))  # fewer in flight: lowest latency
            assert (await _recv_json(ws))["depth"] == 1
            await ws.send("not json")
            assert (await _recv_json(ws))["status"] == 422
            await ws.send('{"eps": ' + "1" * 5000 + "}")  # JSON Python's parser refuses
            assert "4300 digits" in (await _recv_json(ws))["detail"]
            await ws.send(json.dumps({"type": "ping", "t": 7}))
            assert await _recv_json(ws) == {"type": "pong", "t": 7}
            await asyncio.wait_for(await ws.ping(), 10)  # protocol-level ping/pong
            # a corrupt frame is answered with an error that names it
            await ws.send(b"\x89PNG\r\n\x1a\n garbage")
            err = await _recv_json(ws)
            assert err == {**err, "type": "error", "frame": 1, "status": 422}
            await ws.send(json.dumps({"outputs": []}))
            await _recv_json(ws)
            await ws.send(frame)
            res = await _recv_json(ws)
            assert res["frame"] == 2 and res["binary"] == [] and res["eps"] == 0.2
            assert "classes" not in res  # only when asked: it costs a pass per frame
            # "classes" is a field of the result (no binary part), as in REST
            await ws.send(json.dumps({"outputs": ["classes", "mask"]}))
            await _recv_json(ws)
            await ws.send(frame)
            res = await _recv_json(ws)
            assert res["frame"] == 3 and res["binary"] == ["mask"]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(await ws.recv()))), mask)
            assert [row["id"] for row in res["classes"]] == [int(c) for c in np.unique(mask)]
            assert sum(row["pixels"] for row in res["classes"]) == 24 * 32
            assert all(0 <= row["max_flips"] <= res["max_flips"] for row in res["classes"])
            assert all(row["max_gains"] is None for row in res["classes"])
            await ws.send(json.dumps({"outputs": ["gains"]}))  # gains come in the rows
            await _recv_json(ws)
            await ws.send(frame)
            res = await _recv_json(ws)
            assert res["binary"] == [] and all(row["max_gains"] >= 0 for row in res["classes"])
            assert "stability" not in res
            await ws.send(json.dumps({"outputs": ["stability"]}))  # a field, as in REST
            await _recv_json(ws)
            await ws.send(frame)
            res = await _recv_json(ws)
            assert [r["pixels"] for r in res["stability"]] == [8, 39, 77]  # of 24 x 32
            norms = [r["eps"] for r in res["stability"]]
            assert 0 < norms[0] <= norms[1] <= norms[2] and "classes" not in res
            await ws.close()
            assert ws.close_code == 1000

    asyncio.run(run())


def test_stream_auth_and_unknown_model(server):
    async def run() -> None:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"{server.ws_base}/v1/stream"):
                pass
        assert info.value.response.status_code == 401
        headers = {"Authorization": "Bearer k3y"}
        async with websockets.connect(
            f"{server.ws_base}/v1/stream?model=nope", additional_headers=headers
        ) as ws:
            err = await _recv_json(ws)
            assert err["type"] == "error" and err["status"] == 404
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
        bad = ("depth=9", "depth=%C2%B2", "eps=" + "9" * 5000, "esp=0.1", "eps=0.1&eps=0.2")
        for query in bad:  # 9: over stream_depth; esp: a typo; eps twice: which one?
            async with websockets.connect(
                f"{server.ws_base}/v1/stream?{query}", additional_headers=headers
            ) as ws:
                err = await _recv_json(ws)
                assert err["type"] == "error" and err["status"] == 422
                assert query[:3] in err["detail"] and len(err["detail"]) < 200
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1008

    asyncio.run(run())


def test_outputs_that_read_logits_are_refused_up_front_for_a_model_without_them():
    """gains on a model exported without logits: a 422 for the config message (the
    stream goes on) and for the first settings (closed 1008), not an error per frame;
    REST answers the same 422 naming the export option."""
    import httpx

    settings = Settings(intra_op_threads=1, max_delay_ms=1)
    srv = LiveServer(create_app(settings, engines=[ort_engine(tiny_model_dir_without_logits())]))
    srv.start()
    frame = encode(random_image(24, 32, seed=1))

    async def run() -> None:
        async with websockets.connect(f"{srv.ws_base}/v1/stream?outputs=classes") as ws:
            await _recv_json(ws)
            await ws.send(json.dumps({"outputs": ["classes", "gains"]}))
            err = await _recv_json(ws)
            assert err["status"] == 422 and "--logits" in err["detail"]
            await ws.send(frame)  # the stream keeps its settings, and answers
            res = await _recv_json(ws)
            assert res["type"] == "result" and "classes" in res
        async with websockets.connect(f"{srv.ws_base}/v1/stream?outputs=gains") as ws:
            err = await _recv_json(ws)
            assert err["status"] == 422 and "gains" in err["detail"]
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008

    try:
        asyncio.run(run())
        r = httpx.post(srv.base + "/v1/segment?outputs=gains", content=frame)
        assert r.status_code == 422 and "--logits" in r.json()["detail"]
    finally:
        srv.stop()
