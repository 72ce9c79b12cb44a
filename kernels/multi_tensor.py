"""Describe a list of per-sample gradient tensors to ONE Triton launch.

DP-SGD touches every parameter's per-sample gradient ``g_t`` of shape ``(B, *shape_t)``: a UNet has a
few hundred of them, from 32-element biases to 1M-element convolutions. Launching one kernel per
tensor costs a few microseconds each and leaves the GPU idle on the small ones, so both kernels of
this package walk the whole list in one launch, through two small int64 tables:

* ``meta`` (T, META_COLS), rebuilt on every call (the tensors move each step): one row per tensor,
  ``[in_ptr, out_ptr, prev_ptr, n_t, elem_base_t]``: addresses (``data_ptr``) of the per-sample
  gradient, of the output and of the running sum, ``n_t`` the elements of ONE sample, and
  ``elem_base_t`` the tensor's first index in the optimizer's flat parameter vector (it makes the
  Philox noise counters of different parameters disjoint).
* ``blocks`` (NB, 2), cached by shape: one row per BLOCK-element slice, ``[t, start]``; program j of
  the grid handles slice j, so big tensors get many programs and small ones one.

Kernels turn an address back into a typed pointer with ``.to(tl.pointer_type(dtype))``; the element
type is a compile-time constant, so tensors are grouped by (input dtype, output dtype) first, and
by whether every row is 16-byte aligned (then the kernels may promise alignment to the compiler and
get 128-bit loads). This works in compiled mode and under ``TRITON_INTERPRET=1`` on CPU tensors, whose
``data_ptr`` is a host address the interpreter reads directly (CUDA tensors under the interpreter are
NOT supported: their addresses are device addresses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from veil.errors import ConfigError

META_COLS = 5  # in_ptr, out_ptr, prev_ptr, n_t, elem_base_t
ALIGN_ELEMS = 16  # n_t % 16 == 0 and 16-byte aligned pointers -> "aligned" group

_TRITON_DTYPES = ("float32", "bfloat16", "float16")
_BLOCK_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_BLOCK_TABLE_CACHE_MAX = 64


def interpreting(kernel) -> bool:
    """True when ``kernel`` runs under the interpreter: TRITON_INTERPRET=1 when it was decorated."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def triton_dtype(dtype: torch.dtype):
    """The ``tl`` element type of a torch dtype the kernels accept (fp32, bf16, fp16)."""
    import triton.language as tl

    name = str(dtype).removeprefix("torch.")
    if name not in _TRITON_DTYPES:
        raise ConfigError(
            f"the triton DP kernels take float32, bfloat16 or float16 gradients, got {dtype}; "
            "use backend='reference' (or dp.kernel: opacus) for other dtypes"
        )
    return getattr(tl, name)


def check_launchable(tensors: list[torch.Tensor], *, interpreted: bool) -> None:
    """Refuse tensors the compiled kernels or the interpreter cannot address (see module docstring)."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ConfigError(f"the triton DP kernels need every tensor on one device, got {sorted(map(str, devices))}")
    for t in tensors:
        if t.device.type == "cpu" and not interpreted:
            raise ConfigError(
                "the triton DP kernels got CPU tensors but Triton is compiled, not interpreted: set "
                "TRITON_INTERPRET=1 before importing triton, or use backend='reference' on CPU"
            )
        if t.device.type == "cuda" and interpreted:
            raise ConfigError(
                "the triton DP kernels cannot read CUDA tensors under TRITON_INTERPRET=1 (pointer tables "
                "hold device addresses); unset TRITON_INTERPRET or move the tensors to the CPU"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"the triton DP kernels run on CUDA (or CPU under the interpreter), got {t.device}")


def per_sample_numel(x: torch.Tensor) -> int:
    """Elements of one sample of a per-sample tensor (B, *shape): prod(shape), also when B == 0."""
    return math.prod(x.shape[1:])


def is_aligned(n: int, *tensors: torch.Tensor) -> bool:
    """Rows of ``n`` elements from 16-byte-aligned bases all start 16-byte aligned: the fast path."""
    return n % ALIGN_ELEMS == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


@dataclass
class TensorGroup:
    """Tensors one launch can take: same dtypes, same alignment. Indices point into the caller's list."""

    in_dtype: torch.dtype
    out_dtype: torch.dtype
    aligned: bool
    indices: list[int]


def group_tensors(
    inputs: list[torch.Tensor], outputs: list[torch.Tensor] | None = None, prevs: list | None = None
) -> list[TensorGroup]:
    """Split tensor i = (inputs[i], outputs[i], prevs[i]) into launchable groups, order preserved."""
    groups: dict[tuple, TensorGroup] = {}
    for i, x in enumerate(inputs):
        out = outputs[i] if outputs is not None else x
        parts = [x, out] + ([prevs[i]] if prevs is not None and prevs[i] is not None else [])
        key = (x.dtype, out.dtype, is_aligned(per_sample_numel(x), *parts))
        groups.setdefault(key, TensorGroup(x.dtype, out.dtype, key[2], [])).indices.append(i)
    return list(groups.values())


def meta_table(
    *, inputs: list[torch.Tensor], outputs: list | None, prevs: list | None, elem_bases: list[int] | None,
    device: torch.device,
) -> torch.Tensor:
    """Int64 (T, META_COLS) table of addresses and sizes, copied to ``device`` in one transfer."""
    rows = []
    for i, x in enumerate(inputs):
        out = outputs[i] if outputs is not None else None
        prev = prevs[i] if prevs is not None else None
        rows.append([
            x.data_ptr(),
            out.data_ptr() if out is not None else 0,
            prev.data_ptr() if prev is not None else 0,
            per_sample_numel(x),
            elem_bases[i] if elem_bases is not None else 0,
        ])
    return _to_device(torch.tensor(rows, dtype=torch.int64), device)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host table -> device without stalling the host: a copy from pageable memory would wait for the
    kernels already queued (the norm kernel) before Python could prepare the next launch."""
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def block_table(numels: list[int], *, block: int, device: torch.device) -> torch.Tensor:
    """Int64 (NB, 2) table ``[tensor index, first element]`` of BLOCK-element slices; cached by shape."""
    key = (tuple(numels), block, str(device))
    table = _BLOCK_TABLE_CACHE.get(key)
    if table is None:
        rows = [[t, start] for t, n in enumerate(numels) for start in range(0, max(n, 1), block)]
        table = _to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1, 2), device)
        if len(_BLOCK_TABLE_CACHE) >= _BLOCK_TABLE_CACHE_MAX:
            _BLOCK_TABLE_CACHE.pop(next(iter(_BLOCK_TABLE_CACHE)))
        _BLOCK_TABLE_CACHE[key] = table
    return table


def interpreter_block(numels: list[int], cap: int = 1 << 16) -> int:
    """Under the interpreter each program costs Python overhead: one program per tensor if possible."""
    largest = max(numels, default=1)
    return min(cap, 1 << max(4, (largest - 1).bit_length()))
