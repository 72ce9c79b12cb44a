"""``replay``: descent on the revised objective where it changed, anchored by a replay of unchanged samples.

    new, info = replay_descent(obj, theta, revised=(x_new, a_new), pool=(x_kept, a_kept),
                               passes=3, lr=1e-3, replay_ratio=1.0, batch_size=128, seed=0)

Retraining minimises the revised objective L~(theta) = 1/N [sum over unchanged z of l(z) + sum over Z~ of
l(z~)] + the L2 term. The published model theta* minimises L, which differs from L~ only in the m terms
Z -> Z~. The closed-form updates (``influence.py``) take one step from theta* along a local model of that
difference; on the large benchmark none of them moves the penultimate features enough for a linear probe
to stop reading the original attribute off the revised images (docs/unlearning.md). ``replay`` instead
runs ``passes`` passes of Adam over every parameter selected, each pass over the m revised samples Z~
together with ``replay_ratio * m`` unchanged training samples drawn afresh for the pass: Z~ carries the
change, the replayed samples hold the rest of L~ in place (without them the steps on Z~ alone drift what
the model does on everything else). Its cost is ``passes * (1 + replay_ratio) * m`` sample gradients,
which grows with the number of changed images and not with the dataset (fine-tuning on the revised data,
the baseline, costs N per epoch).

Each minibatch's gradient is the mean over its samples plus the L2 term (``obj.l2_vector * theta``, the
coupled decay the classifier was trained with). Adam starts from zero moments (a release carries no
optimizer state) with the usual bias correction.

Several processes: each takes its shard of Z~ and of the unchanged pool (``UnlearningInputs.shard``) and
draws its replay from its own shard (a generator seeded by ``seed`` and its rank); every minibatch's
gradient sum and sample count go through ``reduce`` (the same bits on every rank), and the number of
minibatches per pass is fixed from the global counts, so every rank runs the same collectives and takes
the same Adam steps. In one process it is plain minibatch Adam on the union.

Related work (docs/unlearning.md): fine-tuning on retained data as an unlearning baseline (Golatkar et al.
2020, "Eternal Sunshine of the Spotless Net"); relabelling the forgotten samples and fine-tuning
(Graves et al. 2021, "Amnesiac Machine Learning"); alternating steps on the forget set and the retain set
(Kurmanji et al. 2023, SCRUB). Here the "forget set" is the revision itself, trained towards its released
labels, with a retain replay proportional to it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from veil.errors import ConfigError
from veil.lightning_modules.models.classifier import attribute_bce
from veil.lightning_modules.unlearning.influence import Objective, Reduce, one_process

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def check_replay_knobs(passes: int, lr: float, replay_ratio: float) -> None:
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ConfigError(f"{passes!r}: a whole number of passes >= 1", option="--passes")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"{lr!r}: a finite learning rate > 0", option="--lr")
    if not (isinstance(replay_ratio, (int, float)) and math.isfinite(replay_ratio) and replay_ratio >= 0):
        raise ConfigError(f"{replay_ratio!r}: replayed unchanged samples per revised one, a finite number >= 0",
                          option="--replay-ratio")


def replay_descent(obj: Objective, theta: torch.Tensor, *, revised: tuple[torch.Tensor, torch.Tensor],
                   pool: tuple[torch.Tensor, torch.Tensor], passes: int, lr: float, replay_ratio: float,
                   batch_size: int, seed: int = 0, rank: int = 0, optimizer: str = "adam", momentum: float = 0.9,
                   revised_weights: torch.Tensor | None = None,
                   reduce: Reduce = one_process) -> tuple[torch.Tensor, dict[str, Any]]:
    """(new theta_S, what was done): ``passes`` passes of Adam on Z~ (``revised``, this rank's) and a fresh
    replay of ``replay_ratio`` unchanged samples per revised one drawn from ``pool`` (this rank's unchanged
    training samples). ``revised_weights`` (m, k): the weight of each revised sample's attribute terms in
    the loss (None: all 1; the replayed samples' are 1). See the module docstring."""
    check_replay_knobs(passes, lr, replay_ratio)
    x_new, a_new = revised
    w_new = torch.ones_like(a_new) if revised_weights is None else revised_weights.to(a_new.dtype)
    x_pool, a_pool = pool
    counts = reduce(torch.tensor([float(len(x_new)), float(len(x_pool))], dtype=torch.float64))
    m, n_pool = int(counts[0].item()), int(counts[1].item())
    info: dict[str, Any] = {"passes": passes, "lr": lr, "replay_ratio": replay_ratio, "revised_samples": m}
    if m == 0:
        return theta.clone(), {**info, "steps": 0, "replayed_per_pass": 0}
    k_local = min(len(x_pool), round(replay_ratio * len(x_new)))
    replayed = int(reduce(torch.tensor([float(k_local)], dtype=torch.float64)).item())
    steps_per_pass = max(1, math.ceil((m + replayed) / batch_size))
    gen = torch.Generator().manual_seed(int(seed) * 1000 + int(rank))
    g_sum = _gradient_sum(obj)
    theta = theta.detach().clone()
    vec = theta.clone()
    first, second = torch.zeros_like(vec), torch.zeros_like(vec)
    (b1, b2), t = ADAM_BETAS, 0
    losses = []
    for _ in range(passes):
        pick = torch.randperm(len(x_pool), generator=gen)[:k_local]
        xs, as_ = torch.cat([x_new, x_pool[pick]]), torch.cat([a_new, a_pool[pick]])
        ws = torch.cat([w_new, torch.ones_like(a_pool[pick])])
        order = torch.randperm(len(xs), generator=gen)
        for idx in order.tensor_split(steps_per_pass):
            local = g_sum(vec, xs[idx], as_[idx], ws[idx]) if len(idx) else torch.zeros_like(vec)
            n_batch = reduce(torch.tensor([float(len(idx))], dtype=vec.dtype))
            g = reduce(local) / n_batch.clamp_min(1.0) + obj.l2_vector * vec
            t += 1
            if optimizer == "sgd":  # heavy ball, as torch.optim.SGD(momentum=...)
                first = g.clone() if t == 1 else first.mul_(momentum).add_(g)
                vec.add_(first, alpha=-lr)
                continue
            first.mul_(b1).add_(g, alpha=1 - b1)
            second.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (second / (1 - b2 ** t)).sqrt_().add_(ADAM_EPS)
            vec.addcdiv_(first, denom, value=-lr / (1 - b1 ** t))
        with torch.no_grad():  # the pass's mean loss on Z~, a progress number (not the objective)
            part = obj.sum_loss(vec, x_new, a_new) if len(x_new) else torch.zeros((), dtype=vec.dtype)
            losses.append(float(reduce(part.detach().reshape(1)).item()) / m)
    obj.assign(theta)  # the module as it came (the gradients wrote each step's vec into it); the caller assigns
    info.update(steps=t, steps_per_pass=steps_per_pass, replayed_per_pass=replayed, unchanged_pool=n_pool,
                revised_loss_per_pass=losses)
    return vec, info


def weighted_bce(logits: torch.Tensor, attrs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample loss (B,): ``attribute_bce``'s terms (BCE per attribute, over k) each times its weight; with
    all weights 1 it is ``attribute_bce`` itself."""
    terms = F.binary_cross_entropy_with_logits(logits, (attrs + 1) * 0.5, reduction="none")
    return (terms * weights).sum(dim=1) / logits.shape[1]


def _gradient_sum(obj: Objective):
    """``(vec, x, a, w) -> sum_i grad loss(z_i)`` at theta_S = vec (``weighted_bce``), by the module's own
    backward (vec is written into the selected parameters first): a quarter faster on the CPU than
    ``torch.func.grad`` over ``functional_call`` for the benchmark's ResNet, the same numbers (test_replay.py)."""
    if obj.loss is not attribute_bce:
        raise ConfigError("replay weighs attribute_bce's terms; this objective has another loss")
    params = dict(obj.module.named_parameters())
    selected = [params[n] for n in obj.names]

    def g_sum(vec: torch.Tensor, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        obj.assign(vec)
        with torch.enable_grad():
            loss = weighted_bce(obj.module(x), a, w).sum()
            grads = torch.autograd.grad(loss, selected, allow_unused=True)
        return torch.cat([torch.zeros(p.numel(), dtype=vec.dtype) if g is None else g.detach().reshape(-1)
                          for g, p in zip(grads, selected)])

    return g_sum
