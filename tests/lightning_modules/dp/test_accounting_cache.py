"""PrivacyAccounting.epsilon is computed once per accountant state (PRV takes about a second per call) and is
never stale: a step or a resumed history gives a new value, equal to a fresh accountant's."""

import pytest

from veil.lightning_modules.dp.accounting import PrivacyAccounting, epsilon_of, make_accountant
from veil.lightning_modules.dp.config import DPConfig


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_epsilon_is_computed_once_per_state_and_follows_every_step(name, monkeypatch):
    acc = PrivacyAccounting(DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=None, accountant=name),
                            train_size=1000, sample_rate=0.05, planned_steps=10)
    calls = []
    real = type(acc.accountant).get_epsilon
    monkeypatch.setattr(type(acc.accountant), "get_epsilon", lambda self, **kw: calls.append(kw) or real(self, **kw))
    acc.step()
    first = acc.epsilon()
    assert acc.epsilon() == first and acc.record()["epsilon"] == first and len(calls) == 1
    acc.step()
    second = acc.epsilon()
    assert second > first and len(calls) == 2
    fresh = make_accountant(name)
    for _ in range(2):
        fresh.step(noise_multiplier=1.0, sample_rate=0.05)
    assert second == pytest.approx(epsilon_of(fresh, delta=acc.delta))
    other = PrivacyAccounting(DPConfig(enabled=True, noise_multiplier=1.0, target_epsilon=None, accountant=name),
                              train_size=1000, sample_rate=0.05, planned_steps=10)
    other.step()
    assert other.epsilon() == pytest.approx(first)
    other.load_state_dict(acc.state_dict())  # a resume: the history changes, so does epsilon
    assert other.epsilon() == pytest.approx(second)


def test_opacus_rdp_memo_returns_the_same_bits_and_is_used_by_prv():
    """The memoised ``_compute_rdp`` (Opacus's RDP at one order) equals the original on every input, a repeat is
    a cache hit, an unhashable argument still works, and a PRV epsilon goes through it."""
    import numpy as np
    from opacus.accountants.analysis import rdp
    from opacus.accountants.analysis.prv import prvs

    from veil.lightning_modules.dp.accounting import memoize_opacus_rdp

    memoize_opacus_rdp()
    memoize_opacus_rdp()  # idempotent: one wrapper, not two
    memo, original = rdp._compute_rdp, rdp._compute_rdp.__wrapped__
    assert prvs._compute_rdp is memo and not getattr(original, "veil_memoized", False)
    for q, sigma, alpha in [(0.01, 1.1, 1.5), (0.3, 0.7, 2.0), (0.05, 3.0, 32.0), (0.0, 1.0, 1.5), (1.0, 2.0, 4.0),
                            (0.2, 0.0, 1.5), (0.1, 1.0, float("inf"))]:
        assert memo(q, sigma, alpha) == original(q, sigma, alpha)
    hits = memo.cache_info().hits
    assert memo(0.01, 1.1, 1.5) == original(0.01, 1.1, 1.5) and memo.cache_info().hits == hits + 1
    alpha = np.array(1.5)  # a 0-d array: a number to Opacus, unhashable to the memo, so computed each time
    assert memo(0.01, 1.1, alpha) == original(0.01, 1.1, 1.5) and memo.cache_info().hits == hits + 1
    acc = make_accountant("prv")
    acc.step(noise_multiplier=0.913, sample_rate=0.0371)
    misses = memo.cache_info().misses
    epsilon_of(acc, delta=1e-5)
    assert memo.cache_info().misses > misses  # the PRV domain's RDP went through the memo


def test_the_noise_search_runs_once_for_the_same_public_inputs():
    from veil.lightning_modules.dp.accounting import _solve_noise_multiplier, resolve_noise_multiplier

    cfg = DPConfig(enabled=True, noise_multiplier=None, target_epsilon=3.0, accountant="rdp")
    hits = _solve_noise_multiplier.cache_info().hits
    sigma = resolve_noise_multiplier(cfg, sample_rate=0.02, steps=50, delta=1e-5)
    assert resolve_noise_multiplier(cfg, sample_rate=0.02, steps=50, delta=1e-5) == sigma
    assert _solve_noise_multiplier.cache_info().hits == hits + 1
    assert resolve_noise_multiplier(cfg, sample_rate=0.02, steps=60, delta=1e-5) > sigma  # other inputs: solved
    acc = make_accountant("rdp")
    acc.step(noise_multiplier=sigma, sample_rate=0.02)
    acc.history[-1] = (sigma, 0.02, 50)
    assert 2.98 <= epsilon_of(acc, delta=1e-5) <= 3.0  # Opacus's search: within its tolerance under the target
