"""The privacy/fidelity trade-off of edit strength and encoding, from ``bench/edit_eval.py`` results.

    python bench/edit_tradeoff.py runs/grid/edit_eval.json --out docs/edit_tradeoff.png

Reads one ``edit_eval.json`` (a single run, or a ``--combine`` of several) and plots, against the
strength of each row: the stronger attacker's excess over the prior-aware bound (the worst protected
attribute; error bars: 2 standard errors of an accuracy at the bound), SSIM to the original, and KID.
Colour is epsilon, marker and line style the encoding (circle, solid: invert; square, dashed: noise),
so the level table of docs/editing.md can be read off it: the smallest strength of each epsilon whose
excess stays within the error bar, and what that strength costs in fidelity.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

_spec = importlib.util.spec_from_file_location("edit_eval", Path(__file__).with_name("edit_eval.py"))
edit_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(edit_eval)


def points(result: dict) -> list[dict]:
    """One point per row of every run: strength, epsilon, encoding, excess (and its 2-SE bar), SSIM, KID."""
    runs = result.get("runs", [result])
    out = []
    for run in runs:
        for r in run["rows"]:
            excess, bar = -math.inf, 0.0
            for p in run["protect"]:
                bound, n = edit_eval._num(r["bound"][p]), max(int(r["n"]), 1)
                d = edit_eval._stronger(r, p) - bound
                if d > excess:
                    excess, bar = d, 2 * math.sqrt(max(bound * (1 - bound), 0.25 / n) / n)
            out.append({"strength": float(r["strength"]), "epsilon": edit_eval._num(r["epsilon"]),
                        "encoding": r.get("encoding", "invert"), "excess": excess, "bar": bar,
                        "ssim": edit_eval._num(r["ssim"]), "kid": edit_eval._num(r["kid"])})
    return out


def plot(pts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    epsilons = sorted({p["epsilon"] for p in pts}, reverse=True)
    for k, eps in enumerate(epsilons):
        for enc, marker, ls in (("invert", "o", "-"), ("noise", "s", "--")):
            line = sorted((p for p in pts if p["epsilon"] == eps and p["encoding"] == enc), key=lambda p: p["strength"])
            if not line:
                continue
            xs, style = [p["strength"] for p in line], dict(color=f"C{k}", marker=marker, ls=ls,
                                                              label=f"eps {eps:g}, {enc}")
            axes[0].errorbar(xs, [p["excess"] for p in line], yerr=[p["bar"] for p in line], capsize=3, **style)
            axes[1].plot(xs, [p["ssim"] for p in line], **style)
            axes[2].plot(xs, [p["kid"] for p in line], **style)
    axes[0].axhline(0, color="k", lw=1)
    for ax, title in zip(axes, ("stronger attack - bound (worst attribute; bars: 2 SE)",
                                "fidelity: SSIM to the original", "realism: KID vs originals")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("strength (t0 / T)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", help="an edit_eval.json of bench/edit_eval.py (one run or a --combine)")
    p.add_argument("--out", default="bench/out/edit_tradeoff.png", help="the plot (PNG)")
    args = p.parse_args(argv)
    pts = points(json.loads(Path(args.result).read_text()))
    if not pts:
        raise SystemExit(f"{args.result}: no rows")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(pts, Path(args.out))
    for q in sorted(pts, key=lambda q: (-q["epsilon"], q["encoding"], q["strength"])):
        flag = "*" if q["excess"] > q["bar"] else ""
        print(f"eps {q['epsilon']:g}  {q['encoding']:6s}  strength {q['strength']:.2f}  excess {q['excess']:+.3f}{flag}"
              f"  SSIM {q['ssim']:.3f}  KID {q['kid']:.3g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
