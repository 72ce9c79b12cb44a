"""DP-SGD plumbing shared by every private training loop: config, per-sample gradients, accounting.

- ``DPConfig``: the privacy knobs, validated where they are set (the error names the option).
- ``attach_grad_sampler``: wraps a plain ``nn.Module`` in Opacus's ``GradSampleModule`` *after*
  fixing a silent Opacus 1.6 bug: hooks-mode per-sample gradients of ``Conv2d`` are wrong when
  the conv's input is not contiguous (channels_last views, which diffusers' attention blocks
  produce). A forward pre-hook makes every conv input contiguous; Opacus's activation-capturing
  forward hook then sees the contiguous tensor. ``tests/lightning_modules/test_dp_per_sample.py``
  fails without it.
- ``resolve_noise_multiplier`` / ``make_accountant`` / ``privacy_record``: Opacus's accountants,
  called exactly as ``PrivacyEngine.make_private_with_epsilon`` calls them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from veil.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
KERNELS = ("auto", "fused", "opacus")


@dataclass
class DPConfig:
    """Privacy settings of one training run (YAML section ``dp``)."""

    enabled: bool = True
    target_epsilon: float | None = 8.0  # solve sigma for this epsilon over the planned steps ...
    noise_multiplier: float | None = None  # ... or give sigma directly (then target_epsilon must be null)
    max_grad_norm: float = 1.0  # C: per-sample clipping bound
    delta: float | None = None  # default 1/N, N the training-set size
    accountant: str = "prv"
    noise_multiplicity: int = 1  # K noise draws per example averaged inside its loss (DPDM)
    max_physical_batch_size: int = 64  # logical (Poisson) batches are split into chunks this big
    kernel: str = "auto"  # clip-and-noise implementation: fused (veil.kernels) | opacus | auto
    secure_mode: bool = False

    def __post_init__(self):
        if not self.enabled:
            return
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ConfigError("dp: set dp.target_epsilon or dp.noise_multiplier (or dp.enabled: false)")
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ConfigError("dp: dp.target_epsilon and dp.noise_multiplier are exclusive; set one to null")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"dp.target_epsilon must be > 0, got {self.target_epsilon}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"dp.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.noise_multiplicity < 1:
            raise ConfigError(f"dp.noise_multiplicity must be >= 1, got {self.noise_multiplicity}")
        if self.max_physical_batch_size < 1:
            raise ConfigError(f"dp.max_physical_batch_size must be >= 1, got {self.max_physical_batch_size}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"dp.kernel must be one of {KERNELS}, got {self.kernel!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def make_conv_inputs_contiguous(model: nn.Module) -> int:
    """Register a pre-hook on every Conv2d so its input is contiguous; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(_contiguous_input)
            count += 1
    return count


def attach_grad_sampler(model: nn.Module, *, fix_contiguity: bool = True):
    """Register Opacus per-sample-gradient hooks on ``model`` and return the GradSampleModule.

    The hooks live on ``model``'s layers, so calling ``model`` directly fills ``p.grad_sample``;
    the returned wrapper only has to be kept alive (and removed with ``_close()``).
    """
    from opacus import GradSampleModule

    if fix_contiguity:
        make_conv_inputs_contiguous(model)
    errors = GradSampleModule.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model is not DP-compatible: {errors}; replace BatchNorm with GroupNorm")
    return GradSampleModule(model, batch_first=True, loss_reduction="mean")


def fold_noise_draws(params, b: int, k: int) -> None:
    """Noise multiplicity: the K rows of each example are adjacent in the batch; make each parameter's
    per-sample gradient the mean over its example's K rows, (b*K, ...) -> (b, ...)."""
    if k > 1:
        for p in params:
            gs = p.grad_sample
            p.grad_sample = gs.view(b, k, *gs.shape[1:]).mean(dim=1)


