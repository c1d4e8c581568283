"""ONNX Runtime sessions specialised to a frame size (`Settings.ort_size_sessions`).

With every shape fixed, onnxruntime computes at load what depends on the size alone;
the answers must stay those of the one dynamic session, bit for bit, the sessions kept
must stay bounded (least recently used out first), and batches of more than one keep
the dynamic session. Real sessions of the tiny model.
"""

from __future__ import annotations

import numpy as np
from server_support import ort_engine, tiny_model_dir


def _engines(**kw):
    dynamic, sized = (
        ort_engine(tiny_model_dir(), ort_size_sessions=0),
        ort_engine(tiny_model_dir(), **kw),
    )
    dynamic.load()
    sized.load()
    return dynamic, sized


def test_sized_sessions_answer_bit_for_bit_and_stay_bounded():
    dynamic, sized = _engines(ort_size_sessions=2)
    rng = np.random.default_rng(0)
    shapes = [(1, 32, 48), (1, 21, 37), (1, 32, 48), (1, 40, 56), (3, 40, 56), (1, 21, 37)]
    seen = []
    for n, h, w in shapes:
        x = rng.random((n, 3, h, w), dtype=np.float32)
        a, b = dynamic.infer(x, ["mask", "logits"]), sized.infer(x, ["mask", "logits"])
        for key in ("mask", "margin", "radius", "logits"):
            np.testing.assert_array_equal(a[key], b[key])
        seen.append(sized.sized_sessions)
    assert seen == [
        [(32, 48)],
        [(32, 48), (21, 37)],
        [(21, 37), (32, 48)],  # used again: most recent
        [(32, 48), (40, 56)],  # 21x37 was the least recently used
        [(32, 48), (40, 56)],  # a batch of 3 runs on the dynamic session
        [(40, 56), (21, 37)],
    ]
    assert dynamic.sized_sessions == []  # 0: one dynamic session for all
    sized.close()
    assert sized.sized_sessions == []


def test_warmup_makes_the_sessions_of_its_sizes():
    _, sized = _engines()
    sized.warmup([(1, 32, 48), (1, 64, 96)])
    assert sized.ready and sized.sized_sessions == [(32, 48), (64, 96)]
