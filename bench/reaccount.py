"""Re-account published DP runs at another delta: the same mechanism (sigma, q, steps), Opacus's accountant.

    python bench/reaccount.py

The runs behind the README's figures were accounted at delta = 1/N, which veil now refuses (a
mechanism that publishes one record in full meets it). Accounting the same noise, sampling rate
and step count at the new default delta = min(1e-5, 0.1/N) is post-processing of nothing new: it
only reads the guarantee those runs already had at a meaningful delta. Prints one table row per
run: epsilon at 1/N (as published) and at the new default.
"""

from __future__ import annotations

from opacus.accountants import create_accountant

# (run, sigma, logical batch, training images N, steps), from docs/training.md
RUNS = [
    ("DP guidance classifier (classifier32_guidance.yaml)", 0.498, 1024, 90_000, 348),
    ("DP fine-tune (synthetic32_dp_finetune.yaml)", 0.470, 1024, 90_000, 200),
]


def epsilon(*, sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    acc = create_accountant(accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def main() -> None:
    print("| run | sigma | q | steps | epsilon at delta 1/N | epsilon at min(1e-5, 0.1/N) |")
    print("|---|---|---|---|---|---|")
    for name, sigma, batch, n, steps in RUNS:
        q = batch / n
        old = epsilon(sigma=sigma, sample_rate=q, steps=steps, delta=1 / n)
        new = epsilon(sigma=sigma, sample_rate=q, steps=steps, delta=min(1e-5, 0.1 / n))
        print(f"| {name} | {sigma} | {q:.5f} | {steps} | {old:.2f} ({1 / n:.2g}) | {new:.2f} ({min(1e-5, 0.1 / n):.2g}) |")


if __name__ == "__main__":
    main()
