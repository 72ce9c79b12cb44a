"""Clip, sum over the batch, add Gaussian noise and divide, in one pass over the per-sample gradients.

For every parameter t and element i, with clip factors c[b] = min(1, C / (n[b] + 1e-6)):

    out_t[i] = ( prev_t[i] + sum_b c[b] g_t[b, i] + sigma C z_t[i] ) / denominator

* ``prev_t`` is the running clipped sum of earlier virtual steps (optional, may alias ``out_t``);
* ``z_t[i] ~ N(0, 1)`` is drawn in the kernel: Philox-4x32 keyed by ``seed`` at the 64-bit counter
  ``philox_offset + elem_base_t + i``, Box-Muller'd by ``tl.randn``. ``elem_base_t`` is t's start in
  the flat parameter vector, so parameters never share counters; the caller advances
  ``philox_offset`` between steps (the optimizer uses ``step << 32``). Same (seed, offset): same noise.
  This is NOT Opacus's secure_mode noise (no protection against floating-point attacks).
* ``denominator`` is ``expected_batch_size * accumulated_iterations`` (mean loss) or 1 (sum loss);
  a virtual (skipped) step passes ``noise_std=0, denominator=1`` and writes into the running sum.

Each program owns BLOCK elements of one tensor (slice j of the block table, see ``multi_tensor``),
reads SAMPLES rows at a time for all B samples, accumulates in fp32 and writes its BLOCK outputs
once: per-sample gradients are read once and nothing of size B x P is ever written.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from veil.kernels.multi_tensor import (
    META_COLS,
    block_table,
    check_launchable,
    group_tensors,
    interpreter_block,
    interpreting,
    meta_table,
    per_sample_numel,
    triton_dtype,
)

# Compiled-mode launch shape: 1024 elements x 8 samples per loop iteration (32 KiB of fp32 in
# flight per program, pipelined by the compiler over the batch loop).
GPU_BLOCK, GPU_SAMPLES, GPU_WARPS = 1024, 8, 8


@triton.jit
def _clip_sum_noise_kernel(
    meta_ptr,  # int64 (T, META_COLS): [in_ptr, out_ptr, prev_ptr, n_t, elem_base_t] per tensor
    blocks_ptr,  # int64 (NB, 2): [t, first element] per slice of BLOCK elements
    clip_ptr,  # fp32 (B,): clip factors c[b]
    B,  # samples
    seed,  # Philox key
    philox_offset,  # added to every counter: the caller's stream position for this step
    noise_std,  # sigma * C
    denominator,  # expected_batch_size * accumulated_iterations, or 1
    IN_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_PREV: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
    SAMPLES: tl.constexpr,
    META_COLS: tl.constexpr,
):
    j = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * j)
    start = tl.load(blocks_ptr + 2 * j + 1)
    row = meta_ptr + t * META_COLS
    in_addr = tl.load(row)
    out_addr = tl.load(row + 1)
    n = tl.load(row + 3)
    x_ptr = in_addr.to(tl.pointer_type(IN_DTYPE))
    out_ptr = out_addr.to(tl.pointer_type(OUT_DTYPE))
    if ALIGNED:  # the hints must sit on typed pointers: int_to_ptr drops an integer's divisibility
        x_ptr = tl.multiple_of(x_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
        n = tl.multiple_of(n, 16)
        start = tl.multiple_of(start, BLOCK)
    cols = start + tl.arange(0, BLOCK)  # (BLOCK,) element indices within one sample
    col_mask = cols < n

    # 1. s[i] = sum_b c[b] g[b, i], SAMPLES rows per iteration, fp32 accumulator
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b0 in range(0, B, SAMPLES):
        rows = b0 + tl.arange(0, SAMPLES)
        c = tl.load(clip_ptr + rows, mask=rows < B, other=0.0)  # (SAMPLES,)
        mask = (rows < B)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(x.to(tl.float32) * c[:, None], axis=0)
    # 2. running sum of the earlier virtual steps (Opacus: summed_grad += grad)
    if HAS_PREV:
        prev_ptr = tl.load(row + 2).to(tl.pointer_type(OUT_DTYPE))
        if ALIGNED:
            prev_ptr = tl.multiple_of(prev_ptr, 16)
        prev = tl.load(prev_ptr + cols, mask=col_mask, other=0.0)
        acc = prev.to(tl.float32) + acc
    # 3. Gaussian noise of std sigma * C, one Philox counter per element of the flat parameter vector
    if ADD_NOISE:
        elem_base = tl.load(row + 4)
        counters = philox_offset + elem_base + cols.to(tl.int64)
        acc += noise_std * tl.randn(seed, counters)
    # 4. mean over the expected batch: IEEE-rounded division like Opacus's p.grad /= denominator
    #    (a plain `/` compiles to the approximate div.full.f32)
    acc = tl.math.div_rn(acc, denominator)
    tl.store(out_ptr + cols, acc.to(OUT_DTYPE), mask=col_mask)


def _launch_config(numels: list[int], batch: int) -> dict:
    """Block sizes: GPU tiles in compiled mode, one program per tensor under the interpreter."""
    if interpreting(_clip_sum_noise_kernel):
        samples = min(16, triton.next_power_of_2(max(batch, 1)))
        return dict(BLOCK=interpreter_block(numels), SAMPLES=samples, num_warps=1)
    samples = min(GPU_SAMPLES, triton.next_power_of_2(max(batch, 1)))
    return dict(BLOCK=GPU_BLOCK, SAMPLES=samples, num_warps=GPU_WARPS)


def _check_outputs(grads: list[torch.Tensor], outputs: list[torch.Tensor], prevs: list | None) -> None:
    """Every output (and running sum) holds one sample's worth of elements, contiguously."""
    for i, (g, out) in enumerate(zip(grads, outputs)):
        n = per_sample_numel(g)
        for name, t in (("outputs", out), ("prevs", prevs[i] if prevs is not None else None)):
            if t is not None and (t.numel() != n or not t.is_contiguous()):
                raise ValueError(f"{name}[{i}] must be contiguous with {n} elements, got {tuple(t.shape)}")


