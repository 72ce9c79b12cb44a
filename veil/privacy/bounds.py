"""What randomized response lets an attacker infer: the prior-aware bound on attribute inference.

Randomized response at epsilon (``veil.privacy.mechanism``) releases r = a with probability
p_keep = e^eps / (1 + e^eps) and r = -a otherwise. The guarantee is a bound on how much r moves an
attacker's belief about a, whatever they believed before:

    P(a=+1 | r) / P(a=-1 | r)  <=  e^eps * P(a=+1) / P(a=-1)      (posterior odds <= e^eps x prior odds)

and the same with the roles of +1 and -1 swapped. It is NOT "nobody guesses a more often than
p_keep": p_keep is the best accuracy only under a 50/50 prior. For a skewed attribute (eyeglasses is
about 6.5% positive in CelebA) always guessing "no" is right 93.5% of the time at any epsilon.

The right yardstick for an attacker who sees only the released value is the Bayes-optimal accuracy:
with prior p = P(a=+1), the best decision rule guesses, for each r, the a that maximises
P(a) P(r | a), so

    acc*(eps, p) = sum over r of max_a P(a) P(r | a)
                 = max(p p_keep, (1-p)(1-p_keep))        (r = +1)
                 + max(p (1-p_keep), (1-p) p_keep)       (r = -1)

It equals max(p, 1-p) at eps = 0 (the released value is a fair coin: guess the majority), p_keep at
p = 1/2, 1 at eps = inf, and it does not decrease in eps. An attacker on edited images who does
significantly better than acc* learns from the pixels what the mechanism was meant to hide.

Which prior: the one the attacker holds. ``bench/edit_eval.py`` uses each attribute's frequency in
the dataset's training split (an owner-side evaluation may read it). An attacker who also knows
attributes correlated with the protected one (the unprotected ones are released as they are) has a
sharper prior, hence a higher acc*; the posterior-odds bound holds for that prior too.

A measured accuracy (an attacker's, or ``veil unlearn``'s feature probe) comes with its Wilson score 95%
interval (``wilson_interval``): the demo's attack rows, the unlearning report and its verdict use it.
"""

from __future__ import annotations

import math

from veil.errors import ConfigError
from veil.privacy.mechanism import keep_probability

__all__ = ["bayes_accuracy_bound", "wilson_interval"]


def bayes_accuracy_bound(*, epsilon: float, prior: float) -> float:
    """The best accuracy of guessing a binary attribute a from its randomized-response release at
    ``epsilon``, when P(a = +1) = ``prior`` (see the module docstring for the formula)."""
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or math.isnan(prior) or not 0 <= prior <= 1:
        raise ConfigError(f"prior={prior!r}: must be a probability P(a = +1) in [0, 1]")
    p, keep = float(prior), keep_probability(epsilon=epsilon)
    return max(p * keep, (1 - p) * (1 - keep)) + max(p * (1 - keep), (1 - p) * keep)


def wilson_interval(successes: int, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes`` / ``n`` (95% for the default z); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: {successes} successes out of {n}")
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)
