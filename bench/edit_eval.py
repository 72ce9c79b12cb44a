"""Evaluation: what a private edit still leaks about the protected attributes, and what it keeps.

    python bench/edit_eval.py --checkpoint runs/public --classifier runs/guide --checker runs/judge \
        --label "guided, DP eps 10" --out bench/out/guided --threads 1   # the guided pipeline at the four levels
    python bench/edit_eval.py --checkpoint run/ --quick --threads 1      # conditional backend, a few minutes
    python bench/edit_eval.py --checkpoint veil/demo/models/public_unet --classifier veil/demo/models/guide \
        --encodings noise,fresh:1,invert:0.4 --strengths 0.55,0.7,0.85,1 --epsilons 0,1,2 \
        --num-images 64 --adaptive-images 128 --steps 20 --threads 2 --out docs/edit_price   # price vs utility
    python bench/edit_eval.py --combine bench/out/guided/edit_eval.json bench/out/control/edit_eval.json \
        --out docs/edit_eval                                 # several runs in one table and one plot

Pipeline. ``--checkpoint`` is a ``veil train`` release. With ``--classifier`` (a ``veil train-classifier``
release) and ``--classifier-scale`` > 0 the editor is the guided backend (a denoiser steered by the
classifier), else the conditional one (classifier-free guidance); see ``PrivateEditor``. The images
edited are the held-out (val + test) images of the private data: the classifier's dataset when one is
given (the guided denoiser is a public model of other data), else the checkpoint's. Rows: the privacy
levels (``--levels``, default low,medium,high,max, each an (epsilon, strength)) or, to re-choose the
levels, the grid ``--strengths`` x ``--epsilons`` x ``--encodings`` (invert, noise, fresh; "fresh:1" gives
an encoding its own strength instead of every ``--strengths``). ``--label`` names the rows of one run.

Pooling (the grid's third axis, "poolR" in ``--encodings``): the "noise" encoding of the image average-pooled to
R x R blocks and upsampled back (``pooled``), i.e. only the block means reach the model. Its price is the
"noise" encoding's at the same strength, and that is tight, not a bound left loose: ``pooled`` is an orthogonal
projection, so it never lengthens the difference of two images, and two flat images (all -1, all +1) keep the
whole sensitivity 2 sqrt(3 H W). Nor could a finer accounting help: the block means of a "noise" release
already carry the pooled release at the same mu (averaging k^2 noise samples divides the noise by k as
pooling divides the sensitivity), so a pooled release is a post-processing of the unpooled one at equal
price. The rows measure what that costs in utility.

The price. Each row carries the formal price of ONE release at its setting, exactly as the ledger charges
it (``formal_price``: the editor's ``pixel_mus``, every encoding the check may draw, and one randomized
response per protected attribute, priced and composed by ``veil.privacy.accounting`` at delta 1e-6): the
pixels' Gaussian mu, the pixels' epsilon, the labels' epsilon and the composed epsilon ("fresh" does not read
the image: 0; "invert": unbounded). With the price, the plot puts utility (SSIM, follows) and the stronger
attack minus the labels' bound against the composed epsilon on a log axis.

The check. With a check classifier (``--checker``, or ``--classifier`` at scale 0), edits go through
``edit_checked``: an edit that does not show its released protected values is re-done deeper, and refused
if it still does not. Each row gives the fraction re-done and refused; every other number is computed on
the n edits that passed, the ones that would be released. A guided run is never checked by its guide (as
``veil edit``): without ``--checker`` it runs unchecked, every edit counts, and its label says "unchecked".

(a) Privacy. Attribute-inference attackers (small CNNs) read each protected attribute off the edits;
    their accuracy w.r.t. the ORIGINAL value is compared with the "bound": the Bayes-optimal accuracy of
    someone who sees only the released value, given the attribute's prior P(a=+1)
    (``veil.privacy.bounds.bayes_accuracy_bound``: randomized response keeps posterior odds <= e^eps x
    prior odds; p_keep = e^eps / (1 + e^eps) is the bound only at a 50/50 prior, on a skewed attribute
    always guessing the majority beats it). The prior is the attribute's frequency in the dataset's
    TRAINING split, the owner's labels: fine for this owner-side evaluation.
    - naive: trained on ORIGINAL synthetic faces of another seed (neither model nor evaluation uses them).
    - adaptive: knows the pipeline. Per row it edits ``--adaptive-images`` images of the TRAINING split
      (disjoint from the evaluated ones) with the same backend and level and fresh randomized-response
      draws, keeps the edits that pass the check, and fine-tunes a copy of the naive attacker on (edit,
      ORIGINAL attributes) for ``--adaptive-epochs`` epochs: it learns what of the original the
      pipeline's edits keep.
    Above the bound, the pixels leak what the mechanism hid (inversion keeps part of the original image);
    "excess" says by how much for the stronger attacker ("*" = more than 2 standard errors).
(b) Utility. The naive attacker doubles as the probe: its accuracy on the UNprotected attributes of the
    edits (they should survive); "follows": its accuracy on the protected ones w.r.t. the RELEASED value
    (does the edit show what was released); PSNR and SSIM (gaussian window 11, sigma 1.5) against the
    original; realism as KID between the edits and the evaluated originals.
(c) Why KID on the probe's features. Inception features mean little on 32x32 synthetic faces, and FID
    is biased at n ~ 100 (its expectation depends on n), while KID, the unbiased MMD^2 with the kernel
    k(x, y) = (x.y / d + 1)^3, has expectation 0 for two samples of one distribution at any n. The
    features are the probe's penultimate layer (``AttributeCNN.embed``, 128-d), trained on this
    distribution, standardized per dimension by the originals' mean and std (``standardized``: raw, the
    cubic kernel made KID noise of magnitude 1e2-1e3). Edits of the first half of the images are compared
    with the originals of the second half (an edit and its own original are not independent samples), and
    the noise floor is the KID of the first half's originals against the same second half.

Each strength's inversion is computed once and shared by every epsilon when there is no check (with the
check, re-dos invert again). Writes OUT/edit_eval.md (table), .png (plot: against the price when every row
has one, else per level), .json (strict JSON: the rows, no per-image attributes, no randomized-response seed
but ``--seed``) and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from torch import nn

from veil.errors import VeilError
from veil.lightning_modules.data.datamodule import DATASET_KEYS, FaceDataModule
from veil.demo.attacker import AttributeCNN, adaptive_attacker, fit, predict, train_attacker  # noqa: F401
from veil.lightning_modules.diffusion.sample import combined_privacy, privacy_phrase
from veil.editing.load import load_editor
from veil.lightning_modules.editing.editor import PrivateEditor
from veil.outputs import write_json_atomic, write_text_atomic
from veil.privacy.accounting import DEFAULT_RELEASE_DELTA, compose, price_release
from veil.privacy.bounds import bayes_accuracy_bound
from veil.privacy.levels import ENCODINGS, LEVELS
from veil.privacy.mechanism import derive_seed, json_epsilon, keep_probability, privatize

SPLIT_KEYS = DATASET_KEYS + ("val_fraction", "test_fraction")  # the images and the splits the model saw
FULL = dict(num_images=200, adaptive_images=384, attacker_images=2048, attacker_epochs=4, adaptive_epochs=4, steps=25)
QUICK = dict(num_images=48, adaptive_images=96, attacker_images=1024, attacker_epochs=3, adaptive_epochs=3, steps=12)
PRICE_KEYS = ("pixel_mu", "pixels_epsilon", "labels_epsilon", "epsilon")  # a row's "price", as tabled
GRID = dict(strengths="0.4,0.55,0.7,0.95", epsilons="0,1,2,4,inf", encodings="invert")


# ---------------------------------------------------------------------------------------- attackers
# AttributeCNN, fit, train_attacker, adaptive_attacker, predict: veil.demo.attacker (the demo uses them)


@torch.no_grad()
def embed(model: AttributeCNN, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,128) probe features."""
    return torch.cat([model.embed(b) for b in images.split(256)])


