"""Privacy levels a person can pick: low | medium | high | max, each an (epsilon, strength) pair.

    level    epsilon  strength  attribute kept with  what it means
    low        4.0      0.40        98.2 %          light touch: identity and pose stay, the attribute
                                                    is almost always released as it is
    medium     2.0      0.55        88.1 %          about one protected attribute in eight is flipped
    high       1.0      0.70        73.1 %          one in four flipped; the image is redrawn more deeply
    max        0.0      0.95        50.0 %          a fair coin: the released value says nothing about
                                                    the original; the image keeps only coarse layout

epsilon is the randomized-response level of each protected attribute (see mechanism.py): an
attacker who sees only the released value guesses the original right with probability at most
e^eps / (1 + e^eps). strength (t0 / T in (0, 1]) is how far the image is pushed into noise before
it is redrawn under the released attributes. The two move together because the guarantee covers
the released *values* only: the pixels still carry what inversion kept, and a weak edit at a small
epsilon would release a flipped label on an image that still shows the original. Stronger levels
therefore redraw more of the image (docs/editing.md measures how much the pixels still leak).

Why 0.0 for max: it is the only epsilon at which the released value is independent of the
original, the strongest promise randomized response can make. It costs no budget, so the ledger
does not limit how often an image is released at max; each release still leaks through the pixels
(measured, not bounded), which is why the ledger records every release regardless of epsilon.

Experts may give epsilon and strength directly (``resolve_level(epsilon=..., strength=...)``);
the result is a level named "custom".
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.errors import ConfigError
from veil.privacy.mechanism import check_epsilon, json_epsilon, keep_probability

__all__ = ["PrivacyLevel", "LEVELS", "LEVEL_NAMES", "resolve_level", "more_private", "less_private", "check_strength"]


def check_strength(strength, *, option: str = "strength") -> float:
    """strength as a float in (0, 1]; ConfigError naming ``option`` otherwise."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ConfigError(f"{option}={strength!r}: must be in (0, 1] (the fraction of the noise schedule inverted)")
    return float(strength)


@dataclass(frozen=True)
class PrivacyLevel:
    """A named (epsilon, strength) pair; ``keep_probability`` is the randomized-response ceiling."""

    name: str
    epsilon: float
    strength: float

    def __post_init__(self):
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        object.__setattr__(self, "strength", check_strength(self.strength))

    @property
    def keep_probability(self) -> float:
        return keep_probability(epsilon=self.epsilon)

    def to_json(self) -> dict:
        return {"name": self.name, "epsilon": json_epsilon(self.epsilon), "strength": self.strength}


LEVELS: dict[str, PrivacyLevel] = {
    "low": PrivacyLevel("low", 4.0, 0.40),
    "medium": PrivacyLevel("medium", 2.0, 0.55),
    "high": PrivacyLevel("high", 1.0, 0.70),
    "max": PrivacyLevel("max", 0.0, 0.95),
}
LEVEL_NAMES = tuple(LEVELS)  # least to most private


def resolve_level(level: str | None = "medium", *, epsilon: float | None = None,
                  strength: float | None = None) -> PrivacyLevel:
    """A named level, with epsilon and/or strength overriding it (then named "custom").

    ConfigError names the option (--level, --epsilon, --strength) that is wrong.
    """
    if level is None:
        level = "medium"
    if level not in LEVELS:
        raise ConfigError(f"--level {level!r}: choose one of {list(LEVEL_NAMES)} (or give --epsilon and --strength)")
    base = LEVELS[level]
    if epsilon is None and strength is None:
        return base
    eps = base.epsilon if epsilon is None else check_epsilon(epsilon, option="--epsilon")
    s = base.strength if strength is None else check_strength(strength, option="--strength")
    return PrivacyLevel("custom", eps, s)


def more_private(level: PrivacyLevel) -> PrivacyLevel:
    """The next named level that is more private (smaller epsilon, or equal epsilon and a stronger
    edit); max stays max. A custom level moves to the nearest such named level."""
    stricter = [lv for lv in LEVELS.values()
                if (lv.epsilon, -lv.strength) < (level.epsilon, -level.strength)]
    return stricter[0] if stricter else level


def less_private(level: PrivacyLevel) -> PrivacyLevel:
    """The next named level that is less private; low stays low."""
    looser = [lv for lv in LEVELS.values()
              if (lv.epsilon, -lv.strength) > (level.epsilon, -level.strength)]
    return looser[-1] if looser else level
