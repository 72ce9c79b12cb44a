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


def test_residual_blocks_make_the_resnet_like_classifier_and_keep_the_plain_one_as_it_was():
    """``blocks=n``: n basic blocks (conv-GN-SiLU-conv-GN + skip) after each stage; blocks=0 has exactly the
    old parameters (checkpoints load); the noise-conditional path runs the blocks too; bad values refused."""
    from veil.errors import ConfigError
    from veil.lightning_modules.models.classifier import AttributeClassifier, BasicBlock
    from veil.jobs.train_classifier import check_model_options

    torch.manual_seed(0)
    plain = AttributeClassifier(num_attributes=3, channels=[8, 16], norm_num_groups=4)
    assert not any(n.startswith("res.") for n, _ in plain.named_parameters())
    res = AttributeClassifier(num_attributes=3, channels=[8, 16], norm_num_groups=4, blocks=2)
    plain_names = {n for n, _ in plain.named_parameters()}
    assert plain_names < {n for n, _ in res.named_parameters()}
    assert sum(isinstance(m, BasicBlock) for m in res.modules()) == 4
    x = torch.randn(5, 3, 32, 32)
    assert res(x).shape == (5, 3) and res.features(x).shape == (5, 64)
    # the forward is the stages in order: stage i = trunk conv/norm/act, then its blocks (checked by hand)
    h = x
    for i in range(2):
        h = res.res[i](res.trunk[3 * i + 2](res.trunk[3 * i + 1](res.trunk[3 * i](h))))
    torch.testing.assert_close(res.features(x), torch.nn.functional.silu(res.proj(h.flatten(1))))
    block = res.res[0][0]
    z = torch.randn(2, 8, 16, 16)
    manual = torch.nn.functional.silu(z + block.norm2(block.conv2(torch.nn.functional.silu(block.norm1(block.conv1(z))))))
    torch.testing.assert_close(block(z), manual)
    cond = AttributeClassifier(num_attributes=3, channels=[8, 16], norm_num_groups=4, blocks=1, noise_conditional=True)
    out = cond(x, torch.tensor([10]))
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="blocks"):
        AttributeClassifier(num_attributes=3, blocks=-1)
    assert check_model_options({"blocks": 2})["blocks"] == 2
    with pytest.raises(ConfigError, match="model.blocks"):
        check_model_options({"blocks": -1})
