"""DDIM sampling with classifier-free guidance, and loading a trained diffusion checkpoint.

``load_diffusion_checkpoint(path)`` rebuilds the denoiser from the constructor arguments stored
in the checkpoint (no training config needed) and returns it with its scheduler config,
attribute names and privacy record. ``ddim_sample`` draws images for given attribute vectors:

    eps = eps(x_t, t, 0) + w * (eps(x_t, t, a) - eps(x_t, t, 0))     (classifier-free guidance)

with w = ``guidance_scale`` (w = 1: plain conditional; w = 0: unconditional), then one DDIM
update per step (eta = 0: deterministic given the initial noise, which a seeded generator draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from veil.errors import CheckpointError, ConfigError
from veil.lightning_modules.unet import AttributeConditionalUNet


@dataclass
class DiffusionCheckpoint:
    model: AttributeConditionalUNet
    scheduler_config: dict[str, Any]
    attribute_names: list[str]
    privacy: dict[str, Any]
    data_spec: dict[str, Any] | None
    model_kwargs: dict[str, Any]
    cond_drop_prob: float | None  # 1.0: trained without attribute labels (None: not recorded)
    initialized_from: dict[str, Any] | None = None  # provenance of a fine-tuned model's start


def load_diffusion_checkpoint(path: str | Path, *, use_ema: bool = True, map_location="cpu") -> DiffusionCheckpoint:
    """Rebuild the (EMA by default) denoiser of a ``veil train`` checkpoint, in eval mode."""
    from veil.lightning_modules.dp_diffusion_module import CHECKPOINT_KIND

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the last.ckpt that `veil train` wrote")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    meta = ckpt.get("veil") if isinstance(ckpt, dict) else None
    if not meta or meta.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a veil diffusion checkpoint (kind {meta and meta.get('kind')!r})")
    model = AttributeConditionalUNet(**meta["model_kwargs"])
    prefix = "ema." if use_ema else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.eval()
    hparams = ckpt.get("hyper_parameters") or {}
    return DiffusionCheckpoint(
        model, meta["scheduler_config"], meta["attribute_names"], meta["privacy"], meta.get("data_spec"),
        model_kwargs=dict(meta["model_kwargs"]), cond_drop_prob=hparams.get("cond_drop_prob"),
        initialized_from=meta.get("initialized_from"),
    )


def parse_attribute_spec(spec: str, attribute_names: list[str]) -> torch.Tensor:
    """'smiling=1,hat=0' -> (k,) in {-1,0,+1}. 1/yes/true = present, 0/-1/no/false = absent,
    ?/unknown = unspecified (0); attributes not named are unspecified."""
    values = torch.zeros(len(attribute_names))
    present, absent, unknown = {"1", "+1", "yes", "true"}, {"0", "-1", "no", "false"}, {"?", "unknown"}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, raw = item.partition("=")
        if not sep or name.strip() not in attribute_names:
            raise ConfigError(
                f"--attributes: {item!r} is not NAME=VALUE with NAME one of {attribute_names}"
            )
        raw = raw.strip().lower()
        if raw not in present | absent | unknown:
            raise ConfigError(f"--attributes: value {raw!r} for {name} must be 1, 0, -1 or ?")
        values[attribute_names.index(name.strip())] = 1.0 if raw in present else (-1.0 if raw in absent else 0.0)
    return values


def guided_eps(model, x_t: torch.Tensor, t: torch.Tensor, attrs: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free-guided noise prediction; one batched forward for both branches."""
    if guidance_scale == 1.0:
        return model(x_t, t, attrs)
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([attrs, torch.zeros_like(attrs)]))
    eps_cond, eps_uncond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(
    model, scheduler_config: dict[str, Any], attrs: torch.Tensor, *, num_steps: int = 50,
    guidance_scale: float = 2.0, generator: torch.Generator | None = None, resolution: int | None = None,
) -> torch.Tensor:
    """attrs (B,k) -> images (B,3,H,W) in [-1,1]."""
    from diffusers import DDIMScheduler

    if num_steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {num_steps}")
    sched = DDIMScheduler(**scheduler_config)
    sched.set_timesteps(num_steps)
    device = next(model.parameters()).device
    res = resolution or model.unet.config.sample_size
    x = torch.randn((attrs.shape[0], 3, res, res), generator=generator).to(device)
    attrs = attrs.to(device)
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = guided_eps(model, x, tt, attrs, guidance_scale)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)
