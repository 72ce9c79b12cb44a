"""The one DP optimizer factory: Opacus's ``DPOptimizer``, veil's fused one, or the ghost engine's.

    opt = make_dp_optimizer(kernel="fused", optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=64)

``kernel="opacus"`` returns Opacus's own ``DPOptimizer`` / ``DistributedDPOptimizer``;
``kernel="fused"`` returns ``veil.kernels.optimizer.FusedDPOptimizer`` /
``FusedDistributedDPOptimizer`` (Triton kernels on CUDA, the exact PyTorch reference on CPU);
``kernel="auto"`` (the config's default) is "fused". Those read per-sample gradients (``dp.engine:
opacus``). With ``engine="ghost"`` (the default) there are none: ``veil.lightning_modules.dp.ghost``
leaves each chunk's clipped sum in ``p.grad`` and ``GhostDPOptimizer`` / ``GhostDistributedDPOptimizer``
accumulate, noise (the fused stage's noise: Triton on CUDA, else the reference; ``kernel="opacus"``
forces the reference, Opacus's own arithmetic) and divide.

Noise: with neither ``seed`` nor ``generator`` (what training uses), the noise generator is seeded
from the OS CSPRNG in this process, for both kernels: Opacus's own default, torch's global RNG, is
what ``L.seed_everything(config.seed)`` seeds, so anyone holding the config could replay the noise.
``seed`` (reproducible, hence not private) exists for tests and ``dp.reproducible_noise_seed``.
Opacus's ``secure_mode`` is refused: it needs torchcsprng, which is not installed, and without it
Opacus draws ordinary noise while the run would claim secure noise.
"""

from __future__ import annotations

import secrets

from veil.errors import ConfigError, PrivacyError
from veil.lightning_modules.dp.config import ENGINES, KERNELS
from veil.lightning_modules.dp.grad_sample import attach_grad_sampler

SECURE_MODE_REFUSED = (
    "secure_mode=True: Opacus's secure noise needs torchcsprng (unmaintained, not installed) and veil will not "
    "report secure noise it does not draw; set dp.secure_mode: false (veil's noise is seeded from the OS CSPRNG)"
)


def resolve_kernel(kernel: str) -> str:
    """The implementation ``kernel`` names: "auto" -> "fused"."""
    if kernel not in KERNELS:
        raise ConfigError(f"must be one of {KERNELS}, got {kernel!r}", option="dp.kernel")
    return "fused" if kernel == "auto" else kernel


def make_dp_optimizer(
    *,
    kernel: str,
    optimizer,
    engine: str = "opacus",
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

    ``seed`` makes the noise reproducible (not private); pass ``seed`` or ``generator``, not both.
    With neither, the noise is seeded from the OS CSPRNG. ``secure_mode`` is refused (PrivacyError).
    """
    kernel = resolve_kernel(kernel)
    if engine not in ENGINES:
        raise ConfigError(f"must be one of {ENGINES}, got {engine!r}", option="dp.engine")
    if secure_mode:
        raise PrivacyError(SECURE_MODE_REFUSED)
    if seed is not None and generator is not None:
        raise ConfigError("pass dp.reproducible_noise_seed or a torch.Generator, not both")
    common = dict(
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
        loss_reduction=loss_reduction,
    )
    if engine == "ghost":
        from veil.kernels.optimizer import GhostDistributedDPOptimizer, GhostDPOptimizer

        cls = GhostDistributedDPOptimizer if distributed else GhostDPOptimizer
        return cls(optimizer, generator=generator, seed=seed, backend="reference" if kernel == "opacus" else "auto",
                   **common)
    if kernel == "fused":
        from veil.kernels.optimizer import FusedDistributedDPOptimizer, FusedDPOptimizer

        cls = FusedDistributedDPOptimizer if distributed else FusedDPOptimizer
        return cls(optimizer, generator=generator, seed=seed, **common)  # neither: CSPRNG-seeded inside

    import torch
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    if generator is None:
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed(secrets.randbits(63) if seed is None else seed)
    cls = DistributedDPOptimizer if distributed else DPOptimizer
    return cls(optimizer, generator=generator, **common)


def dp_optimizer_for(module, base):
    """The DP optimizer of a DP LightningModule (``module.model``, ``.dp_cfg``, ``.accounting``,
    ``hparams.sample_rate`` and ``hparams.train_size``) around its ``base`` optimizer.

    Attaches, once, ``dp.engine``'s hooks to ``module.model``: the ghost engine's ``GhostClipper``
    (``module._ghost_clipper``, used by ``dp.step``) or Opacus's per-sample hooks. Each is set with
    ``object.__setattr__``: as a registered submodule the state dict would hold the model twice
    (the hooks live on ``module.model``'s layers anyway). Under DDP each rank's expected batch is
    its share, q N / world. The noise is secret (OS CSPRNG, per process) unless
    ``dp.reproducible_noise_seed`` is set; then it is derived from that seed, the rank and the
    steps already taken (so a resume does not repeat it), and the run is stamped not private.
    """
    from veil.privacy.randomness import reproducible_seed

    cfg = module.dp_cfg
    if cfg.engine == "ghost":
        precision = str(module.trainer.precision) if module._trainer is not None else "32-true"
        if precision.startswith("16"):  # fp16 needs a loss scaler on manual_backward, which ghost bypasses
            raise ConfigError(f": ghost does not support trainer.precision {precision} (fp16 with loss "
                              "scaling); use bf16-mixed or 32-true, or dp.engine: opacus", option="dp.engine")
        if getattr(module, "_ghost_clipper", None) is None:
            from veil.lightning_modules.dp.ghost import GhostClipper

            object.__setattr__(module, "_ghost_clipper", GhostClipper(
                module.model, max_grad_norm=cfg.max_grad_norm, noise_multiplicity=cfg.noise_multiplicity))
    elif getattr(module, "_grad_sampler", None) is None:
        object.__setattr__(module, "_grad_sampler", attach_grad_sampler(module.model))
    world = module.trainer.world_size if module._trainer is not None else 1
    rank = module.trainer.global_rank if module._trainer is not None else 0
    seed = None
    if cfg.reproducible:
        seed = reproducible_seed(cfg.reproducible_noise_seed, "noise", rank, module.accounting.steps)
    return make_dp_optimizer(
        kernel=cfg.kernel, optimizer=base, engine=cfg.engine, noise_multiplier=module.accounting.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=module.hparams.sample_rate * module.hparams.train_size / world,
        distributed=world > 1, secure_mode=cfg.secure_mode, seed=seed,
    )
