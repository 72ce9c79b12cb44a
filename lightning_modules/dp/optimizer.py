"""The one DP optimizer factory: Opacus's ``DPOptimizer`` or veil's fused one, chosen by ``dp.kernel``.

    opt = make_dp_optimizer(kernel="fused", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=64)

``kernel="opacus"`` returns Opacus's own ``DPOptimizer`` / ``DistributedDPOptimizer``;
``kernel="fused"`` returns ``veil.kernels.optimizer.FusedDPOptimizer`` /
``FusedDistributedDPOptimizer`` (Triton kernels on CUDA, the exact PyTorch reference on CPU);
``kernel="auto"`` (the config's default) is "fused", or "opacus" under ``secure_mode``, which the
fused kernels refuse (they do not draw cryptographically secure noise). ``dp_optimizer_for`` wraps
a LightningModule's base optimizer with the module's accounting and the world size.
"""

from __future__ import annotations

from veil.errors import ConfigError, PrivacyError
from veil.lightning_modules.dp.config import KERNELS
from veil.lightning_modules.dp.grad_sample import attach_grad_sampler


def resolve_kernel(kernel: str, *, secure_mode: bool = False) -> str:
    """The implementation ``kernel`` names: "auto" -> "fused" ("opacus" under secure_mode)."""
    if kernel not in KERNELS:
        raise ConfigError(f"dp.kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "opacus" if secure_mode else "fused"
    return kernel


def make_dp_optimizer(
    *,
    kernel: str,
    optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    loss_reduction: str = "mean",
    distributed: bool = False,
    secure_mode: bool = False,
    seed: int | None = None,
    generator=None,
):
    """Wrap ``optimizer`` in the DP optimizer ``kernel`` names ("auto", "fused" or "opacus").

    ``seed`` makes the noise reproducible (for "opacus", through a ``torch.Generator`` seeded with
    it on the parameters' device); pass ``seed`` or ``generator``, not both. ``secure_mode`` is only
    available with "opacus" (a seeded generator would defeat it, so ``seed`` is refused there too).
    """
    kernel = resolve_kernel(kernel, secure_mode=secure_mode)
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


def dp_optimizer_for(module, base):
    """The DP optimizer of a DP LightningModule (``module.model``, ``.dp_cfg``, ``.accounting``,
    ``hparams.sample_rate`` and ``hparams.train_size``) around its ``base`` optimizer.

    Attaches Opacus's per-sample hooks to ``module.model`` once. The wrapper is set with
    ``object.__setattr__``: as a registered submodule the state dict would hold the model twice
    (the hooks live on ``module.model``'s layers anyway). Under DDP each rank's expected batch is
    its share, q N / world.
    """
    if getattr(module, "_grad_sampler", None) is None:
        object.__setattr__(module, "_grad_sampler", attach_grad_sampler(module.model))
    world = module.trainer.world_size if module._trainer is not None else 1
    cfg = module.dp_cfg
    return make_dp_optimizer(
        kernel=cfg.kernel, optimizer=base, noise_multiplier=module.accounting.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=module.hparams.sample_rate * module.hparams.train_size / world,
        distributed=world > 1, secure_mode=cfg.secure_mode,
    )
