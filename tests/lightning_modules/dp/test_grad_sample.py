"""Per-sample gradients of the full conditional UNet (with attention) against one-example autograd.

Opacus 1.6 silently computes wrong per-sample gradients for Conv2d layers whose input is not
contiguous, which diffusers' attention blocks produce (DESIGN.md, Platform facts). The ground
truth here is a loop of ordinary autograd, one example at a time; ``attach_grad_sampler`` must
match it, and the same model *without* the contiguity fix must not (so this test would catch a
regression of the fix, and tells us when Opacus fixes the bug).
"""

import copy

import pytest
import torch

from veil.lightning_modules.dp.grad_sample import attach_grad_sampler
from veil.lightning_modules.models.unet import AttributeConditionalUNet

TINY = dict(num_attributes=3, resolution=16, block_out_channels=(16, 32), attention_levels=(False, True),
            layers_per_block=1, norm_num_groups=8, attention_head_dim=8)


def _inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    a = torch.randint(-1, 2, (b, 3), generator=g).float()
    target = torch.randn(b, 3, 16, 16, generator=g)
    return x, t, a, target


def _loss(model, x, t, a, target):
    return (model(x, t, a) - target).pow(2).mean(dim=(1, 2, 3))


def _loop_grads(model, x, t, a, target):
    """Ground truth: grad of each example's own loss, one at a time."""
    out = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        _loss(model, x[i : i + 1], t[i : i + 1], a[i : i + 1], target[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.clone())
    return {n: torch.stack(v) for n, v in out.items()}


def _opacus_grads(model, x, t, a, target, *, fix):
    gsm = attach_grad_sampler(model, fix_contiguity=fix)
    # loss_reduction="mean": Opacus rescales by the batch size, so grad_sample[i] is grad of loss_i.
    _loss(model, x, t, a, target).mean().backward()
    grads = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm._close()
    return grads


def _max_rel_error(got, want):
    # Relative to the largest per-sample gradient overall: some true gradients are exactly zero
    # in exact arithmetic (attention key biases: softmax ignores a shift shared by all keys), so
    # a per-parameter relative error would divide rounding noise by zero.
    scale = max(w.abs().max().item() for w in want.values())
    return max((got[n] - want[n]).abs().max().item() for n in want) / scale


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = AttributeConditionalUNet(**TINY).double()
    inputs = [v.double() if v.is_floating_point() else v for v in _inputs()]
    return model, inputs, _loop_grads(copy.deepcopy(model), *inputs)


def test_per_sample_grads_match_autograd_loop_with_fix(reference):
    model, inputs, want = reference
    got = _opacus_grads(copy.deepcopy(model), *inputs, fix=True)
    assert set(got) == set(want)
    # float64 throughout: any real discrepancy is orders of magnitude above 1e-8.
    assert _max_rel_error(got, want) < 1e-8


def test_opacus_without_fix_is_wrong_on_attention_unet(reference):
    model, inputs, want = reference
    got = _opacus_grads(copy.deepcopy(model), *inputs, fix=False)
    assert _max_rel_error(got, want) > 1e-3, "Opacus no longer shows the channels_last bug; the fix may be dropped"
