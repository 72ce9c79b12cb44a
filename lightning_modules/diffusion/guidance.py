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
import math
from typing import Any, Sequence

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
    scale: float | torch.Tensor = 1.0  # a (B,) tensor: one scale per row (the edit's re-dos)

    def targets_for(self, attrs: torch.Tensor, names: list[str]) -> torch.Tensor:
        """attrs (B, k) over ``names`` (the denoiser's) -> (B, k_clf) over the classifier's attributes."""
        out = torch.zeros(attrs.shape[0], len(self.attribute_names), dtype=attrs.dtype, device=attrs.device)
        for i, name in enumerate(names):
            if (attrs[:, i] != 0).any():
                if name not in self.attribute_names:
                    raise ConfigError(f": the guidance classifier does not know {name!r} "
                                      f"(it knows {self.attribute_names})", option="--attributes")
                out[:, self.attribute_names.index(name)] = attrs[:, i]
        return out

    def log_prob_grad(self, x_t: torch.Tensor, t: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """grad_x sum over the specified attributes of log p(a_i | x_t): (B,3,H,W).

        ``torch.func.grad`` rather than ``autograd.grad``: ``make_fx`` traces it into one graph of
        forward and backward ops (tensors in, no value-dependent control flow), which the export
        issue can compile; ``tests/.../test_guidance.py`` checks both give the same gradient."""
        with torch.enable_grad():
            return torch.func.grad(_log_prob, argnums=0)(x_t.detach(), t, targets, self.model)

    def logits(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Logits (B, k_clf) of clean images (B,3,H,W) in [-1,1]: the classifier at t = 0."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return torch.cat([self.model(x.to(device), _clean_t(self.model, x.shape[0], device)).cpu()
                              for x in images.split(batch_size)])

    def propose(self, images: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Attributes of images that arrive without labels: (values (B,k) in {-1,+1}, confidence (B,k) in
        [0.5, 1]) over ``names``; the classifier at t = 0 guesses, the owner may correct. An attribute the
        classifier does not know is 0 (unknown) with confidence 0."""
        logits = self.logits(images)
        values = torch.zeros(images.shape[0], len(names))
        confidence = torch.zeros(images.shape[0], len(names))
        for j, name in enumerate(names):
            if name in self.attribute_names:
                z = logits[:, self.attribute_names.index(name)]
                values[:, j] = torch.where(z >= 0, 1.0, -1.0)
                confidence[:, j] = torch.sigmoid(z.abs())
        return values, confidence

    def shown_probability(self, images: torch.Tensor, targets: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """P(image shows the target value) per attribute, (B,k) over ``names``: sigmoid(a_i logit_i) at
        t = 0; NaN where the target is 0 (unspecified)."""
        logits = self.logits(images)
        clf_targets = self.targets_for(targets, list(names))
        probs = torch.full(targets.shape, float("nan"))
        for j, name in enumerate(names):
            if name in self.attribute_names:
                i = self.attribute_names.index(name)
                p = torch.sigmoid(logits[:, i] * clf_targets[:, i])
                probs[:, j] = torch.where(targets[:, j] != 0, p, torch.full_like(p, float("nan")))
        return probs


def _log_prob(x_t: torch.Tensor, t: torch.Tensor, targets: torch.Tensor, model) -> torch.Tensor:
    """sum over the specified attributes (targets != 0) of log sigmoid(a_i logit_i(x_t, t)): a scalar."""
    return (F.logsigmoid(model(x_t, t) * targets) * (targets != 0)).sum()


def _clean_t(model, batch: int, device) -> torch.Tensor | None:
    """t = 0 for a noise-conditional classifier, None (no t) for a classifier of clean images."""
    return torch.zeros(batch, dtype=torch.long, device=device) if getattr(model, "noise_conditional", True) else None


def load_guidance_classifier(path: str | Path, *, scheduler_config: dict[str, Any], scale: float,
                             check_only: bool = False) -> GuidanceClassifier:
    """The classifier of a ``veil train-classifier`` release, checked to be noise-conditional on the
    same noise schedule as the denoiser (``scheduler_config``). ``check_only``: it only checks edits
    (scale 0), so a classifier of clean images is accepted too."""
    from veil.lightning_modules.checkpoints import load_classifier

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"must be a finite number >= 0, got {scale}", option="--classifier-scale")
    model, ckpt = load_classifier(path)
    meta = ckpt["veil"]
    if not model.noise_conditional:
        if check_only:
            return GuidanceClassifier(model.eval(), list(meta["attribute_names"]), meta.get("privacy") or {},
                                      meta.get("data_spec"), dict(scheduler_config), 0.0)
        raise ConfigError(f"{path}: a classifier of clean images; guidance needs one trained on "
                          "noised images (model.noise_conditional: true, e.g. configs/classifier32_guidance.yaml)",
                          option="--classifier")
    own, theirs = alphas_cumprod_table(meta["scheduler_config"]), alphas_cumprod_table(scheduler_config)
    if own.shape != theirs.shape or not torch.allclose(own, theirs):
        raise ConfigError(f"{path}: trained on another noise schedule than the diffusion model "
                          f"({meta['scheduler_config']} vs {scheduler_config})", option="--classifier")
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
    scale = guide.scale.view(-1, 1, 1, 1) if isinstance(guide.scale, torch.Tensor) else guide.scale
    return eps - scale * (1 - alpha_prod_t).sqrt() * guide.log_prob_grad(x_t, t, guide_targets)
