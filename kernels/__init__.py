"""veil.kernels: fused DP-SGD clipping and noising behind Opacus's optimizer interface.

    from veil.kernels import make_dp_optimizer
    dp_opt = make_dp_optimizer(kernel="fused", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=64, seed=0)

``kernel="opacus"`` returns Opacus's own ``DPOptimizer`` / ``DistributedDPOptimizer``;
``kernel="fused"`` (the default) returns ``FusedDPOptimizer`` / ``FusedDistributedDPOptimizer``
(``veil.kernels.optimizer``): Triton kernels on CUDA, the exact PyTorch reference on CPU.
Files: ``reference.py`` (Opacus's arithmetic), ``per_sample_norms.py`` and ``clip_and_noise.py``
(the kernels), ``multi_tensor.py`` (pointer tables for one launch over many tensors),
``optimizer.py`` (the optimizers). See README.md for the design and benchmark numbers.

Importing this package is cheap: torch, opacus and triton are imported on first use, and triton
only when the triton backend actually runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from veil.errors import ConfigError, PrivacyError

if TYPE_CHECKING:  # pragma: no cover
    from veil.kernels.optimizer import FusedDistributedDPOptimizer, FusedDPOptimizer

KERNELS = ("fused", "opacus")
__all__ = ["KERNELS", "default_kernel", "make_dp_optimizer", "FusedDPOptimizer", "FusedDistributedDPOptimizer"]


def default_kernel(device=None) -> str:
    """The ``dp.kernel`` to use when none is configured: "fused" (triton on CUDA, reference on CPU)."""
    return "fused"


def make_dp_optimizer(
    *,
    kernel: str,
    optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    loss_reduction: str = "mean",
    distributed: bool = False,
    secure_mode: bool = False,
    seed: int | None = None,
    generator=None,
):
    """Wrap ``optimizer`` in the DP optimizer ``kernel`` names ("fused" or "opacus").

    ``seed`` makes the noise reproducible (for "opacus", through a ``torch.Generator`` seeded with
    it on the parameters' device); pass ``seed`` or ``generator``, not both. ``secure_mode`` is only
    available with "opacus" (a seeded generator would defeat it, so ``seed`` is refused there too).
    """
    if kernel not in KERNELS:
        raise ConfigError(f"dp.kernel must be one of {KERNELS}, got {kernel!r}")
    if seed is not None and generator is not None:
        raise ConfigError("pass dp.seed or a torch.Generator, not both")
    common = dict(
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction, secure_mode=secure_mode,
    )
    if kernel == "fused":
        from veil.kernels.optimizer import FusedDistributedDPOptimizer, FusedDPOptimizer

        cls = FusedDistributedDPOptimizer if distributed else FusedDPOptimizer
        return cls(optimizer, generator=generator, seed=seed, **common)

    import torch
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    if seed is not None:
        if secure_mode:
            raise PrivacyError("secure_mode noise from a seeded generator is reproducible, hence not secure: drop dp.seed")
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed(seed)
    cls = DistributedDPOptimizer if distributed else DPOptimizer
    return cls(optimizer, generator=generator, **common)


def __getattr__(name: str):
    """Lazy access to the optimizer classes, so that ``import veil.kernels`` stays light."""
    if name in ("FusedDPOptimizer", "FusedDistributedDPOptimizer"):
        from veil.kernels import optimizer

        return getattr(optimizer, name)
    raise AttributeError(f"module 'veil.kernels' has no attribute {name!r}")
