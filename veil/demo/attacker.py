"""Attribute-inference attackers: small CNNs that read protected attributes off (edited) images.

    naive = train_attacker(names, resolution=32, num_images=2048, epochs=4, seed=1)  # original faces of seed 1
    adaptive = adaptive_attacker(naive, edits, originals, epochs=4, seed=2)          # knows the pipeline
    predict(adaptive, edits)                                                       # (B,k) in {-1,+1}
    train, test = stratified_halves(originals[:, col])                             # equal priors in both
    attack_row(guess, truth, epsilon=1.0)       # accuracy, its Wilson 95% interval, the test set's prior, bound

The naive attacker is trained on original synthetic faces of a seed of its own; the adaptive one is
a copy fine-tuned on (edit, ORIGINAL attributes) pairs made by the same pipeline and level: it learns
what of the original the edits keep. ``bench/edit_eval.py`` and ``veil demo`` use them.

How an attack is scored (``attack_row``): its accuracy on the ORIGINAL value, with a Wilson score 95%
interval, against ``veil.privacy.bounds.bayes_accuracy_bound`` at the release's epsilon for the prior of
the *same* set the accuracy is measured on (what an attacker who saw only the released value could reach
on that set); ``within_bound`` is True when the interval's lower end is at most that bound, i.e. the
attacker is not significantly better than the labels' guarantee allows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from veil.lightning_modules.data.synthetic_faces import SyntheticFaces
from veil.privacy.bounds import wilson_interval  # re-exported: it lives below veil.jobs, which uses it too

__all__ = ["AttributeCNN", "fit", "train_attacker", "adaptive_attacker", "predict", "probability",
           "wilson_interval", "stratified_halves", "attack_row"]

class AttributeCNN(nn.Module):
    """Small multi-label classifier: (B,3,32k,32k) -> (B,k) logits, one per attribute."""

    def __init__(self, num_attributes: int):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                           nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_attributes))

    def forward(self, x):
        return self.head(self.features(x))

    def embed(self, x):
        """(B,3,H,W) -> (B,128): the penultimate features (head up to its ReLU), KID's feature space."""
        return self.head[:3](self.features(x))


def fit(model: AttributeCNN, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int,
        noise: float = 0.0) -> AttributeCNN:
    """Minimise the multi-label BCE of model on images x (N,3,H,W) and labels y (N,k) in {0,1}; in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=gen) if noise else x[idx]
            loss = nn.functional.binary_cross_entropy_with_logits(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def train_attacker(names, *, resolution: int, num_images: int, epochs: int, seed: int) -> AttributeCNN:
    """The naive attacker: fit on original synthetic faces drawn with their own seed (disjoint from the
    evaluated images), with light noise (edits are slightly noisy)."""
    ds = SyntheticFaces(num_images=num_images, resolution=resolution, seed=seed, attributes=names)
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (N,3,H,W)
    torch.manual_seed(seed)  # the initial weights
    return fit(AttributeCNN(len(names)), x, (ds.attribute_matrix > 0).float(), epochs=epochs, lr=2e-3, seed=seed,
               noise=0.03)


def adaptive_attacker(naive: AttributeCNN, images: torch.Tensor, originals: torch.Tensor, *, epochs: int,
                      seed: int) -> AttributeCNN:
    """A copy of ``naive`` fine-tuned on (edited image (N,3,H,W), ORIGINAL attributes (N,k) in {-1,+1}):
    the attacker who knows the pipeline. ``naive`` itself is left as it is."""
    if not len(images):
        return naive  # every training edit was refused: nothing to learn from
    return fit(copy.deepcopy(naive), images, (originals > 0).float(), epochs=epochs, lr=5e-4, seed=seed)


@torch.no_grad()
def predict(model, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,k) in {-1,+1}."""
    return torch.cat([torch.where(model(b) > 0, 1.0, -1.0) for b in images.split(256)])


@torch.no_grad()
def probability(model, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,k): P(attribute = +1) per attribute."""
    return torch.cat([torch.sigmoid(model(b)) for b in images.split(256)])


def stratified_halves(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) of ``labels`` (N,) in {-1,+1}: the indices grouped by value, then every other one to
    each half, so the halves differ in size by at most one and in each value's count by at most one (the attack
    and its bound see the same prior)."""
    order = torch.cat([torch.nonzero(labels.flatten() == value).flatten() for value in (-1, 1)])
    return order[0::2].sort().values, order[1::2].sort().values


def attack_row(guess: torch.Tensor, truth: torch.Tensor, *, epsilon: float, train_prior: float | None = None) -> dict:
    """Score guesses (N,) of an original binary value ``truth`` (N,) in {-1,+1}: accuracy, Wilson 95% interval,
    the prior P(+1) of ``truth`` and ``bayes_accuracy_bound`` at ``epsilon`` for that prior (see the module
    docstring); ``train_prior``: the attacker's training set's, reported beside it."""
    from veil.privacy.bounds import bayes_accuracy_bound

    n = int(truth.numel())
    correct = int((guess.flatten() == truth.flatten()).sum())
    prior = float((truth > 0).float().mean()) if n else 0.5
    lo, hi = wilson_interval(correct, n)
    bound = bayes_accuracy_bound(epsilon=epsilon, prior=prior)
    row = {"accuracy": round(correct / n, 4) if n else None, "correct": correct, "n": n,
           "ci95": [round(lo, 4), round(hi, 4)], "prior_test": round(prior, 4), "bound": round(bound, 4),
           "within_bound": bool(n) and lo <= bound}
    if train_prior is not None:
        row["prior_train"] = round(float(train_prior), 4)
    return row
