"""Start ``hyprec serve`` in a subprocess on 127.0.0.1 and wait until it answers (used by tests and the load test)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, startup_timeout: float = 180.0) -> Iterator[str]:
    """``hyprec serve ARGS`` on a free loopback port; yields its base URL and stops it afterwards.

    Readiness is polled (``/health``) until a deadline; between polls the wait is on the process itself, so a
    server that dies is reported at once with its output. The output goes to a temporary file, not a pipe: a
    pipe nobody reads fills up and blocks a chatty server mid-request.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "hyprec.entrypoints.cli", "-q", "serve", *args, "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+t") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)

        def output() -> str:
            log.seek(0)
            return log.read()

        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer /health within {startup_timeout} s:\n{output()}")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)  # poll interval, cut short if the server exits
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{output()}")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
