"""Where DP-SGD's randomness comes from: the OS CSPRNG, in every process, unless explicitly reproducible.

DP-SGD's guarantee assumes the noise and the Poisson sample are unknown to whoever sees the model.
If they could be recomputed from the public config (its ``seed`` seeds torch's global RNG through
``L.seed_everything``), an adversary who knows the other records could replay training with and
without a target record: epsilon would be infinite, and without secret batches there would be no
amplification by sampling either. So:

* ``secret_seed()`` draws 63 bits from ``secrets`` (the OS CSPRNG) for each generator, in each
  process, at each start (a resume draws new ones: nothing repeats), and is never written anywhere;
* ``reproducible_seed(seed, *parts)`` derives a seed from ``dp.reproducible_noise_seed`` for tests
  and debugging only; a run that uses it is stamped ``"private": false`` in its privacy record.

No torch here: the sampler and the optimizer factory make their own generators from these numbers.
"""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["secret_seed", "reproducible_seed", "REPRODUCIBLE_REASON"]

REPRODUCIBLE_REASON = (
    "dp.reproducible_noise_seed is set: the DP noise and the Poisson batches are reproducible from it "
    "(a test/debug mode); whoever knows the seed can remove the noise"
)


def secret_seed() -> int:
    """63 bits from the OS CSPRNG: the seed of one noise or sampling generator, used once, never stored."""
    return secrets.randbits(63)


def reproducible_seed(seed: int, *parts) -> int:
    """A 63-bit seed determined by (seed, *parts): the not-private reproducible mode's streams."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
