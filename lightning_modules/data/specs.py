"""Data specs (``FaceDataModule.spec()``): which images of which source a model was trained on.

Plain dictionaries, compared without loading any image: sampling uses them to say whether two
models saw the same data (their epsilons then add), fine-tuning to refuse a "public" start that was
trained on the private data itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def same_dataset(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Do two data specs (``FaceDataModule.spec()``) draw from the same images?"""
    if not a or not b or a.get("source") != b.get("source"):
        return False
    if a["source"] == "synthetic":  # image i depends only on (seed, i)
        return a.get("seed") == b.get("seed")
    return Path(str(a.get("root"))).resolve() == Path(str(b.get("root"))).resolve()


def data_location(spec: dict[str, Any]) -> str:
    """'seed 0' (synthetic) or the data root: which images of its source a data spec draws."""
    return f"seed {spec.get('seed')}" if spec.get("source") == "synthetic" else str(spec.get("root"))
