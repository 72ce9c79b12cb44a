"""Randomized response and the privacy levels: keep rates, seeds, level moves; the package imports no torch."""

import math
import random
import subprocess
import sys

import pytest

from veil.errors import ConfigError
from veil.privacy import levels, mechanism
from veil.privacy.mechanism import keep_probability, privatize, randomized_response

N_DRAWS = 20_000


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_keep_rate_matches_e_eps_over_1_plus_e_eps(epsilon):
    # Bound: the kept count is Binomial(N, p), std sqrt(p(1-p)/N) <= 0.0036 for N = 20000. We allow
    # 5 standard deviations (two-sided false-alarm probability < 6e-7 for a correct mechanism) plus
    # nothing else; a mechanism off by 0.02 in p (e.g. eps misread by ~10%) fails at every eps here.
    rng = random.Random(1234)
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    kept = sum(randomized_response(1, epsilon=epsilon, rng=rng) == 1 for _ in range(N_DRAWS))
    bound = 5 * math.sqrt(p * (1 - p) / N_DRAWS)
    assert abs(kept / N_DRAWS - p) <= bound, (kept / N_DRAWS, p, bound)


def test_draws_are_independent_across_attributes():
    # P(both kept) = p^2 for two protected attributes (independence), within 5 std of the binomial.
    rng, p = random.Random(7), keep_probability(epsilon=1.0)
    attrs = {"smiling": 1, "eyeglasses": -1, "hat": 1}
    draws = [privatize(attrs, protected=["smiling", "eyeglasses"], epsilon=1.0, rng=rng) for _ in range(N_DRAWS)]
    both = sum(d["smiling"] == 1 and d["eyeglasses"] == -1 for d in draws) / N_DRAWS
    assert abs(both - p * p) <= 5 * math.sqrt(p * p * (1 - p * p) / N_DRAWS)
    assert all(d["hat"] == 1 for d in draws)  # unprotected: unchanged


def test_extreme_epsilons():
    rng = random.Random(0)
    assert keep_probability(epsilon=math.inf) == 1.0 and keep_probability(epsilon=0.0) == 0.5
    assert all(randomized_response(-1, epsilon=math.inf, rng=rng) == -1 for _ in range(1000))
    assert keep_probability(epsilon=1000.0) == 1.0  # no overflow


def test_bad_inputs_are_config_errors():
    rng = random.Random(0)
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(ConfigError, match="epsilon"):
            randomized_response(1, epsilon=bad, rng=rng)
    with pytest.raises(ConfigError, match="binary"):
        randomized_response(0, epsilon=1.0, rng=rng)
    with pytest.raises(ConfigError, match="beard"):
        privatize({"smiling": 1}, protected=["beard"], epsilon=1.0, rng=rng)


def test_seeded_draws_repeat_and_derived_seeds_differ():
    attrs = {"a": 1, "b": -1, "c": 1}
    draws = lambda s: [privatize(attrs, protected=["a", "b"], epsilon=0.5, rng=r) for r in [random.Random(s)] * 20]
    assert draws(3) == draws(3) and draws(3) != draws(4)
    seeds = {mechanism.derive_seed(0, "img", "release", k) for k in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert mechanism.derive_seed(0, "img", 1) == mechanism.derive_seed(0, "img", 1)


def test_outcome_probability_sums_to_one():
    orig = {"a": 1, "b": -1, "c": 1}
    outcomes = [{"a": x, "b": y, "c": 1} for x in (-1, 1) for y in (-1, 1)]
    total = sum(mechanism.outcome_probability(orig, o, protected=["a", "b"], epsilon=1.3) for o in outcomes)
    assert total == pytest.approx(1.0)
    assert mechanism.outcome_probability(orig, {"a": 1, "b": -1, "c": -1}, protected=["a"], epsilon=1.0) == 0.0


def test_levels_order_and_moves():
    names = levels.LEVEL_NAMES
    assert names == ("low", "medium", "high", "max")
    eps = [levels.LEVELS[n].epsilon for n in names]
    strengths = [levels.LEVELS[n].strength for n in names]
    assert eps == sorted(eps, reverse=True) and strengths == sorted(strengths)
    assert levels.more_private(levels.LEVELS["medium"]).name == "high"
    assert levels.more_private(levels.LEVELS["max"]).name == "max"
    assert levels.less_private(levels.LEVELS["high"]).name == "medium"
    assert levels.less_private(levels.LEVELS["low"]).name == "low"
    custom = levels.resolve_level("high", epsilon=1.5)
    assert (custom.name, custom.epsilon, custom.strength) == ("custom", 1.5, levels.LEVELS["high"].strength)
    assert levels.more_private(custom).name == "high" and levels.less_private(custom).name == "medium"
    assert levels.LEVELS["max"].to_json()["encoding"] == levels.LEVELS["max"].encoding


def test_encoding_is_part_of_a_level_and_orders_it():
    """At equal epsilon and strength, fresh noise is more private than inversion (it forgets the pixels)."""
    base = levels.LEVELS["high"]
    other = "invert" if base.encoding == "noise" else "noise"
    custom = levels.resolve_level("high", encoding=other)
    assert (custom.name, custom.epsilon, custom.strength, custom.encoding) == ("custom", base.epsilon,
                                                                              base.strength, other)
    inverted, noised = (levels.PrivacyLevel("x", 1.0, 0.7, e) for e in ("invert", "noise"))
    assert inverted.order < noised.order
    assert levels.resolve_level("medium").encoding in levels.ENCODINGS
    with pytest.raises(ConfigError, match="--encoding"):
        levels.resolve_level("high", encoding="blur")
    with pytest.raises(ConfigError, match="--encoding"):
        levels.PrivacyLevel("x", 1.0, 0.7, "blur")


@pytest.mark.parametrize("kwargs, option", [
    (dict(level="extreme"), "--level"), (dict(level="high", epsilon=-1), "--epsilon"),
    (dict(level="high", strength=0.0), "--strength"), (dict(level="high", strength=1.5), "--strength"),
    (dict(level="high", encoding="sdedit"), "--encoding"),
])
def test_bad_levels_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        levels.resolve_level(**kwargs)


def test_privacy_package_imports_no_torch(tmp_path):
    code = ("import sys; import veil.privacy, veil.privacy.mechanism, "
            "veil.privacy.levels, veil.privacy.ledger, "
            "veil.privacy.session; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
