"""``DPConfig``: the privacy settings of one training run (YAML section ``dp``), validated on construction.

delta: when not given, ``default_delta(N) = min(1e-5, 0.1 / N)``. delta = 1/N is no guarantee at
all (a mechanism that publishes one random record in full meets it), so ``check_delta`` refuses
delta >= 1/N.

Randomness: DP-SGD's noise and its Poisson sample are drawn from generators seeded from the OS
CSPRNG in every process (``veil.privacy.randomness``), never from ``seed``. ``reproducible_noise_seed`` is for
tests and debugging only: it makes noise and batches reproducible from a number, so the run is
stamped ``"private": false`` (the privacy record says why).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from veil.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
KERNELS = ("auto", "fused", "opacus")  # clip-and-noise implementations; auto: fused, opacus under secure_mode
ENGINES = ("ghost", "opacus")  # how per-example norms are found: one backward (ghost) or Opacus's per-sample hooks


@dataclass
class DPConfig:
    """Privacy settings of one training run (YAML section ``dp``)."""

    enabled: bool = True
    target_epsilon: float | None = 8.0  # solve sigma for this epsilon over the planned steps ...
    noise_multiplier: float | None = None  # ... or give sigma directly (then target_epsilon must be null)
    max_grad_norm: float = 1.0  # C: per-sample clipping bound
    delta: float | None = None  # default min(1e-5, 0.1/N), N the training-set size; must be < 1/N
    accountant: str = "prv"
    noise_multiplicity: int = 1  # K noise draws per example averaged inside its loss (DPDM)
    max_physical_batch_size: int = 64  # logical (Poisson) batches are split into chunks this big
    engine: str = "ghost"  # per-example norms: ghost (one backward, no per-example grads) | opacus (hooks)
    kernel: str = "auto"  # clip-and-noise implementation: fused (veil.kernels) | opacus | auto
    secure_mode: bool = False  # refused: needs torchcsprng (see __post_init__)
    reproducible_noise_seed: int | None = None  # tests/debugging only: noise + batches from this seed, NOT private

    def __post_init__(self):
        seed = self.reproducible_noise_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ConfigError(f"must be null or an integer in [0, 2**63), got {seed!r}",
                              option="dp.reproducible_noise_seed")
        for name in ("enabled", "secure_mode"):  # a string "false" would be truthy: refuse, never guess
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"must be true or false, got {getattr(self, name)!r}", option=f"dp.{name}")
        if not self.enabled:
            return
        if self.secure_mode:
            raise ConfigError(
                ": Opacus's secure mode needs torchcsprng (unmaintained since 2021, not installed), "
                "and veil will not report secure noise it does not draw; set dp.secure_mode: false. veil's "
                "noise generators are already seeded from the OS CSPRNG in every process (see README, "
                "'What is protected and what is not')", option="dp.secure_mode")
        for name in ("target_epsilon", "noise_multiplier", "max_grad_norm", "delta"):
            value = getattr(self, name)
            if isinstance(value, str):  # YAML 1.1 reads 1e-6 as a string; "nan" and "inf" fail below
                try:
                    value = float(value)
                    setattr(self, name, value)
                except ValueError:
                    pass
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ConfigError(f"must be a finite number, got {value!r}", option=f"dp.{name}")
        for name in ("noise_multiplicity", "max_physical_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"must be an integer >= 1, got {value!r}", option=f"dp.{name}")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ConfigError("dp: set dp.target_epsilon or dp.noise_multiplier (or dp.enabled: false)")
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ConfigError("dp: dp.target_epsilon and dp.noise_multiplier are exclusive; set one to null")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"must be > 0, got {self.target_epsilon}", option="dp.target_epsilon")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"must be >= 0, got {self.noise_multiplier}", option="dp.noise_multiplier")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"must be > 0, got {self.max_grad_norm}", option="dp.max_grad_norm")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"must be in (0, 1), got {self.delta}", option="dp.delta")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"must be one of {ACCOUNTANTS}, got {self.accountant!r}", option="dp.accountant")
        if self.noise_multiplicity < 1:
            raise ConfigError(f"must be >= 1, got {self.noise_multiplicity}", option="dp.noise_multiplicity")
        if self.max_physical_batch_size < 1:
            raise ConfigError(f"must be >= 1, got {self.max_physical_batch_size}", option="dp.max_physical_batch_size")
        if self.engine not in ENGINES:
            raise ConfigError(f"must be one of {ENGINES}, got {self.engine!r}", option="dp.engine")
        if self.kernel not in KERNELS:
            raise ConfigError(f"must be one of {KERNELS}, got {self.kernel!r}", option="dp.kernel")

    @property
    def reproducible(self) -> bool:
        """True when noise and batches come from ``reproducible_noise_seed``: the run is not private."""
        return self.reproducible_noise_seed is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_delta(train_size: int) -> float:
    """min(1e-5, 0.1 / N): well below 1/N, where DP stops meaning anything."""
    return min(1e-5, 0.1 / train_size)


def check_delta(delta: float, *, train_size: int) -> float:
    """delta, refused (ConfigError) when >= 1/N."""
    if not delta < 1.0 / train_size:
        raise ConfigError(
            f"={delta:g} is >= 1/N = {1.0 / train_size:g} (N = {train_size} training images): at delta = 1/N "
            "a mechanism that publishes one random record in full meets the guarantee. Use a much smaller delta, "
            f"e.g. the default min(1e-5, 0.1/N) = {default_delta(train_size):g} (set dp.delta: null)",
            option="dp.delta")
    return delta
