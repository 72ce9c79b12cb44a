"""The DDPM noise schedule: one scheduler config, one alpha_prod_t table, one forward process.

Symbols: alpha_prod_t = cumulative alpha at t (alpha-bar_t of DDPM), t = 0 .. T-1.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


def default_scheduler_config(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """DDPM noise schedule shared by training, sampling, editing and export."""
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": True,
    }


def alphas_cumprod_table(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """alpha_prod_t for t = 0 .. T-1 (float32, (T,)), from a checkpoint's DDPM scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config).alphas_cumprod.float().clone()


def q_sample(x0: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward (noising) process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t (B,) or a scalar."""
    alpha_prod_t = alphas_cumprod[t].reshape(-1, 1, 1, 1)  # cumulative alpha at t
    return alpha_prod_t.sqrt() * x0 + (1 - alpha_prod_t).sqrt() * noise
