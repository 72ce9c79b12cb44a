"""`veil train-classifier` and `veil unlearn`: the attribute classifier and its feature unlearning.

    veil train-classifier --data source=synthetic,num_images=3000 --out runs/clf [--config classifier32.yaml]
    veil unlearn --model runs/clf/last.ckpt --revision runs/rev --method second --compare-retrain --out runs/unl

argparse only at import time; torch and Lightning are imported inside the handlers.
"""

from __future__ import annotations

import json


def _parse_data(text: str | None) -> dict:
    """``--data``: a revision folder, or FaceDataModule options as KEY=VALUE[,KEY=VALUE] (values as YAML)."""
    from pathlib import Path

    import yaml

    from veil.errors import ConfigError

    if not text:
        return {}
    if (Path(text) / "manifest.json").is_file():
        from veil.lightning_modules.data.revision_manifest import load_manifest

        return {**load_manifest(text)["base"], "revision": text}
    if text == "synthetic":
        return {"source": "synthetic"}
    options = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--data expects KEY=VALUE pairs (e.g. source=synthetic,num_images=3000) "
                              f"or a revision folder, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _add_train_classifier(sub) -> None:
    p = sub.add_parser("train-classifier", help="train the attribute classifier (optionally with DP-SGD)",
                       description="Train a small GroupNorm CNN for multi-label attribute classification.")
    p.add_argument("--data", default="synthetic",
                   help="FaceDataModule options as KEY=VALUE,... (e.g. source=synthetic,num_images=3000,"
                        "test_fraction=0.2), or a revision folder (default: synthetic)")
    p.add_argument("--config", help="YAML recipe (e.g. lightning_modules/configs/classifier32.yaml); "
                                    "--data options override its data section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set epochs=6 --set dp.enabled=true")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="train with DP-SGD to this epsilon (sets dp.enabled, dp.target_epsilon, refit_head=false)")
    p.add_argument("--out", required=True, help="output folder: last.ckpt, train_report.json")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    p.set_defaults(func=_train_classifier)


def _train_classifier(args) -> int:
    from veil.lightning_modules.unlearn import load_recipe, train_classifier

    overrides = list(args.overrides)
    if args.dp_epsilon is not None:
        overrides += ["dp.enabled=true", f"dp.target_epsilon={args.dp_epsilon}", "refit_head=false"]
    recipe, data = load_recipe(args.config, overrides)
    data = {**data, **_parse_data(args.data)}
    record = train_classifier(recipe=recipe, data=data, out=args.out, progress=args.progress)
    eps = record["privacy"].get("epsilon")
    privacy = f"epsilon = {eps:.3f}" if eps is not None else "not private"
    print(f"test accuracy {record['test_accuracy']:.4f} after {record['steps']} steps in {record['seconds']:.1f}s "
          f"({privacy}); wrote {record['checkpoint']}")
    return 0


def _add_unlearn(sub) -> None:
    p = sub.add_parser("unlearn", help="update a trained classifier to a dataset revision in closed form",
                       description="First-order, second-order (CG/LiSSA over Hessian-vector products) or exact "
                                   "(Newton on the frozen-feature logistic head) feature unlearning.")
    p.add_argument("--model", required=True, help="classifier checkpoint (OUT/last.ckpt of train-classifier)")
    p.add_argument("--revision", required=True, help="revision folder (manifest.json + images/) of the same dataset")
    p.add_argument("--method", choices=["first", "second", "exact"], default="second",
                   help="first: theta - tau g/N; second: theta - tau (H + damping I)^-1 g/N; "
                        "exact: Newton on the head with frozen features (default: second)")
    p.add_argument("--params", action="append", default=None, metavar="PREFIX",
                   help="update only parameters whose name starts with PREFIX (repeatable, e.g. --params head "
                        "--params proj); default all (head for exact)")
    p.add_argument("--tau", type=float, default=None,
                   help="step scale; default 1 for second order, the minimal-residual step for first order")
    p.add_argument("--damping", type=float, default=None,
                   help="added to the Hessian's diagonal (default: 0 for the head, which its L2 term makes "
                        "convex; 1.0 when network layers are updated)")
    p.add_argument("--solver", choices=["cg", "lissa", "direct"], default="cg",
                   help="H^-1 g for second order: cg, lissa, or direct (head only: closed-form Hessian) (default cg)")
    p.add_argument("--cg-max-iter", type=int, default=100, help="conjugate-gradient iterations at most (default 100)")
    p.add_argument("--lissa-iterations", type=int, default=300, help="LiSSA recursion depth (default 300)")
    p.add_argument("--lissa-scale", type=float, default=None,
                   help="LiSSA scale, above H's largest eigenvalue (default 1.5x a power-iteration estimate)")
    p.add_argument("--hessian-samples", type=int, default=None,
                   help="estimate H on this many training samples (seeded; default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Hessian subsample and power iteration")
    p.add_argument("--compare-retrain", action="store_true",
                   help="also retrain from scratch on the revised data (same recipe and seed) and compare")
    p.add_argument("--out", required=True, help="output folder: unlearned.ckpt, unlearn_report.json")
    p.set_defaults(func=_unlearn)


def _unlearn(args) -> int:
    from veil.lightning_modules.unlearn import run_unlearn

    report = run_unlearn(
        model=args.model, revision=args.revision, method=args.method, out=args.out,
        compare_retrain=args.compare_retrain, params=args.params, tau=args.tau, damping=args.damping,
        solver=args.solver, cg_max_iter=args.cg_max_iter, lissa_iterations=args.lissa_iterations,
        lissa_scale=args.lissa_scale, hessian_samples=args.hessian_samples, seed=args.seed,
    )
    keys = ("update_seconds", "retrain_seconds", "test_accuracy", "changed_original_attribute_accuracy",
            "gradient_residual", "distance_to_retrained")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=1))
    print(f"wrote {args.out}/unlearned.ckpt and {args.out}/unlearn_report.json")
    return 0


def add_subcommands(sub) -> None:
    """Register `train-classifier` and `unlearn` on the `veil` parser's subparsers."""
    _add_train_classifier(sub)
    _add_unlearn(sub)
