"""``veil train-classifier``: train the attribute classifier, optionally with DP-SGD (argparse and a thin handler).

    veil train-classifier --data synthetic,num_images=3000 --out runs/clf [--config classifier32]
    veil train-classifier --config classifier32_small --data folder:photos --out runs/guide   # docs/data.md

The handler is ``veil.api.train_classifier`` (the job ``veil.jobs.train_classifier.train_classifier``) and the
printing; torch and Lightning are imported inside it.
"""

from __future__ import annotations


def _parse_data(text: str | None) -> dict | str:
    """``--data`` (``veil.data_arg``: folder:PATH[,csv=FILE], celeba:PATH, synthetic[:SEED], each with KEY=VALUE
    options, or the older source=...,root=... pairs), or a revision folder (returned as a path: the classifier
    trains on the revision itself); ``veil.api.train_classifier`` checks the keys against the recipe's."""
    from veil.data_arg import parse_data_arg, revision_folder

    revision = revision_folder(text)
    return str(revision) if revision is not None else parse_data_arg(text)


def add_subcommand(sub) -> None:
    p = sub.add_parser("train-classifier", help="train the attribute classifier (optionally with DP-SGD)",
                       description="Train a small GroupNorm CNN for multi-label attribute classification.")
    from veil.data_arg import data_arg_help

    p.add_argument("--data", default="synthetic", metavar="SPEC",
                   help=data_arg_help("synthetic") + "; e.g. folder:photos,test_fraction=0.2 or "
                        "synthetic,num_images=3000")
    from veil.cli.train import _shipped

    p.add_argument("--config", help=f"YAML recipe: a file, or a shipped recipe's name ({', '.join(_shipped(True))}); "
                                    "--data options override its data section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set epochs=6 --set dp.enabled=true")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="train with DP-SGD to this epsilon (sets dp.enabled, dp.target_epsilon, refit_head=false)")
    p.add_argument("--out", required=True, help="output folder: model/ (the release to share), train_report.json, "
                                                "private/ (owner-only: last.ckpt, test accuracy); a run that fails "
                                                "leaves nothing there")
    p.add_argument("--ledger", help="the dataset's privacy database (default: found from the data, under "
                                    "$VEIL_HOME/datasets); the run is recorded there")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    p.set_defaults(func=_train_classifier)


def _train_classifier(args) -> int:
    from veil import api

    record = api.train_classifier(config=args.config, overrides=args.overrides, dp_epsilon=args.dp_epsilon,
                                  data=_parse_data(args.data), out=args.out, progress=args.progress,
                                  ledger=args.ledger).record  # --dp-epsilon is checked there
    eps = record["privacy"].get("epsilon")
    privacy = f"epsilon = {eps:.3f}" if record["privacy"].get("private") else \
        f"NOT PRIVATE: {record['privacy'].get('not_private_reason')}"
    print(f"{record['steps']} steps in {record['seconds']:.1f}s ({privacy}); wrote {args.out}/model (the release "
          f"to share)")
    acc = record["test_accuracy"]
    print(f"owner-only: test accuracy {'n/a (no test images)' if acc is None else f'{acc:.4f}'} on held-out private "
          f"images ({args.out}/private/train_report.json)")
    return 0
