"""The one DDIM implementation (eta = 0): grids, one inversion step, one denoising step, their loops.

Sampling (``sample.ddim_sample``) and the private edit (``editing.editor``) both walk these steps,
and the export issue traces them into ONNX, so the step functions take timesteps, attributes (and
the guidance scale, if wanted) as tensors, look the schedule up in an ``alphas_cumprod`` tensor,
and have no Python control flow on values. ``tests/lightning_modules/diffusion/test_ddim.py``
checks the steps and the sampling loop against diffusers' ``DDIMScheduler``.

Grid: ``veil.editing.plan`` (torch-free, shared with the ONNX Runtime editor): 0, r, ..., (n-1) r with
r = T // n; the edit at strength s walks 0 .. t0, t0 the grid point nearest s T. Symbols: alpha_prod_t = cumulative alpha at t (alpha-bar_t of DDPM);
alpha_prod = 1 for t = -1 (clean image, the end of the walk down); eps = the guided noise prediction.
"""

from __future__ import annotations

import torch

from veil.editing.plan import edit_grid, sample_grid
from veil.lightning_modules.diffusion.guidance import GuidanceClassifier, guided_eps

__all__ = ["edit_timesteps", "sample_timesteps", "alpha_prod", "ddim_invert_step", "ddim_denoise_step",
           "ddim_denoise_step_x0",
           "ddim_invert", "ddim_regenerate"]


def sample_timesteps(*, num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """Ascending DDIM grid 0, r, ..., (n-1) r (int64), r = T // n: the full walk of sampling."""
    return torch.tensor(sample_grid(num_steps=num_steps, num_train_timesteps=num_train_timesteps), dtype=torch.long)


def edit_timesteps(*, strength: float, num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """Ascending DDIM grid points 0, r, ..., t0 (int64), t0 = grid point nearest strength * T."""
    return torch.tensor(edit_grid(strength=strength, num_steps=num_steps, num_train_timesteps=num_train_timesteps),
                        dtype=torch.long)


def alpha_prod(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_prod_t per row, (B,1,1,1); t = -1 means the clean image (alpha_prod = 1)."""
    a = alphas_cumprod[t.clamp(min=0)]
    return torch.where(t >= 0, a, torch.ones_like(a)).view(-1, 1, 1, 1)


def ddim_invert_step(model, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, attrs: torch.Tensor,
                     alphas_cumprod: torch.Tensor, guidance_scale=1.0) -> torch.Tensor:
    """One DDIM step up: x at t (B,3,H,W) -> x at t_next > t; t, t_next (B,) int64 (t = -1: clean)."""
    # 1. eps at the *target* timestep, evaluated on the current x (the usual DDIM inversion
    #    approximation x_t ~ x_t_next; it makes the step the mirror image of ddim_denoise_step).
    eps = guided_eps(model, x, t_next, attrs, guidance_scale)
    alpha_prod_t, alpha_prod_next = alpha_prod(alphas_cumprod, t), alpha_prod(alphas_cumprod, t_next)
    # 2. predicted clean image x0_hat = (x_t - sqrt(1 - alpha_prod_t) eps) / sqrt(alpha_prod_t)
    x0_hat = (x - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()
    # 3. re-noise deterministically to t_next along the same eps
    return alpha_prod_next.sqrt() * x0_hat + (1 - alpha_prod_next).sqrt() * eps


def ddim_denoise_step(model, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, attrs: torch.Tensor,
                      alphas_cumprod: torch.Tensor, guidance_scale=1.0, clip_sample: bool = True, *,
                      guide: GuidanceClassifier | None = None,
                      guide_targets: torch.Tensor | None = None) -> torch.Tensor:
    """One guided DDIM step down (eta = 0): x_t -> x_t_prev; t (B,), t_prev (B,) int64 (t_prev = -1: clean).

    ``DDIMScheduler.step`` for eps prediction (clip_sample clips x0_hat to [-1, 1]); with ``guide``
    (classifier guidance towards ``guide_targets``), ``use_clipped_model_output=True``.
    """
    return ddim_denoise_step_x0(model, x_t, t, t_prev, attrs, alphas_cumprod, guidance_scale, clip_sample,
                                guide=guide, guide_targets=guide_targets)[0]


def ddim_denoise_step_x0(model, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, attrs: torch.Tensor,
                         alphas_cumprod: torch.Tensor, guidance_scale=1.0, clip_sample: bool = True, *,
                         guide: GuidanceClassifier | None = None,
                         guide_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ddim_denoise_step`` and the (clipped) x0 estimate it steps along: (x_t_prev, x0_hat), for previews."""
    # 1. guided noise prediction
    eps = guided_eps(model, x_t, t, attrs, guidance_scale, alphas_cumprod=alphas_cumprod, guide=guide,
                     guide_targets=guide_targets)
    alpha_prod_t, alpha_prod_prev = alpha_prod(alphas_cumprod, t), alpha_prod(alphas_cumprod, t_prev)
    # 2. predicted clean image, clipped like the sampler clips it
    x0_hat = (x_t - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()
    if clip_sample:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    if guide is not None:
        # Under classifier guidance, re-derive eps from the clipped x0 (as GLIDE does): otherwise a
        # guidance push that the clip removes from x0 survives, reversed, in the direction term.
        eps = (x_t - alpha_prod_t.sqrt() * x0_hat) / (1 - alpha_prod_t).sqrt()
    # 3. step to t_prev along eps
    return alpha_prod_prev.sqrt() * x0_hat + (1 - alpha_prod_prev).sqrt() * eps, x0_hat


@torch.no_grad()
def ddim_invert(model, x0: torch.Tensor, attrs: torch.Tensor, alphas_cumprod: torch.Tensor,
                timesteps: torch.Tensor, guidance_scale=1.0) -> torch.Tensor:
    """x0 (B,3,H,W) -> x_t0 with t0 = timesteps[-1]; ``timesteps`` ascending from ``edit_timesteps``."""
    b, x = x0.shape[0], x0
    t = torch.full((b,), -1, dtype=torch.long, device=x0.device)
    for t_next in timesteps.tolist():
        t_next = torch.full((b,), t_next, dtype=torch.long, device=x0.device)
        x, t = ddim_invert_step(model, x, t, t_next, attrs, alphas_cumprod, guidance_scale), t_next
    return x


@torch.no_grad()
def ddim_regenerate(model, x_t0: torch.Tensor, attrs: torch.Tensor, alphas_cumprod: torch.Tensor,
                    timesteps: torch.Tensor, guidance_scale=2.0, clip_sample: bool = True, *,
                    guide: GuidanceClassifier | None = None, guide_targets: torch.Tensor | None = None) -> torch.Tensor:
    """x_t0 (B,3,H,W) -> images in [-1,1], walking ``timesteps`` (ascending) back down under ``attrs``
    (and classifier guidance by ``guide`` towards ``guide_targets``, if given)."""
    b, x = x_t0.shape[0], x_t0
    steps = timesteps.tolist()
    for i in range(len(steps) - 1, -1, -1):
        t = torch.full((b,), steps[i], dtype=torch.long, device=x.device)
        t_prev = torch.full((b,), steps[i - 1] if i > 0 else -1, dtype=torch.long, device=x.device)
        x = ddim_denoise_step(model, x, t, t_prev, attrs, alphas_cumprod, guidance_scale, clip_sample,
                              guide=guide, guide_targets=guide_targets)
    return x.clamp(-1, 1)
