"""``veil sample``: draw images for given attributes from a trained checkpoint (argparse and a thin handler).

    veil sample --checkpoint RUN --attributes smiling=1,hat=0 --n 16 --out grid.png [--force]
                [--classifier CLF_RUN --classifier-scale 10]  (classifier guidance)

RUN is a `veil train` output folder or its release, RUN/model (never the owner-only RUN/private).
Every flag and the --out path are checked before the model loads: a grid file format PIL writes
(the extension says which), a folder that can be created and written, and no existing file
replaced without --force. The grid is written atomically (a temporary file, then a rename), each
tile at least 96 px and captioned with the requested attribute values.

The sampler is ``veil.lightning_modules.diffusion.sample``; torch loads in the handler.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from veil.cli import finite_float, nonneg_float, nonneg_int, positive_int
from veil.errors import ConfigError


def add_subcommand(sub) -> None:
    p = sub.add_parser("sample", help="draw images for given attributes from a trained checkpoint (DDIM)",
                       description="Draw images with DDIM for given attributes: classifier-free guidance "
                                   "through the model's own attribute path and/or classifier guidance by a "
                                   "noise-conditional attribute classifier (--classifier).")
    p.add_argument("--checkpoint", required=True, help="the model release of `veil train`: its --out folder or OUT/model")
    p.add_argument("--attributes", default="", help="e.g. smiling=1,hat=0 (1 present, 0/-1 absent, ? unknown; others unknown)")
    p.add_argument("--n", type=positive_int, default=16, help="number of images (default 16)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance scale (default 2.0; 0, i.e. unconditional, for a model "
                        "trained without attribute labels)")
    p.add_argument("--classifier", help="noise-conditional classifier release (`veil train-classifier` --out, with "
                                        "model.noise_conditional, e.g. configs/classifier32_guidance.yaml) that "
                                        "steers the samples to --attributes")
    p.add_argument("--classifier-scale", type=nonneg_float, default=10.0,
                   help="classifier guidance scale s (default 10.0; used with --classifier)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", required=True, help="the grid image to write; its extension picks the format "
                                                "(.png, .jpg, .jpeg, .webp, ...)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_sample)


def check_grid_out(out: str, *, force: bool) -> Path:
    """``--out`` checked before sampling: a known image extension, not a folder, no existing file unless
    ``force``, and a folder that exists or can be created, and is writable. ConfigError naming --out."""
    from veil.lightning_modules.data.grid import grid_format

    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give an image file path, e.g. {path / 'grid.png'}", option="--out")
    grid_format(path)  # ConfigError on a missing or unknown extension
    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists; choose another file (or pass --force to replace it)",
                          option="--out")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing ancestor
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{path}: {parent} is a file, not a folder; choose a path in a folder", option="--out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot write in {parent}; choose a folder you can write", option="--out")
    return path


def _sample(args) -> int:
    out = check_grid_out(args.out, force=args.force)  # before the model loads

    import torch

    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil import console
    from veil.lightning_modules.data.grid import attribute_caption, save_grid
    from veil.lightning_modules.diffusion.guidance import load_guidance_classifier
    from veil.lightning_modules.diffusion.sample import (
        combined_privacy,
        ddim_sample,
        default_guidance,
        parse_attribute_spec,
    )

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
    with console.stage(f"sampling {args.n} images, {args.steps} DDIM steps"):
        images = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=args.steps, guidance_scale=guidance,
                             generator=gen, guide=guide,
                             guide_targets=guide.targets_for(attrs, ckpt.attribute_names) if guide else None)
    if not torch.isfinite(images).all():
        raise ConfigError(f"{args.checkpoint}: the samples are not finite (NaN/inf weights, or a "
                          f"guidance scale too large: --guidance {guidance}, --classifier-scale "
                          f"{args.classifier_scale}); nothing written", option="--checkpoint")
    requested = attribute_caption(dict(zip(ckpt.attribute_names, attrs[0].int().tolist()))) or ["no attribute set"]
    save_grid(images, out, captions=[requested] * len(images), legend="requested values (1 present, 0 absent)")
    print(f"wrote {out} ({args.n} images; privacy: {combined_privacy(ckpt, guide)})")
    return 0
