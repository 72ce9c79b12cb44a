"""Per-example squared norms of a Conv2d's weight gradient by the ghost norm, without im2col.

A Conv2d (groups = 1) computes ``y[r, :, s] = W patch[r, :, s]`` at every output position s of row r,
where ``patch[r, :, s]`` is the im2col column (C * kh * kw entries; zero outside the image). Rows are
example-major with K rows per example (rows iK .. iK+K-1 are example i: K noise draws of one image),
and example i's weight gradient is the mean over its rows,

    G_i = (1/K) sum_{r in i} sum_s outer(g[r, :, s], patch[r, :, s])          (O x C kh kw)

With S_i the example's K * Ho * Wo (row, position) pairs, its squared Frobenius norm is

    ||G_i||_F^2 = (1/K^2) sum_{u, v in S_i} <patch_u, patch_v> <g_u, g_v>        (the ghost norm)

two S x S Gram matrices multiplied elementwise and summed, never the O x C kh kw gradient (this is
``veil.lightning_modules.dp.ghost``'s "ghost" path for one Conv2d call).

``backend="reference"`` is that formula in PyTorch: ``F.unfold`` and two batched Grams, fp32 (or
fp64 for fp64 inputs); the oracle, it runs anywhere. ``backend="triton"`` never materialises the
im2col: program (p, i) takes the p-th pair of S-tiles (tu <= tv: the Grams are symmetric, so an
off-diagonal pair counts twice) of example i, gathers the patch tiles straight from x (patch element
(c, a, b) at output position (ho, wo) is ``x[c, ho*sh - ph + a*dh, wo*sw - pw + b*dw]``, masked to
zero outside the image), forms the tiles of the patch Gram and of the output-gradient Gram with
``tl.dot`` and writes the sum of their elementwise product to ``partial[i, p]``. The (B, pairs)
partial sums are added by ``torch.sum``: no atomics, so the result is deterministic on a GPU too.
Extra memory: the partial buffer only (B * pairs fp32 values).

Precision: fp32 accumulation throughout. fp32 inputs are multiplied in IEEE fp32 (never TF32);
bf16/fp16 products are exact in fp32. Under the interpreter, whose bf16/fp16 ``tl.dot`` returns
garbage (Triton 3.9), half-precision tiles are widened to fp32 before the dot: the same products.

``backend="auto"`` takes the kernel when x is on CUDA in fp32, bf16 or fp16 and Triton is compiled (not
interpreted), else the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from veil.errors import ConfigError
from veil.kernels.multi_tensor import check_launchable, interpreting, triton_dtype

BACKENDS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Compiled-mode tiles: 64 x 64 Gram tiles, contraction 32 channels (patch entries / output channels)
# at a time. Untuned: chosen for tl.dot's minimum of 16 and a modest register footprint.
GPU_BLOCK_S, GPU_BLOCK_D, GPU_WARPS = 64, 32, 4
# Interpreter tiles: 16 positions, so that the tests' small images still span several tiles (the
# symmetric pair logic runs), contraction up to 64 at a time.
INTERPRET_BLOCK_S, INTERPRET_BLOCK_D = 16, 64
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (examples); tile pairs take the first, 2^31 - 1


@triton.jit
def _ghost_sq_norm_kernel(
    x_ptr,  # (N, C, H, W) contiguous: the conv's input
    g_ptr,  # (N, O, Ho, Wo) contiguous: its output gradient
    pairs_ptr,  # int32 (P, 2): tile pairs (tu, tv) with tu <= tv
    partial_ptr,  # fp32 (B, P): per-example, per-pair partial sums
    C, H, W, O, Ho, Wo,
    K,  # rows per example
    n_pairs,
    SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr,
    X_PRECISION: tl.constexpr,
    G_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,  # interpreter only: tl.dot of bf16/fp16 tiles is wrong there, so dot in fp32
):
    p = tl.program_id(0)
    i = tl.program_id(1)
    tu = tl.load(pairs_ptr + 2 * p)
    tv = tl.load(pairs_ptr + 2 * p + 1)
    L = Ho * Wo
    S = K * L
    D = C * KH * KW

    # (row, ho, wo) of the example's positions u (tile tu, rows of the Grams) and v (tile tv, columns)
    u = tu * BLOCK_S + tl.arange(0, BLOCK_S)
    v = tv * BLOCK_S + tl.arange(0, BLOCK_S)
    ru = (i * K + u // L).to(tl.int64)
    rv = (i * K + v // L).to(tl.int64)
    pu = u % L
    pv = v % L
    hu = (pu // Wo) * SH - PH
    wu = (pu % Wo) * SW - PW
    hv = (pv // Wo) * SH - PH
    wv = (pv % Wo) * SW - PW

    # patch Gram tile: sum over patch entries d = (c, a, b) of patch_u[d] * patch_v[d]
    gram_x = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        c = (d // (KH * KW)).to(tl.int64)
        a = (d % (KH * KW)) // KW * DH
        b = d % KW * DW
        h = hu[:, None] + a[None, :]  # (BLOCK_S, BLOCK_D)
        w = wu[:, None] + b[None, :]
        m = (u < S)[:, None] & (d < D)[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        xu = tl.load(x_ptr + ((ru[:, None] * C + c[None, :]) * H + h) * W + w, mask=m, other=0.0)
        h = a[:, None] + hv[None, :]  # (BLOCK_D, BLOCK_S)
        w = b[:, None] + wv[None, :]
        m = (d < D)[:, None] & (v < S)[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        xv = tl.load(x_ptr + ((rv[None, :] * C + c[:, None]) * H + h) * W + w, mask=m, other=0.0)
        if WIDEN:
            xu, xv = xu.to(tl.float32), xv.to(tl.float32)
        gram_x += tl.dot(xu, xv, input_precision=X_PRECISION)

    # output-gradient Gram tile: sum over output channels o of g_u[o] * g_v[o]
    gram_g = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float32)
    for o0 in range(0, O, BLOCK_O):
        o = (o0 + tl.arange(0, BLOCK_O)).to(tl.int64)
        m = (u < S)[:, None] & (o < O)[None, :]
        gu = tl.load(g_ptr + (ru[:, None] * O + o[None, :]) * L + pu[:, None], mask=m, other=0.0)
        m = (o < O)[:, None] & (v < S)[None, :]
        gv = tl.load(g_ptr + (rv[None, :] * O + o[:, None]) * L + pv[None, :], mask=m, other=0.0)
        if WIDEN:
            gu, gv = gu.to(tl.float32), gv.to(tl.float32)
        gram_g += tl.dot(gu, gv, input_precision=G_PRECISION)

    total = tl.sum(tl.sum(gram_x * gram_g, axis=1), axis=0)
    total = tl.where(tu < tv, 2.0 * total, total)  # (u, v) off the diagonal tiles stands for (v, u) too
    tl.store(partial_ptr + i * n_pairs + p, total)


@functools.lru_cache(maxsize=64)
def _tile_pairs(n_tiles: int, device: str) -> torch.Tensor:
    """Int32 (P, 2) upper-triangle tile pairs (tu, tv), tu <= tv, P = n_tiles (n_tiles + 1) / 2; cached."""
    pairs = [(a, b) for a in range(n_tiles) for b in range(a, n_tiles)]
    return torch.tensor(pairs, dtype=torch.int32).to(device)


def _pair(value, name: str, *, minimum: int) -> tuple[int, int]:
    """An int or a 2-tuple of ints, each >= minimum, as a 2-tuple."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        hint = "; pad the input with F.pad first for 'same'/'valid'" if isinstance(value, str) else ""
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}{hint}")
    if min(pair) < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_shapes(x: torch.Tensor, g: torch.Tensor, *, kernel_size, stride, padding, dilation, k: int) -> None:
    """x (N, C, H, W) and g (N, O, Ho, Wo) must be a conv's input and output gradient, N = B * K."""
    if x.dim() != 4 or g.dim() != 4:
        raise ConfigError(f"x and g must be 4-d (N, C, H, W) and (N, O, Ho, Wo), got {tuple(x.shape)} and "
                          f"{tuple(g.shape)}")
    if x.shape[0] != g.shape[0]:
        raise ConfigError(f"x and g must have the same rows, got {x.shape[0]} and {g.shape[0]}")
    if x.shape[0] % k:
        raise ConfigError(f"rows_per_example={k} must divide the {x.shape[0]} rows of x (rows iK .. iK+K-1 "
                          "are example i)")
    out_hw = tuple(
        (x.shape[2 + a] + 2 * padding[a] - dilation[a] * (kernel_size[a] - 1) - 1) // stride[a] + 1 for a in (0, 1)
    )
    if min(out_hw) < 1:
        raise ConfigError(f"the kernel {kernel_size} (dilation {dilation}) does not fit the padded input "
                          f"{tuple(x.shape[2:])} (padding {padding})")
    if tuple(g.shape[2:]) != out_hw:
        raise ConfigError(f"g has spatial shape {tuple(g.shape[2:])} but a conv with kernel_size={kernel_size}, "
                          f"stride={stride}, padding={padding}, dilation={dilation} on {tuple(x.shape[2:])} "
                          f"gives {out_hw}")
    if not (x.is_floating_point() and g.is_floating_point()):
        raise ConfigError(f"x and g must be floating point, got {x.dtype} and {g.dtype}")


