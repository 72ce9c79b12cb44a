"""DDIM sampling with classifier-free guidance, and loading a trained diffusion checkpoint.

``load_diffusion_checkpoint(path)`` rebuilds the denoiser from the constructor arguments stored
in the checkpoint (no training config needed) and returns it with its scheduler config,
attribute names and privacy record. ``ddim_sample`` draws images for given attribute vectors:

    eps = eps(x_t, t, 0) + w * (eps(x_t, t, a) - eps(x_t, t, 0))     (classifier-free guidance)

with w = ``guidance_scale`` (w = 1: plain conditional; w = 0: unconditional), then one DDIM
update per step (eta = 0: deterministic given the initial noise, which a seeded generator draws).

Classifier guidance (``guide``, a ``GuidanceClassifier``): a noise-conditional attribute classifier
p(a | x_t) (``veil train-classifier`` with ``model.noise_conditional``, e.g. trained with DP-SGD on
the private data) steers any denoiser, also an unconditional one trained on public data:

    eps <- eps - s * sqrt(1 - abar_t) * grad_x sum_i log sigmoid(a_i * logit_i(x_t, t))   (a_i != 0)

with s = ``guide.scale`` (Dhariwal & Nichol's classifier guidance in eps form). The samples then
carry only the classifier's privacy cost on its data plus the denoiser's on its own
(``combined_privacy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from veil.errors import CheckpointError, ConfigError
from veil.lightning_modules.unet import AttributeConditionalUNet

LABEL_FREE = "trained without attribute labels"


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


def default_guidance(ckpt: DiffusionCheckpoint) -> float:
    """Classifier-free guidance scale to use when none is given: 2, or 0 (unconditional) for a model
    whose attribute path was never trained (``cond_drop_prob`` 1)."""
    return 0.0 if ckpt.cond_drop_prob == 1.0 else 2.0


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
    if guidance_scale == 0.0:
        return model(x_t, t, torch.zeros_like(attrs))
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([attrs, torch.zeros_like(attrs)]))
    eps_cond, eps_uncond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


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
    from veil.lightning_modules.editor import alphas_cumprod_table
    from veil.lightning_modules.unlearn import load_classifier

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


def combined_privacy(ckpt: DiffusionCheckpoint, guide: GuidanceClassifier | None) -> str:
    """One line: what the samples cost in privacy, on whose data."""
    from veil.lightning_modules.finetune import data_location, same_dataset

    def one(privacy: dict[str, Any]) -> str:
        if not privacy.get("enabled"):
            return "not private"
        return f"epsilon {privacy['epsilon']:.3f}, delta {privacy['delta']:.3g}"

    def data(spec: dict[str, Any] | None) -> str:
        return f"{spec.get('source')} {data_location(spec)}" if spec else "unrecorded data"

    unet = f"denoiser: {one(ckpt.privacy)} on {data(ckpt.data_spec)}"
    if ckpt.cond_drop_prob == 1.0:
        unet += f" ({LABEL_FREE})"
    if guide is None:
        return unet
    clf = f"guidance classifier: {one(guide.privacy)} on {data(guide.data_spec)}"
    if not same_dataset(ckpt.data_spec, guide.data_spec):
        return f"{unet}; {clf}; different data, so each dataset's cost is its own model's"
    if ckpt.privacy.get("enabled") and guide.privacy.get("enabled"):
        total = ckpt.privacy["epsilon"] + guide.privacy["epsilon"]
        return f"{unet}; {clf}; same data: together at most epsilon {total:.3f} (the epsilons add)"
    return f"{unet}; {clf}; same data, and one of them is not private: the samples are not private"


@torch.no_grad()
def ddim_sample(
    model, scheduler_config: dict[str, Any], attrs: torch.Tensor, *, num_steps: int = 50,
    guidance_scale: float = 2.0, generator: torch.Generator | None = None, resolution: int | None = None,
    guide: GuidanceClassifier | None = None, guide_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """attrs (B,k) -> images (B,3,H,W) in [-1,1]. With ``guide``, ``guide_targets`` (B, k_clf) are the
    attributes it steers to (default: ``attrs``, when the classifier's attributes are the model's)."""
    from diffusers import DDIMScheduler

    if num_steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {num_steps}")
    sched = DDIMScheduler(**scheduler_config)
    sched.set_timesteps(num_steps)
    device = next(model.parameters()).device
    res = resolution or model.unet.config.sample_size
    x = torch.randn((attrs.shape[0], 3, res, res), generator=generator).to(device)
    attrs = attrs.to(device)
    guiding = guide is not None and guide.scale > 0
    if guiding:
        guide_targets = (attrs if guide_targets is None else guide_targets).to(device)
        abar = sched.alphas_cumprod.to(device)
        guiding = bool((guide_targets != 0).any())  # nothing specified: plain sampling
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = guided_eps(model, x, tt, attrs, guidance_scale)
        if guiding:
            grad = guide.log_prob_grad(x, tt, guide_targets)
            eps = eps - guide.scale * (1 - abar[int(t)]).sqrt() * grad
        # Under guidance, re-derive eps from the clipped x0 (as GLIDE does): otherwise a guidance
        # push that the clip removes from x0 survives, reversed, in the "direction to x_t" term.
        x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=guiding).prev_sample
    return x.clamp(-1, 1)
