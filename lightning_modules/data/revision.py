"""``RevisedDataset``: a base dataset with a revision's edited images and released attributes.

The manifest format and its reader/writer live in ``revision_manifest`` (plain Python, no torch,
so the serving path can use them); they are re-exported here for convenience.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from veil.errors import DataError
from veil.lightning_modules.data.grid import uint8_to_tensor
from veil.privacy.revision_manifest import (  # noqa: F401  (re-exported)
    FORMAT,
    MANIFEST,
    RevisionChange,
    load_manifest,
    write_revision,
)

__all__ = ["FORMAT", "MANIFEST", "RevisionChange", "write_revision", "load_manifest", "RevisedDataset"]


class RevisedDataset(Dataset):
    """``base`` with each changed id's image and attrs replaced by the edited image and the released values.

    The base's attribute names must all appear in the manifest (a manifest may record more).
    """

    def __init__(self, base: Dataset, revision_dir):
        revision_dir = Path(revision_dir)
        self.base = base
        self.revision_dir = revision_dir.parent if revision_dir.suffix == ".json" else revision_dir
        self.manifest = load_manifest(self.revision_dir)
        where = self.revision_dir / MANIFEST
        names = list(base.attribute_names)
        missing = [n for n in names if n not in self.manifest["attribute_names"]]
        if missing:
            raise DataError(
                f"{where}: attribute names {self.manifest['attribute_names']} do not cover the dataset's {names} "
                f"(missing {missing}); rebuild the dataset with the revision's attributes"
            )
        position = {item_id: i for i, item_id in enumerate(base.ids)}
        unknown = [c["id"] for c in self.manifest["changes"] if c["id"] not in position]
        if unknown:
            raise DataError(
                f"{where}: ids {unknown[:5]} are not in the base dataset ({len(unknown)} unknown); "
                f"the revision was made from a different dataset than {self.manifest['base']}"
            )
        changes = sorted(self.manifest["changes"], key=lambda c: position[c["id"]])
        self.changed_indices = [position[c["id"]] for c in changes]
        self.changed_ids = [c["id"] for c in changes]
        self._change_at = dict(zip(self.changed_indices, changes))
        self.ids, self.attribute_names, self.resolution = list(base.ids), names, base.resolution
        self.partition = getattr(base, "partition", None)
        self.attribute_matrix = base.attribute_matrix.clone()  # (N, k), released values on changed rows
        for i, c in self._change_at.items():
            self.attribute_matrix[i] = torch.tensor([float(c["released_attributes"][n]) for n in names])
        self._images: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.base)

    def _edited_image(self, index: int) -> np.ndarray:
        if index not in self._images:
            path = self.revision_dir / self._change_at[index]["file"]
            with Image.open(path) as im:
                pixels = np.array(im.convert("RGB"), np.uint8)
            if pixels.shape[:2] != (self.resolution, self.resolution):
                r = self.resolution
                raise DataError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} image, expected {r}x{r}")
            self._images[index] = pixels
        return self._images[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        if index in self._change_at:
            return uint8_to_tensor(self._edited_image(index)), self.attribute_matrix[index].clone()
        return self.base[index]
