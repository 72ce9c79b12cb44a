"""veil: share face-image datasets and models without giving away protected attributes.

Subpackages (each a top-level folder of the repository, installed under this namespace):
``veil.lightning_modules`` (data, models, training), ``veil.kernels`` (fused DP-SGD kernels),
``veil.export`` (ONNX export), ``veil.serve`` (preview server). Importing ``veil`` is cheap:
nothing heavy (torch included) is imported here.
"""

__version__ = "0.1.0"
