"""``EditBackend``: what the edit pipeline (``veil.editing.pipeline``) needs of the machine that runs it.

Two backends implement it: torch (``veil.lightning_modules.editing.editor.TorchBackend``: the denoiser,
the DDIM loops of ``diffusion.ddim``, the classifiers) and ONNX Runtime (``veil.export.runtime.OrtBackend``:
the exported step graphs walked on the host, numpy only). The pipeline decides *what* is computed (which
attributes inversion sees, which grid is walked, which rows are re-done); a backend computes it, one
whole walk per call, so per-step work (and on a GPU the sample itself) stays inside the backend.

Arrays: the backend's own (``torch.Tensor`` on the torch backend, ``numpy.ndarray`` on ONNX Runtime),
passed through the pipeline as they are: images (B,3,H,W) float32 in [-1, 1], attributes (B,k) float32
in {-1, 0, +1} in ``attribute_names`` order. The pipeline reads and writes the small ones (attributes,
probabilities, bookkeeping) on the host as numpy arrays through ``to_host`` / ``from_host``; rows are
selected with numpy integer arrays (``x[rows]``, ``x[rows] = y``), which both array types accept.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

__all__ = ["Array", "EditBackend", "OnStep"]

Array = Any  # the backend's array type: torch.Tensor (torch) or numpy.ndarray (ONNX Runtime)
OnStep = Callable[[int, int, np.ndarray], None]  # (step i of n, n, predicted clean images (B,3,H,W) on the host)


class EditBackend(Protocol):
    """The walks, the classifier and the few facts an edit needs, on one runtime."""

    attribute_names: list[str]  # the denoiser's attributes: the columns of every (B,k) array
    num_train_timesteps: int  # T of the noise schedule; the DDIM grid is veil.editing.plan's
    label_free: bool  # a denoiser trained without attribute labels (it is only ever given zeros)
    mode: str  # "guided" (a classifier steers the denoiser) or "conditional" (classifier-free guidance)
    guidance_scale: float  # classifier-free guidance w of regeneration (conditional mode)
    classifiers: Mapping[str, list[str]]  # role ("guidance", "check") -> that classifier's attribute names
    batch_size: int  # rows per call of the network
    alphas_cumprod: Any  # (T,) alpha_prod_t of the schedule (the pixel price of a "noise" encoding reads it)

    # -- arrays -----------------------------------------------------------------------------------------
    def asarray(self, values) -> Array:
        """An array or a sequence of (3,H,W) / (k,) rows -> the backend's float32 array (no copy when it is one)."""

    def to_host(self, values: Array) -> np.ndarray:
        """The backend's array (or anything array-like) -> numpy on the host."""

    def from_host(self, values: np.ndarray) -> Array:
        """numpy -> the backend's array, dtype kept (bool, int64, float32)."""

    # -- the walks (one call walks the whole grid) -------------------------------------------------------
    def invert(self, images: Array, attributes: Array, *, timesteps: Sequence[int], guidance: float) -> Array:
        """DDIM inversion of images (B,3,H,W) up ``timesteps`` (ascending) under ``attributes`` (B,k), which the
        pipeline has already masked; classifier-free guidance ``guidance``. Returns x_t0 (B,3,H,W)."""

    def add_noise(self, images: Array, *, t0: int, noise: Array | None) -> Array:
        """The forward process q(x_t0 | x0) = sqrt(alpha_prod_t0) x0 + sqrt(1 - alpha_prod_t0) z. ``noise`` None:
        z drawn from a generator seeded from the OS CSPRNG (``veil.privacy.randomness.secret_seed``) at this
        call, never stored; given (same shape as ``images``): tests and export verification only."""

    def regenerate(self, x_t0: Array, targets: Array, *, timesteps: Sequence[int], guidance_factor: np.ndarray,
                   guide_targets: Array | None, on_step: OnStep | None) -> Array:
        """x_t0 (B,3,H,W) down ``timesteps`` (walked top down) to clean images in [-1, 1] towards ``targets``
        (B,k). ``guidance_factor`` (B,) float32 multiplies each row's guidance (the check's re-dos);
        ``guide_targets`` (B,k): what classifier guidance steers to (guided mode; None otherwise);
        ``on_step(i, n, pred_x0)`` after each step, if given (live previews)."""

    def logits(self, images: Array) -> np.ndarray:
        """The check classifier at t = 0: logits (B, k_clf) on the host, columns in ``classifiers["check"]``."""
