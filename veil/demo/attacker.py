"""Attribute-inference attackers: small CNNs that read protected attributes off (edited) images.

    naive = train_attacker(names, resolution=32, num_images=2048, epochs=4, seed=1)  # original faces of seed 1
    adaptive = adaptive_attacker(naive, edits, originals, epochs=4, seed=2)          # knows the pipeline
    predict(adaptive, edits)                                                       # (B,k) in {-1,+1}

The naive attacker is trained on original synthetic faces of a seed of its own; the adaptive one is
a copy fine-tuned on (edit, ORIGINAL attributes) pairs made by the same pipeline and level: it learns
what of the original the edits keep. ``bench/edit_eval.py`` and ``veil demo`` use them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from veil.lightning_modules.data.synthetic_faces import SyntheticFaces

__all__ = ["AttributeCNN", "fit", "train_attacker", "adaptive_attacker", "predict", "probability"]

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
