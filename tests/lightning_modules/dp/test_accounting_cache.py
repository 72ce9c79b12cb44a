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
