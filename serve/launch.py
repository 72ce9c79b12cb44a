"""Starting ``veil serve`` from another program: a free loopback port, and waiting until it answers.

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "veil.cli", "serve", "--export", X, "--port", str(port)])
    wait_ready(proc, f"http://127.0.0.1:{port}")    # ServerNotReady if it exits or stays silent

Used by ``veil demo``, ``bench/serve.py`` and the end-to-end tests. No torch.
"""

from __future__ import annotations

import socket
import subprocess
import time

__all__ = ["free_port", "wait_ready", "ServerNotReady"]


class ServerNotReady(RuntimeError):
    """The server exited before answering, or did not answer /healthz in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, *, timeout: float = 180.0) -> None:
    """Poll ``url``/healthz until it answers 200; ServerNotReady if ``proc`` exits first or ``timeout`` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerNotReady(f"veil serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerNotReady(f"veil serve was not ready within {timeout:.0f} s")
