"""``veil edit``: private attribute edits from the command line (argparse, and a handler over ``veil.api``'s
``Editor``: ``release``, or ``preview`` with --sweep; torch loads there).

    veil edit --checkpoint PUBLIC --classifier GUIDE --checker JUDGE --first 8 --protect eyeglasses,smiling --level high --out edits/
    veil edit --checkpoint RUN --classifier CLF --classifier-scale 0 --first 8 --protect eyeglasses --out edits/
    veil edit --checkpoint RUN --first 8 --protect eyeglasses --sweep --out sweep/
    veil edit --checkpoint PUBLIC --classifier GUIDE --checker JUDGE --data folder:photos --first 8 --protect smiling --out edits/

``--data SPEC`` (``veil.data_arg``: folder:PATH[,csv=FILE], celeba:PATH, synthetic[:SEED], each with KEY=VALUE
options; default: the data the classifier, else the checkpoint, was trained on); the older --data folder
--root PATH --csv FILE (and --num-images, --data-seed, --resolution) still work, hidden from --help.

The backend follows from what is given: --classifier with --classifier-scale > 0 (default 10) is the
guided backend (the classifier steers a label-free or conditional denoiser); --classifier-scale 0 keeps
the conditional backend and the classifier only checks. Every release is checked to show its released
values (re-done, else refused and reported); --no-check releases unchecked edits and says so. A guided
edit is never checked by its guide (its own gradients fool it): it needs --checker (another
`veil train-classifier` release) or --no-check, else it is refused before anything loads.

Every release is recorded in the dataset's privacy database ($VEIL_HOME/datasets/, see
``veil privacy``). See docs/editing.md for the privacy levels, the budget and what the guarantee covers.

Every number is checked while parsing (NaN, infinities where they mean nothing, and out-of-range values
exit 2 naming the flag), --out before anything loads; a release is all-or-nothing (its files are written,
then charged in one transaction with their move into --out: ``veil/jobs/edit.py``).
"""

from __future__ import annotations

import argparse
import re

from veil.cli import epsilon_or_budget, nonneg_float, nonneg_int, positive_float, positive_int
from veil.data_arg import data_arg_help, parse_data_arg  # yaml only
from veil.privacy.ledger import DEFAULT_BUDGET  # stdlib sqlite3 only, no torch
from veil.privacy.levels import ENCODINGS  # no torch

# argparse (before 3.13) reads "-1,2" or "-inf" after a flag as another option and fails with "expected one
# argument"; no option of `veil edit` starts with "-<digit>", ".", "inf" or "nan", so such words are values
# (then refused, naming their flag, by the types below: an epsilon is >= 0).
_NEGATIVE_VALUE = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _epsilons(text: str) -> list[float]:
    """Comma-separated epsilons, each >= 0 or inf."""
    values = [epsilon_or_budget(s) for s in _csv(text)]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated epsilons such as 0,1,2,inf, got {text!r}")
    return values


