"""The CPU engine gives its memory arena back once a large pass is some passes old.

onnxruntime's CPU arena keeps every chunk a pass grew it by, so one large image would
hold the server at that image's memory for good; shrinking after every large pass
would make a stream of large frames regrow it each time (measured 45% slower). The
policy keeps what the largest of the last `ARENA_WINDOW_PASSES` passes needed, never
less than a full batch of the card's or the largest warm-up size. The answers must not
depend on it. Real sessions of the tiny model (card size 32x48, one image per CPU
pass); the memory given back is measured in `test_engine_memory_short.py`.
"""

from __future__ import annotations

import itertools

import numpy as np
from server_support import ort_engine, tiny_model_dir

from server.backends.ort import ARENA_WINDOW_PASSES, ArenaShrinkPolicy, OnnxRuntimeEngine

SHRINK = "memory.enable_memory_arena_shrinkage"
WINDOW = ARENA_WINDOW_PASSES


def _shrinks(policy: ArenaShrinkPolicy, passes: list[int]) -> list[int]:
    """The indices of the passes after which the arena shrinks."""
    return [i for i, pixels in enumerate(passes) if policy.shrink_after(pixels)]


def test_a_stream_of_large_passes_keeps_its_arena():
    assert _shrinks(ArenaShrinkPolicy(100), [400] * 50) == []
    assert _shrinks(ArenaShrinkPolicy(100), [100, 50, 100, 10] * 20) == []  # steady sizes


def test_a_one_off_large_pass_is_given_back_a_window_later():
    policy = ArenaShrinkPolicy(100)
    assert _shrinks(policy, [400] + [50] * (3 * WINDOW)) == [WINDOW]
    # the shrink gave everything back: a large pass grows anew, and is given back again
    assert _shrinks(policy, [300] + [50] * (2 * WINDOW)) == [WINDOW]


def test_a_larger_pass_inside_the_window_carries_the_arena_on():
    policy = ArenaShrinkPolicy(100)
    passes = [200, 50, 50, 300] + [50] * (2 * WINDOW)
    assert _shrinks(policy, passes) == [3 + WINDOW]  # the 300 leaves the window
    # varied large sizes shrink at most once per window of passes
    rng = np.random.default_rng(0)
    passes = [int(p) for p in rng.integers(1, 1000, size=40 * WINDOW)]
    done = _shrinks(ArenaShrinkPolicy(100), passes)
    assert done and all(b - a >= WINDOW for a, b in itertools.pairwise(done))


def _options_shrink(engine: OnnxRuntimeEngine, n: int, h: int, w: int) -> bool:
    options = engine.run_options(np.zeros((n, 3, h, w), np.float32))
    if options is None:
        return False
    assert options.get_run_config_entry(SHRINK) == "cpu:0"
    return True


def test_engine_steady_pixels_are_a_batch_of_the_card_or_warmup_size():
    engine = ort_engine(tiny_model_dir(), max_batch=2)
    engine.load()
    assert engine._arena.steady_pixels == 2 * 32 * 48
    engine.warmup([(1, 64, 96), (1, 24, 40)])
    assert engine._arena.steady_pixels == 2 * 64 * 96  # the largest warm-up size's batch
    for _ in range(3 * WINDOW):  # steady passes, whatever came before: no shrink
        assert not _options_shrink(engine, 2, 64, 96)
    assert not _options_shrink(engine, 3, 64, 96)  # larger: grows the arena
    shrunk = [_options_shrink(engine, 1, 32, 48) for _ in range(WINDOW)]
    assert shrunk == [False] * (WINDOW - 1) + [True]
    engine.close()


class _ArenaKept(OnnxRuntimeEngine):
    def run_options(self, images: np.ndarray) -> None:
        return None


def test_answers_are_the_same_with_and_without_the_shrink():
    from server.settings import Settings

    model = tiny_model_dir() / "model.onnx"
    settings = Settings(intra_op_threads=1)
    served, kept = OnnxRuntimeEngine(None, model, settings), _ArenaKept(None, model, settings)
    for engine in (served, kept):
        engine.load()
    rng = np.random.default_rng(0)
    # a large pass, a window of small ones (the last shrinks), the large one regrown
    sizes = [(96, 160)] + [(32, 48)] * WINDOW + [(96, 160), (128, 96)]
    for i, (h, w) in enumerate(sizes):
        x = rng.random((1, 3, h, w), dtype=np.float32)
        a, b = served.infer(x, ["mask", "logits"]), kept.infer(x, ["mask", "logits"])
        for key in ("mask", "margin", "radius", "logits"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"pass {i}")
    served.close()
    kept.close()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def test_passes_at_a_warmup_size_give_a_large_pass_back_too():
    """Every pass counts in the window, whichever session runs it: the warm-up size's
    own session runs a batch of one of that size, and traffic of those alone had kept
    a one-off large image's arena in the dynamic session for good (3 GiB at 1024x2048;
    here 512x1024 of the shipped model, ~0.7 GiB, measured in this process)."""
    from server.settings import Settings, default_model_path

    engine = OnnxRuntimeEngine(None, default_model_path(), Settings(intra_op_threads=1))
    engine.load()
    engine.warmup([(1, 64, 128)])
    assert engine.sized_sessions == [(64, 128)]
    small = np.zeros((1, 3, 64, 128), np.float32)
    engine.infer(small, ["mask"])
    before = _rss_mib()
    engine.infer(np.zeros((1, 3, 512, 1024), np.float32), ["mask"])
    grown = _rss_mib() - before
    assert grown > 200, grown
    for _ in range(WINDOW):
        engine.infer(small, ["mask"])
    assert _rss_mib() - before < 0.25 * grown, (grown, _rss_mib() - before)
    engine.close()