# ------------------------------------------------------------------------------------------ metrics
def attribute_priors(attributes: torch.Tensor, names: list[str]) -> dict[str, float]:
    """(N,k) in {-1,0,+1} -> {name: P(a = +1)} over the known (non-zero) values: the attacker's prior."""
    known = attributes != 0  # (N,k)
    if not known.any(dim=0).all():
        missing = [n for n, k in zip(names, known.any(dim=0)) if not k]
        raise SystemExit(f"no known values in the training split to estimate the prior of {missing}")
    return {n: float((attributes[:, i] > 0).sum() / known[:, i].sum()) for i, n in enumerate(names)}


def score_edits(pred: torch.Tensor, original: torch.Tensor, released: torch.Tensor, *, names: list[str],
                protect: list[str], epsilon: float, priors: dict[str, float]) -> dict:
    """The naive attacker's (the probe's) numbers for one row. pred, original, released: (N,k) in {-1,+1}.

    naive[p]: accuracy on protected p w.r.t. the ORIGINAL value; bound[p]: the Bayes-optimal accuracy
    from the released value alone at p's prior; follows[p]: accuracy w.r.t. the RELEASED value;
    unprotected: accuracy on the other attributes. NaN where N = 0.
    """
    p_idx = [names.index(p) for p in protect]
    u_idx = [i for i in range(len(names)) if i not in p_idx]
    row = {"epsilon": epsilon, "p_keep": keep_probability(epsilon=epsilon), "naive": {}, "bound": {}, "follows": {},
           "unprotected": float((pred[:, u_idx] == original[:, u_idx]).float().mean()) if u_idx else math.nan,
           "flip_rate": float((released[:, p_idx] != original[:, p_idx]).float().mean())}
    for i in p_idx:
        name = names[i]
        row["naive"][name] = float((pred[:, i] == original[:, i]).float().mean())
        row["bound"][name] = bayes_accuracy_bound(epsilon=epsilon, prior=priors[name])
        row["follows"][name] = float((pred[:, i] == released[:, i]).float().mean())
    return row


def kid(f_x: torch.Tensor, f_y: torch.Tensor) -> float:
    """Kernel inception distance of features (m,d) and (n,d): the unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3,

        1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i,y_j) - 2/(mn) sum_{i,j} k(x_i,y_j),

    in float64. Its expectation is 0 when both come from one distribution (it can be slightly negative);
    NaN if either set has fewer than 2 rows. Give it ``standardized`` features."""
    m, n = len(f_x), len(f_y)
    if m < 2 or n < 2:
        return math.nan
    x, y = f_x.double(), f_y.double()
    k = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3
    k_xx, k_yy = k(x, x), k(y, y)
    within = (k_xx.sum() - k_xx.trace()) / (m * (m - 1)) + (k_yy.sum() - k_yy.trace()) / (n * (n - 1))
    return float(within - 2 * k(x, y).mean())


