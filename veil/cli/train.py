"""``veil train``: DP-SGD training of the attribute-conditional diffusion model (argparse and a thin handler).

    veil train --config synthetic32 --out DIR [--set key=value ...] [--resume]   # or --config my.yaml
    veil train --config synthetic32 --data folder:photos,csv=photos/labels.csv --out DIR   # docs/data.md

``--data SPEC`` (``veil.data_arg``, as in every command) replaces the config's dataset (source, root, csv,
revision; its other data keys stay); ``--set data.KEY=VALUE`` still works and is applied after it.

The handler is ``veil.api.train`` (the job ``veil.jobs.train.run_training``) and the printing; torch loads in it.
"""

from __future__ import annotations


def _shipped(prefix_classifier: bool = False) -> list[str]:
    """The shipped configs' names (veil/lightning_modules/configs/*.yaml; classifier*: veil train-classifier's)."""
    from veil.lightning_modules.configs import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem.startswith("classifier") == prefix_classifier)


def add_subcommand(sub) -> None:
    p = sub.add_parser("train", help="train the attribute-conditional diffusion model with DP-SGD",
                       description="Train the attribute-conditional diffusion model with DP-SGD (Opacus accounting).")
    p.add_argument("--config", help=f"a YAML config file, or a shipped config's name ({', '.join(_shipped())}); "
                                    "defaults apply when omitted")
    p.add_argument("--out", required=True, help="output folder: model/ (the release to share), privacy.json, "
                                                "config.json, private/ (owner-only: resume state, logs). A run "
                                                "that fails before its first checkpoint leaves nothing there")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dp.target_epsilon=10 --set trainer.max_steps=200")
    from veil.data_arg import data_arg_help

    p.add_argument("--data", metavar="SPEC", help=data_arg_help("the config's data section") +
                   "; replaces the config's dataset, --set data.KEY=VALUE applies after it")
    p.add_argument("--resume", action="store_true", help="continue OUT/private/last.ckpt (privacy accounting "
                                                         "continues; fresh secret noise)")
    p.add_argument("--ledger", help="the dataset's privacy database (default: found from the data, under "
                                    "$VEIL_HOME/datasets); the run is recorded there and refused if it would pass "
                                    "the dataset's training budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from veil import api
    from veil.data_arg import parse_data_arg
    from veil.jobs.train import describe

    run = api.train(config=args.config, overrides=args.overrides, data=parse_data_arg(args.data, keep_revision=True) or None,
                    out=args.out, resume=args.resume,
                    progress=not args.no_progress, ledger=args.ledger)
    print(describe(run.record))
    print(f"wrote {args.out}/model (the release to share) and {args.out}/privacy.json; "
          f"{args.out}/private/ is owner-only (resume state, per-step statistics of the private data)")
    return 0
