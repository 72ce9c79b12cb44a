"""The one-pass clip + sum + noise + divide kernel against fp64 ground truth, Opacus's arithmetic,
and the statistics of its in-kernel Gaussian noise.

Tolerances, as a forward-error bound |out - exact| <= tol * (sum_b |c_b g_b[i]|) / d per element
(the exact sum may cancel to ~0, so a bound relative to |exact| would be meaningless):
* fp32 output: 1e-5 (fp32 accumulation over <= 6 samples, one division: a few ulps of 6e-8);
* fp16 output: 1e-3 (one final rounding to fp16, 2^-11 ~ 4.9e-4);
* bf16 output: 8e-3 (one final rounding to bf16, 2^-8 ~ 3.9e-3).
Against the reference (= Opacus, which rounds clip factors, products and sums to the parameter
dtype along the way) the bf16/fp16 bounds are 4x wider.

Noise: for n iid N(0, s^2) draws the sample mean has sd s / sqrt(n) and the sample std has sd
~ s / sqrt(2n). The tests require |mean| <= 5 s / sqrt(n) and |std / s - 1| <= 5 / sqrt(2n) (a
correct sampler fails with probability < 1e-6; the seeds are fixed, so the tests are deterministic).
"""

import math

import pytest
import torch

from veil.kernels.clip_and_noise import fused_clip_and_noise
from veil.kernels.reference import (
    clip_factors_reference,
    dp_update_reference,
    per_sample_norms_reference,
)

OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _exact(grads, clip, denominator, prevs=None):
    """(prev + sum_b c_b g_b) / d in fp64, and the elementwise error scale sum_b |c_b g_b| / d."""
    out, scale = [], []
    c = clip.detach().cpu().double()
    for i, g in enumerate(grads):
        g64 = g.detach().cpu().double().reshape(len(g), -1)
        s = c @ g64
        if prevs is not None:
            s = s + prevs[i].detach().cpu().double().reshape(-1)
        out.append(s / denominator)
        scale.append((c.abs() @ g64.abs() + (prevs[i].cpu().double().abs().reshape(-1) if prevs else 0)) / denominator)
    return out, scale


def _assert_within(outs, exact, scale, tol):
    for o, e, s in zip(outs, exact, scale):
        err = (o.detach().cpu().double().reshape(-1) - e).abs()
        assert (err <= tol * s + 1e-30).all(), f"max error {err.max():.3g} vs bound {(tol * s).max():.3g}"


@pytest.mark.parametrize("out_dtype", ["same", "float32"])
def test_clipped_mean_matches_fp64(triton_device, dtype, shape_case, grad_samples_factory, out_dtype):
    batch, shapes = shape_case
    grads = grad_samples_factory(batch, shapes, dtype=dtype, device=triton_device)
    odt = dtype if out_dtype == "same" else torch.float32
    clip = clip_factors_reference(per_sample_norms_reference([g.float() for g in grads]), max_grad_norm=5.0)
    outs = [torch.empty(s, dtype=odt, device=triton_device) for s in shapes]
    fused_clip_and_noise(grads, clip_factors=clip, outputs=outs, noise_std=0.0, denominator=7.0)
    exact, scale = _exact(grads, clip, 7.0)
    _assert_within(outs, exact, scale, OUT_TOL[odt])


def test_matches_opacus_arithmetic_at_sigma_zero(triton_device, dtype, shape_case, grad_samples_factory):
    batch, shapes = shape_case
    grads = grad_samples_factory(batch, shapes, dtype=dtype, device=triton_device)
    expected = dp_update_reference(grads, max_grad_norm=5.0, noise_multiplier=0.0, denominator=7.0)
    clip = clip_factors_reference(per_sample_norms_reference(grads).float(), max_grad_norm=5.0)
    outs = [torch.empty(s, dtype=dtype, device=triton_device) for s in shapes]
    fused_clip_and_noise(grads, clip_factors=clip, outputs=outs, noise_std=0.0, denominator=7.0)
    _, scale = _exact(grads, clip, 7.0)
    tol = OUT_TOL[dtype] * (1 if dtype == torch.float32 else 4)
    _assert_within(outs, [e.cpu().double().reshape(-1) for e in expected], scale, tol)


