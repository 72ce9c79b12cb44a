"""Helpers for tests/serve: test images, a server on an export, and reading server-sent events."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from veil.serve.launch import free_port  # noqa: F401  (re-exported for the tests)


def png_upload(width: int = 40, height: int = 48, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small random RGB picture as PNG (or JPEG) bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def read_sse(text: str) -> list[tuple[str, dict]]:
    """[(event, data), ...] of a text/event-stream body."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def decode_data_url(url: str) -> np.ndarray:
    import base64

    assert url.startswith("data:image/png;base64,"), url[:40]
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB"))


class AnswerLog:
    """The status of every answer a test client got, checked against the statuses the app's OpenAPI schema
    declares for that route: ``log.watch(app, client)``, then ``log.undeclared()`` -> [(method, route, status)]
    answered but not declared (routes outside the schema, e.g. /docs or an unknown path, are not checked)."""

    def __init__(self):
        self.seen: list = []

    def watch(self, app, client) -> None:
        client.event_hooks["response"].append(
            lambda r: self.seen.append((app, r.request.method.lower(), r.request.url.path, r.status_code)))

    def undeclared(self) -> list[tuple[str, str, int]]:
        import re

        missing = set()
        for app, method, path, status in self.seen:
            paths = app.openapi()["paths"]
            for template, ops in paths.items():
                if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path) and method in ops:
                    if str(status) not in ops[method]["responses"]:
                        missing.add((method.upper(), template, status))
        return sorted(missing)
