"""Pure-PyTorch DP-SGD clipping and noising, with Opacus 1.6's arithmetic op for op: the CPU path.

Opacus's ``DPOptimizer`` turns per-sample gradients ``g_t[b]`` (parameter t, sample b) into the update

    1. n_t[b] = ||g_t[b]||_2                      per parameter, in the gradients' dtype
    2. n[b]   = ||(n_1[b], ..., n_T[b])||_2         stacked (B, T), then the norm of each row
    3. c[b]   = min(1, C / (n[b] + 1e-6))           clip factor, C = max_grad_norm
    4. s_t    = sum_b c[b] g_t[b]                  einsum("i,i...") in the parameter's dtype
    5. s_t   += z_t,  z_t ~ N(0, (sigma C)^2)       torch.normal(..., generator, dtype=p.dtype)
    6. s_t   /= expected_batch_size * accumulated_iterations   (loss_reduction="mean")

The functions below make exactly these calls, in this order, so results equal Opacus's bit for
bit on the same inputs and generator state. What they do NOT do is Opacus's bookkeeping copies:
no ``torch.cat`` of accumulated per-sample gradients (norms of a concatenation are the
concatenation of per-chunk norms), no zeros tensor next to the noise, and the noise is added in
place into the clipped sum instead of into a third buffer. Peak extra memory per parameter drops
from Opacus's ``summed + zeros + noise + grad`` to ``summed + noise``.
"""

from __future__ import annotations

import torch

CLIP_EPS = 1e-6  # Opacus's guard in C / (norm + 1e-6); part of the privacy analysis' arithmetic


def per_sample_norms_reference(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample L2 norm over all parameters, steps 1-2. ``grad_samples[t]`` is (B, *shape_t); returns (B,)."""
    per_param_norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]  # T x (B,)
    device = per_param_norms[0].device
    per_param_norms = [n.to(device) for n in per_param_norms]
    return torch.stack(per_param_norms, dim=1).norm(2, dim=1)  # (B, T) -> (B,)


def clip_factors_reference(per_sample_norms: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    """Step 3: c[b] = min(1, C / (n[b] + 1e-6)); samples within the bound keep their gradient."""
    return (max_grad_norm / (per_sample_norms + CLIP_EPS)).clamp(max=1.0)


def clipped_sum_reference(
    grad_sample: torch.Tensor, *, clip_factors: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Step 4 for one parameter: sum_b c[b] g[b], computed in ``dtype`` (the parameter's), shape g.shape[1:]."""
    grad_sample = grad_sample.to(dtype)  # no copy when the dtypes already agree
    clip = clip_factors.to(grad_sample.device).to(dtype)
    return torch.einsum("i,i...", clip, grad_sample)


def add_noise_reference_(summed: torch.Tensor, *, std: float, generator=None) -> torch.Tensor:
    """Step 5 in place: ``summed += N(0, std^2)``, the same draw as Opacus's ``_generate_noise``.

    Opacus draws nothing at std == 0 (the generator state is untouched) and otherwise calls
    ``torch.normal(mean=0, std=std, size, device, generator, dtype)``; the sum ``summed + noise`` is
    the same IEEE addition whether done in place or not.
    """
    if std == 0:
        return summed
    noise = torch.normal(
        mean=0, std=std, size=summed.shape, device=summed.device, generator=generator, dtype=summed.dtype
    )
    return summed.add_(noise)


def dp_update_reference(
    grad_samples: list[torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    denominator: float,
    dtypes: list[torch.dtype] | None = None,
    generator=None,
) -> list[torch.Tensor]:
    """Steps 1-6 for one batch of per-sample gradients; returns one update per parameter.

    ``denominator`` is ``expected_batch_size * accumulated_iterations`` for a mean loss, 1 for a sum.
    ``dtypes`` are the parameters' dtypes (default: the gradients' own).
    """
    dtypes = dtypes or [g.dtype for g in grad_samples]
    clip = clip_factors_reference(per_sample_norms_reference(grad_samples), max_grad_norm=max_grad_norm)
    updates = []
    for g, dtype in zip(grad_samples, dtypes):
        summed = clipped_sum_reference(g, clip_factors=clip, dtype=dtype)
        add_noise_reference_(summed, std=noise_multiplier * max_grad_norm, generator=generator)
        updates.append(summed.div_(denominator))
    return updates
