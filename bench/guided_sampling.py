"""What classifier guidance costs at sampling time: seconds per image, against unguided sampling.

    python bench/guided_sampling.py --checkpoint runs/public --classifier runs/guide

Draws ``--batch`` images with ``--steps`` DDIM steps three ways, same initial noise: unguided
(one denoiser forward a step: the baseline), classifier-free guidance 2 (two forwards, batched),
and classifier guidance (one forward + the classifier's forward and backward). Prints the median
of ``--repeats`` timed runs after one warm-up, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="veil train run folder or its model/ release (the denoiser)")
    parser.add_argument("--classifier", required=True, help="noise-conditional guidance classifier checkpoint")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil.lightning_modules.diffusion.guidance import load_guidance_classifier
    from veil.lightning_modules.diffusion.sample import ddim_sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_diffusion_checkpoint(args.checkpoint)
    model = ckpt.model.to(device)
    guide = load_guidance_classifier(args.classifier, scheduler_config=ckpt.scheduler_config, scale=10.0)
    guide.model.to(device)
    attrs = torch.zeros(args.batch, len(ckpt.attribute_names))
    attrs[:, 0] = 1.0
    targets = guide.targets_for(attrs, ckpt.attribute_names)
    modes = {
        "unguided (baseline)": dict(guidance_scale=0.0),
        "classifier-free guidance 2": dict(guidance_scale=2.0),
        "classifier guidance 10": dict(guidance_scale=0.0, guide=guide, guide_targets=targets),
    }

    def run(kw) -> float:
        gen = torch.Generator().manual_seed(0)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ddim_sample(model, ckpt.scheduler_config, attrs, num_steps=args.steps, generator=gen, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results = {}
    for name, kw in modes.items():
        run(kw)  # warm-up
        results[name] = statistics.median(run(kw) for _ in range(args.repeats))
    base = results["unguided (baseline)"]
    params = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in guide.model.parameters())
    print(f"device {device}, threads {torch.get_num_threads()}; denoiser {params[0]:,} parameters, "
          f"classifier {params[1]:,}; batch {args.batch}, {args.steps} DDIM steps, median of {args.repeats}")
    print("| sampling | s per batch | ms per image per step | x baseline |")
    print("| --- | --- | --- | --- |")
    for name, sec in results.items():
        print(f"| {name} | {sec:.3f} | {1000 * sec / (args.batch * args.steps):.2f} | {sec / base:.2f} |")


if __name__ == "__main__":
    main()
