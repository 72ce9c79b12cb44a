"""The fused noise + optimizer-update kernels against torch.optim, and the statistics of their noise.

At noise_std = 0 both backends must reproduce torch.optim.SGD / AdamW (single-tensor path,
``foreach=False``) given ``p.grad = summed / denominator``:
* reference backend: bit for bit (it makes the same calls);
* triton backend: rtol 1e-6, atol 1e-7 over 3 steps. The kernel does the same fp32 operations but
  may round differently by an ulp (6e-8) per operation (contracted multiply-adds, ``m + w (g - m)``
  for ``lerp``), a handful of operations per step.

Noise: for n iid N(0, s^2) draws the sample mean has sd s / sqrt(n) and the sample std has sd
~ s / sqrt(2n); the tests require |mean| <= 5 s / sqrt(n) and |std / s - 1| <= 5 / sqrt(2n) (a correct
sampler fails with probability < 1e-6; seeds are fixed, so the tests are deterministic).
"""

import math

import pytest
import torch

from veil.errors import ConfigError
from veil.kernels.clip_and_noise import fused_clip_and_noise
from veil.kernels.noise_update import fused_noise_adamw_, fused_noise_sgd_

SHAPES = [(3,), (5, 7), (2, 3, 3, 3), (17,), (131, 9), (32, 16)]  # (32, 16): the 16-aligned launch group
DENOMINATOR = 6.0
ADAMW = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}


def _tensors(device, *, steps=3, seed=0, shapes=SHAPES):
    """Initial parameters and, per step, summed gradients (a list per step)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    summed = [[(3 * torch.randn(s, generator=gen)).to(device) for s in shapes] for _ in range(steps)]
    return params, summed


def _assert_close(actual, expected, backend):
    for a, e in zip(actual, expected):
        if backend == "reference":
            assert torch.equal(a, e), f"max difference {(a - e).abs().max():.3g}"
        else:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


SGD_OPTIONS = {
    "plain": {},
    "weight-decay": {"weight_decay": 0.05},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "dampening": {"momentum": 0.8, "dampening": 0.1, "weight_decay": 0.01},
}


@pytest.mark.parametrize("options", list(SGD_OPTIONS.values()), ids=list(SGD_OPTIONS))
def test_sgd_matches_torch_at_zero_noise(backend_device, options):
    backend, device = backend_device
    params, summed = _tensors(device)
    expected = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(expected, lr=0.1, foreach=False, **options)
    buffers = [torch.zeros_like(p) for p in params] if options.get("momentum") else None
    for step, sums in enumerate(summed):
        for p, s in zip(expected, sums):
            p.grad = s / DENOMINATOR
        opt.step()
        fused_noise_sgd_(params, sums, buffers, noise_std=0.0, denominator=DENOMINATOR, lr=0.1,
                         first_step=step == 0, backend=backend, **options)
    _assert_close(params, [p.detach() for p in expected], backend)
    if buffers is not None:
        _assert_close(buffers, [opt.state[p]["momentum_buffer"] for p in expected], backend)


def test_adamw_matches_torch_at_zero_noise(backend_device):
    backend, device = backend_device
    params, summed = _tensors(device)
    expected = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(expected, lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"], foreach=False)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for step, sums in enumerate(summed, start=1):
        for p, s in zip(expected, sums):
            p.grad = s / DENOMINATOR
        opt.step()
        fused_noise_adamw_(params, sums, exp_avgs, exp_avg_sqs, noise_std=0.0, denominator=DENOMINATOR, step=step,
                           backend=backend, **ADAMW)
    _assert_close(params, [p.detach() for p in expected], backend)
    _assert_close(exp_avgs, [opt.state[p]["exp_avg"] for p in expected], backend)
    _assert_close(exp_avg_sqs, [opt.state[p]["exp_avg_sq"] for p in expected], backend)


def test_bf16_summed_gradients_are_widened(triton_device):
    params, summed = _tensors(triton_device, steps=1)
    sums = [s.bfloat16() for s in summed[0]]
    kernel, reference = [p.clone() for p in params], [p.clone() for p in params]
    for out, backend in ((kernel, "triton"), (reference, "reference")):
        fused_noise_sgd_(out, sums, None, noise_std=0.0, denominator=DENOMINATOR, lr=0.1, weight_decay=0.01,
                         first_step=True, backend=backend)
    _assert_close(kernel, reference, "triton")


def _sgd_noise(device, *, seed, offset, shapes=((200_003,), (65_536,)), std=0.5, summed=None, elem_bases=None):
    """-p after one SGD step with lr 1 from p = 0: exactly the kernel's g = (summed + std z) / DENOMINATOR."""
    params = [torch.zeros(s, device=device) for s in shapes]
    summed = summed if summed is not None else [torch.zeros(s, device=device) for s in shapes]
    fused_noise_sgd_(params, summed, None, noise_std=std, denominator=DENOMINATOR, lr=1.0, first_step=True,
                     seed=seed, philox_offset=offset, elem_bases=elem_bases, backend="triton")
    return [-p for p in params]


def test_noise_statistics(triton_device):
    z = torch.cat(_sgd_noise(triton_device, seed=123, offset=0)).cpu().double()
    n, s = z.numel(), 0.5 / DENOMINATOR
    assert abs(z.mean().item()) <= 5 * s / math.sqrt(n)
    assert abs(z.std().item() / s - 1) <= 5 / math.sqrt(2 * n)
    p_in = (z.abs() < s).double().mean().item()  # Gaussian shape: P(|z| < s) = 0.6827
    assert abs(p_in - 0.682689) <= 5 * math.sqrt(0.6827 * 0.3173 / n)


