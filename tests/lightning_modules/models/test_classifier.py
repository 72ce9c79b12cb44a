"""AttributeClassifier's timestep embedding: diffusers' get_timestep_embedding, bit for bit the formula it replaced."""

import math

import pytest
import torch

from veil.lightning_modules.models.classifier import timestep_embedding


def handwritten_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoid veil computed by hand before (DDPM's: sin half, cos half, frequencies 10^4^(-i/half))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


@pytest.mark.parametrize("dim", [8, 32, 64, 128])
def test_timestep_embedding_is_bit_identical_to_the_handwritten_one(dim):
    t = torch.cat([torch.arange(1000), torch.tensor([0, 999, 500])])
    ours = timestep_embedding(t, dim)
    assert ours.shape == (len(t), dim) and ours.dtype == torch.float32
    assert torch.equal(ours, handwritten_timestep_embedding(t, dim))
