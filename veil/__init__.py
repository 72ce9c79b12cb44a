"""veil: share face-image datasets and models without giving away protected attributes.

The Python API (``veil/api.py``), loaded on first use: ``veil.train``, ``veil.train_classifier``,
``veil.load_editor`` (``.preview``, ``.release``), ``veil.unlearn``, ``veil.export_onnx``,
``veil.privacy_account``; the ``veil`` command is a layer over the same jobs.

Subpackages (each a top-level folder of the repository, installed under this namespace):
``veil.lightning_modules`` (data, models, training), ``veil.kernels`` (fused DP-SGD kernels),
``veil.export`` (ONNX export), ``veil.serve`` (preview server). Importing ``veil`` is cheap:
nothing heavy (torch included) is imported here, nor by ``veil.api`` (each function imports its job).
"""

__version__ = "0.1.0"

_API = ("train", "train_classifier", "unlearn", "load_editor", "export_onnx", "privacy_account",
        "Editor", "EditResult", "Preview", "Run", "ExportResult")


def __getattr__(name: str):
    """``veil.train`` and the rest of the API, imported from ``veil.api`` when first asked for."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module("veil.api"), name)
    raise AttributeError(f"module 'veil' has no attribute {name!r}")
