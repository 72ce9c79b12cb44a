"""Privacy levels a person can pick: low | medium | high | max, each an (epsilon, strength, encoding).

    level    epsilon  strength  encoding  labels kept   pixels (accounting.py)
    low        4.0      0.40     invert     98.2 %      DDIM inversion: no bound; only under a dataset policy that
                                                        says the pixels are not protected (labels only)
    medium     2.0      1.00     fresh      88.1 %      the image is not read: a face drawn afresh towards the
    high       1.0      1.00     fresh      73.1 %      released attributes and the unprotected ones; the pixels
    max        0.0      1.00     fresh      50.0 %      cost 0 (proven: nothing of the image is used)

The levels were re-chosen on the price (issue 30): a "noise" edit, which keeps the face, costs its pixels as
a Gaussian mechanism, and at 32x32 with 50 steps that is mu ~ 90 at strength 0.55, ~ 56 at 0.7, ~ 3.3 at 1.0
(epsilon ~ 6700, ~ 1800, ~ 22 at delta 1e-6): no strength keeps a resemblance at a small pixel epsilon, so the
named levels that fit the default budget (8 per record) do not read the image. Faces that keep their
original's pose and look are a custom level (``--encoding noise --strength S``), priced by the same rule
(``bench/release_price.py`` prints the grid).

epsilon is the randomized-response level of each protected attribute (see mechanism.py): an attacker who sees
only the released value guesses the original right with probability at most e^eps / (1 + e^eps). strength
(t0 / T in (0, 1]) is how far the image is pushed into noise before it is redrawn under the released
attributes, and encoding is how: "invert" is DDIM inversion, nearly invertible, so the latent keeps what the
pixels show (no bound); "noise" is the forward process with fresh secret noise (SDEdit) of the image clipped
to [-1, 1], a Gaussian mechanism whose price ``veil.privacy.accounting`` computes from alpha_prod_t0 (mu =
sqrt(a / (1 - a)) * 2 sqrt(3 H W)); "fresh" does not read the image at all.

What is proven and what is measured: every release is priced in both channels and composed per record by a
PLD accountant (``veil.privacy.ledger``); the budget limits that. The pixel price of the "noise" levels is
honest and large: at 32x32 only alpha_prod below ~1e-4 (nearly pure noise) keeps the pixels' mu under 1,
so a face that still resembles its original costs an epsilon in the hundreds on the pixels (README, "What is
protected and what is not"; ``bench/release_price.py`` prices the grid). ``max`` costs nothing because it
uses nothing of the record but its unprotected attributes, which the owner publishes exactly. The
measured side (``bench/edit_eval.py``): with inversion an adaptive attacker read the original eyeglasses off
the edits far above the labels' bound.

Experts may give epsilon, strength and encoding directly (``resolve_level(epsilon=..., strength=...,
encoding=...)``); the result is a level named "custom", priced by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.errors import ConfigError
from veil.privacy.mechanism import check_epsilon, json_epsilon, keep_probability

__all__ = ["PrivacyLevel", "LEVELS", "LEVEL_NAMES", "ENCODINGS", "resolve_level", "more_private", "less_private",
           "check_strength", "check_encoding"]

ENCODINGS = ("invert", "noise", "fresh")  # how the image is taken to t0: DDIM inversion, fresh secret noise
                                          # (SDEdit), or not at all (pure noise)


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
                          f"face, pixels not protected; noise: fresh secret noise keeps only what survives the noise "
                          f"level, priced as a Gaussian mechanism; fresh: the image is not read)", option=option)
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
        """Least to most private: smaller epsilon, then a deeper edit, then fresh noise over inversion, then
        not reading the image at all."""
        return (-self.epsilon, self.strength, ENCODINGS.index(self.encoding))

    @property
    def keep_probability(self) -> float:
        return keep_probability(epsilon=self.epsilon)

    def to_json(self) -> dict:
        return {"name": self.name, "epsilon": json_epsilon(self.epsilon), "strength": self.strength,
                "encoding": self.encoding}


LEVELS: dict[str, PrivacyLevel] = {
    "low": PrivacyLevel("low", 4.0, 0.40, "invert"),
    "medium": PrivacyLevel("medium", 2.0, 1.00, "fresh"),
    "high": PrivacyLevel("high", 1.0, 1.00, "fresh"),
    "max": PrivacyLevel("max", 0.0, 1.00, "fresh"),
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
