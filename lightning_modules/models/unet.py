"""The attribute-conditional denoiser: a diffusers ``UNet2DModel`` plus an attribute embedding.

A plain ``nn.Module`` (no Lightning): ``AttributeConditionalUNet(x_t, t, attrs) -> eps_hat``.
Attributes live in {-1, 0, +1}^k (0 = unknown); a two-layer MLP maps them to the time-embedding
width and the UNet adds them to the timestep embedding (``class_embed_type="identity"``).
The constructor's keyword arguments are the whole configuration: checkpoints store them
(``model_kwargs``) so the model can be rebuilt without the training config.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def unet_block_types(attention_levels: Sequence[bool]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block type names for the given per-level attention flags."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    return down, up


class AttributeConditionalUNet(nn.Module):
    """eps-prediction UNet conditioned on a timestep and an attribute vector in {-1,0,+1}^k."""

    def __init__(
        self,
        *,
        num_attributes: int,
        resolution: int = 32,
        block_out_channels: Sequence[int] = (64, 128, 128),
        attention_levels: Sequence[bool] = (False, True, True),
        layers_per_block: int = 1,
        norm_num_groups: int = 16,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        from diffusers import UNet2DModel  # heavy import, kept local

        if len(attention_levels) != len(block_out_channels):
            raise ValueError("attention_levels needs one flag per entry of block_out_channels")
        self.num_attributes = num_attributes
        time_embed_dim = block_out_channels[0] * 4
        down, up = unet_block_types(attention_levels)
        self.unet = UNet2DModel(
            sample_size=resolution,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(block_out_channels),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            dropout=dropout,
            class_embed_type="identity",
        )
        # a in {-1,0,+1}^k -> R^{time_embed_dim}, added to the timestep embedding inside the UNet.
        self.attribute_embedding = nn.Sequential(
            nn.Linear(num_attributes, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
        # x_t: (B, 3, H, W); t: (B,) int64; attrs: (B, k) float in {-1, 0, +1}
        cond = self.attribute_embedding(attrs.to(x_t.dtype))  # (B, time_embed_dim)
        return self.unet(x_t, t, class_labels=cond).sample  # (B, 3, H, W)

