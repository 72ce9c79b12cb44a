"""The private edit's image math: DDIM inversion to a noise level, then guided DDIM regeneration.

Editing images x0 (B,3,H,W) in [-1,1] with their attributes a and privatized attributes a~:

    1. t0 = the DDIM grid point nearest strength * T (grid: 0, r, 2r, ..., (n-1) r with r = T // n,
       the grid ``ddim_sample`` uses, so strength 1 starts where sampling starts).
    2. Invert: walk x0 up the grid 0 -> r -> ... -> t0 with ``ddim_invert_step`` under a (no guidance).
    3. Regenerate: walk x_t0 down the grid t0 -> ... -> 0 -> clean with ``ddim_denoise_step`` under a~
       and classifier-free guidance w.

Both walks are deterministic (DDIM, eta = 0), so an edit is a function of (x0, a, a~, strength);
the only randomness of a private edit is the randomized response that chose a~ (privacy/mechanism.py).

The two step functions are the single source of truth for the edit: the export issue traces them
into ONNX, so they take timesteps and attributes (and the guidance scale, if wanted) as tensors,
look the schedule up in an ``alphas_cumprod`` tensor, and have no Python control flow on values.
Symbols: alpha_prod_t = cumulative alpha at t (alpha-bar_t of DDPM); alpha_prod = 1 for t = -1
(clean image, the end of the walk down); eps = the guided noise prediction.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from veil.errors import ConfigError
from veil.lightning_modules.privacy.levels import check_strength

__all__ = ["alphas_cumprod_table", "edit_timesteps", "guided_eps", "ddim_invert_step", "ddim_denoise_step",
           "ddim_invert", "ddim_regenerate", "PrivateEditor"]


def alphas_cumprod_table(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """alpha_prod_t for t = 0 .. T-1 (float32, (T,)), from the checkpoint's DDPM scheduler config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config).alphas_cumprod.float().clone()


