"""Choose dp.max_grad_norm (C) for a fine-tuning config from *public* data, before spending budget.

    python bench/clip_norms.py --config lightning_modules/configs/synthetic32_dp_finetune.yaml \
        --set model.init_from=runs/public/model --clip 1,0.03,0.01,0.003

At the config's start (``model.init_from``) and trainable subset (``optim.trainable``), on images
of the start checkpoint's own training data (public by construction: veil refuses a start trained
on the private set), it computes per-sample gradients of the DDPM loss and prints:

1. quantiles of the per-sample gradient norm over the trained parameters;
2. for each candidate C: the fraction of samples clipped; the signal |E[clip_C(g)]|, estimated
   without bias as the dot product of two disjoint half-batch means, averaged over 16 random
   splits (+- its spread: a spread as large as the value means the signal is below what these
   images can resolve); the DP noise norm of one step sigma * C * sqrt(P) / B at the config's
   sigma and batch; the minibatch (sampling) noise of the mean of B clipped gradients,
   sqrt(E|clip(g)|^2 / B), which a non-private run of the same batch has too; signal / DP noise.

Nothing here touches the private data, so it spends no privacy budget. Signal/noise well below 1
means the step is mostly noise; C far above the median norm only adds noise (nothing is clipped).
"""

from __future__ import annotations

import argparse

import torch


def per_sample_gradients(module, x: torch.Tensor, attrs: torch.Tensor, *, chunk: int, seed: int) -> torch.Tensor:
    """(n, P) per-sample gradients of the DDPM loss over the trainable parameters."""
    from veil.lightning_modules.diffusion.schedule import q_sample
    from veil.lightning_modules.dp.grad_sample import attach_grad_sampler

    attach_grad_sampler(module.model)
    params = module.trainable_parameters()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in range(0, len(x), chunk):
        x0, a = x[s : s + chunk], attrs[s : s + chunk]
        t = torch.randint(0, len(module.alphas_cumprod), (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = q_sample(x0, module.alphas_cumprod, t, noise)
        loss = (module.model(x_t, t, a) - noise).pow(2).mean(dim=(1, 2, 3)).mean()
        loss.backward()
        # loss_reduction="mean": Opacus scales grad_sample back up, so row i is example i's own gradient
        rows.append(torch.cat([p.grad_sample.reshape(len(x0), -1) for p in params], dim=1))
        for p in params:
            p.grad, p.grad_sample = None, None
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n", type=int, default=256, help="public images (default 256)")
    parser.add_argument("--clip", default="1,0.1,0.03,0.01,0.003", help="candidate C values")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil.lightning_modules.data.datamodule import FaceDataModule
    from veil.jobs.config import load_config
    from veil.jobs.train import build_datamodule, build_module
    from veil.jobs.init_from import load_start

    cfg = load_config(args.config, args.set)
    if not cfg.model.init_from:
        raise SystemExit("set model.init_from: C is calibrated at the public start")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    load_start(module, cfg.model.init_from, data_spec=dm.spec())
    public = FaceDataModule.from_spec(load_diffusion_checkpoint(cfg.model.init_from).data_spec).dataset
    x = torch.stack([public[i][0] for i in range(args.n)])
    attrs = torch.stack([public[i][1] for i in range(args.n)])
    if list(getattr(public, "attribute_names", [])) != list(dm.attribute_names):
        attrs = torch.zeros(args.n, len(dm.attribute_names))  # the public set lacks these labels
    grads = per_sample_gradients(module, x, attrs, chunk=64, seed=cfg.seed)
    norms = grads.norm(dim=1)
    P, B, sigma = grads.shape[1], cfg.data.batch_size, module.noise_multiplier
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    print(f"trained parameters P = {P:,}; sigma = {sigma:.3f} at batch B = {B}; {args.n} public images")
    print("per-sample gradient norm quantiles 10/25/50/75/90%: "
          + " / ".join(f"{v:.4g}" for v in torch.quantile(norms, q).tolist()))
    print("| C | clipped | signal E[clip(g)] (+- spread) | DP noise sigma C sqrt(P) / B | sampling noise | signal / DP noise |")
    print("|---|---|---|---|---|---|")
    half, gen = args.n // 2, torch.Generator().manual_seed(0)
    for c in (float(v) for v in args.clip.split(",")):
        clipped = grads * (c / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)  # (n, P)
        dots = []
        for _ in range(16):
            perm = torch.randperm(args.n, generator=gen)
            dots.append(float(clipped[perm[:half]].mean(0) @ clipped[perm[half : 2 * half]].mean(0)))
        dots = torch.tensor(dots)
        signal, spread = max(float(dots.mean()), 0.0) ** 0.5, float(dots.std()) ** 0.5
        noise = sigma * c * P**0.5 / B
        sampling = float(clipped.pow(2).sum(1).mean() / B) ** 0.5
        frac = float((norms > c).float().mean())
        print(f"| {c:g} | {frac:.0%} | {signal:.3g} (+- {spread:.2g}) | {noise:.3g} | {sampling:.3g} | {signal / noise:.2f} |")


if __name__ == "__main__":
    main()