def standardized(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``features`` (m,d) mapped by the reference set's per-dimension mean and standard deviation: one fixed
    affine map for every row of a run (the reference is all the evaluated originals). Raw ReLU features have
    norms in the tens, and the cubic kernel then turns KID into noise of magnitude 1e2-1e3 (measured on the
    guided pipeline); standardized, x.y/d is O(1), as with Inception features."""
    mu, sd = reference.double().mean(0), reference.double().std(0).clamp(min=1e-6)
    return (features.double() - mu) / sd


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


# --------------------------------------------------------------------------------------- evaluation
def load_pipeline(args) -> tuple[PrivateEditor, dict, dict]:
    """(editor, the data spec of its images, {"label", "privacy", "backend"}) of --checkpoint [--classifier]."""
    # --checker: a classifier that did not steer the edit judges it (veil edit --checker)
    editor = load_editor(args.checkpoint, runtime="torch", classifier=args.classifier, checker=args.checker,
                         classifier_scale=args.classifier_scale, steps=args.steps, guidance=args.guidance)
    ckpt, clf = editor.checkpoint, editor.classifier  # the release and the --classifier
    data_owner = clf if args.classifier else ckpt  # the private data the edits are about
    spec = {k: v for k, v in (data_owner.data_spec or {"source": "synthetic"}).items() if k in SPLIT_KEYS}
    trained = editor.guide if editor.backend == "guided" else ckpt  # the model that learned from that data
    private, phrase = privacy_phrase(trained.privacy)
    eps = (trained.privacy or {}).get("epsilon")
    label = args.label or f"{editor.backend}, " + (f"DP eps {eps:.3g}" if private else "not private")
    if editor.backend == "guided" and not editor.can_check and "unchecked" not in label:
        label += ", unchecked"  # no --checker: the guide never checks its own edits
    return editor, spec, {"label": label, "backend": editor.backend, "private": private,
                          "privacy": combined_privacy(ckpt, clf) + (
                              f"; checker: {privacy_phrase(editor.checker.privacy)[1]}" if args.checker else ""),
                          "model_privacy": phrase}


def load_images(dm: FaceDataModule, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(x (N,3,H,W), attributes (N,k), ids) of dataset rows ``indices``."""
    x = torch.stack([dm.dataset[i][0] for i in indices])
    a = torch.stack([dm.dataset[i][1] for i in indices])
    return x, a, [dm.dataset.ids[i] for i in indices]


def release(a: torch.Tensor, ids: list[str], *, names: list[str], protect: list[str], epsilon: float, seed: int,
            stream: str) -> torch.Tensor:
    """Randomized response of each row's protected attributes: (N,k) -> (N,k) released values, one draw per
    (seed, stream, image, epsilon): the evaluated and the adaptive attacker's images draw apart."""
    draws = [privatize(dict(zip(names, row.int().tolist())), protected=protect, epsilon=epsilon,
                       rng=random.Random(derive_seed(seed, stream, i, epsilon))) for i, row in zip(ids, a)]
    return torch.tensor([[d[n] for n in names] for d in draws], dtype=torch.float32)


def pool_of(encoding: str) -> int | None:
    """R of a pooled grid encoding "poolR" (the "noise" encoding of the image pooled to R x R), else None."""
    m = re.fullmatch(r"pool([1-9][0-9]*)", encoding)
    return int(m.group(1)) if m else None


def pooled(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B,3,H,W) clipped to [-1, 1], averaged over (H/r x W/r) blocks and upsampled back to (B,3,H,W): the
    orthogonal projection onto block-constant images (idempotent and self-adjoint, so it never lengthens a
    difference; two flat images keep theirs). ValueError unless r divides H and W."""
    h, w = x.shape[-2:]
    if r < 1 or h % r or w % r:
        raise ValueError(f"pool{r}: the pooled side {r} must divide the image size {h}x{w}")
    k = (h // r, w // r)
    blocks = nn.functional.avg_pool2d(x.clamp(-1.0, 1.0), kernel_size=k)
    return blocks.repeat_interleave(k[0], dim=-2).repeat_interleave(k[1], dim=-1)


def edit_cell(editor: PrivateEditor, x, a, released, *, strength: float, encoding: str, protect: list[str],
              inversions: dict, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(edits (N,3,H,W), passed (N,) bool, attempts (N,) long): checked when the editor can check, else
    every edit passes at its first attempt and an inversion is cached in ``inversions`` per (key, strength)
    (a "noise" or "fresh" encoding is drawn afresh for each cell, as each release draws it). "poolR": the
    "noise" encoding of ``pooled(x, R)``."""
    if (r := pool_of(encoding)) is not None:
        x, encoding = pooled(x, r), "noise"
    if editor.can_check:
        checked = editor.edit_checked(x, a, released, strength=strength, protected=protect, encoding=encoding)
        return checked.images, checked.passed, checked.attempts
    if encoding == "invert":
        if (key, strength) not in inversions:
            inversions[key, strength] = editor.invert(x, a, strength=strength, protected=protect)
        x_t0 = inversions[key, strength]
    else:  # "noise": fresh secret noise per cell; "fresh": the image is not read
        x_t0 = editor.encode(x, a, strength=strength, protected=protect, encoding=encoding)
    edited = editor.regenerate(x_t0, released, strength=strength, protected=protect)
    return edited, torch.ones(len(x), dtype=torch.bool), torch.ones(len(x), dtype=torch.long)


def score_row(naive, adaptive, edited, x, a, released, passed, attempts, *, checked: bool, **score) -> dict:
    """Every number of one row, on the edits that passed (``score``: score_edits' keyword arguments)."""
    keep = passed.bool()
    e, o = edited[keep], a[keep]
    row = score_edits(predict(naive, e), o, released[keep], **score)
    pred = predict(adaptive, e)
    row["adaptive"] = {p: float((pred[:, i] == o[:, i]).float().mean())
                       for p, i in ((p, score["names"].index(p)) for p in score["protect"])}
    row.update(n=len(e), n_edited=len(x), psnr=psnr(e, x[keep]) if len(e) else math.nan,
               ssim=ssim(e, x[keep]) if len(e) else math.nan,
               kid=_kid_disjoint(naive, edited, x, keep),
               check={"redone": float((attempts > 1).float().mean()), "refused": float((~keep).float().mean())}
               if checked else None)
    return row


def formal_price(editor: PrivateEditor, *, epsilon: float, strength: float, encoding: str, protect: list[str],
                 priors: dict[str, float], delta: float = DEFAULT_RELEASE_DELTA) -> dict:
    """The formal price of one release at a row's setting, exactly as the ledger charges it: the editor's
    ``pixel_mus`` (every encoding the edit may draw: with a check, each re-do of its ladder) and one randomized
    response per protected attribute, priced and composed by ``veil.privacy.accounting`` at ``delta``. Also the
    accuracy bound that composed epsilon allows on each protected attribute: acc*(eps, prior) + delta (an
    (eps, delta)-DP release moves any guess at most delta past the pure-DP bound); 1 where eps is unbounded."""
    encoding = "noise" if pool_of(encoding) else encoding  # pooled: the "noise" price, tight (``pooled``)
    mus = editor.pixel_mus(strength=strength, encoding=encoding, check=editor.can_check)
    price = price_release(epsilon=epsilon, protected=protect, encoding=encoding, pixel_mus=mus)
    g = compose([price], delta=delta)
    return {"delta": delta, "pixel_mu": price.pixel_mu, "pixel_mu_first": mus[0], "encodings_priced": len(mus),
            "pixels_epsilon": g.pixels_epsilon, "labels_epsilon": g.labels_epsilon, "epsilon": g.epsilon,
            "formal_bound": {p: min(1.0, bayes_accuracy_bound(epsilon=g.epsilon, prior=priors[p]) + delta)
                             for p in protect}}


def _kid_disjoint(naive, edited: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> float:
    """KID of the kept edits of the first half of the images against the originals of the second half: an
    edit and its own original are not independent samples (KID's estimate assumes they are, and went
    negative, about -0.03, when they were paired). Compare with ``kid_floor``: first-half originals
    against the same second half."""
    half = len(x) // 2
    ref = embed(naive, x)
    first = keep.clone()
    first[half:] = False
    return kid(standardized(embed(naive, edited[first]), ref), standardized(ref[half:], ref))


def originals_numbers(naive: AttributeCNN, x: torch.Tensor, a: torch.Tensor, names: list[str]) -> dict:
    """The naive attacker's accuracy on the unedited originals, and the KID noise floor (two halves of them)."""
    pred, half = predict(naive, x), len(x) // 2
    return {"accuracy_on_originals": {n: float((pred[:, i] == a[:, i]).float().mean()) for i, n in enumerate(names)},
            "kid_floor": kid(standardized((f := embed(naive, x))[:half], f), standardized(f[half:], f))}


def evaluate(args) -> dict:
    """One run: {"label", "protect", "rows", "baseline", ...} (the JSON written, before ``_strict``)."""
    editor, spec, about = load_pipeline(args)
    names = list(editor.attribute_names)
    protect = [p for p in args.protect.split(",") if p]
    if not protect or not set(protect) <= set(names):
        raise SystemExit(f"--protect {args.protect!r}: choose attributes from {names}")
    dm = FaceDataModule(**{**spec, "attributes": names})
    x, a, ids = load_images(dm, (dm.split_indices("val") + dm.split_indices("test"))[: args.num_images])
    for r in {pool_of(enc) for *_, enc in args.cells} - {None}:
        if x.shape[-1] % r or x.shape[-2] % r:
            raise SystemExit(f"--encodings pool{r}: {r} must divide the image size {x.shape[-2]}x{x.shape[-1]}")
    train = dm.split_indices("train")
    adv_rows = random.Random(args.seed).sample(train, min(args.adaptive_images, len(train)))
    x_adv, a_adv, ids_adv = load_images(dm, sorted(adv_rows))  # the adaptive attacker's: training split
    priors = attribute_priors(dm.dataset.attribute_matrix[train], names)  # owner-side: the training split's labels
    t0 = time.time()
    naive = train_attacker(names, resolution=x.shape[-1], num_images=args.attacker_images,
                           epochs=args.attacker_epochs, seed=args.seed + 1000)
    baseline = {"n": len(ids), "adaptive_images": len(ids_adv), "priors": priors, "prior_n": len(train),
                "attacker_seconds": time.time() - t0, **originals_numbers(naive, x, a, names)}
    rr = functools.partial(release, names=names, protect=protect, seed=args.seed)  # randomized response
    rows, inversions = [], {}
    for level, eps, strength, encoding in args.cells:
        cell = dict(strength=strength, encoding=encoding, protect=protect, inversions=inversions)
        # 1. the adaptive attacker: the pipeline's own edits of training images (fresh draws), ORIGINAL labels
        adv_edits, adv_passed, _ = edit_cell(editor, x_adv, a_adv, rr(a_adv, ids_adv, epsilon=eps, stream="adaptive"),
                                             key="adaptive", **cell)
        adaptive = adaptive_attacker(naive, adv_edits[adv_passed], a_adv[adv_passed], epochs=args.adaptive_epochs,
                                     seed=derive_seed(args.seed, "adaptive attacker", eps, strength, encoding) % 2**31)
        # 2. the evaluated edits, scored where they passed the check
        released = rr(a, ids, epsilon=eps, stream="eval")
        edited, passed, attempts = edit_cell(editor, x, a, released, key="eval", **cell)
        row = {"label": about["label"], "level": level, "strength": strength, "encoding": encoding,
               "pool": pool_of(encoding),
               "adaptive_n": int(adv_passed.sum()),
               **score_row(naive, adaptive, edited, x, a, released, passed, attempts, checked=editor.can_check,
                           names=names, protect=protect, epsilon=eps, priors=priors)}
        row["price"] = formal_price(editor, epsilon=eps, strength=strength, encoding=encoding, protect=protect,
                                    priors=priors)
        rows.append(row)
        print(f"  {_cell_name(row)}: composed eps {_eps(row['price']['epsilon'])}, naive {row['naive']} "
              f"adaptive {row['adaptive']} bound {row['bound']} n {row['n']} KID {row['kid']:.3g} "
              f"({time.time() - t0:.0f}s)", flush=True)
    return {**about, "protect": protect, "rows": rows, "baseline": baseline}


# ------------------------------------------------------------------------------------------ reports
def _num(v) -> float:
    """A JSON number back to a float (None was NaN, "inf" infinity)."""
    return math.nan if v is None else float(v)


def _fmt(v, spec: str) -> str:
    v = _num(v)
    return "n/a" if math.isnan(v) else format(v, spec)


def _eps(v) -> str:
    """A price (mu or epsilon) for the table: "unbounded" for infinity, whole numbers from 100 up, "n/a" missing."""
    v = _num(v)
    return "n/a" if math.isnan(v) else "unbounded" if math.isinf(v) else f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _encoding_name(row: dict) -> str:
    """"noise"; "pool4" (the "noise" encoding of the image pooled to 4 x 4); rows written before encodings
    existed were all inverted."""
    return row.get("encoding", "invert")


def _cell_name(row: dict) -> str:
    """"high"; "high, invert" where the row overrode the level's encoding; "s 0.7, eps 1, noise" in a grid."""
    enc = _encoding_name(row)
    if row["level"]:
        return row["level"] + ("" if enc == LEVELS[row["level"]].encoding else f", {enc}")
    return f"s {row['strength']:g}, eps {_num(row['epsilon']):g}, {enc}"


def _cell_order(name: str) -> tuple:
    """Levels least private first (each before its overrides), then the grid cells by name."""
    base = name.split(",")[0]
    return (list(LEVELS).index(base), name) if base in LEVELS else (len(LEVELS), name)


def _excess(acc: float, bound: float, n: int) -> str:
    """acc - bound where positive, "*" when more than 2 standard errors of an accuracy at the bound."""
    acc, bound = _num(acc), _num(bound)
    if not n or math.isnan(acc):
        return "n/a"
    se = _se(bound, n)
    d = acc - bound
    return f"{d:+.3f}{'*' if d > 2 * se else ''}" if d > 0 else "-"


def _se(bound: float, n: int) -> float:
    """Standard error of an accuracy at ``bound`` over n cases (at least that of 1/(2 sqrt n), so 0 or 1 is not
    certain at small n)."""
    n = max(int(n), 1)
    return math.sqrt(max(bound * (1 - bound), 0.25 / n) / n)


def _stronger(row: dict, p: str) -> float:
    """The better of the two attackers' accuracies on p (the naive one where the adaptive is missing)."""
    accuracies = (_num(row["naive"][p]), _num((row.get("adaptive") or {}).get(p)))
    return max(accuracies, key=lambda v: -1 if math.isnan(v) else v)


def markdown(runs: list[dict]) -> str:
    """One table for the rows of every run (their protected attributes must agree), and notes per run."""
    protect = runs[0]["protect"]
    head = ["label", "level", "RR eps", "strength", "encoding", "pixel mu", "pixels eps", "labels eps",
            "composed eps", "n", "re-done", "refused"] + \
        [f"{c} {p}" for p in protect for c in ("naive", "adaptive", "bound", "excess")] + \
        [f"follows {p}" for p in protect] + ["unprotected acc", "PSNR dB", "SSIM", "KID"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    beat, beat_formal = [], []
    for run in runs:
        for r in run["rows"]:
            check, price = r.get("check") or {}, r.get("price") or {}
            cells = [run["label"], r["level"] or "-", _fmt(r["epsilon"], "g"), f"{r['strength']:.2f}",
                     _encoding_name(r), *(_eps(price.get(k)) for k in PRICE_KEYS), str(r["n"]),
                     _fmt(check.get("redone"), ".2f"), _fmt(check.get("refused"), ".2f")]
            for p in protect:
                excess = _excess(_stronger(r, p), r["bound"][p], r["n"])
                beat += [(run["label"], r, p)] if excess.endswith("*") else []
                formal = price.get("formal_bound", {}).get(p)
                beat_formal += [(run["label"], r, p)] if formal is not None and _excess(
                    _stronger(r, p), formal, r["n"]).endswith("*") else []
                cells += [_fmt(r["naive"][p], ".3f"), _fmt((r.get("adaptive") or {}).get(p), ".3f"),
                          _fmt(r["bound"][p], ".3f"), excess]
            cells += [_fmt(r["follows"][p], ".3f") for p in protect]
            cells += [_fmt(r[key], spec) for key, spec in (("unprotected", ".3f"), ("psnr", ".1f"), ("ssim", ".3f"),
                                                            ("kid", ".3g"))]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [_run_note(run, protect) for run in runs] + list(NOTES)
    cells_total = sum(len(run["rows"]) for run in runs) * len(protect)
    if beat:
        label, r, p = max(beat, key=lambda b: _stronger(b[1], b[2]) - _num(b[1]["bound"][b[2]]))
        notes.append(f"An attacker beats the prior-aware bound in {len(beat)} of {cells_total} cells; worst: {p} "
                     f"in {label} at {_cell_name(r)}, {_stronger(r, p):.3f} vs {_num(r['bound'][p]):.3f}.")
    else:
        notes.append("No attacker beats the prior-aware bound significantly anywhere.")
    priced = sum(len((r.get("price") or {}).get("formal_bound", {})) for run in runs for r in run["rows"])
    if priced:
        notes.append(f"Against the bound the composed epsilon allows (acc*(composed eps, prior) + delta), the "
                     f"stronger attacker is more than 2 standard errors above it in {len(beat_formal)} of {priced} "
                     f"priced cells" + (" (a proven bound: look at those cells)." if beat_formal else "."))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in notes) + "\n"


NOTES = (
    "RR eps = the randomized-response epsilon of each protected attribute; pixel mu = the Gaussian mu of the "
    "pixels per release (every encoding the check may draw, composed); pixels / labels / composed eps = "
    f"epsilon at delta {DEFAULT_RELEASE_DELTA:g} of the pixels alone, the labels alone and both, for ONE release, "
    "composed by dp-accounting's PLD accountant exactly as the ledger charges it (veil.privacy.accounting); "
    "0 = the image is not read (fresh); unbounded = DDIM inversion (no bound on the pixels); poolR = the noise "
    "encoding of the image average-pooled to R x R blocks, priced as noise (tight: pooling is an orthogonal "
    "projection that keeps the difference of two flat images).",
    "naive = attacker trained on original faces; adaptive = the naive one fine-tuned on the pipeline's own "
    "edits of training-split images with their ORIGINAL attributes; n = edits that passed the check (the "
    "ones released), on which every number but re-done / refused is computed.",
    "bound = the best accuracy from the released labels alone given the prior (posterior odds <= e^eps x "
    "prior odds at RR eps): above it, the pixels leak; excess = the stronger attack - bound where positive; "
    "* = more than 2 standard errors.",
    "KID: unbiased MMD^2 (polynomial kernel) of edits vs originals on the probe's 128-d features; "
    "0 = indistinguishable, the floor is two halves of the originals.")


def _run_note(run: dict, protect: list[str]) -> str:
    b = run["baseline"]
    orig = ", ".join(f"{k} {_num(v):.3f}" for k, v in b["accuracy_on_originals"].items())
    priors = ", ".join(f"{p} {_num(b['priors'][p]):.3f}" for p in protect)
    return (f"**{run['label']}** ({run.get('privacy', '')}): {b['n']} evaluated images, {b['adaptive_images']} "
            f"adaptive-attacker images per row; naive attacker on the unedited originals: {orig}; prior P(a=+1) "
            f"from the training split ({b['prior_n']} images): {priors}; KID floor {_fmt(b['kid_floor'], '.3g')}.")


def plot(runs: list[dict], path: Path) -> None:
    """The price plot when every row is priced (``plot_price``), else (runs written before prices) privacy and
    utility per level: ``plot_levels``."""
    import matplotlib

    matplotlib.use("Agg")
    if all(r.get("price") for run in runs for r in run["rows"]):
        return plot_price(runs, path)
    return plot_levels(runs, path)


def _price_axis(runs: list[dict]):
    """x of a composed epsilon on a log axis, and its ticks: 0 (fresh: nothing read) drawn at the left edge,
    infinity (inversion) at the right edge as "unbounded", the finite ones where they are."""
    eps = [_num(r["price"]["epsilon"]) for run in runs for r in run["rows"]]
    finite = [e for e in eps if 0 < e < math.inf] or [1.0]
    left, right = min(finite) / 10, max(finite) * 10
    decades = [10.0**k for k in range(math.floor(math.log10(left)), math.ceil(math.log10(right)) + 1)
               if 3 * left < 10.0**k < right / 3]  # not on top of the edges' labels
    ticks = [(left, "0\n(fresh)")] * any(e == 0 for e in eps) + [(d, f"{d:g}") for d in decades] + \
        [(right, "unbounded\n(invert)")] * any(math.isinf(e) for e in eps)
    return (lambda e: left if e == 0 else right if math.isinf(e) else e), ticks


def _draw_price_group(axes, rows: list[dict], xs: list[float], style: dict, name: str, *, annotate: bool) -> None:
    """One line (a run's encoding at one RR eps, through its strengths) on each panel of ``plot_price``."""
    protect = list(rows[0]["bound"])
    axes[0].plot(xs, [_num(r["ssim"]) for r in rows], label=name, **style)
    axes[0].plot(xs, [sum(map(_num, r["follows"].values())) / len(protect) for r in rows], color=style["color"],
                 marker=style["marker"], ls=":", alpha=0.45, mfc="none")
    for x, r in zip(xs, rows):
        if annotate:  # the strength, once per encoding
            axes[0].annotate(f"s {r['strength']:g}", (x, _num(r["ssim"])), fontsize=6, xytext=(4, -9),
                             textcoords="offset points")
    for ax, p in zip(axes[1:], protect):
        bound = [_num(r["bound"][p]) for r in rows]
        ax.errorbar(xs, [_stronger(r, p) - b for r, b in zip(rows, bound)], yerr=[2 * _se(b, r["n"]) for b, r in
                                                                               zip(bound, rows)], capsize=2, **style)
        ax.plot(xs, [_num(r["price"]["formal_bound"][p]) - b for r, b in zip(rows, bound)], "_", color="grey",
                ms=14, mew=2)


def _marker(encoding: str) -> str:
    """The plot's marker of an encoding: one per encoding and per pooled size."""
    pool = pool_of(encoding)
    return {"noise": "o", "fresh": "s", "invert": "^"}.get(encoding) or {2: "P", 4: "v", 8: "D", 16: "X"}.get(pool, "*")


def plot_price(runs: list[dict], path: Path) -> None:
    """Utility (SSIM; follows dotted) and, per protected attribute, the stronger attack minus the labels' bound
    (error bar: 2 standard errors; grey: the room the composed epsilon's formal bound allows) against the
    formal composed epsilon of one release. One line per run, encoding and RR eps, through the strengths."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    protect, (x_of, ticks) = runs[0]["protect"], _price_axis(runs)
    rr = sorted({_num(r["epsilon"]) for run in runs for r in run["rows"]})
    fig, axes = plt.subplots(1, len(protect) + 1, figsize=(5.2 * (len(protect) + 1), 5.0))
    for k, run in enumerate(runs):
        groups: dict[tuple, list] = {}
        for r in run["rows"]:
            groups.setdefault((_encoding_name(r), _num(r["epsilon"])), []).append(r)
        for (enc, e), rows in groups.items():
            rows.sort(key=lambda r: x_of(_num(r["price"]["epsilon"])))
            style = dict(color=f"C{rr.index(e)}", marker=_marker(enc),
                         ls=["-", "--", ":", "-."][k % 4])
            name = f"{enc}, RR eps {e:g}" + (f" ({run['label']})" if len(runs) > 1 else "")
            _draw_price_group(axes, rows, [x_of(_num(r["price"]["epsilon"])) for r in rows], style, name,
                              annotate=e == min(rr_eps for _, rr_eps in groups))
    axes[0].set_title("utility: SSIM to the original\n(dotted, open: follows, mean over protected)")
    axes[0].set_ylabel("SSIM / follows")
    for ax, p in zip(axes[1:], protect):
        ax.axhline(0, color="k", lw=1)
        ax.set_title(f"{p}: stronger attack - labels' bound (+-2 SE)\n"
                     "grey: formal bound of the composed eps - labels' bound")
        ax.set_ylabel("accuracy - bound")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"composed epsilon of one release (delta {DEFAULT_RELEASE_DELTA:g})")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 9 if len(runs) == 1 else 4), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / (9 if len(runs) == 1 else 4)), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_levels(runs: list[dict], path: Path) -> None:
    """Privacy (one panel per protected attribute: naive and adaptive attack vs bound per row, per label)
    and utility (follows, unprotected, SSIM; KID on its own axis) against the rows' levels."""
    import matplotlib.pyplot as plt

    protect = runs[0]["protect"]
    order = sorted(dict.fromkeys(_cell_name(r) for run in runs for r in run["rows"]), key=_cell_order)
    fig, axes = plt.subplots(1, len(protect) + 2, figsize=(4.2 * (len(protect) + 2), 4.2))
    for k, run in enumerate(runs):
        rows = sorted(run["rows"], key=lambda r: order.index(_cell_name(r)))
        xs, c = [order.index(_cell_name(r)) for r in rows], f"C{k}"
        for ax, p in zip(axes, protect):
            ax.plot(xs, [_num(r["bound"][p]) for r in rows], "k_", ms=18, mew=2)
            ax.plot(xs, [_num(r["naive"][p]) for r in rows], "o--", color=c, label=f"naive, {run['label']}")
            ax.plot(xs, [_num((r.get("adaptive") or {}).get(p)) for r in rows], "s-", color=c,
                    label=f"adaptive, {run['label']}")
            ax.set_title(f"privacy: {p} (black: bound)")
        for key, style in (("follows", "o-"), ("unprotected", "s--"), ("ssim", "^:")):
            ys = [sum(map(_num, r[key].values())) / len(r[key]) if key == "follows" else _num(r[key]) for r in rows]
            axes[-2].plot(xs, ys, style, color=c, label=f"{key}, {run['label']}")
        axes[-1].plot(xs, [_num(r["kid"]) for r in rows], "o-", color=c, label=run["label"])
        axes[-1].axhline(_num(run["baseline"]["kid_floor"]), color=c, ls=":", lw=1)
    axes[0].set_ylabel("accuracy vs original")
    axes[-2].set_title("utility")
    axes[-1].set_title("realism: KID (dotted: noise floor)")
    for ax in axes:
        ax.set_xticks(range(len(order)), order, fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _strict(obj):
    """The run as strict JSON: NaN -> None, infinities -> "inf" / "-inf" (``_num`` reads them back)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else json_epsilon(obj) if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_report(runs: list[dict], out: Path, header: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = header + markdown(runs)
    write_text_atomic(out / "edit_eval.md", text)
    write_json_atomic(out / "edit_eval.json", runs[0] if len(runs) == 1 else {"runs": runs})
    plot(runs, out / "edit_eval.png")
    return text


def combine(paths: list[str], out: Path) -> str:
    """Merge the JSON of several runs (or of earlier merges) into one table and one plot."""
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--combine {path}: not a readable edit_eval.json ({e})") from None
        runs += data.get("runs", [data])
    if len({tuple(r["protect"]) for r in runs}) > 1:
        raise SystemExit(f"--combine: the runs protect different attributes ({[r['protect'] for r in runs]}); "
                         "combine runs made with the same --protect")
    labels = [r["label"] for r in runs]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"--combine: labels {labels} repeat; give each run its own --label")
    return write_report(runs, out, f"{len(runs)} runs: {', '.join(labels)}\n\n")


def _cells(args, p) -> list[tuple[str | None, float, float, str]]:
    """The rows: (level name, epsilon, strength, encoding) of each --levels name (with each of --encodings
    instead of the level's, if given), or (None, eps, s, enc) of the grid: each encoding at every --strengths,
    or only at its own where --encodings gives one ("noise,fresh:1,invert:0.4")."""
    if args.strengths or args.epsilons or (args.encodings and not args.levels):
        if args.levels:
            p.error("--levels or --strengths/--epsilons: give one of the two")
        try:
            strengths = [float(s) for s in (args.strengths or GRID["strengths"]).split(",")]
            epsilons = [float(e) for e in (args.epsilons or GRID["epsilons"]).split(",")]
        except ValueError:
            p.error(f"--strengths {args.strengths!r} / --epsilons {args.epsilons!r}: give comma-separated numbers")
        if not all(0 < s <= 1 for s in strengths) or not all(e >= 0 for e in epsilons):
            p.error("--strengths must lie in (0, 1] and --epsilons be >= 0")
        encodings = _encodings(args, p) or [(GRID["encodings"], None)]
        return [(None, e, s, enc) for enc, own in encodings for s in ([own] if own else strengths) for e in epsilons]
    names = [n for n in (args.levels or ",".join(LEVELS)).split(",") if n]
    unknown = [n for n in names if n not in LEVELS]
    if unknown or not names:
        p.error(f"--levels {args.levels!r}: choose names from {list(LEVELS)}")
    encodings = _encodings(args, p)
    if any(own for _, own in encodings):
        p.error(f"--encodings {args.encodings!r}: ENCODING:STRENGTH is for a grid; a level has its own strength")
    return [(n, LEVELS[n].epsilon, LEVELS[n].strength, enc) for n in names
            for enc in ([e for e, _ in encodings] or [LEVELS[n].encoding])]


def _encodings(args, p) -> list[tuple[str, float | None]]:
    """--encodings as [(encoding, its own strength or None)]: "noise,fresh:1" -> [("noise", None), ("fresh", 1.0)]."""
    out = []
    for item in (args.encodings or "").split(","):
        name, _, own = item.partition(":")
        try:
            strength = float(own) if own else None
        except ValueError:
            strength = math.nan
        if item and ((name not in ENCODINGS and pool_of(name) is None) or
                     (strength is not None and not 0 < strength <= 1)):
            p.error(f"--encodings {args.encodings!r}: choose from {list(ENCODINGS)} or poolR (the noise encoding of "
                    f"the image pooled to R x R), each optionally with its own strength in (0, 1] as "
                    f"ENCODING:STRENGTH")
        out += [(name, strength)] if item else []
    if args.encodings is not None and not out:
        p.error(f"--encodings {args.encodings!r}: choose from {list(ENCODINGS)}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="the model release of `veil train`: its run folder OUT or OUT/model")
    p.add_argument("--classifier", help="a `veil train-classifier` release: guides (scale > 0), or only checks the "
                                        "edits (scale 0)")
    p.add_argument("--classifier-scale", type=float, default=10.0, help="classifier guidance scale (default 10; "
                                                                         "0: the classifier only checks)")
    p.add_argument("--checker", help="a `veil train-classifier` release that checks the edits (as `veil edit "
                                     "--checker`); a guided run without one is unchecked and labelled so")
    p.add_argument("--label", help="names this run's rows (default: backend and privacy, e.g. 'guided, DP eps 10')")
    p.add_argument("--protect", default="eyeglasses,smiling", help="protected attributes (default: these two)")
    p.add_argument("--levels", help=f"comma-separated privacy levels (default {','.join(LEVELS)})")
    p.add_argument("--strengths", help=f"instead of --levels, a grid: strengths (default {GRID['strengths']})")
    p.add_argument("--epsilons", help=f"... by epsilons (default {GRID['epsilons']})")
    p.add_argument("--encodings", help=f"... by encodings: invert, noise, fresh and/or poolR (noise of the image "
                                       f"pooled to R x R), each at every strength or at its own as "
                                       f"ENCODING:STRENGTH (default {GRID['encodings']})")
    for name, help_ in (("num-images", "edited images (val + test splits)"),
                        ("adaptive-images", "training-split images the adaptive attacker edits per row"),
                        ("attacker-images", "naive attacker's training images"),
                        ("attacker-epochs", "naive attacker's training epochs"),
                        ("adaptive-epochs", "epochs of the adaptive attacker's fine-tuning"),
                        ("steps", "DDIM steps of a full-strength edit")):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=int, help=f"{help_} (default {FULL[key]}, --quick {QUICK[key]})")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance of the conditional "
                                                               "backend (default 2.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized response and the attackers")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is often "
                                                          "fastest on a busy machine)")
    p.add_argument("--quick", action="store_true", help="smaller defaults for a few-minute CPU run")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="merge these runs' edit_eval.json into one "
                                                                "table and plot in --out (no evaluation)")
    p.add_argument("--out", default="bench/out/edit_eval", help="folder for edit_eval.md/.png/.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.combine:
        print(combine(args.combine, Path(args.out)))
        print(f"wrote {args.out}/edit_eval.md, edit_eval.png, edit_eval.json")
        return
    if not args.checkpoint:
        p.error("--checkpoint is required (or --combine)")
    for key in FULL:
        value = getattr(args, key)
        setattr(args, key, value if value is not None else (QUICK if args.quick else FULL)[key])
        if getattr(args, key) < (0 if key == "adaptive_epochs" else 1):
            p.error(f"--{key.replace('_', '-')} must be a positive whole number")
    args.cells = _cells(args, p)
    start = time.time()
    try:
        run = evaluate(args)
    except VeilError as e:
        raise SystemExit(f"error: {e}") from None
    run["args"] = {k: v for k, v in vars(args).items() if k not in ("cells", "combine")}
    run = _strict(run)
    header = (f"checkpoint `{args.checkpoint}`, classifier `{args.classifier}` (scale {args.classifier_scale:g}), "
              f"backend {run['backend']}: {run['privacy']}; steps {args.steps}, protect {args.protect}; "
              f"{time.time() - start:.0f} s\n\n")
    print(write_report([run], Path(args.out), header))
    print(f"wrote {args.out}/edit_eval.md, edit_eval.png, edit_eval.json")


if __name__ == "__main__":
    main()
