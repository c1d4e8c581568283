"""ONNX Runtime sessions specialised to the warm-up sizes (`Settings.ort_specialize`).

With every shape fixed, onnxruntime computes at load what depends on the size alone;
the answers must stay those of the one dynamic session, bit for bit. Only the warm-up
sizes (named by the operator) get a session: a size a client sends, or a batch of more
than one, runs on the dynamic session, so clients cannot make sessions pile up. Real
sessions of the tiny model.
"""

from __future__ import annotations

import numpy as np
from server_support import ort_engine, serve_tiny, tiny_model_dir


def test_warmup_sizes_get_sessions_that_answer_bit_for_bit():
    dynamic = ort_engine(tiny_model_dir(), ort_specialize=False)
    sized = ort_engine(tiny_model_dir())
    for engine in (dynamic, sized):
        engine.load()
        engine.warmup([(1, 32, 48), (1, 21, 37), (2, 40, 56)])
    assert dynamic.sized_sessions == []
    assert sized.sized_sessions == [(32, 48), (21, 37)]  # batch 1 sizes only
    rng = np.random.default_rng(0)
    for n, h, w in [(1, 32, 48), (1, 21, 37), (1, 40, 56), (3, 32, 48), (1, 64, 96)]:
        x = rng.random((n, 3, h, w), dtype=np.float32)
        a, b = dynamic.infer(x, ["mask", "logits"]), sized.infer(x, ["mask", "logits"])
        for key in ("mask", "margin", "radius", "logits"):
            np.testing.assert_array_equal(a[key], b[key])
    assert sized.sized_sessions == [(32, 48), (21, 37)]  # other sizes made none
    sized.close()
    assert sized.sized_sessions == []


def test_server_warms_a_session_per_warmup_size():
    live = serve_tiny(warmup_sizes=["24x40", "32x48"])
    try:
        engine = live.app.state.server.engines["tiny"]
        assert engine.sized_sessions == [(24, 40), (32, 48)]
    finally:
        live.stop()