def fused_clip_and_noise(
    grad_samples: list[torch.Tensor],
    *,
    clip_factors: torch.Tensor,
    outputs: list[torch.Tensor],
    prevs: list[torch.Tensor] | None = None,
    noise_std: float,
    denominator: float,
    seed: int = 0,
    philox_offset: int = 0,
    elem_bases: list[int] | None = None,
) -> list[torch.Tensor]:
    """out_t = (prev_t + sum_b c[b] g_t[b] + noise_std * z_t) / denominator for every t; returns ``outputs``.

    ``grad_samples[t]`` is (B, *shape_t); ``outputs[t]`` (and ``prevs[t]``, which may be the same
    tensor) is contiguous with prod(shape_t) elements, in the parameter's dtype. ``clip_factors`` is
    (B,). ``elem_bases[t]`` is t's offset in the flat parameter vector (default: cumulative sizes of
    this list); counters ``philox_offset + elem_bases[t] + i`` must not repeat across calls.
    """
    if prevs is not None and any(p is None for p in prevs):
        raise ValueError("prevs must hold a running sum for every tensor, or be None")
    grads = [g.contiguous() for g in grad_samples]
    _check_outputs(grads, outputs, prevs)
    if elem_bases is None:
        sizes = [per_sample_numel(g) for g in grads]
        elem_bases = list(itertools.accumulate(sizes[:-1], initial=0))
    batch = len(grads[0]) if grads else 0
    device = outputs[0].device if outputs else clip_factors.device
    clip = clip_factors.to(device=device, dtype=torch.float32).contiguous()
    check_launchable(grads + list(outputs) + [clip], interpreted=interpreting(_clip_sum_noise_kernel))
    for group in group_tensors(grads, outputs, prevs):
        idx = group.indices
        sub = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        numels = [per_sample_numel(grads[i]) for i in idx]
        cfg = _launch_config(numels, batch)
        meta = meta_table(
            inputs=sub(grads), outputs=sub(outputs), prevs=sub(prevs), elem_bases=sub(elem_bases), device=device
        )
        blocks = block_table(numels, block=cfg["BLOCK"], device=device)
        _clip_sum_noise_kernel[(len(blocks),)](
            meta, blocks, clip, batch, seed, philox_offset, float(noise_std), float(denominator),
            IN_DTYPE=triton_dtype(group.in_dtype), OUT_DTYPE=triton_dtype(group.out_dtype),
            ALIGNED=group.aligned, HAS_PREV=prevs is not None, ADD_NOISE=noise_std > 0,
            META_COLS=META_COLS, **cfg,
        )
    return outputs
