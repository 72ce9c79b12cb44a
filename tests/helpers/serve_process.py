"""The real ``veil serve`` as a subprocess on a free loopback port (tests/serve's end-to-end tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
from serve_helpers import free_port, png_upload

from veil.serve.launch import ServerNotReady, wait_ready


class Server:
    def __init__(self, export, state, *extra: str, log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(log_path or os.devnull, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "veil.cli", "serve", "--export", str(export), "--state", str(state),
             "--port", str(self.port), "--threads", "1", "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self._wait()

    def _wait(self) -> None:
        try:
            wait_ready(self.proc, self.url, timeout=120)
        except ServerNotReady:
            self.kill()
            raise

    def session(self, attributes: dict, protected: list, level: str, seed: int = 0) -> dict:
        r = self.client.post("/v1/sessions", files={"image": ("face.png", png_upload(seed=seed), "image/png")},
                             data={"attributes": json.dumps(attributes), "protected": json.dumps(protected),
                                   "level": level})
        r.raise_for_status()
        return r.json()

    def accept(self, session: str, key: str) -> httpx.Response:
        return self.client.post(f"/v1/sessions/{session}/feedback", json={"action": "accept", "idempotency_key": key})

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.client.close()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.client.close()
        self.log.close()