def test_accumulates_in_place_into_running_sum(triton_device, grad_samples_factory):
    shapes = [(33,), (16, 4)]
    grads = grad_samples_factory(4, shapes, dtype=torch.float32, device=triton_device)
    prevs = grad_samples_factory(1, shapes, dtype=torch.float32, device=triton_device, seed=9)
    prevs = [p[0].clone() for p in prevs]
    before = [p.clone() for p in prevs]
    clip = torch.tensor([1.0, 0.5, 0.25, 0.0], device=triton_device)
    fused_clip_and_noise(grads, clip_factors=clip, outputs=prevs, prevs=prevs, noise_std=0.0, denominator=1.0)
    exact, scale = _exact(grads, clip, 1.0, prevs=before)
    _assert_within(prevs, exact, scale, 1e-5)


def _noise(device, *, seed, offset, shapes=((200_003,), (65_536,)), std=0.5, denominator=2.0):
    """The kernel's output for zero gradients: pure noise of std `std / denominator`."""
    grads = [torch.zeros((2, *s), device=device) for s in shapes]
    outs = [torch.empty(s, device=device) for s in shapes]
    fused_clip_and_noise(grads, clip_factors=torch.ones(2, device=device), outputs=outs, noise_std=std,
                         denominator=denominator, seed=seed, philox_offset=offset)
    return [o.cpu().double() for o in outs]


def test_noise_statistics(triton_device):
    z = torch.cat(_noise(triton_device, seed=123, offset=0))
    n, s = z.numel(), 0.5 / 2.0
    assert abs(z.mean().item()) <= 5 * s / math.sqrt(n)
    assert abs(z.std().item() / s - 1) <= 5 / math.sqrt(2 * n)
    # Gaussian shape, not only two moments: P(|z| < s) = 0.6827, binomial sd sqrt(p(1-p)/n)
    p_in = (z.abs() < s).double().mean().item()
    assert abs(p_in - 0.682689) <= 5 * math.sqrt(0.6827 * 0.3173 / n)


def test_noise_is_reproducible_and_keyed(triton_device):
    a = _noise(triton_device, seed=7, offset=0)
    assert all(torch.equal(x, y) for x, y in zip(a, _noise(triton_device, seed=7, offset=0)))
    for other in (_noise(triton_device, seed=8, offset=0), _noise(triton_device, seed=7, offset=1 << 32)):
        assert all(not torch.equal(x, y) for x, y in zip(a, other))
    # two parameters of one shape draw from disjoint counters: uncorrelated, not equal
    p, q = _noise(triton_device, seed=7, offset=0, shapes=((50_000,), (50_000,)))
    assert abs(torch.corrcoef(torch.stack([p, q]))[0, 1].item()) <= 5 / math.sqrt(50_000)


def test_noise_only_pass_with_empty_batch(triton_device):
    summed = [torch.ones(1000, device=triton_device)]
    empty = [s.reshape(1, -1)[:0] for s in summed]
    fused_clip_and_noise(empty, clip_factors=torch.zeros(0, device=triton_device), outputs=summed, prevs=summed,
                         noise_std=1.0, denominator=4.0, seed=1)
    z = summed[0].cpu().double() * 4.0 - 1.0  # undo the division and the running sum
    assert abs(z.mean().item()) <= 5 / math.sqrt(1000) and abs(z.std().item() - 1) <= 5 / math.sqrt(2000)


def test_rejects_badly_shaped_outputs(triton_device):
    grads = [torch.zeros((2, 8), device=triton_device)]
    with pytest.raises(ValueError, match="outputs"):
        fused_clip_and_noise(grads, clip_factors=torch.ones(2, device=triton_device),
                             outputs=[torch.empty(7, device=triton_device)], noise_std=0.0, denominator=1.0)
