"""The prior-aware bound on attribute inference from a randomized-response release (issue 11, item 15)."""

import itertools
import math
import subprocess
import sys

import pytest

from veil.errors import ConfigError
from veil.privacy.bounds import bayes_accuracy_bound
from veil.privacy.mechanism import keep_probability

EPSILONS = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf]
PRIORS = [0.0, 0.01, 0.065, 0.3, 0.5, 0.7, 0.935, 1.0]


def _best_rule_by_enumeration(epsilon: float, prior: float) -> float:
    """Ground truth: the accuracy of every decision rule r -> guess (4 of them), the best one."""
    keep = keep_probability(epsilon=epsilon)
    p_r_given_a = {(r, a): keep if r == a else 1 - keep for r in (-1, 1) for a in (-1, 1)}
    p_a = {1: prior, -1: 1 - prior}
    rules = [dict(zip((-1, 1), guesses)) for guesses in itertools.product((-1, 1), repeat=2)]
    return max(sum(p_a[a] * p_r_given_a[r, a] for a in (-1, 1) for r in (-1, 1) if rule[r] == a) for rule in rules)


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_fifty_fifty_prior_gives_the_keep_probability(epsilon):
    assert bayes_accuracy_bound(epsilon=epsilon, prior=0.5) == pytest.approx(keep_probability(epsilon=epsilon))


def test_skewed_attribute_always_no_is_the_best_rule_at_epsilon_1():
    # eyeglasses, about 6.5% positive in CelebA: at epsilon 1 (p_keep 0.731) the released value never
    # outweighs the prior, so the best attacker says "no" whatever it sees, and is right 93.5% of the time.
    assert keep_probability(epsilon=1.0) == pytest.approx(0.731, abs=5e-4)
    assert bayes_accuracy_bound(epsilon=1.0, prior=0.065) == pytest.approx(0.935)


@pytest.mark.parametrize("prior", PRIORS)
def test_epsilon_zero_gives_the_majority_and_infinity_gives_one(prior):
    assert bayes_accuracy_bound(epsilon=0.0, prior=prior) == pytest.approx(max(prior, 1 - prior))
    assert bayes_accuracy_bound(epsilon=math.inf, prior=prior) == pytest.approx(1.0)


@pytest.mark.parametrize("prior", PRIORS)
def test_monotone_in_epsilon_symmetric_in_the_prior_and_the_best_decision_rule(prior):
    bounds = [bayes_accuracy_bound(epsilon=e, prior=prior) for e in EPSILONS]
    assert all(b1 <= b2 + 1e-12 for b1, b2 in zip(bounds, bounds[1:]))
    for e, b in zip(EPSILONS, bounds):
        assert b == pytest.approx(bayes_accuracy_bound(epsilon=e, prior=1 - prior))
        assert b == pytest.approx(_best_rule_by_enumeration(e, prior))
        assert max(prior, 1 - prior) - 1e-12 <= b <= 1 + 1e-12


@pytest.mark.parametrize("prior", [0.065, 0.3, 0.5])
@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0])
def test_posterior_odds_within_e_eps_times_prior_odds(prior, epsilon):
    # The guarantee the bound follows from: seeing r moves the odds of a = +1 by at most e^eps.
    keep = keep_probability(epsilon=epsilon)
    prior_odds = prior / (1 - prior)
    for r in (-1, 1):
        like_pos, like_neg = (keep, 1 - keep) if r == 1 else (1 - keep, keep)  # P(r | a=+1), P(r | a=-1)
        posterior_odds = prior * like_pos / ((1 - prior) * like_neg)
        lo, hi = math.exp(-epsilon) * prior_odds, math.exp(epsilon) * prior_odds
        assert lo * (1 - 1e-9) <= posterior_odds <= hi * (1 + 1e-9)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_prior_is_checked(bad):
    with pytest.raises(ConfigError, match="prior"):
        bayes_accuracy_bound(epsilon=1.0, prior=bad)
    with pytest.raises(ConfigError, match="epsilon"):
        bayes_accuracy_bound(epsilon=-1.0, prior=0.5)


def test_imports_no_torch():
    code = "import sys, veil.privacy.bounds; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
