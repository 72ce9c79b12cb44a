"""The price of a release, in both channels a recipient gets, composed per record with a library accountant.

A release of a record (one face and its attributes) gives its recipient two things:

* **labels**: each protected attribute through randomized response at epsilon (``mechanism.py``): one
  epsilon-LDP event per protected attribute (``RandomizedResponseDpEvent``, 2 buckets, noise parameter
  2 / (1 + e^epsilon));
* **pixels**: the edit, computed from the encoding of the image. The ``noise`` encoding
  x_t0 = sqrt(a) x0 + sqrt(1 - a) z (fresh secret z) is a Gaussian mechanism on x0: divided by sqrt(1 - a) it is
  x0 sqrt(a / (1 - a)) + N(0, I), so for images whose L2 distance is at most ``sensitivity`` it is mu-GDP with
  mu = sqrt(a / (1 - a)) * sensitivity (``gaussian_mu``). The code *enforces* the sensitivity: the encoder clips
  x0 to the pixel domain [-1, 1] first, so two images of shape (3, H, W) differ by at most 2 sqrt(3 H W) in L2
  (``image_sensitivity``; 111 at 32x32). Everything after the encoding (the model's regeneration, guided by the
  released labels) is post-processing. A re-do of an edit draws a new encoding: every attempt the check may
  make is charged (``price_release`` takes one mu per attempt), so whether a record was re-done is in the price.
  ``fresh`` does not read the image (x_t0 is pure noise): mu = 0, a price of zero *proven* by construction.
  ``invert`` (DDIM inversion) is deterministic and nearly invertible: no bound, mu = inf; it can only be
  released under a dataset policy that says the pixels are not protected (``PIXEL_POLICIES``).

``compose(prices, delta=...)`` composes every release of a record, both channels, with dp-accounting's
privacy-loss-distribution accountant (``PLDAccountant``, ``REPLACE_ONE``: the record's image and protected
attributes replaced, its unprotected attributes, published exactly by the owner's choice, kept). Gaussian
releases compose exactly (mu adds in quadrature) before they reach the accountant. The result is the record's
(epsilon, delta); the ledger refuses a release that would take it past the dataset's budget.

Two dp-accounting 0.6.0 details this module works around (tests pin both): the accountant's
``compose(RandomizedResponseDpEvent, count)`` ignores ``count`` (so each randomized response is composed on its
own), and under ``REPLACE_ONE`` a ``GaussianDpEvent`` has sensitivity 2 (so noise_multiplier = 2 / mu).
Torch-free.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from veil.errors import ConfigError
from veil.privacy.mechanism import check_epsilon, json_epsilon

__all__ = ["DEFAULT_RELEASE_DELTA", "PIXEL_POLICIES", "ENCODING_PIXELS", "image_sensitivity", "gaussian_mu",
           "ReleasePrice", "price_release", "Guarantee", "compose", "check_delta", "check_pixel_policy"]

DEFAULT_RELEASE_DELTA = 1e-6  # per record: the chance the epsilon bound fails for that person
PIXEL_POLICIES = ("protected", "not-protected")  # a dataset's pixels: priced and limited, or labels only
ENCODING_PIXELS = {"fresh": "the image is not read (pure noise): nothing about the pixels",
                   "noise": "a Gaussian mechanism on the image clipped to [-1, 1]",
                   "invert": "DDIM inversion: no bound (pixels not protected)"}


def check_delta(delta, *, option: str = "delta") -> float:
    """delta as a float in (0, 1); ConfigError naming ``option`` otherwise."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"={delta!r}: must be a number in (0, 1) (the chance the epsilon bound fails)", option=option)
    return float(delta)


def check_pixel_policy(policy, *, option: str = "pixels") -> str:
    if policy not in PIXEL_POLICIES:
        raise ConfigError(f"={policy!r}: choose one of {list(PIXEL_POLICIES)} (protected: the pixels are priced and "
                          f"limited by the budget; not-protected: only the labels are)", option=option)
    return policy


def image_sensitivity(shape: Sequence[int]) -> float:
    """L2 diameter of the pixel domain [-1, 1]^shape: 2 sqrt(prod(shape)) (the encoder clips to it)."""
    n = math.prod(int(s) for s in shape)
    if n <= 0:
        raise ConfigError(f"image shape {tuple(shape)}: needs at least one pixel value")
    return 2.0 * math.sqrt(n)


def gaussian_mu(*, signal: float, sensitivity: float) -> float:
    """mu of x_t0 = sqrt(signal) x0 + sqrt(1 - signal) z for x0 within ``sensitivity`` of each other (L2):
    sqrt(signal / (1 - signal)) * sensitivity; 0 when no signal survives, inf when no noise is added."""
    if not 0 <= signal <= 1 or math.isnan(signal):
        raise ConfigError(f"signal fraction (alpha_prod at t0) {signal!r}: must be in [0, 1]")
    if signal == 0:
        return 0.0
    if signal >= 1:
        return math.inf
    return math.sqrt(signal / (1.0 - signal)) * float(sensitivity)


