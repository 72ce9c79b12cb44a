"""Evaluation: what a private edit still leaks about the protected attributes, and what it keeps.

    python bench/edit_eval.py --checkpoint run/last.ckpt --quick        # ~1-3 min on a CPU
    python bench/edit_eval.py --checkpoint run/last.ckpt --out bench/out/edit_eval

(a) Privacy. An attribute-inference attacker (a small CNN, trained here on ORIGINAL synthetic
    faces that neither the diffusion model nor the evaluation uses) reads each protected attribute
    off the edited images. Its accuracy w.r.t. the ORIGINAL value is compared with the ceiling
    e^eps / (1 + e^eps): the best anyone can do from the released value alone (randomized response).
    Above the ceiling, the pixels leak what the mechanism hid (inversion keeps part of the original);
    the table says where, and by how much ("excess"; "*" = more than 2 standard errors).
(b) Utility. The same classifier's accuracy on the UNprotected attributes of edited images (they
    should survive), "follows": accuracy on protected attributes w.r.t. the RELEASED value (does the
    image show what was released), and PSNR / SSIM (gaussian window 11, sigma 1.5) of edit vs original.

Images: the checkpoint's dataset, its validation + test splits (not trained on). Each strength's
inversion is computed once and shared by every epsilon. Writes OUT/edit_eval.md (table),
OUT/edit_eval.png (plot) and OUT/edit_eval.json, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
from veil.lightning_modules.data.datamodule import DATASET_KEYS, FaceDataModule
from veil.lightning_modules.data.synthetic_faces import SyntheticFaces
from veil.lightning_modules.editing.editor import PrivateEditor
from veil.privacy.mechanism import derive_seed, keep_probability, privatize


class AttributeCNN(nn.Module):
    """Small multi-label classifier: (B,3,32k,32k) -> (B,k) logits, one per attribute."""

    def __init__(self, num_attributes: int):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_attributes))

    def forward(self, x):
        return self.head(self.features(x))


def train_attacker(names, *, resolution: int, num_images: int, epochs: int, seed: int) -> AttributeCNN:
    """Fit the attacker on original synthetic faces drawn with their own seed (disjoint from the eval images)."""
    ds = SyntheticFaces(num_images=num_images, resolution=resolution, seed=seed, attributes=names)
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (N,3,H,W)
    y = (ds.attribute_matrix > 0).float()  # (N,k) in {0,1}
    torch.manual_seed(seed)
    model, gen = AttributeCNN(len(names)), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = x[idx] + 0.03 * torch.randn(x[idx].shape, generator=gen)  # light noise: edits are slightly noisy
            loss = nn.functional.binary_cross_entropy_with_logits(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,k) in {-1,+1}."""
    return torch.cat([torch.where(model(b) > 0, 1.0, -1.0) for b in images.split(256)])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1,1] (peak-to-peak 2)."""
    mse = (a - b).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) with a gaussian window, per channel, on images mapped to [0,1]."""
    a, b = (a + 1) / 2, (b + 1) / 2
    g = torch.exp(-((torch.arange(window) - window // 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).to(a.dtype)
    w = (g[:, None] * g[None, :]).expand(3, 1, window, window)  # (3,1,win,win), one per channel
    blur = lambda x: nn.functional.conv2d(x, w, groups=3)  # valid window positions only
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def evaluate(args) -> tuple[list[dict], dict]:
    ckpt = load_diffusion_checkpoint(args.checkpoint)
    names = list(ckpt.attribute_names)
    protect = [p for p in args.protect.split(",") if p]
    if not protect or not set(protect) <= set(names):
        raise SystemExit(f"--protect {args.protect!r}: choose attributes from {names}")
    editor = PrivateEditor(ckpt.model, ckpt.scheduler_config, names, num_steps=args.steps, guidance_scale=args.guidance)
    spec = {k: v for k, v in (ckpt.data_spec or {"source": "synthetic"}).items() if k in DATASET_KEYS}
    dm = FaceDataModule(**{**spec, "attributes": names})
    indices = (dm.split_indices("val") + dm.split_indices("test"))[: args.num_images]
    x = torch.stack([dm.dataset[i][0] for i in indices])  # (N,3,H,W)
    a = torch.stack([dm.dataset[i][1] for i in indices])  # (N,k)
    ids = [dm.dataset.ids[i] for i in indices]
    p_idx = [names.index(p) for p in protect]
    u_idx = [i for i in range(len(names)) if i not in p_idx]

    t0 = time.time()
    attacker = train_attacker(names, resolution=x.shape[-1], num_images=args.attacker_images,
                              epochs=args.attacker_epochs, seed=args.seed + 1000)
    base_pred = predict(attacker, x)
    baseline = {"attacker_seconds": time.time() - t0, "n": len(ids),
                "accuracy_on_originals": {n: float((base_pred[:, i] == a[:, i]).float().mean()) for i, n in enumerate(names)}}
    rows = []
    for strength in args.strengths:
        x_t0 = editor.invert(x, a, strength=strength)  # shared by every epsilon
        for eps in args.epsilons:
            draws = [privatize(dict(zip(names, row.int().tolist())), protected=protect, epsilon=eps,
                               rng=random.Random(derive_seed(args.seed, i, eps))) for i, row in zip(ids, a)]
            released = torch.tensor([[d[n] for n in names] for d in draws], dtype=torch.float32)
            edited = editor.regenerate(x_t0, released, strength=strength)
            pred = predict(attacker, edited)
            ceiling = keep_probability(epsilon=eps)
            row = {"strength": strength, "epsilon": eps, "ceiling": ceiling, "attack": {}, "follows": {},
                   "unprotected": float((pred[:, u_idx] == a[:, u_idx]).float().mean()) if u_idx else float("nan"),
                   "psnr": psnr(edited, x), "ssim": ssim(edited, x),
                   "flip_rate": float((released[:, p_idx] != a[:, p_idx]).float().mean())}
            for i in p_idx:
                row["attack"][names[i]] = float((pred[:, i] == a[:, i]).float().mean())
                row["follows"][names[i]] = float((pred[:, i] == released[:, i]).float().mean())
            rows.append(row)
            print(f"  strength {strength:.2f} eps {eps:g}: attack {row['attack']} ceiling {ceiling:.3f} "
                  f"ssim {row['ssim']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return rows, baseline


def _excess(acc: float, ceiling: float, n: int) -> str:
    se = math.sqrt(max(ceiling * (1 - ceiling), 0.25 / n) / n)  # stderr of an accuracy at the ceiling
    d = acc - ceiling
    return f"{d:+.3f}{'*' if d > 2 * se else ''}" if d > 0 else "-"


def markdown(rows, baseline, args) -> str:
    prot = [p for p in args.protect.split(",") if p]
    n = baseline["n"]
    head = ["strength", "epsilon", "ceiling"] + [f"attack {p}" for p in prot] + [f"excess {p}" for p in prot] + \
        [f"follows {p}" for p in prot] + ["unprotected acc", "PSNR dB", "SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['strength']:.2f}", f"{r['epsilon']:g}", f"{r['ceiling']:.3f}"]
        cells += [f"{r['attack'][p]:.3f}" for p in prot] + [_excess(r["attack"][p], r["ceiling"], n) for p in prot]
        cells += [f"{r['follows'][p]:.3f}" for p in prot] + [f"{r['unprotected']:.3f}", f"{r['psnr']:.1f}", f"{r['ssim']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    beat = [(r, p) for r in rows for p in prot if _excess(r["attack"][p], r["ceiling"], n).endswith("*")]
    orig = ", ".join(f"{k} {v:.3f}" for k, v in baseline["accuracy_on_originals"].items())
    notes = [f"n = {n} images; attacker accuracy on the unedited originals: {orig}.",
             "excess = attack - ceiling where positive; * = more than 2 standard errors above the ceiling."]
    if beat:
        worst = max(beat, key=lambda rp: rp[0]["attack"][rp[1]] - rp[0]["ceiling"])
        r, p = worst
        notes.append(f"The attacker beats the randomized-response ceiling in {len(beat)} of {len(rows) * len(prot)} "
                     f"cells; worst: {p} at strength {r['strength']:.2f}, epsilon {r['epsilon']:g}, "
                     f"{r['attack'][p]:.3f} vs {r['ceiling']:.3f} (+{r['attack'][p] - r['ceiling']:.3f}).")
    else:
        notes.append("The attacker does not beat the randomized-response ceiling significantly anywhere.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in notes) + "\n"


def plot(rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prot = [p for p in args.protect.split(",") if p]
    finite = [e for e in args.epsilons if math.isfinite(e)]
    pos = lambda e: e if math.isfinite(e) else (max(finite, default=1) + 2)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = sorted({pos(e) for e in args.epsilons})
    top = max(finite, default=1)
    dense = [top * i / 100 for i in range(101)]
    curve = [keep_probability(epsilon=e) for e in dense]
    if any(not math.isfinite(e) for e in args.epsilons):
        dense, curve = dense + [pos(math.inf)], curve + [1.0]
    ax1.plot(dense, curve, "k--", label="ceiling e^eps/(1+e^eps)")
    for k, s in enumerate(args.strengths):
        sel, c = [r for r in rows if r["strength"] == s], f"C{k}"
        xs = [pos(r["epsilon"]) for r in sel]
        ax1.plot(xs, [sum(r["attack"][p] for p in prot) / len(prot) for r in sel], "o-", color=c,
                 label=f"attacker, strength {s:g}")
        ax2.plot(xs, [r["unprotected"] for r in sel], "o-", color=c, label=f"unprotected acc, strength {s:g}")
        ax2.plot(xs, [r["ssim"] for r in sel], "s:", color=c, label=f"SSIM, strength {s:g}")
    for ax in (ax1, ax2):
        ax.set_xticks(grid, [f"{e:g}" if e in finite else "inf" for e in grid])
        ax.set_xlabel("epsilon")
        ax.grid(alpha=0.3)
    ax1.set_ylabel(f"accuracy on protected ({', '.join(prot)}) vs original")
    ax1.set_title("privacy: attribute inference on edited images")
    ax2.set_title("utility")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="last.ckpt of `veil train`")
    p.add_argument("--protect", default="eyeglasses,smiling", help="protected attributes (default eyeglasses,smiling)")
    p.add_argument("--epsilons", default="0,1,2,4,inf", help="comma-separated epsilons (default 0,1,2,4,inf)")
    p.add_argument("--strengths", default="0.4,0.55,0.7,0.95", help="comma-separated strengths (default: the levels')")
    p.add_argument("--num-images", type=int, default=200, help="edited images (val + test splits; default 200)")
    p.add_argument("--attacker-images", type=int, default=2048, help="attacker training images (default 2048)")
    p.add_argument("--attacker-epochs", type=int, default=4, help="attacker training epochs (default 4)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of a full-strength edit (default 25)")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance of the regeneration (default 2.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized response and the attacker")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is often "
                                                          "fastest on a busy machine)")
    p.add_argument("--quick", action="store_true", help="48 images, eps 0,1,4,inf, strengths 0.4,0.7, 12 steps, "
                                                        "attacker on 1024 images x 3 epochs")
    p.add_argument("--out", default="bench/out/edit_eval", help="folder for edit_eval.md/.png/.json")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.attacker_images, args.attacker_epochs, args.steps = 48, 1024, 3, 12
        args.epsilons, args.strengths = "0,1,4,inf", "0.4,0.7"
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.strengths = [float(s) for s in args.strengths.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    rows, baseline = evaluate(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, baseline, args)
    header = (f"checkpoint `{args.checkpoint}`, {baseline['n']} images, steps {args.steps}, guidance {args.guidance}, "
              f"protect {args.protect}; {time.time() - start:.0f} s\n\n")
    (out / "edit_eval.md").write_text(header + table)
    (out / "edit_eval.json").write_text(json.dumps({"rows": rows, "baseline": baseline,
                                                    "args": {k: v for k, v in vars(args).items()}}, indent=1, default=str))
    plot(rows, args, out / "edit_eval.png")
    print(header + table)
    print(f"wrote {out}/edit_eval.md, edit_eval.png, edit_eval.json")


if __name__ == "__main__":
    main()
