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

from typing import Any

from veil.privacy.locations import same_dataset  # the one rule (torch-free: the server uses it too)

__all__ = ["same_dataset", "data_location"]


def data_location(spec: dict[str, Any]) -> str:
    """'seed 0' (synthetic) or the data root: which images of its source a data spec draws."""
    return f"seed {spec.get('seed')}" if spec.get("source") == "synthetic" else str(spec.get("root"))
