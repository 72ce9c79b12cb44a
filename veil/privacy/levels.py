"""Privacy levels a person can pick: low | medium | high | max, each an (epsilon, strength, encoding).

    level    epsilon  strength  encoding  attribute kept with  what it means
    low        4.0      0.40     invert       98.2 %          light touch: identity and pose stay, the attribute
                                                              is almost always released as it is
    medium     2.0      0.55     noise        88.1 %          about one protected attribute in eight is flipped;
                                                              the face is redrawn from a noised copy
    high       1.0      0.70     noise        73.1 %          one in four flipped; redrawn from deeper noise
    max        0.0      1.00     noise        50.0 %          a fair coin: the released value says nothing about
                                                              the original; the image is drawn afresh, keeping
                                                              its unprotected attributes only

epsilon is the randomized-response level of each protected attribute (see mechanism.py): an
attacker who sees only the released value guesses the original right with probability at most
e^eps / (1 + e^eps). strength (t0 / T in (0, 1]) is how far the image is pushed into noise before
it is redrawn under the released attributes, and encoding is how: "invert" is DDIM inversion,
which is nearly invertible, so the latent keeps what the pixels show, protected attributes
included; "noise" is the forward process with fresh secret noise (SDEdit), which keeps only
sqrt(alpha_prod_t0) of the image (0.45 at strength 0.7; at 1.0, 0.08 with 20 steps and 0.03 with 50).
The guarantee covers the released *values* only; the pixels are measured (docs/editing.md,
``bench/edit_eval.py``): with inversion, an adaptive attacker read the original eyeglasses off the
edits far above the bound at epsilon 2, 1 and 0 (0.945, 0.938, 0.883 vs 0.881, 0.731, 0.502), with
fresh noise it stayed within noise of the bound at each level (epsilon-10 DP guided pipeline,
32x32). So only ``low``, where the released value is almost always the original anyway, inverts.

Why 0.0 for max: it is the only epsilon at which the released value is independent of the
original, the strongest promise randomized response can make. It costs no budget, so the ledger
does not limit how often an image is released at max; each release still leaks through the pixels
(measured, not bounded: at max only what survives the noise), which is why the ledger records
every release regardless of epsilon.

Experts may give epsilon, strength and encoding directly (``resolve_level(epsilon=..., strength=...,
encoding=...)``); the result is a level named "custom".
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.errors import ConfigError
from veil.privacy.mechanism import check_epsilon, json_epsilon, keep_probability

__all__ = ["PrivacyLevel", "LEVELS", "LEVEL_NAMES", "ENCODINGS", "resolve_level", "more_private", "less_private",
           "check_strength", "check_encoding"]

ENCODINGS = ("invert", "noise")  # how the image is taken to t0: DDIM inversion, or fresh secret noise (SDEdit)


def check_strength(strength, *, option: str = "strength") -> float:
    """strength as a float in (0, 1]; ConfigError naming ``option`` otherwise."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ConfigError(f"={strength!r}: must be in (0, 1] (how far into the noise schedule the image is taken)",
                          option=option)
    return float(strength)


def check_encoding(encoding, *, option: str = "--encoding") -> str:
    """"invert" or "noise"; ConfigError naming ``option`` otherwise."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"={encoding!r}: choose one of {list(ENCODINGS)} (invert: DDIM inversion keeps the "
                          f"face; noise: fresh secret noise keeps only what survives the noise level)", option=option)
    return encoding


@dataclass(frozen=True)
class PrivacyLevel:
    """A named (epsilon, strength, encoding); ``keep_probability`` is the randomized-response ceiling."""

    name: str
    epsilon: float
    strength: float
    encoding: str = "invert"

    def __post_init__(self):
        object.__setattr__(self, "epsilon", check_epsilon(self.epsilon))
        object.__setattr__(self, "strength", check_strength(self.strength))
        object.__setattr__(self, "encoding", check_encoding(self.encoding))

    @property
    def order(self) -> tuple:
        """Least to most private: smaller epsilon, then a deeper edit, then fresh noise over inversion."""
        return (-self.epsilon, self.strength, ENCODINGS.index(self.encoding))

    @property
    def keep_probability(self) -> float:
        return keep_probability(epsilon=self.epsilon)

    def to_json(self) -> dict:
        return {"name": self.name, "epsilon": json_epsilon(self.epsilon), "strength": self.strength,
                "encoding": self.encoding}


LEVELS: dict[str, PrivacyLevel] = {
    "low": PrivacyLevel("low", 4.0, 0.40, "invert"),
    "medium": PrivacyLevel("medium", 2.0, 0.55, "noise"),
    "high": PrivacyLevel("high", 1.0, 0.70, "noise"),
    "max": PrivacyLevel("max", 0.0, 1.00, "noise"),
}
LEVEL_NAMES = tuple(LEVELS)  # least to most private


def resolve_level(level: str | None = "medium", *, epsilon: float | None = None,
                  strength: float | None = None, encoding: str | None = None) -> PrivacyLevel:
    """A named level, with epsilon, strength and/or encoding overriding it (then named "custom").

    ConfigError names the option (--level, --epsilon, --strength, --encoding) that is wrong.
    """
    if level is None:
        level = "medium"
    if level not in LEVELS:
        raise ConfigError(f"{level!r}: choose one of {list(LEVEL_NAMES)} (or give --epsilon and --strength)",
                          option="--level")
    base = LEVELS[level]
    if epsilon is None and strength is None and encoding is None:
        return base
    eps = base.epsilon if epsilon is None else check_epsilon(epsilon, option="--epsilon")
    s = base.strength if strength is None else check_strength(strength, option="--strength")
    enc = base.encoding if encoding is None else check_encoding(encoding)
    return PrivacyLevel("custom", eps, s, enc)


def more_private(level: PrivacyLevel) -> PrivacyLevel:
    """The next named level that is more private (smaller epsilon, or equal epsilon and a stronger
    edit); max stays max. A custom level moves to the nearest such named level."""
    stricter = [lv for lv in LEVELS.values() if lv.order > level.order]
    return stricter[0] if stricter else level


def less_private(level: PrivacyLevel) -> PrivacyLevel:
    """The next named level that is less private; low stays low."""
    looser = [lv for lv in LEVELS.values() if lv.order < level.order]
    return looser[-1] if looser else level
