"""Evaluation: what a private edit still leaks about the protected attributes, and what it keeps.

    python bench/edit_eval.py --checkpoint run/ --quick        # ~1-3 min on a CPU
    python bench/edit_eval.py --checkpoint run/ --out bench/out/edit_eval

(a) Privacy. An attribute-inference attacker (a small CNN, trained here on ORIGINAL synthetic
    faces that neither the diffusion model nor the evaluation uses: the naive attacker; an adaptive
    one trained on edited images is not implemented yet) reads each protected attribute off the
    edited images. Its accuracy w.r.t. the ORIGINAL value is compared with the "bound": the
    Bayes-optimal accuracy of someone who sees only the released value, given the attribute's prior
    P(a=+1) (``veil.privacy.bounds.bayes_accuracy_bound``; randomized response guarantees posterior
    odds <= e^eps x prior odds, and e^eps / (1 + e^eps) = p_keep is the bound only for a 50/50 prior:
    on a skewed attribute always guessing the majority beats p_keep). The prior of each attribute is
    its frequency in the dataset's TRAINING split: the owner's data, fine for this owner-side
    evaluation (the edited images come from the val + test splits). Above the bound, the pixels leak
    what the mechanism hid (inversion keeps part of the original image); the table says where, and
    by how much ("excess"; "*" = more than 2 standard errors).
(b) Utility. The same classifier's accuracy on the UNprotected attributes of edited images (they
    should survive), "follows": accuracy on protected attributes w.r.t. the RELEASED value (does the
    image show what was released), and PSNR / SSIM (gaussian window 11, sigma 1.5) of edit vs original.

Images: the checkpoint's dataset, its validation + test splits (not trained on). Each strength's
inversion (with the protected attributes unknown, as every private edit inverts) is computed once
and shared by every epsilon. Writes OUT/edit_eval.md (table), OUT/edit_eval.png (plot) and
OUT/edit_eval.json, and prints the table.
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
from veil.privacy.bounds import bayes_accuracy_bound
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


def attribute_priors(attributes: torch.Tensor, names: list[str]) -> dict[str, float]:
    """(N,k) in {-1,0,+1} -> {name: P(a = +1)} over the known (non-zero) values: the attacker's prior."""
    known = attributes != 0  # (N,k)
    if not known.any(dim=0).all():
        missing = [n for n, k in zip(names, known.any(dim=0)) if not k]
        raise SystemExit(f"no known values in the training split to estimate the prior of {missing}")
    return {n: float((attributes[:, i] > 0).sum() / known[:, i].sum()) for i, n in enumerate(names)}


