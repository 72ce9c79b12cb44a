"""veil.privacy.accounting: the price of a release in both channels (randomized response on the labels, a
Gaussian mechanism on the pixels) and its composition per record with dp-accounting's PLD accountant,
checked against closed forms: the analytic Gaussian, basic composition of pure-DP events, quadrature."""

import math

import pytest
from scipy.stats import norm

from veil.errors import ConfigError
from veil.privacy.accounting import (
    ReleasePrice,
    compose,
    gaussian_mu,
    image_sensitivity,
    price_release,
)

DELTA = 1e-6


def _gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of a mu-GDP mechanism (Dong, Roth, Su 2019, Cor. 2.13): the tight curve."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


def _gdp_epsilon(mu: float, delta: float) -> float:
    lo, hi = 0.0, 10.0 * mu * mu + 50.0
    for _ in range(200):  # delta(eps) decreases in eps: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gdp_delta(mid, mu) > delta else (lo, mid)
    return hi


def _pixels(mu):
    return ReleasePrice(0.0, 0, mu, "noise")


def _labels(eps, k=1):
    return ReleasePrice(eps, k, 0.0, "fresh")


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_a_gaussian_price_is_the_analytic_gaussian(mu):
    # The accountant's epsilon must be safe (the exact mu-GDP curve gives at most delta there) and tight (a
    # 1% smaller epsilon is not safe): this pins GaussianDpEvent's noise multiplier (2 / mu under REPLACE_ONE).
    got = compose([_pixels(mu)], delta=DELTA)
    assert _gdp_delta(got.epsilon, mu) <= DELTA
    assert _gdp_delta(0.99 * got.epsilon, mu) > DELTA
    assert got.epsilon == pytest.approx(_gdp_epsilon(mu, DELTA), rel=1e-2)
    assert (got.pixel_mu, got.pixels_epsilon, got.labels_epsilon, got.releases) == (mu, got.epsilon, 0.0, 1)


@pytest.mark.parametrize("eps", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_randomized_responses_compose_to_about_k_epsilon(eps, k):
    # Pure eps-DP events compose to at most k * eps (basic composition); at delta 1e-6 the PLD bound is barely
    # below it. k labels in one release and k releases of one label are the same events.
    for prices in ([_labels(eps, k)], [_labels(eps)] * k):
        got = compose(prices, delta=DELTA).epsilon
        assert k * eps - 0.01 <= got <= k * eps


def test_three_responses_cost_three_not_one():
    # dp-accounting 0.6.0's PLDAccountant.compose(RandomizedResponseDpEvent, count) ignores count: composed that
    # way, three responses at epsilon 1 would be priced as one.
    assert compose([_labels(1.0, 3)], delta=DELTA).epsilon == pytest.approx(3.0, abs=1e-3)
    assert compose([_labels(1.0, 1)] * 3, delta=DELTA).epsilon == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize("eps", [0.1, 0.5, 10.0])
def test_one_randomized_response_never_costs_more_than_its_epsilon(eps):
    # PLD's pessimistic grid (1e-4) alone would price it a step above eps, so a release exactly at a budget of
    # eps would be refused; labels alone are capped by basic composition, which holds at any delta
    assert compose([_labels(eps)], delta=DELTA).epsilon <= eps


def test_the_sensitivity_is_the_diameter_of_the_pixel_domain():
    assert image_sensitivity((3, 32, 32)) == 2 * math.sqrt(3072) == pytest.approx(110.85, abs=0.01)
    assert image_sensitivity((3, 64, 64)) == 2 * math.sqrt(3 * 64 * 64)
    with pytest.raises(ConfigError):
        image_sensitivity((3, 0, 32))


def test_gaussian_mu_and_its_edges():
    assert gaussian_mu(signal=0.0, sensitivity=111.0) == 0.0  # nothing of the image survives
    assert gaussian_mu(signal=1.0, sensitivity=111.0) == math.inf  # no noise at all
    assert gaussian_mu(signal=0.5, sensitivity=2.0) == pytest.approx(2.0)  # sqrt(a / (1 - a)) * sensitivity
    assert gaussian_mu(signal=0.2, sensitivity=10.0) == pytest.approx(10.0 * math.sqrt(0.25))
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ConfigError, match="signal"):
            gaussian_mu(signal=bad, sensitivity=1.0)


def test_price_release_composes_the_attempts_in_quadrature():
    p = price_release(epsilon=1.0, protected=["smiling", "hat", "smiling"], encoding="noise", pixel_mus=[3.0, 4.0])
    assert (p.label_epsilon, p.labels, p.pixel_mu, p.encoding) == (1.0, 2, pytest.approx(5.0), "noise")
    assert price_release(epsilon=1.0, protected=["x"], encoding="noise", pixel_mus=[1.0, math.inf]).pixel_mu == math.inf
    fresh = price_release(epsilon=0.0, protected=["x"], encoding="fresh", pixel_mus=[0.0, 0.0, 0.0])
    assert fresh.pixel_mu == 0.0 and fresh.pixels_bounded
    # the re-dos compose exactly like separate releases of the record
    assert compose([p]).pixels_epsilon == pytest.approx(compose([_pixels(3.0), _pixels(4.0)]).pixels_epsilon)
    assert compose([p]).pixels_epsilon == pytest.approx(compose([_pixels(5.0)]).pixels_epsilon)
    for bad in ([-1.0], [math.nan]):
        with pytest.raises(ConfigError, match="pixel mus"):
            price_release(epsilon=1.0, protected=["x"], encoding="noise", pixel_mus=bad)
    with pytest.raises(ConfigError):
        price_release(epsilon=-1.0, protected=["x"], encoding="fresh", pixel_mus=[0.0])
    with pytest.raises(ConfigError, match="pixel mu"):
        ReleasePrice(1.0, 1, -2.0, "noise")


def test_both_channels_compose_and_unprotected_pixels_leave_the_labels():
    labels, pixels = _labels(1.0, 2), _pixels(1.0)
    both = compose([labels, pixels], delta=DELTA)
    assert both.labels_epsilon == pytest.approx(2.0, abs=1e-4)
    assert both.pixels_epsilon == pytest.approx(compose([pixels]).epsilon)
    assert max(both.labels_epsilon, both.pixels_epsilon) < both.epsilon <= both.labels_epsilon + both.pixels_epsilon
    inverted = ReleasePrice(1.0, 2, math.inf, "invert")
    assert compose([labels, inverted]).epsilon == math.inf  # the pixels are protected: no bound
    mine = compose([labels, inverted], pixels_protected=False)
    assert not mine.pixels_protected and mine.pixels_epsilon == math.inf and mine.pixel_mu == math.inf
    assert mine.epsilon == mine.labels_epsilon == pytest.approx(4.0, abs=1e-4)
    assert compose([], delta=DELTA).epsilon == 0.0 and compose([_labels(0.0, 3), _pixels(0.0)]).epsilon == 0.0
    with pytest.raises(ConfigError, match="delta"):
        compose([labels], delta=0.0)


def test_a_price_round_trips_through_json():
    for p in (ReleasePrice(1.0, 2, 3.5, "noise"), ReleasePrice(4.0, 1, math.inf, "invert"),
              ReleasePrice(0.0, 1, 0.0, "fresh")):
        assert ReleasePrice.from_json(p.to_json()) == p
    g = compose([ReleasePrice(4.0, 1, math.inf, "invert")], pixels_protected=False).to_json()
    assert g["pixels_epsilon"] == "inf" and g["pixels_protected"] is False
