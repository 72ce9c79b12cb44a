"""Data specs (``FaceDataModule.spec()``): which images of which source a model was trained on.

Plain dictionaries: sampling uses them to say whether two models saw the same data (their epsilons
then add), fine-tuning to refuse a "public" start that was trained on the private data itself, the
editor to say whether a model's cost falls on the images it edits. A dataset is its content, not its
path: two CelebA or folder specs are the same data when they share one image file, byte for byte
(``veil.privacy.locations.dataset_digests``: SHA-256 of every image file, cached per folder), so a
copied, moved or trimmed private folder is still the private data. A folder that is gone is taken from
the index of the privacy databases, else compared by its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from veil.privacy.locations import dataset_digests


def same_dataset(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Do two data specs (``FaceDataModule.spec()``) draw from the same images? Synthetic faces: the same
    seed. CelebA and folders: the same folder, or any image file in common (whatever the folder or source)."""
    if not a or not b:
        return False
    if a.get("source") == "synthetic" or b.get("source") == "synthetic":  # image i depends only on (seed, i)
        return a.get("source") == b.get("source") and a.get("seed") == b.get("seed")
    if a.get("source") == b.get("source") and Path(str(a.get("root"))).resolve() == Path(str(b.get("root"))).resolve():
        return True
    digests_a, digests_b = dataset_digests(a), dataset_digests(b)
    return digests_a is not None and digests_b is not None and not digests_a.isdisjoint(digests_b)


def data_location(spec: dict[str, Any]) -> str:
    """'seed 0' (synthetic) or the data root: which images of its source a data spec draws."""
    return f"seed {spec.get('seed')}" if spec.get("source") == "synthetic" else str(spec.get("root"))
