"""``PrivateEditor``: a loaded denoiser that edits images towards given attributes (the private edit).

Editing images x0 (B,3,H,W) in [-1,1] with their attributes a and privatized attributes a~ (the math
is ``diffusion.ddim``'s, the one DDIM implementation):

    1. t0 = the DDIM grid point nearest strength * T (``ddim.edit_timesteps``);
    2. invert x0 up the grid to x_t0 under a with the PROTECTED entries set to 0 (unknown), at
       guidance ``inversion_guidance`` (default 1: plain conditional);
    3. regenerate from x_t0 down to a clean image under a~ with classifier-free guidance w.

Step 2 never sees the true protected values: inverting under them would write them into x_t0
directly, outside the randomized response (the pixels of x0 still carry them, and what inversion
keeps of the pixels is measured by ``bench/edit_eval.py``, not bounded). So every entry point takes
``protected`` (attribute names, required, keyword-only). Both walks are deterministic (DDIM,
eta = 0), so an edit is a function of (x0, a with the protected entries unknown, a~, strength); the
only randomness of a private edit is the randomized response that chose a~ (veil.privacy.mechanism).
The editor is also the ``EditFn`` of ``veil.privacy.session``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from veil.errors import ConfigError
from veil.lightning_modules.diffusion.ddim import (
    ddim_invert,
    ddim_regenerate,
    edit_timesteps,
)
from veil.lightning_modules.diffusion.schedule import alphas_cumprod_table

__all__ = ["PrivateEditor"]


class PrivateEditor:
    """A loaded denoiser that edits images towards given attributes; also the sessions' ``EditFn``.

    ``edit`` is the batched tensor API; calling the editor (``editor(images, originals=..., targets=...,
    strength=..., protected=...)``) takes attribute dicts, as EditSession does. ``protected`` names the
    attributes whose true values inversion must not see (step 2 of the module docstring).
    """

    def __init__(self, model, scheduler_config: Mapping[str, Any], attribute_names: Sequence[str], *,
                 num_steps: int = 50, guidance_scale: float = 2.0, inversion_guidance: float = 1.0,
                 clip_sample: bool | None = None, batch_size: int = 64):
        for option, w in (("--guidance", guidance_scale), ("inversion_guidance", inversion_guidance)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"{option}={w!r}: must be a finite number >= 0 (1 = plain conditional)")
        self.model = model.eval()
        self.attribute_names = list(attribute_names)
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        edit_timesteps(strength=1.0, num_steps=num_steps, num_train_timesteps=self.num_train_timesteps)  # validate
        self.num_steps, self.guidance_scale = num_steps, float(guidance_scale)
        self.inversion_guidance = float(inversion_guidance)
        self.clip_sample = bool(scheduler_config.get("clip_sample", True) if clip_sample is None else clip_sample)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.alphas_cumprod = alphas_cumprod_table(scheduler_config).to(self.device)  # (T,)

    @classmethod
    def from_checkpoint(cls, path, *, use_ema: bool = True, **kwargs) -> "PrivateEditor":
        from veil.lightning_modules.checkpoints import load_diffusion_checkpoint

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

    def protected_mask(self, protected: Sequence[str]) -> torch.Tensor:
        """Protected attribute names -> (k,) bool, True in their columns; ConfigError if empty or unknown."""
        if isinstance(protected, str) or not protected:
            raise ConfigError(f"--protect={protected!r}: name at least one attribute to protect, as a list of "
                              f"names from {self.attribute_names}")
        unknown = sorted(set(protected) - set(self.attribute_names))
        if unknown:
            raise ConfigError(f"--protect: {unknown} are not attributes of the model ({self.attribute_names})")
        return torch.tensor([n in set(protected) for n in self.attribute_names])

    def inversion_attributes(self, originals: torch.Tensor, *, protected: Sequence[str]) -> torch.Tensor:
        """originals (B,k) -> (B,k) with the protected columns set to 0 (unknown): what inversion sees."""
        if originals.ndim != 2 or originals.shape[1] != len(self.attribute_names):
            raise ValueError(f"attributes {tuple(originals.shape)}: expected (B, {len(self.attribute_names)})")
        return originals.masked_fill(self.protected_mask(protected), 0.0)

    def _chunks(self, *tensors):
        for i in range(0, tensors[0].shape[0], self.batch_size):
            yield [x[i : i + self.batch_size].to(self.device) for x in tensors]

    def invert(self, images: torch.Tensor, originals: torch.Tensor, *, strength: float,
               protected: Sequence[str]) -> torch.Tensor:
        """images (B,3,H,W), originals (B,k) -> x_t0 (B,3,H,W), inverted with the protected entries unknown."""
        a = self.inversion_attributes(originals, protected=protected)  # (B,k), protected columns 0
        ts = self.timesteps(strength)
        return torch.cat([ddim_invert(self.model, x, a_b, self.alphas_cumprod, ts, self.inversion_guidance).cpu()
                          for x, a_b in self._chunks(images, a)])

    def regenerate(self, x_t0: torch.Tensor, targets: torch.Tensor, *, strength: float) -> torch.Tensor:
        """x_t0 (B,3,H,W), targets (B,k) -> edited images (B,3,H,W) in [-1,1]."""
        ts = self.timesteps(strength)
        return torch.cat([ddim_regenerate(self.model, x, a, self.alphas_cumprod, ts, self.guidance_scale,
                                          self.clip_sample).cpu() for x, a in self._chunks(x_t0, targets)])

    def edit(self, images: torch.Tensor, originals: torch.Tensor, targets: torch.Tensor, *,
             strength: float, protected: Sequence[str]) -> torch.Tensor:
        """Batched private edit (steps 1-3 of the module docstring): (B,3,H,W), (B,k), (B,k) -> (B,3,H,W)."""
        if images.ndim != 4 or originals.shape != targets.shape or originals.shape[0] != images.shape[0]:
            raise ValueError(f"edit: images {tuple(images.shape)}, originals {tuple(originals.shape)}, "
                             f"targets {tuple(targets.shape)} do not line up as (B,3,H,W), (B,k), (B,k)")
        x_t0 = self.invert(images, originals, strength=strength, protected=protected)
        return self.regenerate(x_t0, targets, strength=strength)

    def __call__(self, images: Sequence[torch.Tensor], *, originals: Sequence[Mapping[str, int]],
                 targets: Sequence[Mapping[str, int]], strength: float,
                 protected: Sequence[str]) -> list[torch.Tensor]:
        """The EditFn of privacy.session: lists of (3,H,W) images and attribute dicts in, list of edits out."""
        a = torch.stack([self.attribute_vector(o) for o in originals])  # (B,k)
        a_new = torch.stack([self.attribute_vector(t) for t in targets])  # (B,k)
        a_inv = self.inversion_attributes(a, protected=protected)  # (B,k), what inversion sees
        if all(im is images[0] for im in images) and bool((a_inv == a_inv[0]).all()):
            # previews of one image: invert once, regenerate every target from the same x_t0
            x_t0 = self.invert(images[0][None], a_inv[:1], strength=strength, protected=protected)
            return list(self.regenerate(x_t0.expand(len(images), -1, -1, -1), a_new, strength=strength))
        return list(self.edit(torch.stack(list(images)), a, a_new, strength=strength, protected=protected))
