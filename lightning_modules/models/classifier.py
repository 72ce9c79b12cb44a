"""``AttributeClassifier``: a small CNN for multi-label face-attribute classification.

A plain ``nn.Module`` that knows nothing of Lightning or privacy. GroupNorm, never BatchNorm, so
that Opacus can compute per-sample gradients and the model can be trained with DP-SGD.

    x (B, 3, R, R) in [-1, 1]
      -> trunk: len(channels) x [Conv3x3 stride 2 -> GroupNorm -> SiLU]     (B, C, R/2^L, R/2^L)
      -> flatten -> proj: Linear -> SiLU                                     (B, feature_dim) = features(x)
      -> head: Linear                                                        (B, k) logits

``blocks=n`` (default 0) adds n residual blocks after each stage's downsampling conv, each
[Conv3x3 -> GroupNorm -> SiLU -> Conv3x3 -> GroupNorm] + skip -> SiLU (ResNet's basic block, with
GroupNorm): ``channels=[32, 64, 128, 256], blocks=2`` is ResNet-18's layout (4 stages x 2 blocks; here
each stage opens with a stride-2 conv instead of a strided block), the unlearning benchmark's large model
(``configs/classifier32_resnet.yaml``). Stored in ``res`` (absent when 0, so older checkpoints load).

``features`` is the penultimate representation: with it frozen, ``head`` is a logistic regression
(convex in the head's parameters), which is what exact feature unlearning works on.

``noise_conditional=True`` makes it a classifier of *noised* images x_t (the guidance classifier of
``diffusion.sample.ddim_sample``): a sinusoidal embedding of the diffusion timestep t -> Linear -> SiLU is
added, per channel, after each block's GroupNorm (t = 0, the default, is a clean image).
Labels are attribute vectors in {-1, +1}^k; ``attribute_bce`` maps them to {0, 1}.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from veil.errors import ConfigError


class AttributeClassifier(nn.Module):
    def __init__(
        self,
        *,
        num_attributes: int,
        resolution: int = 32,
        channels: Sequence[int] = (16, 32, 64),
        norm_num_groups: int = 8,
        feature_dim: int = 64,
        noise_conditional: bool = False,
        time_embedding_dim: int = 64,
        blocks: int = 0,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if num_attributes < 1:
            raise ConfigError(f"num_attributes={num_attributes}: need at least one attribute")
        if not channels or any(c % norm_num_groups for c in channels):
            raise ConfigError(f"channels={channels}: each must be divisible by norm_num_groups={norm_num_groups}")
        side = resolution // 2 ** len(channels)
        if side < 1 or resolution % 2 ** len(channels):
            raise ConfigError(f"resolution={resolution} is not divisible by 2^{len(channels)} (one halving per channel)")
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(norm_num_groups, c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        if int(blocks) < 0:
            raise ConfigError(f"blocks={blocks}: residual blocks per stage must be >= 0")
        self.blocks = int(blocks)
        if self.blocks:
            self.res = nn.ModuleList(nn.Sequential(*(BasicBlock(c, norm_num_groups) for _ in range(self.blocks)))
                                     for c in channels)
        self.proj = nn.Linear(c_in * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_attributes)
        self.noise_conditional = bool(noise_conditional)
        if self.noise_conditional:
            self.time_embedding_dim = int(time_embedding_dim)
            self.time_mlp = nn.Sequential(nn.Linear(self.time_embedding_dim, self.time_embedding_dim), nn.SiLU())
            self.time_shift = nn.ModuleList(nn.Linear(self.time_embedding_dim, c) for c in channels)

    def _trunk(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if not self.noise_conditional:
            if not self.blocks:
                return self.trunk(x)
            h = x
            for i, stage in enumerate(self.res):
                h = stage(self.trunk[3 * i + 2](self.trunk[3 * i + 1](self.trunk[3 * i](h))))
            return h
        if t is None:
            t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
        temb = self.time_mlp(timestep_embedding(t.reshape(-1).expand(x.shape[0]), self.time_embedding_dim))
        h = x
        for i, shift in enumerate(self.time_shift):  # trunk = [conv, norm, silu] * L
            conv, norm, act = self.trunk[3 * i : 3 * i + 3]
            h = act(norm(conv(h)) + shift(temb)[:, :, None, None])
            if self.blocks:
                h = self.res[i](h)
        return h

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate features: (B, 3, R, R) [, timesteps (B,)] -> (B, feature_dim)."""
        h = self._trunk(x, t)  # (B, C, R/2^L, R/2^L)
        return F.silu(self.proj(h.flatten(1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k) logits; ``t`` (B,) diffusion timesteps of a noise-conditional model (None: clean, t = 0)."""
        return self.head(self.features(x, t))


class BasicBlock(nn.Module):
    """ResNet's basic block with GroupNorm: SiLU(x + GN(conv(SiLU(GN(conv(x)))))), channels and size kept."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x + self.norm2(self.conv2(F.silu(self.norm1(self.conv1(x))))))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), as in DDPM (sin half, cos half): diffusers'
    ``get_timestep_embedding`` with frequencies exp(-ln(10^4) i / (dim/2)); checked bit for bit
    against the hand-written formula it replaced (``tests/lightning_modules/models/test_classifier.py``)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=0)


def attribute_bce(logits: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: BCE-with-logits against attrs in {-1, +1} mapped to {0, 1}, mean over the k attributes.

    logits, attrs (B, k) -> (B,).
    """
    targets = (attrs + 1) * 0.5
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512, t: int | None = None) -> torch.Tensor:
    """Logits (N, k) for images (N, 3, R, R), in eval mode, batch by batch (``t``: timestep of a
    noise-conditional model; the images are then x_t, already noised)."""
    model.eval()
    if not len(x):
        return torch.zeros(0, model.head.out_features)
    extra = () if t is None else (torch.full((1,), int(t), dtype=torch.long),)
    return torch.cat([model(x[i : i + batch_size], *extra) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, attrs: torch.Tensor) -> float:
    """Mean over samples and attributes of sign(logit) == attr; NaN for no samples."""
    if logits.numel() == 0:
        return float("nan")
    return float(((logits > 0) == (attrs > 0)).float().mean())
