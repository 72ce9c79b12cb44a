"""The ``veil`` command line: one command, one subcommand per job.

    veil train   --config CONFIG.yaml --out DIR [--set key=value ...] [--resume]
    veil sample  --checkpoint DIR/last.ckpt --attributes smiling=1,hat=0 --n 16 --out grid.png
                 [--classifier CLF/last.ckpt --classifier-scale 10]  (classifier guidance)

``veil <cmd> --help`` documents every option. Errors of the user's making (bad config, missing
files) print one line naming the option and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys

from veil.errors import VeilError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the attribute-conditional diffusion model with DP-SGD",
                       description="Train the attribute-conditional diffusion model with DP-SGD (Opacus accounting).")
    p.add_argument("--config", help="YAML config (see lightning_modules/configs/); defaults apply when omitted")
    p.add_argument("--out", required=True, help="output folder: last.ckpt, privacy.json, config.json, logs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set dp.target_epsilon=10 --set trainer.max_steps=200")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.ckpt (privacy accounting continues)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from veil.lightning_modules.config import load_config
    from veil.lightning_modules.train import describe, run_training

    cfg = load_config(args.config, args.overrides)
    record = run_training(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    print(describe(record))
    print(f"wrote {args.out}/last.ckpt and {args.out}/privacy.json")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw images for given attributes from a trained checkpoint (DDIM)",
                       description="Draw images with DDIM for given attributes: classifier-free guidance "
                                   "through the model's own attribute path and/or classifier guidance by a "
                                   "noise-conditional attribute classifier (--classifier).")
    p.add_argument("--checkpoint", required=True, help="last.ckpt written by `veil train`")
    p.add_argument("--attributes", default="", help="e.g. smiling=1,hat=0 (1 present, 0/-1 absent, ? unknown; others unknown)")
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default 2.0; 0, i.e. unconditional, for a model "
                        "trained without attribute labels)")
    p.add_argument("--classifier", help="noise-conditional classifier checkpoint (`veil train-classifier` with "
                                        "model.noise_conditional, e.g. configs/classifier32_guidance.yaml) that "
                                        "steers the samples to --attributes")
    p.add_argument("--classifier-scale", type=float, default=10.0,
                   help="classifier guidance scale s (default 10.0; used with --classifier)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", required=True, help="PNG grid to write")
    p.set_defaults(func=_sample)


def _sample(args) -> int:
    import torch

    from veil.errors import ConfigError
    from veil.lightning_modules.data.grid import save_grid
    from veil.lightning_modules.sampling import (
        combined_privacy, ddim_sample, default_guidance, load_diffusion_checkpoint, load_guidance_classifier,
        parse_attribute_spec,
    )

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    ckpt = load_diffusion_checkpoint(args.checkpoint, use_ema=not args.no_ema)
    guide = None
    if args.classifier:
        guide = load_guidance_classifier(args.classifier, scheduler_config=ckpt.scheduler_config,
                                         scale=args.classifier_scale)
    attrs = parse_attribute_spec(args.attributes, ckpt.attribute_names).expand(args.n, -1)
    guidance = default_guidance(ckpt) if args.guidance is None else args.guidance
    if ckpt.cond_drop_prob == 1.0 and guidance != 0 and attrs.abs().sum() > 0:
        print(f"note: {args.checkpoint} was trained without attribute labels; --guidance {guidance} feeds "
              "--attributes to an attribute path it never learned (use --classifier to steer it)", file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)
    images = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=args.steps, guidance_scale=guidance,
                         generator=gen, guide=guide,
                         guide_targets=guide.targets_for(attrs, ckpt.attribute_names) if guide else None)
    save_grid(images, args.out)
    print(f"wrote {args.out} ({args.n} images; privacy: {combined_privacy(ckpt, guide)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_sample(sub)
    from veil import cli_editing, cli_unlearning  # each adds its subcommands (argparse only, no torch)

    cli_editing.add_subcommands(sub)
    cli_unlearning.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VeilError as exc:
        print(f"veil {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
