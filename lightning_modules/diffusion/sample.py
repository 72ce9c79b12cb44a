"""Drawing images for given attributes (``veil sample``), and what the samples cost in privacy.

``ddim_sample`` walks the one DDIM (``diffusion.ddim``) from seeded Gaussian noise over the full grid,
with classifier-free guidance w = ``guidance_scale`` through the model's own attribute path and/or
classifier guidance by a noise-conditional classifier (``guide``, see ``diffusion.guidance``); eta = 0,
so the images are a deterministic function of the initial noise, which a seeded generator draws.
``combined_privacy`` says in one line what the samples cost in privacy, on whose data.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.errors import ConfigError
from veil.lightning_modules.checkpoints import DiffusionCheckpoint
from veil.lightning_modules.data.specs import data_location, same_dataset
from veil.lightning_modules.diffusion.ddim import ddim_regenerate, sample_timesteps
from veil.lightning_modules.diffusion.guidance import GuidanceClassifier
from veil.lightning_modules.diffusion.schedule import alphas_cumprod_table

LABEL_FREE = "trained without attribute labels"


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
                f": {item!r} is not NAME=VALUE with NAME one of {attribute_names}", option="--attributes"
            )
        raw = raw.strip().lower()
        if raw not in present | absent | unknown:
            raise ConfigError(f": value {raw!r} for {name} must be 1, 0, -1 or ?", option="--attributes")
        values[attribute_names.index(name.strip())] = 1.0 if raw in present else (-1.0 if raw in absent else 0.0)
    return values


def privacy_phrase(privacy: dict[str, Any] | None) -> tuple[bool, str]:
    """(private?, 'epsilon E, delta D' or 'not private (why)') of one model's privacy record.

    A DP record without the ``private`` key was written before veil drew its noise from the OS CSPRNG:
    its noise and batches were reproducible from its public config, so it is reported as not private."""
    privacy = privacy or {}
    if not privacy.get("enabled"):
        return False, "not private"
    if "private" not in privacy:
        return False, "not private (trained before veil drew its DP noise from the OS; retrain it)"
    if not privacy["private"]:
        return False, f"not private ({privacy.get('not_private_reason', 'see its privacy record')})"
    eps = privacy.get("epsilon")
    if eps is None:
        return False, "not private (unbounded epsilon)"
    return True, f"epsilon {eps:.3f}, delta {privacy['delta']:.3g}"


def combined_privacy(ckpt: DiffusionCheckpoint, guide: GuidanceClassifier | None) -> str:
    """One line: what the samples cost in privacy, on whose data.

    Two models composed on the same data cost (eps1 + eps2, delta1 + delta2) (basic composition).
    A model whose data is not recorded counts as trained on the same data as the other: being
    unsure, assume the costs add."""

    def data(spec: dict[str, Any] | None) -> str:
        return f"{spec.get('source')} {data_location(spec)}" if spec else "unrecorded data"

    unet_private, unet_phrase = privacy_phrase(ckpt.privacy)
    unet = f"denoiser: {unet_phrase} on {data(ckpt.data_spec)}"
    if ckpt.cond_drop_prob == 1.0:
        unet += f" ({LABEL_FREE})"
    if guide is None:
        return unet
    clf_private, clf_phrase = privacy_phrase(guide.privacy)
    clf = f"guidance classifier: {clf_phrase} on {data(guide.data_spec)}"
    unknown = not ckpt.data_spec or not guide.data_spec
    if not unknown and not same_dataset(ckpt.data_spec, guide.data_spec):
        return f"{unet}; {clf}; different data, so each dataset's cost is its own model's"
    why = "data not recorded for one of them, so counted as the same data" if unknown else "same data"
    if unet_private and clf_private:
        eps = ckpt.privacy["epsilon"] + guide.privacy["epsilon"]
        delta = ckpt.privacy["delta"] + guide.privacy["delta"]
        return f"{unet}; {clf}; {why}: together at most epsilon {eps:.3f}, delta {delta:.3g} (they add)"
    return f"{unet}; {clf}; {why}, and one of them is not private: the samples are not private"


@torch.no_grad()
def ddim_sample(
    model, scheduler_config: dict[str, Any], attrs: torch.Tensor, *, num_steps: int = 50,
    guidance_scale: float = 2.0, generator: torch.Generator | None = None, resolution: int | None = None,
    guide: GuidanceClassifier | None = None, guide_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """attrs (B,k) -> images (B,3,H,W) in [-1,1]. With ``guide``, ``guide_targets`` (B, k_clf) are the
    attributes it steers to (default: ``attrs``, when the classifier's attributes are the model's)."""
    if num_steps < 1:
        raise ConfigError(f"must be >= 1, got {num_steps}", option="--steps")
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    timesteps = sample_timesteps(num_steps=num_steps, num_train_timesteps=num_train_timesteps)
    device = next(model.parameters()).device
    res = resolution or model.unet.config.sample_size
    x = torch.randn((attrs.shape[0], 3, res, res), generator=generator).to(device)  # x_T
    attrs = attrs.to(device)
    if guide is not None and guide.scale > 0:
        guide_targets = (attrs if guide_targets is None else guide_targets).to(device)
        if not bool((guide_targets != 0).any()):  # nothing specified: plain sampling
            guide = None
    else:
        guide = None
    alphas_cumprod = alphas_cumprod_table(scheduler_config).to(device)
    return ddim_regenerate(model, x, attrs, alphas_cumprod, timesteps, guidance_scale,
                           bool(scheduler_config.get("clip_sample", True)), guide=guide,
                           guide_targets=guide_targets if guide is not None else None)
