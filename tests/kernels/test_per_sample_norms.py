"""The one-launch per-sample norm kernel against fp64 ground truth and Opacus's arithmetic.

Tolerances (relative, on norms):
* against fp64 on the same (upcast) inputs: 1e-5 for every input dtype. bf16/fp16 values are exact
  in fp32, so the only error is the fp32 accumulation of at most ~1.4e5 squares (blocked sums:
  a few ulps of 6e-8 each level), far below 1e-5.
* against the reference (= Opacus), which computes per-parameter norms IN the gradient dtype and
  rounds them: fp32 1e-5; fp16 2e-3 (two fp16 roundings of 2^-11 ~ 4.9e-4 each, plus slack);
  bf16 1e-2 (two roundings of 2^-8 ~ 3.9e-3).
"""

import pytest
import torch

from veil.kernels.per_sample_norms import per_sample_norms, per_sample_sq_norms
from veil.kernels.reference import per_sample_norms_reference

VS_OPACUS_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _fp64_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum_t ||g_t[b]||^2) in fp64 on the CPU: the ground truth."""
    sq = sum(g.detach().cpu().double().reshape(len(g), -1).pow(2).sum(1) for g in grads)
    return sq.sqrt()


def test_norms_match_fp64(triton_device, dtype, shape_case, grad_samples_factory):
    batch, shapes = shape_case
    grads = grad_samples_factory(batch, shapes, dtype=dtype, device=triton_device)
    norms = per_sample_norms(grads)
    assert norms.shape == (batch,) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.cpu().double(), _fp64_norms(grads), rtol=1e-5, atol=0)


def test_norms_match_opacus_arithmetic(triton_device, dtype, shape_case, grad_samples_factory):
    batch, shapes = shape_case
    grads = grad_samples_factory(batch, shapes, dtype=dtype, device=triton_device)
    expected = per_sample_norms_reference(grads).float()  # Opacus's two-level norm, in `dtype`
    rtol = VS_OPACUS_RTOL[dtype]
    torch.testing.assert_close(per_sample_norms(grads), expected, rtol=rtol, atol=0)


def test_mixed_dtypes_and_layouts_in_one_call(triton_device, grad_samples_factory):
    # fp32 + bf16 + fp16, aligned (numel % 16 == 0) and ragged tensors: several groups, one sum
    grads = grad_samples_factory(4, [(16, 4), (7,)], dtype=torch.float32, device=triton_device)
    grads += grad_samples_factory(4, [(32,), (5, 3)], dtype=torch.bfloat16, device=triton_device, seed=1)
    grads += grad_samples_factory(4, [(9,)], dtype=torch.float16, device=triton_device, seed=2)
    torch.testing.assert_close(per_sample_norms(grads).cpu().double(), _fp64_norms(grads), rtol=1e-5, atol=0)


def test_non_contiguous_gradients(triton_device, grad_samples_factory):
    (g,) = grad_samples_factory(3, [(12, 5)], dtype=torch.float32, device=triton_device)
    transposed = g.transpose(1, 2)  # (3, 5, 12), not contiguous
    assert not transposed.is_contiguous()
    torch.testing.assert_close(per_sample_norms([transposed]), per_sample_norms([g.contiguous()]))


def test_accumulates_into_given_buffer(triton_device, grad_samples_factory):
    grads = grad_samples_factory(3, [(10,), (4, 4)], dtype=torch.float32, device=triton_device)
    out = torch.full((3,), 2.0, device=triton_device)
    per_sample_sq_norms(grads, out=out)
    torch.testing.assert_close(out.cpu().double(), _fp64_norms(grads) ** 2 + 2.0, rtol=1e-5, atol=0)


def test_empty_batch_and_bad_input(triton_device):
    empty = [torch.zeros((0, 4), device=triton_device)]
    assert per_sample_sq_norms(empty).shape == (0,)
    with pytest.raises(ValueError, match="batch"):
        per_sample_sq_norms([torch.zeros((2, 3), device=triton_device), torch.zeros((3, 3), device=triton_device)])
    with pytest.raises(ValueError, match="at least one"):
        per_sample_sq_norms([])


def test_zero_gradients_give_zero_norms(triton_device):
    grads = [torch.zeros((2, 33), device=triton_device), torch.zeros((2, 7, 3), device=triton_device)]
    assert torch.equal(per_sample_norms(grads).cpu(), torch.zeros(2))