def test_noise_is_reproducible_and_keyed(triton_device):
    shapes = ((4_099,), (33, 31))
    a = _sgd_noise(triton_device, seed=7, offset=0, shapes=shapes)
    assert all(torch.equal(x, y) for x, y in zip(a, _sgd_noise(triton_device, seed=7, offset=0, shapes=shapes)))
    for other in (_sgd_noise(triton_device, seed=8, offset=0, shapes=shapes),
                  _sgd_noise(triton_device, seed=7, offset=1 << 32, shapes=shapes)):
        assert all(not torch.equal(x, y) for x, y in zip(a, other))


def test_noise_uses_the_counters_of_clip_and_noise(triton_device):
    """Same (seed, philox_offset, elem_bases): the same z as fused_clip_and_noise, so a caller can move the
    noise from the clip stage to the update stage without changing the stream."""
    shapes, offset, bases = ((1_000,), (17, 3)), 5 << 32, [100, 7_000]
    update = _sgd_noise(triton_device, seed=3, offset=offset, shapes=shapes, elem_bases=bases)
    clip = [torch.empty(s, device=triton_device) for s in shapes]
    fused_clip_and_noise([torch.zeros((1, *s), device=triton_device) for s in shapes],
                         clip_factors=torch.ones(1, device=triton_device), outputs=clip, noise_std=0.5,
                         denominator=DENOMINATOR, seed=3, philox_offset=offset, elem_bases=bases)
    assert all(torch.equal(u, c) for u, c in zip(update, clip))


def test_adamw_adds_the_noise_before_the_update(triton_device):
    """AdamW with noise = torch.optim.AdamW on the kernel's own noisy gradient (read back through SGD)."""
    params, summed = _tensors(triton_device, steps=1)
    grads = _sgd_noise(triton_device, seed=11, offset=2 << 32, shapes=SHAPES, std=2.0, summed=summed[0])
    expected = [p.clone().requires_grad_() for p in params]
    for p, g in zip(expected, grads):
        p.grad = g
    torch.optim.AdamW(expected, lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
                      weight_decay=ADAMW["weight_decay"], foreach=False).step()
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    fused_noise_adamw_(params, summed[0], exp_avgs, exp_avg_sqs, noise_std=2.0, denominator=DENOMINATOR, step=1,
                       seed=11, philox_offset=2 << 32, backend="triton", **ADAMW)
    _assert_close(params, [p.detach() for p in expected], "triton")
    again = [torch.zeros_like(p) for p in params]
    fused_noise_adamw_(again, summed[0], [torch.zeros_like(p) for p in params],
                       [torch.zeros_like(p) for p in params], noise_std=2.0, denominator=DENOMINATOR, step=1,
                       seed=11, philox_offset=3 << 32, backend="triton", **ADAMW)
    assert not any(torch.equal(a, b) for a, b in zip(again, params))


def test_reference_noise_comes_from_the_generator():
    params, summed = _tensors("cpu", steps=1)
    out = [p.clone() for p in params]
    fused_noise_sgd_(out, summed[0], None, noise_std=0.5, denominator=DENOMINATOR, lr=1.0, first_step=True,
                     backend="reference", generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    expected = [p - (s + 0.5 * torch.randn(s.shape, generator=gen)) / DENOMINATOR for p, s in zip(params, summed[0])]
    _assert_close(out, expected, "reference")


def test_refuses_bad_arguments():
    params, summed = _tensors("cpu", steps=1)
    sums = summed[0]
    sgd = {"noise_std": 0.0, "denominator": 1.0, "lr": 0.1, "first_step": True}
    with pytest.raises(ConfigError, match="float32"):
        fused_noise_sgd_([p.double() for p in params], sums, None, **sgd)
    with pytest.raises(ConfigError, match=r"summed\[1\]"):
        fused_noise_sgd_(params, [sums[0], sums[0]] + sums[2:], None, **sgd)
    with pytest.raises(ConfigError, match="summed has"):
        fused_noise_sgd_(params, sums[:-1], None, **sgd)
    with pytest.raises(ConfigError, match="shares memory"):
        fused_noise_sgd_(params, params, None, **sgd)
    with pytest.raises(ConfigError, match="momentum_buffers"):
        fused_noise_sgd_(params, sums, None, momentum=0.9, **sgd)
    with pytest.raises(ConfigError, match="nesterov"):
        fused_noise_sgd_(params, sums, None, nesterov=True, **sgd)
    with pytest.raises(ConfigError, match="denominator"):
        fused_noise_sgd_(params, sums, None, **{**sgd, "denominator": 0.0})
    with pytest.raises(ConfigError, match="backend"):
        fused_noise_sgd_(params, sums, None, backend="cuda", **sgd)
    with pytest.raises(ConfigError, match="contiguous"):
        fused_noise_adamw_(params, sums, [torch.zeros(*p.shape, 2)[..., 0] for p in params], [torch.zeros_like(p) for p in params],
                           noise_std=0.0, denominator=1.0, step=1, **ADAMW)
    with pytest.raises(ConfigError, match="step"):
        fused_noise_adamw_(params, sums, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                           noise_std=0.0, denominator=1.0, step=0, **ADAMW)


def test_auto_on_cpu_is_the_reference():
    params, summed = _tensors("cpu", steps=1)
    auto, reference = [p.clone() for p in params], [p.clone() for p in params]
    for out, backend in ((auto, "auto"), (reference, "reference")):
        fused_noise_adamw_(out, summed[0], [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                           noise_std=0.5, denominator=DENOMINATOR, step=1, backend=backend,
                           generator=torch.Generator().manual_seed(1), **ADAMW)
    _assert_close(auto, reference, "reference")
