"""Per-sample squared gradient norms over a list of parameters, in one Triton launch per dtype.

For per-sample gradients g_t of shape (B, *shape_t), t = 1..T, computes

    sq[b] = sum_t sum_i g_t[b, i]^2          (fp32, shape (B,))

so that the DP-SGD norm is n[b] = sqrt(sq[b]). Opacus gets the same number as the norm of T
per-parameter norms; summing squares first needs no (B, T) stack and reads each gradient once.

Grid: (slices, sample tiles). Program (j, s) reads a SAMPLES x (BLOCK * ITERS) tile of tensor t
(slice j of the block table, see ``multi_tensor``), squares and sums it in fp32 whatever the input
dtype, and adds SAMPLES partial sums into ``sq`` with atomics: the only temporary is ``sq`` itself.
fp32 atomics commute but do not associate, so on a GPU the last bit of ``sq`` may change between
runs; the interpreter runs programs in order and is deterministic.

Run the checks with ``pytest tests/kernels/test_per_sample_norms.py`` (interpreter) or
``-m gpu`` on a CUDA machine.
"""

from __future__ import annotations

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

# Compiled-mode launch shape: 8 samples x 4 x 1024 elements per program (128 KiB of fp32 read,
# one atomic per sample); 8 warps give 32 values per thread per iteration.
GPU_BLOCK, GPU_ITERS, GPU_SAMPLES, GPU_WARPS = 1024, 4, 8, 8


@triton.jit
def _per_sample_sq_norms_kernel(
    meta_ptr,  # int64 (T, META_COLS): [in_ptr, -, -, n_t, -] per tensor
    blocks_ptr,  # int64 (NB, 2): [t, first element] per slice of BLOCK * ITERS elements
    sq_ptr,  # fp32 (B,): accumulated sum of squares
    B,  # samples
    IN_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every row starts 16-byte aligned: promise it for vector loads
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    SAMPLES: tl.constexpr,
    META_COLS: tl.constexpr,
):
    j = tl.program_id(0)
    s = tl.program_id(1)
    t = tl.load(blocks_ptr + 2 * j)
    start = tl.load(blocks_ptr + 2 * j + 1)
    addr = tl.load(meta_ptr + t * META_COLS)
    n = tl.load(meta_ptr + t * META_COLS + 3)
    x_ptr = addr.to(tl.pointer_type(IN_DTYPE))
    if ALIGNED:  # the hint must sit on the typed pointer: int_to_ptr drops an integer's divisibility
        x_ptr = tl.multiple_of(x_ptr, 16)
        n = tl.multiple_of(n, 16)
        start = tl.multiple_of(start, BLOCK)

    rows = s * SAMPLES + tl.arange(0, SAMPLES)  # (SAMPLES,) sample indices
    row_off = rows.to(tl.int64) * n  # sample b's gradient starts at b * n_t
    acc = tl.zeros((SAMPLES, BLOCK), dtype=tl.float32)
    for it in tl.static_range(ITERS):
        cols = start + it * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) element indices within a sample
        mask = (rows < B)[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    # relaxed: only the kernel's final sums are read, after it ends; no ordering with other memory needed
    tl.atomic_add(sq_ptr + rows, tl.sum(acc, axis=1), mask=rows < B, sem="relaxed")


def _launch_config(numels: list[int], batch: int) -> dict:
    """Block sizes: big tiles in compiled mode, one program per tensor under the interpreter."""
    if interpreting(_per_sample_sq_norms_kernel):
        samples = min(16, triton.next_power_of_2(max(batch, 1)))
        return dict(BLOCK=interpreter_block(numels), ITERS=1, SAMPLES=samples, num_warps=1)
    samples = min(GPU_SAMPLES, triton.next_power_of_2(max(batch, 1)))
    return dict(BLOCK=GPU_BLOCK, ITERS=GPU_ITERS, SAMPLES=samples, num_warps=GPU_WARPS)


def per_sample_sq_norms(grad_samples: list[torch.Tensor], *, out: torch.Tensor | None = None) -> torch.Tensor:
    """sq[b] = sum over all tensors of ||g_t[b]||^2, accumulated in fp32 into ``out`` (zeros if None).

    ``grad_samples[t]`` is (B, *shape_t), fp32, bf16 or fp16, on CUDA (or CPU under TRITON_INTERPRET=1).
    Non-contiguous tensors are copied to contiguous ones first.
    """
    if not grad_samples:
        raise ValueError("per_sample_sq_norms needs at least one per-sample gradient")
    batch = len(grad_samples[0])
    if any(len(g) != batch for g in grad_samples):
        raise ValueError("all per-sample gradients must share the batch dimension")
    device = grad_samples[0].device
    sq = torch.zeros(batch, dtype=torch.float32, device=device) if out is None else out
    grads = [g.contiguous() for g in grad_samples]
    check_launchable(grads + [sq], interpreted=interpreting(_per_sample_sq_norms_kernel))
    if batch == 0:
        return sq
    for group in group_tensors(grads):
        members = [grads[i] for i in group.indices]
        numels = [per_sample_numel(g) for g in members]
        cfg = _launch_config(numels, batch)
        meta = meta_table(inputs=members, outputs=None, prevs=None, elem_bases=None, device=device)
        blocks = block_table(numels, block=cfg["BLOCK"] * cfg["ITERS"], device=device)
        grid = (len(blocks), triton.cdiv(batch, cfg["SAMPLES"]))
        _per_sample_sq_norms_kernel[grid](
            meta, blocks, sq, batch,
            IN_DTYPE=triton_dtype(group.in_dtype), ALIGNED=group.aligned, META_COLS=META_COLS, **cfg,
        )
    return sq


def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """n[b] = sqrt(sq[b]): the per-sample L2 norm over all parameters, fp32 (B,)."""
    return per_sample_sq_norms(grad_samples).sqrt_()
