"""`certseg serve` in a child process: for benchmarks, fault tests and supervisors.

Tests of signals, exit codes and memory need the server in its own process (as it is
deployed); benchmarks need it off the client's interpreter. One launcher serves both.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

__all__ = ["ServeProcess", "free_port"]

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m server.cli serve ARGS --port <free>` until stop(); stderr is kept."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", *args, "--port", str(self.port)]
        # A file, not a pipe: a pipe nobody drains fills up and blocks the server's logging.
        self._log = open(log_path, "w+b") if log_path else tempfile.NamedTemporaryFile()  # noqa: SIM115
        # cwd = the repo root, so `-m server` is this package whatever the caller's cwd.
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        """Block until /v2/health/ready says 200; raise with the log if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.stderr()[-3000:]}")
            try:
                if httpx.get(self.base + "/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Exit code once the process ends (TimeoutExpired if it does not in time)."""
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        """What the server logged so far (all of it once it has exited)."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        """Stop the server and drop its log file (when it was a temporary one)."""
        self.stop()
        self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
