"""The formal price of one release over a grid of settings: labels and pixels, composed (issue 30).

    python bench/release_price.py                        # the demo model's schedule, 32x32, 50 steps
    python bench/release_price.py --resolution 64 --steps 20 --protect 2 --json out.json

For each (encoding, strength) and each label epsilon it prints the pixel channel's Gaussian mu (first try and
with the check's re-dos, which are charged), and the per-release (epsilon, delta) of the pixels alone and of
labels and pixels composed by dp-accounting's PLD accountant (``veil.privacy.accounting``), with how many
such releases fit the default budget. It prices, it does not measure: the utility of the same settings
(SSIM, KID, follows) and the adaptive attacker are ``bench/edit_eval.py``'s table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from veil.editing.plan import DEFAULT_MAX_RETRIES, edit_grid, encoding_mus
from veil.privacy.accounting import DEFAULT_RELEASE_DELTA, compose, price_release
from veil.privacy.ledger import DEFAULT_BUDGET
from veil.privacy.levels import LEVELS

DEMO_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def alphas(schedule: dict) -> list[float]:
    from veil.lightning_modules.diffusion.schedule import alphas_cumprod_table  # torch, only here

    return [float(a) for a in alphas_cumprod_table(schedule).double()]


def grid(*, a: list[float], steps: int, resolution: int, protect: int, delta: float, check: bool,
         strengths, epsilons) -> list[dict]:
    rows = []
    settings = [("fresh", 1.0), ("invert", 0.4)] + [("noise", s) for s in strengths]
    names = {(lv.encoding, lv.strength, lv.epsilon): n for n, lv in LEVELS.items()}
    for encoding, s in settings:
        mus = encoding_mus(alphas_cumprod=a, strength=s, encoding=encoding, num_steps=steps, resolution=resolution,
                           max_retries=DEFAULT_MAX_RETRIES if check else None)  # what EditPipeline.pixel_mus charges
        for eps in epsilons:
            price = price_release(epsilon=eps, protected=[f"a{i}" for i in range(protect)], encoding=encoding,
                                  pixel_mus=mus)
            g = compose([price], delta=delta)
            fits = 0 if g.epsilon > DEFAULT_BUDGET else (math.inf if g.epsilon == 0 else
                                                         int(DEFAULT_BUDGET // g.epsilon))
            t0 = edit_grid(strength=s, num_steps=steps, num_train_timesteps=len(a))[-1]
            rows.append({"level": names.get((encoding, s, eps), ""), "encoding": encoding, "strength": s,
                         "t0": t0, "alpha": a[t0] if encoding == "noise" else None, "label_epsilon": eps,
                         "pixel_mu": price.pixel_mu, "pixels_epsilon": g.pixels_epsilon,
                         "labels_epsilon": g.labels_epsilon, "epsilon": g.epsilon, "fit_budget": fits})
    return rows


def _num(x, fmt=".3g") -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else format(x, fmt))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the edit (veil edit's default 50)")
    p.add_argument("--protect", type=int, default=1, help="how many attributes each release protects")
    p.add_argument("--delta", type=float, default=DEFAULT_RELEASE_DELTA)
    p.add_argument("--no-check", action="store_true", help="price the first try only (an unchecked edit)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.4, 0.55, 0.7, 0.85, 0.95, 1.0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    rows = grid(a=alphas(DEMO_SCHEDULE), steps=args.steps, resolution=args.resolution, protect=args.protect,
                delta=args.delta, check=not args.no_check, strengths=args.strengths, epsilons=args.epsilons)
    print(f"# price of one release, {args.resolution}x{args.resolution}, {args.steps} steps, {args.protect} protected "
          f"attribute(s), delta {args.delta:g}, {'first try only' if args.no_check else 'check re-dos charged'}; "
          f"default budget {DEFAULT_BUDGET:g} per record")
    print("| level | encoding | strength | t0 | alpha_t0 | label eps | pixel mu | pixels eps | composed eps | fit budget |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['level']} | {r['encoding']} | {r['strength']:g} | {r['t0']} | {_num(r['alpha'])} | "
              f"{r['label_epsilon']:g} | {_num(r['pixel_mu'])} | {_num(r['pixels_epsilon'])} | "
              f"{_num(r['epsilon'])} | {_num(r['fit_budget'], 'g')} |")
    if args.json:
        strict = [{k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in r.items()} for r in rows]
        args.json.write_text(json.dumps(strict, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
