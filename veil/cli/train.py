"""``veil train``: DP-SGD training of the attribute-conditional diffusion model (argparse and a thin handler).

    veil train --config lightning_modules/configs/synthetic32.yaml --out DIR [--set key=value ...] [--resume]

The job is ``veil.jobs.train.run_training``; torch loads in the handler.
"""

from __future__ import annotations


def add_subcommand(sub) -> None:
    p = sub.add_parser("train", help="train the attribute-conditional diffusion model with DP-SGD",
                       description="Train the attribute-conditional diffusion model with DP-SGD (Opacus accounting).")
    p.add_argument("--config", help="YAML config (see lightning_modules/configs/); defaults apply when omitted")
    p.add_argument("--out", required=True, help="output folder: model/ (the release to share), privacy.json, "
                                                "config.json, private/ (owner-only: resume state, logs). A run "
                                                "that fails before its first checkpoint leaves nothing there")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dp.target_epsilon=10 --set trainer.max_steps=200")
    p.add_argument("--resume", action="store_true", help="continue OUT/private/last.ckpt (privacy accounting "
                                                         "continues; fresh secret noise)")
    p.add_argument("--ledger", help="the dataset's privacy database (default: found from the data, under "
                                    "$VEIL_HOME/datasets); the run is recorded there and refused if it would pass "
                                    "the dataset's training budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from veil.jobs.config import load_config
    from veil.jobs.train import describe, run_training

    cfg = load_config(args.config, args.overrides)
    record = run_training(cfg, args.out, resume=args.resume, progress=not args.no_progress, ledger=args.ledger)
    print(describe(record))
    print(f"wrote {args.out}/model (the release to share) and {args.out}/privacy.json; "
          f"{args.out}/private/ is owner-only (resume state, per-step statistics of the private data)")
    return 0