def edit_timesteps(*, strength: float, num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """Ascending DDIM grid points 0, r, ..., t0 (int64), t0 = grid point nearest strength * T (see step 1)."""
    strength = check_strength(strength, option="--strength")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(f"--steps={num_steps!r}: must be an integer in [1, {num_train_timesteps}]")
    r = num_train_timesteps // num_steps
    k0 = min(num_steps - 1, round(strength * num_train_timesteps / r))
    return torch.arange(k0 + 1, dtype=torch.long) * r  # (k0 + 1,)


def _alpha_prod(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_prod_t per row, (B,1,1,1); t = -1 means the clean image (alpha_prod = 1)."""
    a = alphas_cumprod[t.clamp(min=0)]
    return torch.where(t >= 0, a, torch.ones_like(a)).view(-1, 1, 1, 1)


def guided_eps(model, x_t: torch.Tensor, t: torch.Tensor, attrs: torch.Tensor, guidance_scale) -> torch.Tensor:
    """eps = eps(x_t,t,0) + w (eps(x_t,t,a) - eps(x_t,t,0)); w a float or a (B,) tensor. w = 1.0 (float) skips
    the unconditional branch."""
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
        return model(x_t, t, attrs)
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([attrs, torch.zeros_like(attrs)]))  # (2B,3,H,W)
    eps_cond, eps_uncond = both.chunk(2)
    w = guidance_scale.view(-1, 1, 1, 1) if isinstance(guidance_scale, torch.Tensor) else guidance_scale
    return eps_uncond + w * (eps_cond - eps_uncond)


def ddim_invert_step(model, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, attrs: torch.Tensor,
                     alphas_cumprod: torch.Tensor, guidance_scale=1.0) -> torch.Tensor:
    """One DDIM step up: x at t (B,3,H,W) -> x at t_next > t; t, t_next (B,) int64 (t = -1: clean)."""
    # 1. eps at the *target* timestep, evaluated on the current x (the usual DDIM inversion
    #    approximation x_t ~ x_t_next; it makes the step the mirror image of ddim_denoise_step).
    eps = guided_eps(model, x, t_next, attrs, guidance_scale)
    alpha_prod_t, alpha_prod_next = _alpha_prod(alphas_cumprod, t), _alpha_prod(alphas_cumprod, t_next)
    # 2. predicted clean image x0_hat = (x_t - sqrt(1 - alpha_prod_t) eps) / sqrt(alpha_prod_t)
    x0_hat = (x - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()
    # 3. re-noise deterministically to t_next along the same eps
    return alpha_prod_next.sqrt() * x0_hat + (1 - alpha_prod_next).sqrt() * eps


def ddim_denoise_step(model, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, attrs: torch.Tensor,
                      alphas_cumprod: torch.Tensor, guidance_scale=1.0, clip_sample: bool = True) -> torch.Tensor:
    """One guided DDIM step down (eta = 0): x_t -> x_t_prev; t (B,), t_prev (B,) int64 (t_prev = -1: clean).

    Matches diffusers' DDIMScheduler.step for eps prediction (clip_sample clips x0_hat to [-1, 1]).
    """
    # 1. guided noise prediction
    eps = guided_eps(model, x_t, t, attrs, guidance_scale)
    alpha_prod_t, alpha_prod_prev = _alpha_prod(alphas_cumprod, t), _alpha_prod(alphas_cumprod, t_prev)
    # 2. predicted clean image, clipped like the sampler clips it
    x0_hat = (x_t - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()
    if clip_sample:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    # 3. step to t_prev along eps
    return alpha_prod_prev.sqrt() * x0_hat + (1 - alpha_prod_prev).sqrt() * eps


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
                    timesteps: torch.Tensor, guidance_scale=2.0, clip_sample: bool = True) -> torch.Tensor:
    """x_t0 (B,3,H,W) -> images in [-1,1], walking ``timesteps`` (ascending) back down under ``attrs``."""
    b, x = x_t0.shape[0], x_t0
    steps = timesteps.tolist()
    for i in range(len(steps) - 1, -1, -1):
        t = torch.full((b,), steps[i], dtype=torch.long, device=x.device)
        t_prev = torch.full((b,), steps[i - 1] if i > 0 else -1, dtype=torch.long, device=x.device)
        x = ddim_denoise_step(model, x, t, t_prev, attrs, alphas_cumprod, guidance_scale, clip_sample)
    return x.clamp(-1, 1)


class PrivateEditor:
    """A loaded denoiser that edits images towards given attributes; also the sessions' ``EditFn``.

    ``edit`` is the batched tensor API; calling the editor (``editor(images, originals=..., targets=...,
    strength=...)``) takes attribute dicts, as EditSession does.
    """

    def __init__(self, model, scheduler_config: Mapping[str, Any], attribute_names: Sequence[str], *,
                 num_steps: int = 50, guidance_scale: float = 2.0, inversion_guidance: float = 1.0,
                 clip_sample: bool | None = None, batch_size: int = 64):
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ConfigError(f"--guidance={guidance_scale!r}: must be a number >= 0 (1 = plain conditional)")
        self.model = model.eval()
        self.attribute_names = list(attribute_names)
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        edit_timesteps(strength=1.0, num_steps=num_steps, num_train_timesteps=self.num_train_timesteps)  # validate
        self.num_steps, self.guidance_scale, self.inversion_guidance = num_steps, float(guidance_scale), inversion_guidance
        self.clip_sample = bool(scheduler_config.get("clip_sample", True) if clip_sample is None else clip_sample)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.alphas_cumprod = alphas_cumprod_table(scheduler_config).to(self.device)  # (T,)

    @classmethod
    def from_checkpoint(cls, path, *, use_ema: bool = True, **kwargs) -> "PrivateEditor":
        from veil.lightning_modules.sampling import load_diffusion_checkpoint

        ckpt = load_diffusion_checkpoint(path, use_ema=use_ema)
        return cls(ckpt.model, ckpt.scheduler_config, ckpt.attribute_names, **kwargs)

    def timesteps(self, strength: float) -> torch.Tensor:
        return edit_timesteps(strength=strength, num_steps=self.num_steps, num_train_timesteps=self.num_train_timesteps)

    def attribute_vector(self, attributes: Mapping[str, int]) -> torch.Tensor:
        """{name: -1|0|+1} -> (k,) float in the model's attribute order; names not given are unknown (0)."""
        unknown = sorted(set(attributes) - set(self.attribute_names))
        if unknown:
            raise ConfigError(f"attributes {unknown} are not known to the model ({self.attribute_names})")
        return torch.tensor([float(attributes.get(n, 0)) for n in self.attribute_names])

    def _chunks(self, *tensors):
        for i in range(0, tensors[0].shape[0], self.batch_size):
            yield [x[i : i + self.batch_size].to(self.device) for x in tensors]

    def invert(self, images: torch.Tensor, originals: torch.Tensor, *, strength: float) -> torch.Tensor:
        """images (B,3,H,W), originals (B,k) -> x_t0 (B,3,H,W)."""
        ts = self.timesteps(strength)
        return torch.cat([ddim_invert(self.model, x, a, self.alphas_cumprod, ts, self.inversion_guidance).cpu()
                          for x, a in self._chunks(images, originals)])

    def regenerate(self, x_t0: torch.Tensor, targets: torch.Tensor, *, strength: float) -> torch.Tensor:
        """x_t0 (B,3,H,W), targets (B,k) -> edited images (B,3,H,W) in [-1,1]."""
        ts = self.timesteps(strength)
        return torch.cat([ddim_regenerate(self.model, x, a, self.alphas_cumprod, ts, self.guidance_scale,
                                          self.clip_sample).cpu() for x, a in self._chunks(x_t0, targets)])

    def edit(self, images: torch.Tensor, originals: torch.Tensor, targets: torch.Tensor, *,
             strength: float) -> torch.Tensor:
        """Batched private edit (steps 1-3 of the module docstring): (B,3,H,W), (B,k), (B,k) -> (B,3,H,W)."""
        if images.ndim != 4 or originals.shape != targets.shape or originals.shape[0] != images.shape[0]:
            raise ValueError(f"edit: images {tuple(images.shape)}, originals {tuple(originals.shape)}, "
                             f"targets {tuple(targets.shape)} do not line up as (B,3,H,W), (B,k), (B,k)")
        return self.regenerate(self.invert(images, originals, strength=strength), targets, strength=strength)

    def __call__(self, images: Sequence[torch.Tensor], *, originals: Sequence[Mapping[str, int]],
                 targets: Sequence[Mapping[str, int]], strength: float) -> list[torch.Tensor]:
        """The EditFn of privacy.session: lists of (3,H,W) images and attribute dicts in, list of edits out."""
        a = torch.stack([self.attribute_vector(o) for o in originals])  # (B,k)
        a_new = torch.stack([self.attribute_vector(t) for t in targets])  # (B,k)
        if all(im is images[0] for im in images) and bool((a == a[0]).all()):
            # previews of one image: invert once, regenerate every target from the same x_t0
            x_t0 = self.invert(images[0][None], a[:1], strength=strength).expand(len(images), -1, -1, -1)
            return list(self.regenerate(x_t0, a_new, strength=strength))
        return list(self.edit(torch.stack(list(images)), a, a_new, strength=strength))
