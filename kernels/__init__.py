"""veil.kernels: fused DP-SGD clipping and noising behind Opacus's optimizer interface.

    from veil.kernels.optimizer import FusedDPOptimizer
    dp_opt = FusedDPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                              max_grad_norm=1.0, expected_batch_size=64, seed=0)

``FusedDPOptimizer`` / ``FusedDistributedDPOptimizer`` (``veil.kernels.optimizer``) run Triton
kernels on CUDA and the exact PyTorch reference on CPU. The choice between them and Opacus's own
optimizers (``dp.kernel``) is made by the one factory, ``veil.lightning_modules.dp.optimizer``;
this package sits below it and imports nothing of veil but ``veil.errors``. Files: ``reference.py`` (Opacus's arithmetic), ``per_sample_norms.py`` and ``clip_and_noise.py``
(the kernels), ``multi_tensor.py`` (pointer tables for one launch over many tensors),
``optimizer.py`` (the optimizers). See README.md for the design and benchmark numbers.

Importing this package is cheap: torch, opacus and triton are imported on first use, and triton
only when the triton backend actually runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from veil.kernels.optimizer import FusedDistributedDPOptimizer, FusedDPOptimizer

__all__ = ["FusedDPOptimizer", "FusedDistributedDPOptimizer"]


def __getattr__(name: str):
    """Lazy access to the optimizer classes, so that ``import veil.kernels`` stays light."""
    if name in ("FusedDPOptimizer", "FusedDistributedDPOptimizer"):
        from veil.kernels import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module 'veil.kernels' has no attribute {name!r}")
