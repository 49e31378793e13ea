"""What both engines' server tests share (integration/sglang/e2e, integration/vllm/e2e): a free port on
127.0.0.1, and waiting until a server just started in a subprocess answers ``/health``."""

import socket
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, log: Path, *, name: str, timeout_s: float, poll_s: float) -> None:
    """Polls ``url + "/health"`` every ``poll_s`` seconds until it answers 200; raises RuntimeError with
    the tail of the server's ``log`` when the process ``proc`` (a ``subprocess.Popen``) exits first
    or ``timeout_s`` seconds pass."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{Path(log).read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer in {timeout_s} s:\n{Path(log).read_text()[-4000:]}")
        time.sleep(poll_s)
