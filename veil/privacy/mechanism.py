"""Randomized response on binary attributes: the mechanism behind a private edit's released attributes.

For one attribute with value a in {-1, +1} and privacy level epsilon:

    released = a     with probability p_keep = e^eps / (1 + e^eps)
             = -a    with probability 1 - p_keep = 1 / (1 + e^eps)

which is epsilon-local-DP: P(released | a) / P(released | -a) <= p_keep / (1 - p_keep) = e^eps.
eps = 0 is a fair coin (the released value says nothing), eps = inf keeps always (no privacy).
Each protected attribute is drawn independently; unprotected attributes pass through unchanged.
A release is therefore epsilon-LDP for each protected attribute on its own (what an attacker after
one attribute faces, and what the ledger charges); for the joint vector of m protected attributes
the bound is m * epsilon.

Seeds: a known seed lets anyone redo the coin flips and undo the mechanism. ``secure_seed()``
draws one from the OS; ``derive_seed(seed, ...)`` makes reproducible, independent streams from a
seed the owner keeps secret (tests, experiments).
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from typing import Mapping, Sequence

from veil.errors import ConfigError

__all__ = ["keep_probability", "flip_probability", "randomized_response", "privatize",
           "outcome_probability", "derive_seed", "secure_seed", "check_epsilon", "json_epsilon"]


def check_epsilon(epsilon, *, option: str = "epsilon") -> float:
    """epsilon as a float in [0, inf]; ConfigError naming ``option`` otherwise."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or math.isnan(epsilon) or epsilon < 0:
        raise ConfigError(f"={epsilon!r}: must be a number >= 0 (0 = fair coin, inf = no privacy)", option=option)
    return float(epsilon)


def json_epsilon(epsilon: float, *, infinite="inf"):
    """epsilon for a JSON file: the number when finite, else ``infinite`` ("inf", or None for null)."""
    return epsilon if math.isfinite(epsilon) else infinite


def keep_probability(*, epsilon: float) -> float:
    """p_keep = e^eps / (1 + e^eps) = 1 / (1 + e^-eps) (the second form does not overflow)."""
    return 1.0 / (1.0 + math.exp(-check_epsilon(epsilon)))


def flip_probability(*, epsilon: float) -> float:
    """1 - p_keep = 1 / (1 + e^eps)."""
    return 1.0 - keep_probability(epsilon=epsilon)


def randomized_response(value: int, *, epsilon: float, rng: random.Random) -> int:
    """One draw: ``value`` (-1 or +1) kept with probability p_keep, else flipped."""
    if value not in (-1, 1):
        raise ConfigError(f"randomized response needs a known binary value (-1 or +1), got {value!r}")
    return value if rng.random() < keep_probability(epsilon=epsilon) else -value


def privatize(attributes: Mapping[str, int], *, protected: Sequence[str], epsilon: float,
              rng: random.Random) -> dict[str, int]:
    """Released attributes: each protected one through its own randomized response, the rest unchanged.

    Draws happen in the order of ``attributes`` (not of ``protected``), so a seed gives the same
    release whatever order the caller lists the protected names in.
    """
    unknown = sorted(set(protected) - set(attributes))
    if unknown:
        raise ConfigError(f"protected attributes {unknown} are not among {list(attributes)}")
    protected = set(protected)
    return {name: (randomized_response(int(v), epsilon=epsilon, rng=rng) if name in protected else int(v))
            for name, v in attributes.items()}


def outcome_probability(original: Mapping[str, int], released: Mapping[str, int], *,
                        protected: Sequence[str], epsilon: float) -> float:
    """P(released | original) under ``privatize`` (0 if an unprotected attribute changed)."""
    p_keep = keep_probability(epsilon=epsilon)
    prob = 1.0
    for name, value in original.items():
        if name in protected:
            prob *= p_keep if released[name] == value else 1.0 - p_keep
        elif released[name] != value:
            return 0.0
    return prob


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed determined by (seed, *parts): independent streams for each image and release.

    SHA-256 of the parts' reprs, so it is stable across processes and Python versions (unlike hash()).
    """
    text = repr((int(seed),) + tuple(parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def secure_seed() -> int:
    """A 63-bit seed from the OS's randomness: the default for releases (nobody can redo the draws)."""
    return secrets.randbits(63)
