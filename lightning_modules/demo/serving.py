"""The demo's HTTP check of ``veil serve`` (stage 5) and ``veil demo --serve`` (the page on the demo's data).

``one_session`` is what a client does: upload a face, let the classifier guess its attributes, protect
one, stream a preview, accept with an idempotency key. ``write_faces`` writes the demo's private test
faces as a folder with ``labels.csv`` (the layout ``veil serve --dataset`` reads), so the page offers them.
"""

from __future__ import annotations

import io
import json
import secrets
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["free_port", "wait_ready", "one_session", "write_faces"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"veil serve exited with {proc.returncode}; its log: {log}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"veil serve was not ready within {timeout:.0f} s; its log: {log}")


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def one_session(client, pixels: np.ndarray, protected: list[str]) -> dict:
    """Upload -> guesses -> protect -> streamed preview -> accept; what happened, for the report."""
    r = client.post("/v1/sessions", files={"image": ("face.png", _png(pixels), "image/png")},
                    data={"protected": json.dumps(protected), "level": "high"})
    r.raise_for_status()
    session = r.json()
    events = client.post(f"/v1/sessions/{session['session']}/previews", json={"n": 2}).text
    kinds = [line.split(": ", 1)[1] for line in events.splitlines() if line.startswith("event: ")]
    key = secrets.token_urlsafe(16)
    answer = client.post(f"/v1/sessions/{session['session']}/feedback",
                         json={"action": "accept", "idempotency_key": key})
    answer.raise_for_status()
    body = answer.json()
    again = client.post(f"/v1/sessions/{session['session']}/feedback",
                        json={"action": "accept", "idempotency_key": key}).json()
    state = client.get(f"/v1/sessions/{session['session']}").json()
    return {"ok": kinds[-1:] == ["done"] and body["decision"] in ("accepted", "refused"),
            "preview_events": len(kinds), "decision": body["decision"], "release_id": body["release_id"],
            "retry_replayed": bool(again.get("replayed")) and again.get("release_id") == body["release_id"],
            "spent": state["spent"], "guessed": sorted(session["guesses"] or {})}


def write_faces(dm, folder: Path, *, limit: int = 48) -> Path:
    """The first ``limit`` test faces of ``dm`` as PNGs + labels.csv (-1/1), for ``veil serve --dataset``."""
    folder.mkdir(parents=True, exist_ok=True)
    ds, names = dm.dataset, list(dm.dataset.attribute_names)
    rows = ["file," + ",".join(names)]
    for i in dm.split_indices("test")[:limit]:
        name = f"{ds.ids[i]}.png"
        Image.fromarray(ds.image_uint8(i)).save(folder / name)
        rows.append(name + "," + ",".join(str(int(v)) for v in ds[i][1].tolist()))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder
