"""The guided noise prediction of every DDIM step: classifier-free guidance and classifier guidance.

Classifier-free guidance through the denoiser's own attribute path:

    eps = eps(x_t, t, 0) + w (eps(x_t, t, a) - eps(x_t, t, 0))

with w = ``guidance_scale`` (w = 1: plain conditional; w = 0: unconditional; both branches in one
batched forward otherwise). Classifier guidance (``guide``, a ``GuidanceClassifier``): a
noise-conditional attribute classifier p(a | x_t) (``veil train-classifier`` with
``model.noise_conditional``, e.g. trained with DP-SGD on the private data) steers any denoiser, also
an unconditional one trained on public data:

    eps <- eps - s sqrt(1 - alpha_prod_t) grad_x sum_i log sigmoid(a_i logit_i(x_t, t))   (a_i != 0)

with s = ``guide.scale`` (Dhariwal & Nichol's classifier guidance in eps form). The samples then
carry only the classifier's privacy cost on its data plus the denoiser's on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from veil.errors import ConfigError
from veil.lightning_modules.diffusion.schedule import alphas_cumprod_table


def classifier_free_eps(model, x_t: torch.Tensor, t: torch.Tensor, attrs: torch.Tensor, guidance_scale) -> torch.Tensor:
    """Classifier-free-guided eps; w a float or a (B,) tensor (a tensor always runs both branches)."""
    if isinstance(guidance_scale, (int, float)):
        if guidance_scale == 1.0:
            return model(x_t, t, attrs)
        if guidance_scale == 0.0:
            return model(x_t, t, torch.zeros_like(attrs))
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([attrs, torch.zeros_like(attrs)]))  # (2B,3,H,W)
    eps_cond, eps_uncond = both.chunk(2)
    w = guidance_scale.view(-1, 1, 1, 1) if isinstance(guidance_scale, torch.Tensor) else guidance_scale
    return eps_uncond + w * (eps_cond - eps_uncond)


@dataclass
class GuidanceClassifier:
    """A noise-conditional attribute classifier that steers sampling towards its ``targets``."""

    model: torch.nn.Module
    attribute_names: list[str]
    privacy: dict[str, Any]
    data_spec: dict[str, Any] | None
    scheduler_config: dict[str, Any]
    scale: float = 1.0

    def targets_for(self, attrs: torch.Tensor, names: list[str]) -> torch.Tensor:
        """attrs (B, k) over ``names`` (the denoiser's) -> (B, k_clf) over the classifier's attributes."""
        out = torch.zeros(attrs.shape[0], len(self.attribute_names), dtype=attrs.dtype, device=attrs.device)
        for i, name in enumerate(names):
            if (attrs[:, i] != 0).any():
                if name not in self.attribute_names:
                    raise ConfigError(f"--attributes: the guidance classifier does not know {name!r} "
                                      f"(it knows {self.attribute_names})")
                out[:, self.attribute_names.index(name)] = attrs[:, i]
        return out

    def log_prob_grad(self, x_t: torch.Tensor, t: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """grad_x sum over the specified attributes of log p(a_i | x_t): (B,3,H,W)."""
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            logits = self.model(x_in, t)
            logp = (F.logsigmoid(logits * targets) * (targets != 0)).sum()
            return torch.autograd.grad(logp, x_in)[0]


def load_guidance_classifier(path: str | Path, *, scheduler_config: dict[str, Any], scale: float) -> GuidanceClassifier:
    """The classifier of a ``veil train-classifier`` checkpoint, checked to be noise-conditional on the
    same noise schedule as the denoiser (``scheduler_config``)."""
    from veil.lightning_modules.checkpoints import load_classifier

    if not scale >= 0:
        raise ConfigError(f"--classifier-scale must be >= 0, got {scale}")
    model, ckpt = load_classifier(path)
    if not model.noise_conditional:
        raise ConfigError(f"--classifier {path}: a classifier of clean images; guidance needs one trained on "
                          "noised images (model.noise_conditional: true, e.g. configs/classifier32_guidance.yaml)")
    meta = ckpt["veil"]
    own, theirs = alphas_cumprod_table(meta["scheduler_config"]), alphas_cumprod_table(scheduler_config)
    if own.shape != theirs.shape or not torch.allclose(own, theirs):
        raise ConfigError(f"--classifier {path}: trained on another noise schedule than the diffusion model "
                          f"({meta['scheduler_config']} vs {scheduler_config})")
    return GuidanceClassifier(model.eval(), list(meta["attribute_names"]), meta.get("privacy") or {},
                              meta.get("data_spec"), dict(meta["scheduler_config"]), float(scale))



def guided_eps(model, x_t: torch.Tensor, t: torch.Tensor, attrs: torch.Tensor, guidance_scale, *,
               alphas_cumprod: torch.Tensor | None = None, guide: GuidanceClassifier | None = None,
               guide_targets: torch.Tensor | None = None) -> torch.Tensor:
    """The noise prediction of one step: classifier-free guidance, then classifier guidance by ``guide``
    towards ``guide_targets`` (B, k_clf) when given (``alphas_cumprod`` is then needed)."""
    eps = classifier_free_eps(model, x_t, t, attrs, guidance_scale)
    if guide is None:
        return eps
    alpha_prod_t = alphas_cumprod[t].view(-1, 1, 1, 1)
    return eps - guide.scale * (1 - alpha_prod_t).sqrt() * guide.log_prob_grad(x_t, t, guide_targets)
