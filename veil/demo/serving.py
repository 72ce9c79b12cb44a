"""The demo's HTTP check of ``veil serve`` (stage 5) and ``veil demo --serve`` (the page on the demo's data).

``one_session`` is what a client does: upload a face, let the classifier guess its attributes, protect
one, stream a preview, accept with an idempotency key. ``write_faces`` writes the demo's private test
faces as a folder with ``labels.csv`` (the layout ``veil serve --dataset`` reads), so the page offers them.
"""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from veil.serve import launch
from veil.serve.launch import free_port

__all__ = ["free_port", "wait_ready", "one_session", "write_faces"]


def wait_ready(proc, url: str, log: Path) -> None:
    """``veil.serve.launch.wait_ready``, naming the server's log when it fails."""
    try:
        launch.wait_ready(proc, url)
    except launch.ServerNotReady as e:
        raise RuntimeError(f"{e}; its log: {log}") from None


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def one_session(client, pixels: np.ndarray, protected: list[str], *, level: str = "high") -> dict:
    """Upload -> guesses -> protect -> streamed preview -> accept at ``level`` (the dataset's level for the
    protected attributes: one per attribute and dataset); what happened, for the report."""
    r = client.post("/v1/sessions", files={"image": ("face.png", _png(pixels), "image/png")},
                    data={"protected": json.dumps(protected), "level": level})
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