def add_subcommand(sub) -> None:
    """Register `veil edit` on the `veil` parser's subparsers."""
    p = sub.add_parser(
        "edit", help="privately edit protected attributes of dataset images (release, ledger, revision)",
        description="Edit the protected attributes of dataset images through randomized response at a privacy "
                    "level, record each release in the ledger, and write a dataset revision. With --sweep, "
                    "write a preview grid over privacy levels instead (nothing is released).")
    p.add_argument("--checkpoint", required=True, help="the model release of `veil train`: its --out folder or OUT/model")
    data = p.add_argument_group("data (default: the dataset the classifier, else the checkpoint, was trained on)")
    data.add_argument("--data", metavar="SPEC", help=data_arg_help())
    # the older spelling (--data folder --root X --csv Y), still accepted, mapped into the same spec
    data.add_argument("--num-images", type=positive_int, help=argparse.SUPPRESS)
    data.add_argument("--data-seed", type=nonneg_int, help=argparse.SUPPRESS)
    data.add_argument("--root", help=argparse.SUPPRESS)
    data.add_argument("--csv", help=argparse.SUPPRESS)
    data.add_argument("--resolution", type=positive_int, help=argparse.SUPPRESS)
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--ids", type=_csv, help="comma-separated image ids, e.g. synth-0-000003,synth-0-000010")
    pick.add_argument("--first", type=positive_int, help="edit the first N images of the dataset")
    p.add_argument("--protect", type=_csv, required=True, help="comma-separated attributes to privatize, e.g. eyeglasses,smiling")
    p.add_argument("--level", default="medium", help="privacy level: low | medium | high | max (default medium; "
                                                    "see `python bench/release_price.py` for what each costs)")
    p.add_argument("--epsilon", type=epsilon_or_budget, help="expert: randomized-response epsilon per protected attribute "
                                                 "(overrides the level's; 0 = fair coin, inf = keep)")
    p.add_argument("--strength", type=positive_float, help="expert: edit strength t0/T in (0, 1] (overrides the level's); "
                                                           "it must walk at least one DDIM step (above 1/(2 --steps))")
    p.add_argument("--runtime", choices=("torch", "ort"), default="torch",
                   help="torch (default), or ort: --checkpoint is a `veil export` folder and the edit runs on ONNX "
                        "Runtime (its classifier, backend and data are the export's)")
    p.add_argument("--encoding", choices=ENCODINGS, help="expert: how the image is taken to t0 (overrides the level's): "
                                                         "invert = DDIM inversion (keeps the face; pixels not "
                                                         "protected), noise = fresh secret noise (keeps what survives "
                                                         "it; priced as a Gaussian mechanism), fresh = the image is not "
                                                         "read (pixels cost 0)")
    p.add_argument("--classifier", help="a `veil train-classifier` release (e.g. trained with DP on this dataset). With "
                                        "--classifier-scale > 0: the guided backend, its gradient steers the denoiser; "
                                        "with --classifier-scale 0 it does not steer and checks that each edit shows its released values")
    p.add_argument("--classifier-scale", type=nonneg_float, default=None,
                   help="classifier guidance scale (default 10 with --classifier; 0 = the classifier only checks)")
    p.add_argument("--checker", help="a `veil train-classifier` release that checks the edits (needed by the guided "
                                     "backend unless --no-check: the classifier that steered an edit is fooled by its "
                                     "own guidance, so it never checks; not the guide's weights); its training privacy "
                                     "is added to the edit's cost")
    p.add_argument("--no-keep-unprotected", action="store_true",
                   help="guided backend: steer only the protected attributes (default: also towards the current "
                        "values of the unprotected ones, which a release publishes as they are)")
    p.add_argument("--no-check", action="store_true",
                   help="release without checking that the edits show their released values (needed when there is "
                        "no check classifier: no --checker with the guided backend, no --classifier at all; the report and the "
                        "summary say NOT CHECKED)")
    p.add_argument("--check-threshold", type=positive_float, default=0.5,
                   help="the checker's probability each released protected value must reach (default 0.5)")
    p.add_argument("--max-retries", type=nonneg_int, default=2,
                   help="re-dos of an edit that fails the check, each 0.15 stronger with 1.5x guidance (default 2)")
    p.add_argument("--guidance", type=nonneg_float, default=None,
                   help="classifier-free guidance scale of the regeneration (default 2.0; a label-free denoiser "
                        "has none)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps of a full-strength edit; an edit runs about strength*steps each way (default 50)")
    p.add_argument("--seed", type=nonneg_int, help="seed of the randomized response. Default: drawn from the OS (nobody can "
                                            "redo the coin flips), for releases and --sweep alike. A given seed makes "
                                            "the draws reproducible; keep it secret, whoever knows it can undo the mechanism")
    p.add_argument("--ledger", help="the dataset's privacy database (SQLite, owner-only); default "
                                    "$VEIL_HOME/datasets/<dataset>.sqlite (VEIL_HOME defaults to ~/.veil), one per "
                                    "dataset, so the budget counts every release of an image across runs")
    p.add_argument("--budget", type=epsilon_or_budget, default=None,
                   help=f"epsilon budget per record (labels and pixels composed), stored when the dataset's database is created "
                        f"(default {DEFAULT_BUDGET:g}; inf = unlimited); on an existing database it must match the "
                        f"stored one: change that with `veil privacy set-budget`")
    p.add_argument("--sweep", action="store_true", help="preview grid over the four levels (rows) for the chosen "
                                                        "images (columns); releases nothing, no ledger entries")
    p.add_argument("--sweep-epsilons", type=_epsilons, help="with --sweep: rows at these epsilons (e.g. 0,1,2,4,inf; each >= 0) at one "
                                                          "strength (--strength, else --level's)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", required=True, help="output folder: revision/, before_after.png, edit_report.json "
                                                "(or sweep.png, sweep.json)")
    p._negative_number_matcher = _NEGATIVE_VALUE  # see _NEGATIVE_VALUE
    p.set_defaults(func=_edit)


def edit_data(args) -> dict:
    """``--data SPEC`` (``veil.data_arg``) with the older --root/--csv/--num-images/--data-seed/--resolution laid
    over it (paths made absolute); unset keys are None (the model's recorded dataset fills them)."""
    from pathlib import Path

    data = {"source": None, "num_images": None, "seed": None, "root": None, "csv": None, "resolution": None,
            **parse_data_arg(args.data)}
    for key, value in (("num_images", args.num_images), ("seed", args.data_seed), ("resolution", args.resolution),
                       ("root", args.root), ("csv", args.csv)):
        if value is not None:
            data[key] = str(Path(value).expanduser().resolve()) if key in ("root", "csv") else value
    if args.root is not None and args.csv is None and data["source"] == "folder" and data["csv"] is None:
        data["csv"] = str(Path(data["root"]) / "labels.csv")  # as folder:PATH
    return data