def score_edits(pred: torch.Tensor, original: torch.Tensor, released: torch.Tensor, *, names: list[str],
                protect: list[str], epsilon: float, priors: dict[str, float]) -> dict:
    """The classifier's numbers for one (strength, epsilon) cell. pred, original, released: (N,k) in {-1,+1}.

    attack[p]: accuracy on protected p w.r.t. the ORIGINAL value; bound[p]: the Bayes-optimal accuracy
    from the released value alone at p's prior; follows[p]: accuracy w.r.t. the RELEASED value;
    unprotected: accuracy on the other attributes.
    """
    p_idx = [names.index(p) for p in protect]
    u_idx = [i for i in range(len(names)) if i not in p_idx]
    row = {"epsilon": epsilon, "p_keep": keep_probability(epsilon=epsilon), "attack": {}, "bound": {}, "follows": {},
           "unprotected": float((pred[:, u_idx] == original[:, u_idx]).float().mean()) if u_idx else float("nan"),
           "flip_rate": float((released[:, p_idx] != original[:, p_idx]).float().mean())}
    for i in p_idx:
        name = names[i]
        row["attack"][name] = float((pred[:, i] == original[:, i]).float().mean())
        row["bound"][name] = bayes_accuracy_bound(epsilon=epsilon, prior=priors[name])
        row["follows"][name] = float((pred[:, i] == released[:, i]).float().mean())
    return row


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
    train = dm.split_indices("train")
    priors = attribute_priors(dm.dataset.attribute_matrix[train], names)  # owner-side: the training split's labels

    t0 = time.time()
    attacker = train_attacker(names, resolution=x.shape[-1], num_images=args.attacker_images,
                              epochs=args.attacker_epochs, seed=args.seed + 1000)
    base_pred = predict(attacker, x)
    baseline = {"attacker_seconds": time.time() - t0, "n": len(ids), "priors": priors, "prior_n": len(train),
                "accuracy_on_originals": {n: float((base_pred[:, i] == a[:, i]).float().mean()) for i, n in enumerate(names)}}
    rows = []
    for strength in args.strengths:
        x_t0 = editor.invert(x, a, strength=strength, protected=protect)  # shared by every epsilon
        for eps in args.epsilons:
            draws = [privatize(dict(zip(names, row.int().tolist())), protected=protect, epsilon=eps,
                               rng=random.Random(derive_seed(args.seed, i, eps))) for i, row in zip(ids, a)]
            released = torch.tensor([[d[n] for n in names] for d in draws], dtype=torch.float32)
            edited = editor.regenerate(x_t0, released, strength=strength)
            row = {"strength": strength, **score_edits(predict(attacker, edited), a, released, names=names,
                                                       protect=protect, epsilon=eps, priors=priors),
                   "psnr": psnr(edited, x), "ssim": ssim(edited, x)}
            rows.append(row)
            print(f"  strength {strength:.2f} eps {eps:g}: attack {row['attack']} bound {row['bound']} "
                  f"ssim {row['ssim']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return rows, baseline


def _excess(acc: float, bound: float, n: int) -> str:
    se = math.sqrt(max(bound * (1 - bound), 0.25 / n) / n)  # stderr of an accuracy at the bound
    d = acc - bound
    return f"{d:+.3f}{'*' if d > 2 * se else ''}" if d > 0 else "-"


def markdown(rows: list[dict], baseline: dict, protect: list[str]) -> str:
    """The table of rows (``score_edits`` plus strength, PSNR, SSIM) and notes; flags attacks above the
    prior-aware bound."""
    n = baseline["n"]
    head = ["strength", "epsilon", "p_keep"] + [f"{c} {p}" for p in protect for c in ("attack", "bound", "excess")] + \
        [f"follows {p}" for p in protect] + ["unprotected acc", "PSNR dB", "SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['strength']:.2f}", f"{r['epsilon']:g}", f"{r['p_keep']:.3f}"]
        for p in protect:
            cells += [f"{r['attack'][p]:.3f}", f"{r['bound'][p]:.3f}", _excess(r["attack"][p], r["bound"][p], n)]
        cells += [f"{r['follows'][p]:.3f}" for p in protect] + [f"{r['unprotected']:.3f}", f"{r['psnr']:.1f}", f"{r['ssim']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    beat = [(r, p) for r in rows for p in protect if _excess(r["attack"][p], r["bound"][p], n).endswith("*")]
    orig = ", ".join(f"{k} {v:.3f}" for k, v in baseline["accuracy_on_originals"].items())
    priors = ", ".join(f"{p} {baseline['priors'][p]:.3f}" for p in protect)
    notes = [f"n = {n} images; attacker accuracy on the unedited originals: {orig}.",
             f"prior P(a=+1) from the training split ({baseline.get('prior_n', '?')} images, the owner's labels): "
             f"{priors}.",
             "bound = the best accuracy from the released value alone given that prior (posterior odds <= e^eps x "
             "prior odds); p_keep = e^eps/(1+e^eps) is the bound only at prior 0.5.",
             "excess = attack - bound where positive; * = more than 2 standard errors above the bound."]
    if beat:
        r, p = max(beat, key=lambda rp: rp[0]["attack"][rp[1]] - rp[0]["bound"][rp[1]])
        notes.append(f"The attacker beats the prior-aware bound in {len(beat)} of {len(rows) * len(protect)} "
                     f"cells; worst: {p} at strength {r['strength']:.2f}, epsilon {r['epsilon']:g}, "
                     f"{r['attack'][p]:.3f} vs {r['bound'][p]:.3f} (+{r['attack'][p] - r['bound'][p]:.3f}).")
    else:
        notes.append("The attacker does not beat the prior-aware bound significantly anywhere.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in notes) + "\n"


def plot(rows, baseline, args, path: Path) -> None:
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
    marks = "os^vD"
    for j, p in enumerate(prot):
        curve = [bayes_accuracy_bound(epsilon=e, prior=baseline["priors"][p]) for e in dense]
        xs = dense + ([pos(math.inf)] if any(not math.isfinite(e) for e in args.epsilons) else [])
        ax1.plot(xs, curve + [1.0] * (len(xs) - len(dense)), "k", ls=["--", ":", "-."][j % 3], lw=1,
                 label=f"bound {p} (prior {baseline['priors'][p]:.2f})")
    for k, s in enumerate(args.strengths):
        sel, c = [r for r in rows if r["strength"] == s], f"C{k}"
        xs = [pos(r["epsilon"]) for r in sel]
        for j, p in enumerate(prot):
            ax1.plot(xs, [r["attack"][p] for r in sel], marker=marks[j % len(marks)], color=c,
                     label=f"attack {p}, strength {s:g}")
        ax2.plot(xs, [r["unprotected"] for r in sel], "o-", color=c, label=f"unprotected acc, strength {s:g}")
        ax2.plot(xs, [r["ssim"] for r in sel], "s:", color=c, label=f"SSIM, strength {s:g}")
    for ax in (ax1, ax2):
        ax.set_xticks(grid, [f"{e:g}" if e in finite else "inf" for e in grid])
        ax.set_xlabel("epsilon")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("accuracy on protected vs original")
    ax1.set_title("privacy: attribute inference on edited images")
    ax2.set_title("utility")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="the model release of `veil train`: its run folder OUT or OUT/model")
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
    table = markdown(rows, baseline, [p for p in args.protect.split(",") if p])
    header = (f"checkpoint `{args.checkpoint}`, {baseline['n']} images, steps {args.steps}, guidance {args.guidance}, "
              f"protect {args.protect}; {time.time() - start:.0f} s\n\n")
    (out / "edit_eval.md").write_text(header + table)
    (out / "edit_eval.json").write_text(json.dumps({"rows": rows, "baseline": baseline,
                                                    "args": {k: v for k, v in vars(args).items()}}, indent=1, default=str))
    plot(rows, baseline, args, out / "edit_eval.png")
    print(header + table)
    print(f"wrote {out}/edit_eval.md, edit_eval.png, edit_eval.json")


if __name__ == "__main__":
    main()