def ghost_sq_norms_reference(
    x: torch.Tensor, g: torch.Tensor, *, kernel_size, stride, padding, dilation, k: int
) -> torch.Tensor:
    """The ghost norm by ``F.unfold`` and two batched Grams, in fp32 (fp64 for fp64 inputs); returns fp32 (B,)."""
    wide = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    n = x.shape[0]
    u = F.unfold(x.to(wide), kernel_size, dilation=dilation, padding=padding, stride=stride)  # (N, D, L)
    positions = u.shape[-1]
    a = u.transpose(1, 2).reshape(n // k, k * positions, u.shape[1])  # (B, S, C kh kw)
    go = g.to(wide).reshape(n, g.shape[1], positions).transpose(1, 2).reshape(n // k, k * positions, g.shape[1])
    gram_a = a @ a.transpose(1, 2)  # (B, S, S)
    gram_g = go @ go.transpose(1, 2)
    return ((gram_a * gram_g).sum(dim=(1, 2)) / k**2).float()


def _precision(dtype: torch.dtype, *, widen: bool) -> str:
    """tl.dot's input precision: fp32 operands (or bf16/fp16 ones widened to fp32) multiplied in IEEE fp32,
    never rounded to TF32; native bf16/fp16 products are exact in fp32 whatever the setting."""
    return "ieee" if dtype == torch.float32 or widen else "tf32"


def _ghost_sq_norms_triton(
    x: torch.Tensor, g: torch.Tensor, *, kernel_size, stride, padding, dilation, k: int
) -> torch.Tensor:
    """The kernel: grid (tile pairs, examples); partial sums per (example, pair), added and scaled by 1/K^2."""
    for t in (x, g):
        triton_dtype(t.dtype)  # fp32, bf16 or fp16; a ConfigError naming the reference backend otherwise
    x, g = x.contiguous(), g.contiguous()
    n, c, h, w = x.shape
    o, ho, wo = g.shape[1:]
    batch, s = n // k, k * ho * wo
    if batch > MAX_GRID_Y:
        raise ConfigError(f"the triton ghost-norm kernel takes at most {MAX_GRID_Y} examples per call (CUDA's "
                          f"grid limit), got {batch}; split the batch")
    interpreted = interpreting(_ghost_sq_norm_kernel)
    block_s, block_d, warps = (INTERPRET_BLOCK_S, INTERPRET_BLOCK_D, 1) if interpreted else (
        GPU_BLOCK_S, GPU_BLOCK_D, GPU_WARPS)
    block_s = min(block_s, max(16, triton.next_power_of_2(s)))
    block_x = min(block_d, max(16, triton.next_power_of_2(c * kernel_size[0] * kernel_size[1])))
    block_o = min(block_d, max(16, triton.next_power_of_2(o)))
    pairs = _tile_pairs(triton.cdiv(s, block_s), str(x.device))
    partial = torch.empty((batch, len(pairs)), dtype=torch.float32, device=x.device)
    check_launchable([x, g, pairs, partial], interpreted=interpreted)
    if batch == 0:
        return partial.sum(dim=1)
    _ghost_sq_norm_kernel[(len(pairs), batch)](
        x, g, pairs, partial, c, h, w, o, ho, wo, k, len(pairs),
        SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], BLOCK_S=block_s, BLOCK_D=block_x, BLOCK_O=block_o,
        X_PRECISION=_precision(x.dtype, widen=interpreted), G_PRECISION=_precision(g.dtype, widen=interpreted),
        WIDEN=interpreted, num_warps=warps,
    )
    return partial.sum(dim=1).div_(k**2)


def conv2d_ghost_sq_norms(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    rows_per_example: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """fp32 (B,): ||G_i||_F^2 of each example's Conv2d weight gradient (mean over its K rows), by the ghost norm.

    ``x`` (N, C, H, W) is the conv's input and ``g`` (N, O, Ho, Wo) its output gradient, N = B * K with
    K = ``rows_per_example`` and rows iK .. iK+K-1 belonging to example i. Only ``groups=1`` and int
    (or pair) padding with zeros. The bias gradient is not included (it is ``g`` summed over positions).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if groups != 1:
        raise ConfigError(f"conv2d_ghost_sq_norms handles groups=1 only, got groups={groups}; use "
                          "veil.lightning_modules.dp.ghost for grouped convolutions")
    if not isinstance(rows_per_example, int) or rows_per_example < 1:
        raise ConfigError(f"rows_per_example must be a positive int, got {rows_per_example!r}")
    geometry = {
        "kernel_size": _pair(kernel_size, "kernel_size", minimum=1), "stride": _pair(stride, "stride", minimum=1),
        "padding": _pair(padding, "padding", minimum=0), "dilation": _pair(dilation, "dilation", minimum=1),
    }
    _check_shapes(x, g, k=rows_per_example, **geometry)
    if backend == "auto":
        compiled = not interpreting(_ghost_sq_norm_kernel)
        kernel_dtypes = all(t.dtype in _KERNEL_DTYPES for t in (x, g))
        backend = "triton" if x.device.type == "cuda" and compiled and kernel_dtypes else "reference"
    if backend == "reference":
        return ghost_sq_norms_reference(x, g, k=rows_per_example, **geometry)
    return _ghost_sq_norms_triton(x, g, k=rows_per_example, **geometry)