def _edit(args) -> int:
    """``veil.api.load_editor`` and its ``preview`` (``--sweep``) or ``release``; the flag combinations that only
    a command line can get wrong are refused here, everything else by the API (the same messages)."""
    from veil import api
    from veil.errors import ConfigError

    data = edit_data(args)
    if args.sweep:
        ignored = [flag for flag, value in (("--epsilon", args.epsilon), ("--ledger", args.ledger),
                                            ("--budget", args.budget)) if value is not None]
        ignored += [flag for flag, on in (("--no-check", args.no_check), ("--checker", args.checker is not None),
                                          ("--check-threshold", args.check_threshold != 0.5),
                                          ("--max-retries", args.max_retries != 2)) if on]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)}: not with --sweep (it releases nothing and opens no ledger); "
                              f"for rows at chosen epsilons use --sweep-epsilons")
    elif args.sweep_epsilons:
        raise ConfigError(": only with --sweep", option="--sweep-epsilons")
    editor = api.load_editor(args.checkpoint, runtime=args.runtime, classifier=args.classifier, checker=args.checker,
                             classifier_scale=args.classifier_scale, steps=args.steps, guidance=args.guidance,
                             use_ema=not args.no_ema, keep_unprotected=not args.no_keep_unprotected,
                             check_threshold=args.check_threshold, max_retries=args.max_retries)
    pick = dict(protect=args.protect, ids=args.ids, first=args.first, data=data, level=args.level,
                strength=args.strength, encoding=args.encoding, seed=args.seed, out=args.out)
    if args.sweep:
        report = editor.preview(epsilons=args.sweep_epsilons, **pick).report
        print(f"wrote {args.out}/sweep.png ({len(report['rows'])} levels x {len(report['ids'])} images, "
              f"{report['backend']} backend; previews for you only, owner-only files: nothing released); "
              f"models: {report['model_privacy']}")
        return 0
    report = editor.release(epsilon=args.epsilon, ledger=args.ledger, budget=args.budget, check=not args.no_check,
                            **pick).report
    print(summary(report, args.out))
    return 0


def summary(report: dict, out) -> str:
    """The CLI's account of a release: what was released and refused, the check, and what it cost."""
    lv, check = report["level"], report["check"]
    lines = [f"released {report['released']} of {len(report['images'])} edits ({report['backend']} backend) at "
             f"{lv['name']} (epsilon {lv['epsilon']}, strength {lv['strength']}, {lv['encoding']} encoding) protecting "
             f"{','.join(report['protected'])}"]
    if check["enabled"]:
        refused = [im["id"] for im in report["images"] if im["outcome"] == "refused"]
        who = "--checker" if report.get("checker") else "the export's" if report.get("runtime") == "ort" else \
            "--classifier at scale 0"
        lines.append(f"check: each released protected value must read >= {check['threshold']:g} on the check "
                     f"classifier ({who}, never the guide); "
                     f"{report['redone']} edits re-done (up to {check['max_retries']} times: {check['retry']}), "
                     f"{len(refused)} refused" + (f" ({', '.join(refused[:5])}{', ...' if len(refused) > 5 else ''}: "
                                                  f"not released, but charged)" if refused else ""))
    else:
        lines.append(check["warning"])
    cost = report["cost"]
    models = "; ".join(f"{m['role']}: {m['privacy']} on {m['data']}" for m in cost["models"])
    rel = cost["release"]
    pixels = rel["pixels"]
    shown = "not protected" if not pixels["protected"] else f"Gaussian mu {pixels['mu']}" if pixels["mu"] else "0"
    worst = max((im["spent"]["epsilon"] for im in report["images"]), key=lambda e: float(e), default=0)
    lines.append(f"cost: each release: labels by randomized response at epsilon {rel['epsilon_per_protected_attribute']} "
                 f"per protected attribute, pixels {shown} ({pixels['encoding']}); one release alone: epsilon "
                 f"{rel['alone']['epsilon']:.4g} at delta {rel['alone']['delta']:g}; composed per record in the "
                 f"dataset's ledger {report['ledger']} (the most spent on one record now: {float(worst):.4g}); "
                 f"models: {models}")
    lines.append(f"models together: {report['model_privacy']}")
    lines.append(f"wrote {out}/edit_report.json; owner-only: {out}/revision (it holds the original attributes; "
                 f"share `veil privacy publish-revision --revision {out}/revision --out PUB` instead) and "
                 f"{out}/before_after.png")
    return "\n".join(lines)