@dataclass(frozen=True)
class ReleasePrice:
    """What one release of a record costs: ``labels`` randomized responses at ``label_epsilon`` each, and a
    Gaussian mechanism of ``pixel_mu`` on the pixels (all attempts composed; 0 = not read, inf = unbounded)."""

    label_epsilon: float
    labels: int
    pixel_mu: float
    encoding: str

    def __post_init__(self):
        object.__setattr__(self, "label_epsilon", check_epsilon(self.label_epsilon))
        mu = self.pixel_mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or math.isnan(mu) or mu < 0:
            raise ConfigError(f"pixel mu {mu!r}: must be a number >= 0 (inf: no bound)")
        if isinstance(self.labels, bool) or not isinstance(self.labels, int) or self.labels < 0:
            raise ConfigError(f"labels {self.labels!r}: the number of protected attributes, a whole number >= 0")

    @property
    def pixels_bounded(self) -> bool:
        return math.isfinite(self.pixel_mu)

    def to_json(self) -> dict:
        return {"label_epsilon": json_epsilon(self.label_epsilon), "labels": self.labels,
                "pixel_mu": json_epsilon(self.pixel_mu), "encoding": self.encoding}

    @classmethod
    def from_json(cls, d: Mapping) -> "ReleasePrice":
        num = lambda v: math.inf if v in ("inf", None) else float(v)  # noqa: E731
        return cls(num(d["label_epsilon"]), int(d["labels"]), num(d["pixel_mu"]), str(d.get("encoding", "?")))


def price_release(*, epsilon: float, protected: Sequence[str], encoding: str,
                  pixel_mus: Sequence[float]) -> ReleasePrice:
    """The price of a release at ``epsilon`` protecting ``protected``, whose edit may encode the image once per
    entry of ``pixel_mus`` (the first try and each re-do the check may ask for): they compose in quadrature."""
    mus = [float(m) for m in pixel_mus]
    if any(math.isnan(m) or m < 0 for m in mus):
        raise ConfigError(f"pixel mus {mus}: must be numbers >= 0")
    total = math.inf if any(math.isinf(m) for m in mus) else math.sqrt(sum(m * m for m in mus))
    return ReleasePrice(check_epsilon(epsilon), len(set(protected)), total, str(encoding))


@dataclass(frozen=True)
class Guarantee:
    """A record's composed guarantee: (``epsilon``, ``delta``)-DP over ``releases`` releases, and each channel on
    its own at the same delta. ``pixels_protected`` False: the dataset's policy leaves pixels out (``epsilon`` is
    the labels' alone, ``pixels_epsilon`` what the pixels would cost, inf for inversion)."""

    epsilon: float
    delta: float
    labels_epsilon: float
    pixels_epsilon: float
    pixel_mu: float
    pixels_protected: bool
    releases: int

    def to_json(self) -> dict:
        return {"epsilon": json_epsilon(self.epsilon), "delta": self.delta,
                "labels_epsilon": json_epsilon(self.labels_epsilon), "pixels_epsilon": json_epsilon(self.pixels_epsilon),
                "pixel_mu": json_epsilon(self.pixel_mu), "pixels_protected": self.pixels_protected,
                "releases": self.releases}


def _discretization(mu: float) -> float:
    """PLD grid step: fine for small losses, coarser for the thousands a sharp image costs (the accountant rounds
    pessimistically, so a coarser grid only makes the bound looser, never wrong)."""
    return max(1e-4, (mu * mu + 10.0 * mu) / 2e4)


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(label_events: tuple[tuple[float, int], ...], mu: float, delta: float) -> float:
    """epsilon at ``delta`` of randomized responses ((epsilon, count), ...) and one mu-GDP Gaussian."""
    if mu == math.inf or any(e == math.inf and n for e, n in label_events):
        return math.inf
    events = [(e, n) for e, n in label_events if e > 0 and n > 0]
    if mu == 0 and not events:
        return 0.0
    import dp_accounting  # imported here: a second or so, only when something is priced
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                        value_discretization_interval=_discretization(mu))
    if mu > 0:
        acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier=2.0 / mu))  # sensitivity 2 under REPLACE_ONE
    for e, n in events:
        p = 2.0 / (1.0 + math.exp(e))  # P(replaced by a uniform bucket): flip probability 1 / (1 + e^eps)
        if p <= 0:
            return math.inf
        for _ in range(n):  # 0.6.0's compose(event, count) ignores count for randomized response
            acc.compose(dp_accounting.RandomizedResponseDpEvent(noise_parameter=p, num_buckets=2))
    eps = float(acc.get_epsilon(delta))
    if mu == 0:  # labels alone: basic composition (the sum) holds at any delta, and PLD's grid rounds up ~1e-4
        eps = min(eps, math.fsum(e * n for e, n in events))
    return eps


def compose(prices: Iterable[ReleasePrice], *, delta: float = DEFAULT_RELEASE_DELTA,
            pixels_protected: bool = True) -> Guarantee:
    """The record's (epsilon, delta) over ``prices`` (every release of it, refused ones included)."""
    delta = check_delta(delta)
    prices = list(prices)
    counts: dict[float, int] = {}
    for p in prices:
        counts[p.label_epsilon] = counts.get(p.label_epsilon, 0) + p.labels
    labels = tuple(sorted(counts.items()))
    mu = math.inf if any(not p.pixels_bounded for p in prices) else math.sqrt(sum(p.pixel_mu ** 2 for p in prices))
    mu_key = mu if math.isinf(mu) else round(mu, 9)
    labels_eps = _pld_epsilon(labels, 0.0, delta)
    pixels_eps = _pld_epsilon((), mu_key, delta)
    both = _pld_epsilon(labels, mu_key, delta) if pixels_protected else labels_eps
    return Guarantee(both, delta, labels_eps, pixels_eps, mu, pixels_protected, len(prices))
