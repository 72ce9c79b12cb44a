"""Privacy accounting of one DP-SGD run: sigma, delta, Opacus's accountant, and the one privacy record.

``resolve_noise_multiplier`` and the accountants are called exactly as Opacus's
``PrivacyEngine.make_private_with_epsilon`` calls them. ``PrivacyAccounting.record`` is the only
place the ``privacy`` record of checkpoints, privacy.json and exports is assembled.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from veil.lightning_modules.dp.config import DPConfig, check_delta, default_delta
from veil.privacy.mechanism import json_epsilon
from veil.privacy.randomness import REPRODUCIBLE_REASON


def resolve_noise_multiplier(
    cfg: DPConfig, *, sample_rate: float, steps: int, delta: float
) -> float:
    """sigma: given directly, or solved so that epsilon(steps) = target_epsilon (Opacus's search)."""
    if cfg.noise_multiplier is not None:
        return float(cfg.noise_multiplier)
    return _solve_noise_multiplier(float(cfg.target_epsilon), float(delta), float(sample_rate), int(steps),
                                   cfg.accountant)


@functools.lru_cache(maxsize=256)
def _solve_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                            accountant: str) -> float:
    """Opacus's search, once per process for the same public inputs (it is deterministic; a PRV search takes
    ~17 epsilons, seconds on a CPU)."""
    from opacus.accountants.utils import get_noise_multiplier

    memoize_opacus_rdp()
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    )


def memoize_opacus_rdp() -> None:
    """Memoise Opacus's RDP of the sampled Gaussian mechanism at one order, ``_compute_rdp(q, sigma, alpha)``:
    a pure function of three numbers, ~3 ms at a fractional order (a series in pure Python). Every PRV epsilon
    asks for it at Opacus's 156 orders twice for the same (q, sigma) (the composition and the one step that size
    the discretisation domain), so a PRV epsilon, and the noise search made of them, takes half the time; the
    results are the same bits (the same function of the same numbers). Idempotent, for the whole process."""
    from opacus.accountants.analysis import rdp
    from opacus.accountants.analysis.prv import prvs

    if getattr(rdp._compute_rdp, "veil_memoized", False):
        return
    original = rdp._compute_rdp
    cached = functools.lru_cache(maxsize=1 << 16)(original)

    @functools.wraps(original)
    def compute_rdp(q, sigma, alpha):
        try:
            return cached(q, sigma, alpha)
        except TypeError:  # an unhashable argument (an array): not memoised
            return original(q, sigma, alpha)

    compute_rdp.veil_memoized, compute_rdp.cache_info = True, cached.cache_info
    rdp._compute_rdp = prvs._compute_rdp = compute_rdp


def make_accountant(name: str):
    from opacus.accountants import create_accountant

    memoize_opacus_rdp()
    return create_accountant(name)


def epsilon_of(accountant, *, delta: float) -> float:
    """Current epsilon; 0 before the first step (Opacus's PRV raises on an empty history)."""
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


class PrivacyAccounting:
    """Sigma, delta, accountant and step count of one training run: the bookkeeping every DP
    module shares. Non-private runs (``cfg.enabled`` false) count steps and report no guarantee."""

    def __init__(self, cfg: DPConfig, *, train_size: int, sample_rate: float, planned_steps: int):
        self.cfg, self.sample_rate, self.steps = cfg, sample_rate, 0
        self.delta = check_delta(cfg.delta if cfg.delta is not None else default_delta(train_size),
                                 train_size=train_size)
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
        """Epsilon at ``delta`` after the steps so far; computed once per accountant state (a PRV epsilon takes
        about a second, and the record, the logs and the checkpoints each ask for it)."""
        if self.accountant is None or self.noise_multiplier == 0:
            return math.inf  # no noise, no guarantee (the accountants diverge at sigma = 0)
        key = (tuple(tuple(h) for h in self.accountant.history), self.delta)
        if getattr(self, "_epsilon_key", None) != key:
            self._epsilon_key, self._epsilon = key, epsilon_of(self.accountant, delta=self.delta)
        return self._epsilon

    def record(self, *, initialized_from: dict[str, Any] | None = None,
               trainable_parameters: int | None = None) -> dict[str, Any]:
        """The ``privacy`` record of checkpoints, privacy.json and exports.

        ``initialized_from``: where the weights started (``model.init_from``; epsilon covers this
        run's data only, the start's own record is inside); ``trainable_parameters``: how many
        scalars DP-SGD trained when that is a subset.
        """
        if self.accountant is None:
            record: dict[str, Any] = {"enabled": False, "epsilon": None, "steps": self.steps}
        else:
            record = {
                "enabled": True,
                "epsilon": json_epsilon(self.epsilon(), infinite=None),  # null = unbounded (sigma = 0)
                "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.cfg.max_grad_norm,
                "sample_rate": self.sample_rate,
                "steps": self.steps,
                "accountant": self.cfg.accountant,
                "noise_multiplicity": self.cfg.noise_multiplicity,
            }
        reason = self.not_private_reason()
        record["private"] = reason is None
        if reason is not None:
            record["not_private_reason"] = reason
        if initialized_from:
            record["initialized_from"] = initialized_from
        if trainable_parameters is not None:
            record["trainable_parameters"] = trainable_parameters
        return record

    def not_private_reason(self) -> str | None:
        """Why this run carries no DP guarantee, or None when it does."""
        if self.accountant is None:
            return "dp.enabled is false: trained without DP-SGD"
        if self.noise_multiplier == 0:
            return "dp.noise_multiplier is 0: no noise, no guarantee"
        if self.cfg.reproducible:
            return REPRODUCIBLE_REASON
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the accounting (the record itself is written beside it)."""
        return {
            "dp_steps": self.steps,
            "accountant_state": self.accountant.state_dict() if self.accountant is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the step count, the accountant's history, and the sigma the run started with."""
        self.steps = int(state.get("dp_steps", 0))
        if self.accountant is not None and state.get("accountant_state") is not None:
            self.noise_multiplier = float((state.get("privacy") or {}).get("noise_multiplier", self.noise_multiplier))
            self.accountant.load_state_dict(state["accountant_state"])


class AccountedModule:
    """Mixin for a LightningModule with ``self.accounting`` (a PrivacyAccounting): read-only views.

    ``privacy_provenance`` (override) adds what the record says beyond the accounting itself."""

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

    def privacy_provenance(self) -> dict[str, Any]:
        return {}

    def privacy(self) -> dict[str, Any]:
        return self.accounting.record(**self.privacy_provenance())
