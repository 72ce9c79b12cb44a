"""``DPConfig``: the privacy settings of one training run (YAML section ``dp``), validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from veil.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
KERNELS = ("auto", "fused", "opacus")  # clip-and-noise implementations; auto: fused, opacus under secure_mode


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
