"""The server runs without torch: every server module imports, the app starts and
serves, with `import torch` made to fail by a meta-path hook in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from server_support import tiny_model_dir

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys, threading, time

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())

    import server
    for mod in pkgutil.walk_packages(server.__path__, "server."):
        importlib.import_module(mod.name)

    import httpx, uvicorn
    from server import Settings, create_app
    from server.backends import ModelSpec, create_engine
    from server.errors import BackendUnavailable

    model_dir, port = sys.argv[1], int(sys.argv[2])
    out = {}
    for backend in ("torch", "tensorrt"):
        try:
            create_engine(ModelSpec(None, __import__("pathlib").Path(model_dir) / "model.onnx"),
                          Settings(backend=backend))
            out[backend] = "created"
        except BackendUnavailable as exc:
            out[backend] = "unavailable: " + str(exc)

    app = create_app(Settings(models=[model_dir], intra_op_threads=1))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/v2/health/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    import io
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, format="PNG")
    r = httpx.post(base + "/v1/segment", content=buf.getvalue())
    out["status"] = r.status_code
    out["guaranteed_fraction"] = r.json().get("guaranteed_fraction")
    out["torch_loaded"] = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    srv.should_exit = True
    print(json.dumps(out))
    """
)


def test_server_runs_without_torch():
    from server_support import free_port

    model_dir = tiny_model_dir()
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir), str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == 200 and 0.0 <= out["guaranteed_fraction"] <= 1.0
    assert out["torch_loaded"] == []
    assert out["torch"].startswith("unavailable") and "torch" in out["torch"]
    assert out["tensorrt"].startswith("unavailable")