def resolve_noise_multiplier(
    cfg: DPConfig, *, sample_rate: float, steps: int, delta: float
) -> float:
    """sigma: given directly, or solved so that epsilon(steps) = target_epsilon (Opacus's search)."""
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=cfg.accountant,
            epsilon_tolerance=0.01,
        )
    )


def make_accountant(name: str):
    from opacus.accountants import create_accountant

    return create_accountant(name)


def epsilon_of(accountant, *, delta: float) -> float:
    """Current epsilon; 0 before the first step (Opacus's PRV raises on an empty history)."""
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


def privacy_record(
    *, accountant, accountant_name: str, delta: float, noise_multiplier: float,
    max_grad_norm: float, sample_rate: float, steps: int, noise_multiplicity: int = 1,
) -> dict[str, Any]:
    """The ``privacy`` record that travels in every checkpoint, privacy.json and export."""
    eps = epsilon_of(accountant, delta=delta) if noise_multiplier > 0 else math.inf
    return {
        "epsilon": eps if math.isfinite(eps) else None,  # null = unbounded (sigma = 0)
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "sample_rate": sample_rate,
        "steps": steps,
        "accountant": accountant_name,
        "noise_multiplicity": noise_multiplicity,
    }


class PrivacyAccounting:
    """Sigma, delta, accountant and step count of one training run: the bookkeeping every DP
    module shares. Non-private runs (``cfg.enabled`` false) count steps and report no guarantee."""

    def __init__(self, cfg: DPConfig, *, train_size: int, sample_rate: float, planned_steps: int):
        self.cfg, self.sample_rate, self.steps = cfg, sample_rate, 0
        self.delta = cfg.delta if cfg.delta is not None else 1.0 / train_size
        self.noise_multiplier, self.accountant = 0.0, None
        if cfg.enabled:
            self.noise_multiplier = resolve_noise_multiplier(
                cfg, sample_rate=sample_rate, steps=planned_steps, delta=self.delta
            )
            self.accountant = make_accountant(cfg.accountant)

    def step(self) -> None:
        """One logical (noised) optimizer step at (sigma, q)."""
        self.steps += 1
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        if self.accountant is None or self.noise_multiplier == 0:
            return math.inf  # no noise, no guarantee (the accountants diverge at sigma = 0)
        return epsilon_of(self.accountant, delta=self.delta)

    def record(self) -> dict[str, Any]:
        """The ``privacy`` record of checkpoints and privacy.json."""
        if self.accountant is None:
            return {"enabled": False, "epsilon": None, "steps": self.steps}
        return {"enabled": True, **privacy_record(
            accountant=self.accountant, accountant_name=self.cfg.accountant, delta=self.delta,
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm,
            sample_rate=self.sample_rate, steps=self.steps, noise_multiplicity=self.cfg.noise_multiplicity,
        )}

    def state_dict(self) -> dict[str, Any]:
        return {
            "dp_steps": self.steps,
            "accountant_state": self.accountant.state_dict() if self.accountant is not None else None,
            "privacy": self.record(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the step count, the accountant's history, and the sigma the run started with."""
        self.steps = int(state.get("dp_steps", 0))
        if self.accountant is not None and state.get("accountant_state") is not None:
            self.noise_multiplier = float((state.get("privacy") or {}).get("noise_multiplier", self.noise_multiplier))
            self.accountant.load_state_dict(state["accountant_state"])


class AccountedModule:
    """Mixin for a LightningModule with ``self.accounting`` (a PrivacyAccounting): read-only views."""

    accounting: PrivacyAccounting

    @property
    def dp_steps(self) -> int:
        return self.accounting.steps

    @property
    def noise_multiplier(self) -> float:
        return self.accounting.noise_multiplier

    @property
    def accountant(self):
        return self.accounting.accountant

    def epsilon(self) -> float:
        return self.accounting.epsilon()

    def privacy(self) -> dict[str, Any]:
        return self.accounting.record()
