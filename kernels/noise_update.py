"""The last stage of a DP step in one pass: Gaussian noise, the mean, and the optimizer update.

Given each parameter's summed clipped gradient ``s_t`` (the shape of the parameter ``p_t``), every
element i of every parameter t gets

    g = (s_t[i] + noise_std * z_t[i]) / denominator          then the optimizer's update of p_t[i]

* ``z_t[i] ~ N(0, 1)`` is drawn in the kernel by the scheme of ``clip_and_noise``: Philox-4x32 keyed by
  ``seed`` at the 64-bit counter ``philox_offset + elem_base_t + i`` (``elem_base_t``: t's start in the
  flat parameter vector, default the cumulative sizes of the list), Box-Muller'd by ``tl.randn``. The
  same (seed, philox_offset, elem_bases) give the same z as ``fused_clip_and_noise``. Not Opacus's
  secure_mode noise.
* ``denominator`` is ``expected_batch_size * accumulated_iterations`` (mean loss) or 1, divided with
  IEEE rounding (``div_rn``).
* SGD (``fused_noise_sgd_``) is torch.optim.SGD's single-tensor update: ``g += weight_decay * p``; with
  momentum ``buf = g`` on the first step, else ``buf = momentum * buf + (1 - dampening) * g``; ``g = g +
  momentum * buf`` (nesterov) or ``buf``; ``p -= lr * g``.
* AdamW (``fused_noise_adamw_``) is torch.optim.AdamW's: ``p *= 1 - lr * weight_decay``; ``m += (1 -
  beta1) (g - m)``; ``v = beta2 v + (1 - beta2) g^2``; ``p -= lr / (1 - beta1^step) * m / (sqrt(v) /
  sqrt(1 - beta2^step) + eps)``, with ``step`` the step number after incrementing (1 on the first step);
  amsgrad and maximize are not supported.

The kernels read s, p and the optimizer state once and write p and the state once: no gradient
tensor (``p.grad``), no noise tensor. One launch per group of tensors with the same summed-gradient
dtype and alignment, over int64 tables like ``multi_tensor``'s: its cached (NB, 2) ``block_table`` of
slices, and an own ``meta`` (T, 6) ``[s_ptr, p_ptr, state1_ptr, state2_ptr, n_t, elem_base_t]``
(state1: momentum buffer or exp_avg, state2: exp_avg_sq; ``multi_tensor.meta_table`` has room for
three pointers, AdamW needs four). Parameters and optimizer state must be fp32 and
contiguous (they are written in place); the summed gradients may be fp32, bf16 or fp16 (widened).

``backend="reference"`` is PyTorch: noise ``torch.randn(shape, generator=generator)`` per parameter
(drawn only when ``noise_std > 0``), then torch.optim's single-tensor ops on ``g``, so at noise 0 it
equals torch.optim bit for bit. ``backend="auto"`` takes the kernels when every tensor is on one
CUDA device, the summed gradients are fp32, bf16 or fp16 and Triton is compiled (not interpreted),
else the reference.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from veil.errors import ConfigError
from veil.kernels.multi_tensor import (
    _to_device,
    block_table,
    check_launchable,
    interpreter_block,
    interpreting,
    is_aligned,
    triton_dtype,
)

BACKENDS = ("auto", "triton", "reference")
_SUMMED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UPDATE_COLS = 6  # s_ptr, p_ptr, state1_ptr, state2_ptr, n_t, elem_base_t
# Compiled-mode launch shape: 1024 elements per program, elementwise (untuned).
GPU_BLOCK, GPU_WARPS = 1024, 4


# The two kernels spell their pointer set-up out: tl.multiple_of hints made inside a @triton.jit helper
# do not reach the caller's loads (checked in the sm_90 PTX: 32-bit instead of 128-bit accesses).
@triton.jit
def _noise_sgd_kernel(
    meta_ptr,  # int64 (T, UPDATE_COLS): [s_ptr, p_ptr, buf_ptr, -, n_t, elem_base_t]
    blocks_ptr,  # int64 (NB, 2): [t, first element] per slice of BLOCK elements
    seed, philox_offset, noise_std, denominator,
    neg_lr, momentum, one_minus_dampening, weight_decay,
    S_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
):
    j = tl.program_id(0)
    row = meta_ptr + tl.load(blocks_ptr + 2 * j) * COLS
    start = tl.load(blocks_ptr + 2 * j + 1)
    s_ptr = tl.load(row).to(tl.pointer_type(S_DTYPE))
    p_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    buf_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 4)
    if ALIGNED:  # the hints must sit on typed pointers: int_to_ptr drops an integer's divisibility
        s_ptr = tl.multiple_of(s_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
        buf_ptr = tl.multiple_of(buf_ptr, 16)
        n = tl.multiple_of(n, 16)
        start = tl.multiple_of(start, BLOCK)
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n

    g = tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_NOISE:
        g += noise_std * tl.randn(seed, philox_offset + tl.load(row + 5) + cols.to(tl.int64))
    g = tl.math.div_rn(g, denominator)  # IEEE division, as p.grad = summed / denominator
    p = tl.load(p_ptr + cols, mask=mask)
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    if MOMENTUM:
        if FIRST_STEP:  # torch.optim.SGD: the buffer starts as a copy of the first gradient
            buf = g
        else:
            buf = tl.load(buf_ptr + cols, mask=mask) * momentum + one_minus_dampening * g
        tl.store(buf_ptr + cols, buf, mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    tl.store(p_ptr + cols, p + neg_lr * g, mask=mask)


@triton.jit
def _noise_adamw_kernel(
    meta_ptr,  # int64 (T, UPDATE_COLS): [s_ptr, p_ptr, exp_avg_ptr, exp_avg_sq_ptr, n_t, elem_base_t]
    blocks_ptr,  # int64 (NB, 2): [t, first element] per slice of BLOCK elements
    seed, philox_offset, noise_std, denominator,
    decay,  # 1 - lr * weight_decay
    one_minus_beta1, beta2, one_minus_beta2,
    neg_step_size,  # -lr / (1 - beta1^step)
    bias_correction2_sqrt,  # sqrt(1 - beta2^step)
    eps,
    S_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ADD_NOISE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
):
    j = tl.program_id(0)
    row = meta_ptr + tl.load(blocks_ptr + 2 * j) * COLS
    start = tl.load(blocks_ptr + 2 * j + 1)
    s_ptr = tl.load(row).to(tl.pointer_type(S_DTYPE))
    p_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 4)
    if ALIGNED:
        s_ptr = tl.multiple_of(s_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        n = tl.multiple_of(n, 16)
        start = tl.multiple_of(start, BLOCK)
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n

    g = tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_NOISE:
        g += noise_std * tl.randn(seed, philox_offset + tl.load(row + 5) + cols.to(tl.int64))
    g = tl.math.div_rn(g, denominator)
    p = tl.load(p_ptr + cols, mask=mask)
    m = tl.load(m_ptr + cols, mask=mask)
    v = tl.load(v_ptr + cols, mask=mask)
    if WEIGHT_DECAY:
        p = p * decay
    m = m + one_minus_beta1 * (g - m)  # torch's lerp_ for weights < 0.5
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    tl.store(m_ptr + cols, m, mask=mask)
    tl.store(v_ptr + cols, v, mask=mask)
    tl.store(p_ptr + cols, p + neg_step_size * tl.math.div_rn(m, denom), mask=mask)


# --- checks and launch ------------------------------------------------------------------------------
def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_tensors(params: list[torch.Tensor], summed: list[torch.Tensor], states: dict[str, list | None]) -> None:
    """Same lengths and shapes; fp32, contiguous parameters and state; summed not aliasing what is written."""
    for name, ts in {"summed": summed, **states}.items():
        if ts is not None and len(ts) != len(params):
            raise ConfigError(f"{name} has {len(ts)} tensors for {len(params)} parameters")
    for i, p in enumerate(params):
        written = {"params": p, **{name: ts[i] for name, ts in states.items() if ts is not None}}
        for name, t in written.items():
            if t.dtype != torch.float32:
                raise ConfigError(f"{name}[{i}] is {t.dtype}: the fused noise + update keeps parameters and "
                                  "optimizer state in float32; keep fp32 master weights (bf16-mixed does)")
            if t.shape != p.shape or not t.is_contiguous():
                raise ConfigError(f"{name}[{i}] must be contiguous with shape {tuple(p.shape)}, got "
                                  f"{tuple(t.shape)} (contiguous: {t.is_contiguous()})")
        s = summed[i]
        if s.shape != p.shape or not s.is_floating_point():
            raise ConfigError(f"summed[{i}] must be a float tensor of shape {tuple(p.shape)}, got {s.dtype} "
                              f"{tuple(s.shape)}")
        if any(s.data_ptr() == t.data_ptr() for t in written.values()):
            raise ConfigError(f"summed[{i}] shares memory with the parameter or its optimizer state, which "
                              "are written in place; pass p.grad or another buffer")


def _check_noise(noise_std: float, denominator: float) -> None:
    if not noise_std >= 0:
        raise ConfigError(f"noise_std must be >= 0, got {noise_std}")
    if not denominator > 0:
        raise ConfigError(f"denominator must be > 0, got {denominator}")


def _use_triton(backend: str, params: list[torch.Tensor], summed: list[torch.Tensor], kernel) -> bool:
    """'auto' is triton when every tensor sits on one CUDA device, the summed gradients are fp32, bf16 or
    fp16, and Triton is compiled."""
    if backend != "auto":
        return backend == "triton"
    devices = {t.device for t in params + summed}
    on_one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
    dtypes_ok = all(s.dtype in _SUMMED_DTYPES for s in summed)
    return on_one_gpu and dtypes_ok and not interpreting(kernel)


def _launch(kernel, *, params, summed, state1, state2, elem_bases, noise_std, seed, philox_offset, scalars: tuple,
            flags: dict) -> None:
    """One launch of ``kernel`` per (summed dtype, alignment) group of parameters."""
    summed = [s.contiguous() for s in summed]
    if elem_bases is None:
        elem_bases = list(itertools.accumulate([p.numel() for p in params[:-1]], initial=0))
    tensors = params + summed + [t for ts in (state1, state2) if ts is not None for t in ts]
    check_launchable(tensors, interpreted=interpreting(kernel))
    groups: dict[tuple, list[int]] = {}
    for i, (p, s) in enumerate(zip(params, summed)):
        parts = [p, s] + [ts[i] for ts in (state1, state2) if ts is not None]
        groups.setdefault((s.dtype, is_aligned(p.numel(), *parts)), []).append(i)
    device = params[0].device
    for (s_dtype, aligned), idx in groups.items():
        rows = [[summed[i].data_ptr(), params[i].data_ptr(),
                 state1[i].data_ptr() if state1 is not None else 0, state2[i].data_ptr() if state2 is not None else 0,
                 params[i].numel(), elem_bases[i]] for i in idx]
        meta = _to_device(torch.tensor(rows, dtype=torch.int64), device)
        numels = [params[i].numel() for i in idx]
        block, warps = (interpreter_block(numels), 1) if interpreting(kernel) else (GPU_BLOCK, GPU_WARPS)
        blocks = block_table(numels, block=block, device=device)
        kernel[(len(blocks),)](
            meta, blocks, seed, philox_offset, float(noise_std), *scalars,
            S_DTYPE=triton_dtype(s_dtype), ALIGNED=aligned, ADD_NOISE=noise_std > 0, BLOCK=block,
            COLS=UPDATE_COLS, num_warps=warps, **flags,
        )


def _noisy_grads_reference(summed, *, noise_std: float, denominator: float, generator):
    """g_t = (s_t + noise_std * z_t) / denominator in fp32, z_t = torch.randn(..., generator), one at a time."""
    for s in summed:
        g = s.float()
        if noise_std > 0:
            z = torch.randn(s.shape, generator=generator, device=s.device, dtype=torch.float32)
            g = g + noise_std * z
        yield torch.div(g, denominator)


# --- SGD -------------------------------------------------------------------------------------------
def fused_noise_sgd_(
    params: list[torch.Tensor],
    summed: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    noise_std: float,
    denominator: float,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool,
    seed: int = 0,
    philox_offset: int = 0,
    elem_bases: list[int] | None = None,
    backend: str = "auto",
    generator: torch.Generator | None = None,
) -> None:
    """torch.optim.SGD's step on g_t = (summed_t + noise_std * z_t) / denominator, in place on ``params``.

    ``momentum_buffers[t]`` (fp32, p_t's shape; None allowed when momentum == 0) is written in place;
    on ``first_step`` it is set to the gradient, as torch.optim.SGD does for a missing buffer.
    ``seed``/``philox_offset``/``elem_bases`` key the kernels' noise, ``generator`` the reference's.
    """
    _check_backend(backend)
    _check_noise(noise_std, denominator)
    if lr < 0 or momentum < 0 or weight_decay < 0:
        raise ConfigError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ConfigError("nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
    if momentum != 0 and momentum_buffers is None:
        raise ConfigError("momentum != 0 needs momentum_buffers (fp32, one per parameter)")
    buffers = momentum_buffers if momentum != 0 else None
    _check_tensors(params, summed, {"momentum_buffers": buffers})
    if not params:
        return
    if _use_triton(backend, params, summed, _noise_sgd_kernel):
        _launch(_noise_sgd_kernel, params=params, summed=summed, state1=buffers, state2=None, elem_bases=elem_bases,
                noise_std=noise_std, seed=seed, philox_offset=philox_offset,
                scalars=(float(denominator), -float(lr), float(momentum), 1.0 - float(dampening), float(weight_decay)),
                flags={"WEIGHT_DECAY": weight_decay != 0, "MOMENTUM": momentum != 0, "FIRST_STEP": first_step,
                           "NESTEROV": nesterov})
        return
    grads = _noisy_grads_reference(summed, noise_std=noise_std, denominator=denominator, generator=generator)
    for i, (p, grad) in enumerate(zip(params, grads)):  # torch.optim.sgd._single_tensor_sgd
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = buffers[i]
            if first_step:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        p.add_(grad, alpha=-lr)


# --- AdamW -----------------------------------------------------------------------------------------
def fused_noise_adamw_(
    params: list[torch.Tensor],
    summed: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    noise_std: float,
    denominator: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    seed: int = 0,
    philox_offset: int = 0,
    elem_bases: list[int] | None = None,
    backend: str = "auto",
    generator: torch.Generator | None = None,
) -> None:
    """torch.optim.AdamW's step on g_t = (summed_t + noise_std * z_t) / denominator, in place on ``params``.

    ``exp_avgs``/``exp_avg_sqs`` (fp32, zeros before the first step) are written in place. ``step`` is
    the step number after incrementing (1 on the first step), for the bias corrections.
    ``seed``/``philox_offset``/``elem_bases`` key the kernels' noise, ``generator`` the reference's.
    """
    _check_backend(backend)
    _check_noise(noise_std, denominator)
    if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ConfigError(f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, "
                          f"weight_decay={weight_decay}, betas=({beta1}, {beta2})")
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"step is the step number after incrementing (1 on the first step), got {step!r}")
    _check_tensors(params, summed, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
    if not params:
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # as torch.optim (a Python pow, not math.sqrt)
    step_size = lr / bias_correction1
    if _use_triton(backend, params, summed, _noise_adamw_kernel):
        _launch(_noise_adamw_kernel, params=params, summed=summed, state1=exp_avgs, state2=exp_avg_sqs,
                elem_bases=elem_bases, noise_std=noise_std, seed=seed, philox_offset=philox_offset,
                scalars=(float(denominator), 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, -step_size,
                         bias_correction2_sqrt, eps),
                flags={"WEIGHT_DECAY": weight_decay != 0})
        return
    grads = _noisy_grads_reference(summed, noise_std=noise_std, denominator=denominator, generator=generator)
    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):  # adam._single_tensor_adam
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
