"""The owner's dataset beside the server (``veil serve --dataset DIR``): images to pick instead of uploading.

    ds = FolderDataset("faces/", attribute_names=["smiling", "eyeglasses", ...], resolution=32)
    ds.ids[:3]               # ["000001.png", ...] in CSV order
    ds.image_png("000001.png"), ds.attributes("000001.png")

The layout is the one ``veil train --data source=folder`` reads: the folder holds the images and a
``labels.csv`` (or the CSV given) with a header row; the id column (``image_id``, ``id``, ``filename``
or ``file``, else the first) names files inside the folder, the other columns are -1/1 or 0/1
attributes (0 reads as -1). Only the model's attributes are kept; one it has and the CSV lacks is
unknown (0). A picked image's id in the ledger is its CSV id, as ``veil edit`` records it, so
releases from the server and from the batch CLI compose; ``fingerprint(id)`` (``veil.privacy.identity``, of
the image at the model's resolution, as an upload is fingerprinted) lets the server give an upload of the
same face that id too. Torch-free (PIL, csv).
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from veil.errors import DataError
from veil.privacy.identity import Fingerprint, fingerprint
from veil.serve.images import from_png, png_bytes, to_model_input

__all__ = ["FolderDataset"]

ID_COLUMNS = ("image_id", "id", "filename", "file")
VALUES = {"1": 1, "+1": 1, "1.0": 1, "-1": -1, "-1.0": -1, "0": -1, "0.0": -1}


class FolderDataset:
    def __init__(self, folder, *, attribute_names: Sequence[str], resolution: int, csv_path=None):
        self.folder = Path(folder).expanduser().resolve()
        path = Path(csv_path) if csv_path else self.folder / "labels.csv"
        if not self.folder.is_dir():
            raise DataError(f"--dataset {folder}: not a folder of images")
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.reader(f))
        except FileNotFoundError:
            raise DataError(f"--dataset {folder}: no {path.name} with the attributes (give --dataset-csv)") from None
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: not a readable CSV ({e})") from None
        if len(rows) < 2 or len(rows[0]) < 2:
            raise DataError(f"{path}: expected a header with an id column and attribute columns, then a row per image")
        header = [h.strip() for h in rows[0]]
        id_col = next((header.index(c) for c in ID_COLUMNS if c in header), 0)
        columns = {name: header.index(name) for name in attribute_names if name in header}
        self.resolution, self.attribute_names = resolution, list(attribute_names)
        self._labels: dict[str, dict[str, int]] = {}
        for line, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            name = row[id_col].strip()
            file = (self.folder / name).resolve()
            if self.folder not in file.parents or not file.is_file():
                raise DataError(f"{path}, line {line}: {name!r} is not a file inside {self.folder}")
            try:
                values = {a: VALUES[row[c].strip()] for a, c in columns.items()}
            except (KeyError, IndexError):
                raise DataError(f"{path}, line {line}: attribute values must be -1/1 or 0/1") from None
            self._labels[name] = {a: values.get(a, 0) for a in attribute_names}
        self.ids = list(self._labels)

    def __len__(self) -> int:
        return len(self.ids)

    def attributes(self, image_id: str) -> dict[str, int]:
        return dict(self._labels[image_id])

    @lru_cache(maxsize=1024)
    def image_png(self, image_id: str) -> bytes:
        """The item at the model's resolution as PNG (KeyError for an unknown id)."""
        if image_id not in self._labels:
            raise KeyError(image_id)
        try:
            with Image.open(self.folder / image_id) as im:  # the owner's own file; Pillow's own bomb guard applies
                pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"--dataset: {image_id} is not a readable image ({e})") from None
        return png_bytes(to_model_input(pixels, resolution=self.resolution))

    def fingerprint(self, image_id: str) -> Fingerprint:
        """The perceptual fingerprint of the item as the model sees it (KeyError for an unknown id)."""
        return fingerprint(from_png(self.image_png(image_id)))
