"""Do samples show the attributes they were asked for? A grid, and a probe classifier's verdict.

    python bench/sample_quality.py --checkpoint runs/long --grid docs/samples.png
    python bench/sample_quality.py --checkpoint runs/public --classifier runs/guide \
        --grid docs/samples_guided.png          # classifier guidance

1. Train a small CNN probe on real synthetic faces (fresh seed), report its held-out accuracy.
2. For each attribute a and value v in {+1, -1}: draw ``--n`` samples with a = v and every other
   attribute unknown (0), the same initial noise for both values, so a row pair shows a's effect.
3. Report the probe's accuracy on the samples against the requested value, per attribute
   (0.5 = the attribute is ignored; the probe's own accuracy on real images is the ceiling).
Writes the grid (rows: a=+1, a=-1 for each attribute in order) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn


def make_probe(k: int) -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.GroupNorm(8, o), nn.SiLU())

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, k))


def train_probe(resolution: int, attributes: list[str], device: str, *, n: int = 6000, epochs: int = 4, seed: int = 1234):
    from veil.lightning_modules.data.synthetic_faces import SyntheticFaces

    ds = SyntheticFaces(num_images=n + 1000, resolution=resolution, seed=seed, attributes=attributes)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
    y = (torch.stack([ds[i][1] for i in range(len(ds))]) > 0).float().to(device)
    probe = make_probe(len(attributes)).to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(128):
            loss = nn.functional.binary_cross_entropy_with_logits(probe(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    probe.eval()
    with torch.no_grad():
        acc = ((probe(x[n:]) > 0).float() == y[n:]).float().mean(0)
    return probe, acc.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--grid", required=True, help="PNG to write")
    parser.add_argument("--n", type=int, default=8, help="samples per (attribute, value)")
    parser.add_argument("--eval-n", type=int, default=64, help="samples per (attribute, value) for the accuracy")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: 2, or 0 for a model trained without labels)")
    parser.add_argument("--classifier", help="noise-conditional guidance classifier checkpoint")
    parser.add_argument("--classifier-scale", type=float, default=10.0)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil.lightning_modules.data.grid import attribute_caption, save_grid
    from veil.lightning_modules.diffusion.guidance import load_guidance_classifier
    from veil.lightning_modules.diffusion.sample import (
        combined_privacy,
        ddim_sample,
        default_guidance,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_diffusion_checkpoint(args.checkpoint)
    model, names = ckpt.model.to(device), ckpt.attribute_names
    guidance = default_guidance(ckpt) if args.guidance is None else args.guidance
    guide = None
    if args.classifier:
        guide = load_guidance_classifier(args.classifier, scheduler_config=ckpt.scheduler_config,
                                         scale=args.classifier_scale)
        guide.model.to(device)
    res = model.unet.config.sample_size
    probe, real_acc = train_probe(res, names, device)
    rows, captions, sample_acc = [], [], []
    for j, name in enumerate(names):
        correct = 0
        for value in (1.0, -1.0):
            attrs = torch.zeros(args.eval_n, len(names))
            attrs[:, j] = value
            gen = torch.Generator().manual_seed(j)  # same noise for +1 and -1
            imgs = ddim_sample(model, ckpt.scheduler_config, attrs, num_steps=args.steps, guidance_scale=guidance,
                               generator=gen, guide=guide,
                               guide_targets=guide.targets_for(attrs, names) if guide else None)
            with torch.no_grad():
                correct += ((probe(imgs.to(device))[:, j] > 0) == (value > 0)).sum().item()
            rows.append(imgs[: args.n].cpu())
            captions += [attribute_caption({name: int(value)})] * len(rows[-1])
        sample_acc.append(correct / (2 * args.eval_n))
    save_grid(torch.cat(rows), args.grid, nrow=args.n, captions=captions,
              legend="requested value of one attribute per row (1 present, 0 absent); the others unknown")
    print(f"checkpoint {args.checkpoint}; classifier-free guidance {guidance}; "
          f"classifier {args.classifier} (scale {args.classifier_scale if guide else '-'})")
    print(f"privacy: {combined_privacy(ckpt, guide)}")
    print("| attribute | probe acc. on real images | probe acc. on samples (requested value) |")
    print("| --- | --- | --- |")
    for name, r, s in zip(names, real_acc.tolist(), sample_acc):
        print(f"| {name} | {r:.3f} | {s:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"privacy": ckpt.privacy, "classifier_privacy": guide.privacy if guide else None,
                       "classifier_scale": args.classifier_scale if guide else None, "guidance": guidance,
                       "summary": combined_privacy(ckpt, guide), "attributes": names, "probe_real": real_acc.tolist(),
                       "samples": sample_acc}, f, indent=2)


if __name__ == "__main__":
    main()
