"""The Conv2d ghost-norm kernel against the unfold + Gram reference and a brute-force per-example gradient.

Ground truth: for each example, autograd of ``conv2d`` with respect to the weight, in fp64, with the
loss ``sum(g * conv2d(x_rows)) / K`` over its K rows (the mean of the rows' gradients), then the
squared Frobenius norm.

Tolerances (relative, on squared norms):
* fp32 inputs: 1e-4. Both the kernel and the reference accumulate in fp32 over at most a few
  thousand products (a few ulps of 6e-8 per level of the sums); the Gram products are PSD so the
  final sum does not cancel catastrophically on these random inputs.
* bf16 inputs, against the brute force on the same bf16 values widened to fp64: 1e-3. bf16 products
  are exact in fp32, so only the fp32 accumulation remains; 10x slack over fp32 for the GPU's
  tensor-core accumulation order.
* bf16 inputs, against the fp32 inputs they were rounded from: 2e-2. Each input moves by up to 2^-9
  (relative) and the squared norm is of degree 4 in the inputs: up to ~4 * 2^-9 ~ 8e-3, plus slack.
"""

import pytest
import torch
import torch.nn.functional as F

from veil.errors import ConfigError
from veil.kernels.ghost_norm import conv2d_ghost_sq_norms

# name: (kernel_size, stride, padding, dilation, K, B, (H, W), C, O)
CASES = {
    "3x3-s1-p1": (3, 1, 1, 1, 1, 2, (5, 7), 3, 4),
    "3x3-s2-d2-K3": (3, 2, 0, 2, 3, 2, (9, 7), 3, 5),
    "3x3-s2-p1-B1": (3, 2, 1, 1, 1, 1, (6, 5), 8, 3),  # C kh kw = 72: two contraction chunks
    "1x1-K3": (1, 1, 0, 1, 3, 2, (4, 6), 4, 3),
    "1x1-wide": (1, 1, 0, 1, 1, 2, (3, 4), 70, 66),  # channels beyond one contraction chunk
    "3x1-tuples": ((3, 1), (1, 2), (1, 0), (2, 1), 2, 2, (6, 7), 3, 4),
}


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _inputs(case, *, dtype=torch.float32, device="cpu", seed=0):
    kernel_size, stride, padding, dilation, k, b, (h, w), c, o = case
    ks, st, pd, dl = map(_pair, (kernel_size, stride, padding, dilation))
    out_hw = [(n + 2 * p - d * (q - 1) - 1) // s + 1 for n, p, d, q, s in zip((h, w), pd, dl, ks, st)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b * k, c, h, w, generator=gen)
    g = torch.randn(b * k, o, *out_hw, generator=gen)
    kwargs = {"kernel_size": kernel_size, "stride": stride, "padding": padding, "dilation": dilation, "rows_per_example": k}
    return x.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype), kwargs


def _brute_force(x, g, *, kernel_size, stride, padding, dilation, rows_per_example):
    """||mean over the example's rows of d<g, conv2d(x_row, W)>/dW||^2 by autograd, fp64, per example."""
    x, g, k = x.cpu().double(), g.cpu().double(), rows_per_example
    out = []
    for i in range(len(x) // k):
        weight = torch.zeros(g.shape[1], x.shape[1], *_pair(kernel_size), dtype=torch.float64, requires_grad=True)
        y = F.conv2d(x[i * k : (i + 1) * k], weight, stride=stride, padding=padding, dilation=dilation)
        (grad,) = torch.autograd.grad((y * g[i * k : (i + 1) * k]).sum() / k, weight)
        out.append(grad.pow(2).sum())
    return torch.stack(out)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_reference_and_brute_force(triton_device, case):
    x, g, kwargs = _inputs(case, device=triton_device)
    expected = _brute_force(x, g, **kwargs)
    kernel = conv2d_ghost_sq_norms(x, g, backend="triton", **kwargs)
    reference = conv2d_ghost_sq_norms(x, g, backend="reference", **kwargs)
    assert kernel.shape == expected.shape and kernel.dtype == torch.float32
    torch.testing.assert_close(kernel.cpu().double(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(reference.cpu().double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("case", [CASES["3x3-s2-d2-K3"], CASES["3x1-tuples"]], ids=["3x3-s2-d2-K3", "3x1-tuples"])
def test_bf16_inputs(triton_device, case):
    x, g, kwargs = _inputs(case, device=triton_device)
    xb, gb = x.bfloat16(), g.bfloat16()
    kernel = conv2d_ghost_sq_norms(xb, gb, backend="triton", **kwargs).cpu().double()
    reference = conv2d_ghost_sq_norms(xb, gb, backend="reference", **kwargs).cpu().double()
    same_values = _brute_force(xb, gb, **kwargs)  # the bf16 values, exactly, in fp64
    torch.testing.assert_close(kernel, same_values, rtol=1e-3, atol=0)
    torch.testing.assert_close(reference, same_values, rtol=1e-3, atol=0)
    torch.testing.assert_close(kernel, _brute_force(x, g, **kwargs), rtol=2e-2, atol=0)


def test_auto_on_cpu_is_the_reference():
    x, g, kwargs = _inputs(CASES["3x3-s1-p1"])
    auto = conv2d_ghost_sq_norms(x, g, **kwargs)
    assert torch.equal(auto, conv2d_ghost_sq_norms(x, g, backend="reference", **kwargs))
    x64, g64 = x.double(), g.double()  # the reference takes fp64 (the kernel does not)
    torch.testing.assert_close(conv2d_ghost_sq_norms(x64, g64, **kwargs).double(), _brute_force(x, g, **kwargs),
                               rtol=1e-6, atol=0)


def test_triton_refuses_fp64(triton_device):
    x, g, kwargs = _inputs(CASES["1x1-K3"], dtype=torch.float64, device=triton_device)
    with pytest.raises(ConfigError, match="reference"):
        conv2d_ghost_sq_norms(x, g, backend="triton", **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_refuses_bad_arguments(backend):
    x, g, kwargs = _inputs(CASES["3x3-s1-p1"])
    with pytest.raises(ConfigError, match="groups=1"):
        conv2d_ghost_sq_norms(x, g, groups=2, backend=backend, **kwargs)
    with pytest.raises(ConfigError, match="rows_per_example=3 must divide"):
        conv2d_ghost_sq_norms(x, g, backend=backend, **{**kwargs, "rows_per_example": 3})
    with pytest.raises(ConfigError, match="same rows"):
        conv2d_ghost_sq_norms(x, g[:1], backend=backend, **kwargs)
    with pytest.raises(ConfigError, match="spatial shape"):
        conv2d_ghost_sq_norms(x, g[..., :-1], backend=backend, **kwargs)
    with pytest.raises(ConfigError, match="4-d"):
        conv2d_ghost_sq_norms(x[0], g[0], backend=backend, **kwargs)
    with pytest.raises(ConfigError, match="F.pad"):
        conv2d_ghost_sq_norms(x, g, backend=backend, **{**kwargs, "padding": "same"})
    with pytest.raises(ConfigError, match="backend"):
        conv2d_ghost_sq_norms(x, g, backend="cuda", **kwargs)
