"""Datasets (synthetic faces, CelebA, image folder + CSV), dataset revisions, and the DataModule that serves them.

Every dataset yields ``(image, attrs)``: image float32 (3, H, W) in [-1, 1], attrs float32 (k,) in {-1, +1},
and exposes ``attribute_names``, ``ids``, ``attribute_matrix`` (N, k) and ``resolution``.
Names are imported lazily, so ``import veil.lightning_modules.data`` stays cheap:

    from veil.lightning_modules.data import FaceDataModule, SyntheticFaces, RevisedDataset
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SYNTHETIC_ATTRIBUTES": "synthetic_faces",
    "SyntheticFaces": "synthetic_faces",
    "render_face": "synthetic_faces",
    "CelebA": "celeba",
    "CELEBA_ATTRIBUTES": "celeba",
    "ImageFolderCSV": "image_folder",
    "RevisionChange": "revision",
    "RevisedDataset": "revision",
    "write_revision": "revision",
    "load_manifest": "revision",
    "FaceDataModule": "datamodule",
    "save_grid": "grid",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
