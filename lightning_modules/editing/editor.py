"""``PrivateEditor``: edits images towards given attributes (the private edit), with two backends.

Editing images x0 (B,3,H,W) in [-1,1] with their attributes a and privatized attributes a~ (the math
is ``diffusion.ddim``'s, the one DDIM implementation, for both backends):

    1. t0 = the DDIM grid point nearest strength * T (``ddim.edit_timesteps``);
    2. encode x0 at t0 without the true protected values, by the level's ``encoding``:
         "invert": DDIM inversion up the grid (keeps the face: nearly invertible, so it also keeps
                   what the pixels say about the protected values), seeing
           conditional: a with the PROTECTED entries set to 0 (unknown), at guidance
                        ``inversion_guidance`` (default 1: plain conditional);
           guided:      no attributes at all (a label-free denoiser);
         "noise":  the forward process q(x_t0 | x0) with fresh noise (SDEdit): only sqrt(alpha_prod_t0)
                   of the image survives, so what the pixels keep shrinks with the strength;
    3. regenerate from x_t0 down to a clean image towards a~:
         conditional: classifier-free guidance w through the denoiser's attribute path;
         guided:      classifier guidance by a noise-conditional attribute classifier (DP-trained, e.g.
                      ``configs/classifier32_guidance.yaml``) towards the released protected values and,
                      with ``keep_unprotected`` (default), towards the current unprotected values;
    4. (``edit_checked``) the checker, the classifier at t = 0, reads each released protected value off
       the edit; rows where P(shows the released value) < ``check_threshold`` are re-done along
       ``retry_ladder`` (strength + 0.15 and guidance x 1.5 per re-do, at most ``max_retries``, strength
       at most 1), and rows that still fail are reported as refused: never released silently.

Step 2 never sees the true protected values: inverting under them would write them into x_t0
directly, outside the randomized response (the pixels of x0 still carry them, and what inversion
keeps of the pixels is measured by ``bench/edit_eval.py``, not bounded). So every entry point takes
``protected`` (attribute names, required, keyword-only). Both walks are deterministic (DDIM,
eta = 0), so an "invert" edit is a function of (x0, a with the protected entries unknown, a~,
strength); its only randomness is the randomized response that chose a~ (veil.privacy.mechanism).
A "noise" edit adds the encoding noise, drawn from a generator seeded from the OS CSPRNG at each
call (``veil.privacy.randomness.secret_seed``), never from a config seed and never stored: whoever
knew it could subtract it and recover sqrt(alpha_prod_t0) x0 exactly. (``noise=`` passes it in, for
tests and export verification only.) The editor is also the ``EditFn`` of ``veil.privacy.session``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch

from veil.editing.plan import (
    DEFAULT_CHECK_THRESHOLD,
    DEFAULT_MAX_RETRIES,
    RETRY_GUIDANCE_FACTOR,
    RETRY_STRENGTH_STEP,
    check_check_options,
    CheckedEdits,
    retry_ladder,
)
from veil.errors import ConfigError, EditRefused
from veil.lightning_modules.diffusion.ddim import (
    ddim_invert,
    ddim_regenerate,
    edit_timesteps,
)
from veil.lightning_modules.data.specs import data_location, same_dataset
from veil.lightning_modules.diffusion.guidance import GuidanceClassifier
from veil.lightning_modules.diffusion.schedule import alphas_cumprod_table, q_sample
from veil.privacy.levels import check_encoding
from veil.privacy.randomness import secret_seed

__all__ = ["PrivateEditor", "CheckedEdits", "EditRefused", "model_costs", "RETRY_STRENGTH_STEP", "RETRY_GUIDANCE_FACTOR"]



def model_costs(ckpt, guide: GuidanceClassifier | None, *, edited: Mapping[str, Any] | None = None,
                checker: GuidanceClassifier | None = None) -> list[dict]:
    """The training privacy of each model that makes an edit: role, private?, epsilon, delta, on which data,
    and whether that is the data being edited (``edited``; None: not known), whose images then pay it too."""
    from veil.lightning_modules.diffusion.sample import privacy_phrase

    def one(role, privacy, spec, **extra):
        private, phrase = privacy_phrase(privacy)
        data = f"{spec.get('source')} {data_location(spec)}" if spec else "unrecorded data"
        return {"role": role, "private": private, "privacy": phrase,
                "epsilon": (privacy or {}).get("epsilon") if private else None,
                "delta": (privacy or {}).get("delta") if private else None, "data": data,
                "edited_data": same_dataset(spec, dict(edited)) if spec and edited else None, **extra}

    models = [one("denoiser", ckpt.privacy, ckpt.data_spec, label_free=ckpt.cond_drop_prob == 1.0)]
    if guide is not None:
        models.append(one("guidance classifier" if guide.scale > 0 else "check classifier", guide.privacy,
                          guide.data_spec))
    if checker is not None:
        models.append(one("check classifier", checker.privacy, checker.data_spec))
    return models


class PrivateEditor:
    """A loaded denoiser (and, for the guided backend, a guidance classifier) that edits images towards
    given attributes; also the sessions' ``EditFn``.

    ``edit`` is the batched tensor API and ``edit_checked`` adds step 4 (the check and its re-dos);
    calling the editor (``editor(images, originals=..., targets=..., strength=..., protected=...)``)
    takes attribute dicts, as EditSession does. ``protected`` names the attributes whose true values
    inversion must not see (step 2 of the module docstring).

    ``guide`` (a ``GuidanceClassifier`` with scale > 0) selects the guided backend; ``checker`` (default:
    ``guide``) is the classifier of step 4; ``label_free``: the denoiser was trained without attribute
    labels (``cond_drop_prob`` 1), so it is only ever given zeros, and needs ``guide`` to edit.
    """

    def __init__(self, model, scheduler_config: Mapping[str, Any], attribute_names: Sequence[str], *,
                 num_steps: int = 50, guidance_scale: float = 2.0, inversion_guidance: float = 1.0,
                 clip_sample: bool | None = None, batch_size: int = 64, guide: GuidanceClassifier | None = None,
                 checker: GuidanceClassifier | None = None, label_free: bool = False, keep_unprotected: bool = True,
                 check_threshold: float = DEFAULT_CHECK_THRESHOLD, max_retries: int = DEFAULT_MAX_RETRIES):
        for option, w in (("--guidance", guidance_scale), ("inversion_guidance", inversion_guidance)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"{option}={w!r}: must be a finite number >= 0 (1 = plain conditional)")
        check_check_options(check_threshold=check_threshold, max_retries=max_retries)
        if guide is not None and not guide.scale > 0:
            guide = None  # scale 0: the classifier only checks
        if label_free and guide is None:
            raise ConfigError("--checkpoint: this denoiser was trained without attribute labels, so it cannot edit "
                              "attributes by itself; give --classifier (a noise-conditional attribute classifier, "
                              "`veil train-classifier` with model.noise_conditional) and --classifier-scale > 0")
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
        self.guide, self.label_free, self.keep_unprotected = guide, bool(label_free), bool(keep_unprotected)
        self.checker = checker if checker is not None else guide
        self.check_threshold, self.max_retries = float(check_threshold), max_retries
        self.model_privacy: str | None = None  # what the models cost, set by whoever loads them (from_checkpoint)
        self.costs: list[dict] | None = None

    @property
    def backend(self) -> str:
        """"guided" (classifier guidance of the denoiser) or "conditional" (classifier-free guidance)."""
        return "guided" if self.guide is not None else "conditional"

    @classmethod
    def from_checkpoint(cls, path, *, use_ema: bool = True, classifier=None, classifier_scale: float = 10.0,
                        **kwargs) -> "PrivateEditor":
        """The editor of a ``veil train`` release; with ``classifier`` (a ``veil train-classifier``
        release) and ``classifier_scale`` > 0 the guided backend, with scale 0 the classifier only checks."""
        from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
        from veil.lightning_modules.diffusion.guidance import load_guidance_classifier

        ckpt = load_diffusion_checkpoint(path, use_ema=use_ema)
        guide = None
        if classifier is not None:
            guide = load_guidance_classifier(classifier, scheduler_config=ckpt.scheduler_config,
                                             scale=classifier_scale, check_only=classifier_scale == 0)
        from veil.lightning_modules.diffusion.sample import combined_privacy

        editor = cls(ckpt.model, ckpt.scheduler_config, ckpt.attribute_names, guide=guide, checker=guide,
                     label_free=ckpt.cond_drop_prob == 1.0, **kwargs)
        editor.model_privacy, editor.costs = combined_privacy(ckpt, guide), model_costs(ckpt, guide)
        return editor

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
        for role, clf in (("guidance", self.guide), ("check", self.checker)):
            missing = [] if clf is None else sorted(set(protected) - set(clf.attribute_names))
            if missing:
                raise ConfigError(f"--protect: the classifier ({role}) does not know {missing} "
                                  f"(it knows {clf.attribute_names})")
        return torch.tensor([n in set(protected) for n in self.attribute_names])

    def inversion_attributes(self, originals: torch.Tensor, *, protected: Sequence[str]) -> torch.Tensor:
        """originals (B,k) -> (B,k) what inversion sees: the protected columns set to 0 (unknown); all of
        them 0 for a label-free denoiser."""
        if originals.ndim != 2 or originals.shape[1] != len(self.attribute_names):
            raise ValueError(f"attributes {tuple(originals.shape)}: expected (B, {len(self.attribute_names)})")
        masked = originals.masked_fill(self.protected_mask(protected), 0.0)
        return torch.zeros_like(masked) if self.label_free else masked

    def _chunks(self, *tensors):
        for i in range(0, tensors[0].shape[0], self.batch_size):
            yield [x[i : i + self.batch_size].to(self.device) for x in tensors]

    def invert(self, images: torch.Tensor, originals: torch.Tensor, *, strength: float,
               protected: Sequence[str]) -> torch.Tensor:
        """images (B,3,H,W), originals (B,k) -> x_t0 (B,3,H,W), inverted with the protected entries unknown."""
        a = self.inversion_attributes(originals, protected=protected)  # (B,k), protected columns 0
        ts = self.timesteps(strength)
        w = 1.0 if self.label_free else self.inversion_guidance
        return torch.cat([ddim_invert(self.model, x, a_b, self.alphas_cumprod, ts, w).cpu()
                          for x, a_b in self._chunks(images, a)])

    def encode(self, images: torch.Tensor, originals: torch.Tensor, *, strength: float, protected: Sequence[str],
               encoding: str = "invert", noise: torch.Tensor | None = None) -> torch.Tensor:
        """Step 2: images (B,3,H,W) -> x_t0 by ``encoding`` ("invert" or "noise"). ``noise`` (B,3,H,W) replaces
        the secret encoding noise; tests and export verification only (a release must never pass it)."""
        check_encoding(encoding)
        if encoding == "invert":
            if noise is not None:
                raise ConfigError("noise=: DDIM inversion takes no noise (only the 'noise' encoding does)")
            return self.invert(images, originals, strength=strength, protected=protected)
        self.protected_mask(protected)  # the same checks as inversion makes
        if noise is None:
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(secret_seed()))
        if noise.shape != images.shape:
            raise ValueError(f"noise {tuple(noise.shape)}: expected the images' shape {tuple(images.shape)}")
        t0 = self.timesteps(strength)[-1].expand(images.shape[0])
        return q_sample(images, self.alphas_cumprod.to(images.device), t0.to(images.device), noise.to(images))

    def guide_targets(self, targets: torch.Tensor, *, protected: Sequence[str]) -> torch.Tensor:
        """targets (B,k) -> what classifier guidance steers to: the released protected values and, with
        ``keep_unprotected``, the current values of the others (a release publishes them exactly)."""
        return targets if self.keep_unprotected else targets.masked_fill(~self.protected_mask(protected), 0.0)

    def regenerate(self, x_t0: torch.Tensor, targets: torch.Tensor, *, strength: float, protected: Sequence[str],
                   guidance_factor: torch.Tensor | float = 1.0) -> torch.Tensor:
        """x_t0 (B,3,H,W), targets (B,k) -> edited images (B,3,H,W) in [-1,1]. ``guidance_factor`` (float or
        (B,)) multiplies the guidance of each row (the re-dos of ``edit_checked``)."""
        ts = self.timesteps(strength)
        factor = torch.as_tensor(guidance_factor, dtype=torch.float32).expand(x_t0.shape[0])
        if self.guide is None:  # conditional: classifier-free guidance w x factor ((b,) tensor if it varies)
            uniform = bool((factor == factor[0]).all())
            return torch.cat([ddim_regenerate(self.model, x, a, self.alphas_cumprod, ts,
                                              self.guidance_scale * float(f[0]) if uniform else self.guidance_scale * f,
                                              self.clip_sample).cpu()
                              for x, a, f in self._chunks(x_t0, targets, factor)])
        g_targets = self.guide.targets_for(self.guide_targets(targets, protected=protected), self.attribute_names)
        attrs = torch.zeros_like(targets) if self.label_free else targets
        w = 1.0 if self.label_free else self.guidance_scale
        out = []
        for x, a, gt, f in self._chunks(x_t0, attrs, g_targets, factor):
            guide = dataclasses.replace(self.guide, scale=self.guide.scale * f)  # (b,) scales
            out.append(ddim_regenerate(self.model, x, a, self.alphas_cumprod, ts, w, self.clip_sample,
                                       guide=guide, guide_targets=gt).cpu())
        return torch.cat(out)

    def edit(self, images: torch.Tensor, originals: torch.Tensor, targets: torch.Tensor, *,
             strength: float, protected: Sequence[str], guidance_factor: torch.Tensor | float = 1.0,
             encoding: str = "invert", noise: torch.Tensor | None = None) -> torch.Tensor:
        """Batched private edit (steps 1-3 of the module docstring): (B,3,H,W), (B,k), (B,k) -> (B,3,H,W)."""
        if images.ndim != 4 or originals.shape != targets.shape or originals.shape[0] != images.shape[0]:
            raise ValueError(f"edit: images {tuple(images.shape)}, originals {tuple(originals.shape)}, "
                             f"targets {tuple(targets.shape)} do not line up as (B,3,H,W), (B,k), (B,k)")
        x_t0 = self.encode(images, originals, strength=strength, protected=protected, encoding=encoding, noise=noise)
        return self.regenerate(x_t0, targets, strength=strength, protected=protected, guidance_factor=guidance_factor)

    # -- step 4: does the edit show what it releases? ----------------------------------------------
    @property
    def can_check(self) -> bool:
        return self.checker is not None

    def shown(self, edited: torch.Tensor, targets: torch.Tensor, *, protected: Sequence[str]) -> torch.Tensor:
        """(B,p): the checker's P(the edit shows the released value) for each protected attribute."""
        if self.checker is None:
            raise ConfigError("checking an edit needs a classifier (--classifier); none was given")
        mask = self.protected_mask(protected)
        probs = self.checker.shown_probability(edited, targets.masked_fill(~mask, 0.0), self.attribute_names)
        return probs[:, mask]

    def retry_ladder(self, strength: float) -> list[tuple[float, float]]:
        """(strength, guidance factor) of the first try and each re-do: strength + 0.15 per re-do (at most 1),
        guidance x 1.5 per re-do; ``max_retries`` re-dos."""
        return retry_ladder(strength, self.max_retries)

    def edit_checked(self, images: torch.Tensor, originals: torch.Tensor, targets: torch.Tensor, *,
                     strength: float, protected: Sequence[str], encoding: str = "invert") -> CheckedEdits:
        """Steps 1-4: edit, check each row shows its released protected values, re-do the rows that do not
        along ``retry_ladder`` (a "noise" re-do draws fresh noise); rows failing every attempt have ``passed``
        False (the caller refuses them)."""
        mask = self.protected_mask(protected)
        b = images.shape[0]
        out = torch.empty_like(images)
        shown = torch.zeros(b, int(mask.sum()))
        attempts, used_s, used_g = torch.zeros(b, dtype=torch.long), torch.zeros(b), torch.zeros(b)
        pending = torch.arange(b)
        for k, (s, g) in enumerate(self.retry_ladder(strength)):
            edited = self.edit(images[pending], originals[pending], targets[pending], strength=s, protected=protected,
                               guidance_factor=g, encoding=encoding)
            p = self.shown(edited, targets[pending], protected=protected)
            out[pending], shown[pending] = edited, p
            attempts[pending], used_s[pending], used_g[pending] = k + 1, s, g
            pending = pending[~(p >= self.check_threshold).all(dim=1)]
            if not len(pending):
                break
        passed = (shown >= self.check_threshold).all(dim=1)
        return CheckedEdits(out, shown, passed, attempts, used_s, used_g, self.check_threshold, tuple(
            n for n in self.attribute_names if n in set(protected)))

    def propose(self, images: torch.Tensor) -> list[dict[str, dict]]:
        """Attributes of images that arrive without labels, guessed by the classifier at t = 0:
        per image {name: {"value": -1|+1, "confidence": P}} (value 0, confidence 0 where it does not know
        the attribute). The owner may correct them before an edit."""
        if self.checker is None:
            raise ConfigError("guessing the attributes of an unlabelled image needs a classifier (--classifier)")
        values, confidence = self.checker.propose(images, self.attribute_names)
        return [{n: {"value": int(v), "confidence": round(float(c), 4)} for n, v, c in zip(self.attribute_names, vr, cr)}
                for vr, cr in zip(values.tolist(), confidence.tolist())]

    def __call__(self, images: Sequence[torch.Tensor], *, originals: Sequence[Mapping[str, int]],
                 targets: Sequence[Mapping[str, int]], strength: float, protected: Sequence[str],
                 check: bool = False, encoding: str = "invert") -> list[torch.Tensor]:
        """The EditFn of privacy.session: lists of (3,H,W) images and attribute dicts in, list of edits out.
        ``check``: run step 4 and raise ``EditRefused`` if a row fails every re-do (a session's release).
        Previews of one image share one encoding (one inversion, or one noise draw) across the targets."""
        a = torch.stack([self.attribute_vector(o) for o in originals])  # (B,k)
        a_new = torch.stack([self.attribute_vector(t) for t in targets])  # (B,k)
        if check:
            result = self.edit_checked(torch.stack(list(images)), a, a_new, strength=strength, protected=protected,
                                       encoding=encoding)
            if not bool(result.passed.all()):
                i = int((~result.passed).nonzero()[0])
                raise EditRefused(f"the edit does not show its released values after {int(result.attempts[i])} "
                                  f"attempts ({result.row(i)['shown']}, threshold {self.check_threshold:g}); "
                                  f"not released", result)
            return list(result.images)
        a_inv = self.inversion_attributes(a, protected=protected)  # (B,k), what inversion sees
        if all(im is images[0] for im in images) and bool((a_inv == a_inv[0]).all()):
            # previews of one image: invert once, regenerate every target from the same x_t0
            x_t0 = self.encode(images[0][None], a_inv[:1], strength=strength, protected=protected, encoding=encoding)
            return list(self.regenerate(x_t0.expand(len(images), -1, -1, -1), a_new, strength=strength,
                                        protected=protected))
        return list(self.edit(torch.stack(list(images)), a, a_new, strength=strength, protected=protected,
                              encoding=encoding))
