"""``PrivateEditor``: the edit pipeline (``veil.editing.pipeline``) on torch, and its backend.

    PrivateEditor.from_checkpoint("runs/public", classifier="runs/guide", classifier_scale=10.0, checker="runs/judge")
    load_checkpoint_editor(...)   what ``veil.editing.load.load_editor`` returns for a checkpoint

The orchestration (which attributes inversion sees, the grid, the check and its re-dos, refusal,
attribute guesses, the EditFn) is the pipeline's, shared with ONNX Runtime (``veil.export.runtime``);
``TorchBackend`` runs the walks: ``diffusion.ddim``'s inversion and regeneration (the one DDIM
implementation) in chunks of ``batch_size`` on the model's device, one chunk at a time from the host,
with one of two guidance modes:

    conditional: classifier-free guidance w through the denoiser's attribute path;
    guided:      a label-free (or conditional) denoiser steered by classifier guidance from a
                 noise-conditional attribute classifier (DP-trained, e.g.
                 ``configs/classifier32_guidance.yaml``), towards the pipeline's ``guide_targets``.

The check (the classifier at t = 0 that must read each released value) is ``checker``, or the classifier
given at scale 0 (it does not steer: an independent check). In the guided mode it is never the guide: a
guided editor without a separate checker has no check (``can_check`` False; ``veil.editing.plan.
check_who_checks`` refuses a checked guided edit before anything loads), and a checker with the guide's
weights is refused (``weights_digest``).

Tensors: images (B,3,H,W) float32 in [-1,1], attributes (B,k), on the CPU in and out (the walks move
each chunk to the model's device and back once, not per step). A "noise" encoding draws its noise
from a generator seeded from the OS CSPRNG at each call (``veil.privacy.randomness.secret_seed``),
never from a config seed and never stored: whoever knew it could subtract it and recover
sqrt(alpha_prod_t0) x0 exactly. (``noise=`` passes it in, for tests and export verification only.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from veil.editing.pipeline import EditPipeline, check_guidance
from veil.editing.plan import (
    DEFAULT_CHECK_THRESHOLD,
    DEFAULT_MAX_RETRIES,
    RETRY_GUIDANCE_FACTOR,
    RETRY_STRENGTH_STEP,
    CheckedEdits,
    check_check_options,
)
from veil.errors import ConfigError, EditRefused
from veil.lightning_modules.data.specs import data_location, same_dataset
from veil.lightning_modules.diffusion.ddim import ddim_invert, ddim_regenerate, edit_timesteps
from veil.lightning_modules.diffusion.guidance import GuidanceClassifier
from veil.lightning_modules.diffusion.schedule import alphas_cumprod_table, q_sample
from veil.privacy.randomness import secret_seed

__all__ = ["PrivateEditor", "TorchBackend", "load_checkpoint_editor", "CheckedEdits", "EditRefused", "model_costs",
           "RETRY_STRENGTH_STEP", "RETRY_GUIDANCE_FACTOR", "weights_digest"]


def weights_digest(classifier: GuidanceClassifier) -> str:
    """sha256 of a classifier's weights (every tensor of its state dict: name, dtype, shape, bytes): the same
    release, copied or renamed, has the same digest."""
    import hashlib

    h = hashlib.sha256()
    for name, value in sorted(classifier.model.state_dict().items()):
        v = value.detach().cpu().contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_not_the_guide(guide: GuidanceClassifier | None, checker: GuidanceClassifier | None) -> None:
    """ConfigError naming --checker when the checker is the guide (the same object, or the same weights)."""
    if guide is None or checker is None:
        return
    if checker is guide or checker.model is guide.model or weights_digest(checker) == weights_digest(guide):
        raise ConfigError(": the same weights as --classifier, the classifier that guides the edit; a check by "
                          "the guide is no evidence (its own gradients fool it): give another `veil train-classifier` "
                          "release, or --no-check", option="--checker")


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


class TorchBackend:
    """``veil.editing.backend.EditBackend`` on torch: a denoiser, its schedule, the guidance classifier
    (``guide``: guided mode) and the check classifier (``checker``)."""

    def __init__(self, model, scheduler_config: Mapping[str, Any], attribute_names: Sequence[str], *,
                 guidance_scale: float, clip_sample: bool | None, batch_size: int, guide: GuidanceClassifier | None,
                 checker: GuidanceClassifier | None, label_free: bool):
        self.model = model.eval()
        self.attribute_names = list(attribute_names)
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.guidance_scale = float(guidance_scale)
        self.clip_sample = bool(scheduler_config.get("clip_sample", True) if clip_sample is None else clip_sample)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.alphas_cumprod = alphas_cumprod_table(scheduler_config).to(self.device)  # (T,)
        self.guide, self.checker, self.label_free = guide, checker, bool(label_free)

    @property
    def mode(self) -> str:
        return "guided" if self.guide is not None else "conditional"

    @property
    def classifiers(self) -> dict[str, list[str]]:
        roles = {"guidance": self.guide, "check": self.checker}
        return {role: list(clf.attribute_names) for role, clf in roles.items() if clf is not None}

    # -- arrays ------------------------------------------------------------------------------------------
    def asarray(self, values) -> torch.Tensor:
        if isinstance(values, (list, tuple)):
            return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values])
        return torch.as_tensor(values, dtype=torch.float32)

    def to_host(self, values) -> np.ndarray:
        return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)

    def from_host(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values))

    def _chunks(self, *tensors):
        for i in range(0, tensors[0].shape[0], self.batch_size):
            yield [x[i : i + self.batch_size].to(self.device) for x in tensors]

    # -- the walks ---------------------------------------------------------------------------------------
    def _denoiser_attrs(self, a: torch.Tensor) -> torch.Tensor:
        """What the denoiser is given for attributes ``a`` (B, k): a label-free one only ever sees zeros, as wide
        as it was built (its own, meaningless names), whatever attributes the guide and the data have."""
        return a.new_zeros(a.shape[0], self.model.num_attributes) if self.label_free else a

    def invert(self, images, attributes, *, timesteps, guidance: float) -> torch.Tensor:
        ts = torch.tensor(list(timesteps), dtype=torch.long)
        return torch.cat([ddim_invert(self.model, x, self._denoiser_attrs(a), self.alphas_cumprod, ts, guidance).cpu()
                          for x, a in self._chunks(images, attributes)])

    def add_noise(self, images, *, t0: int, noise) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(secret_seed()))
        t = torch.full((images.shape[0],), t0, dtype=torch.long, device=images.device)
        return q_sample(images, self.alphas_cumprod.to(images.device), t, torch.as_tensor(noise).to(images))

    def regenerate(self, x_t0, targets, *, timesteps, guidance_factor: np.ndarray, guide_targets,
                   on_step=None) -> torch.Tensor:
        if on_step is not None:
            raise NotImplementedError("on_step: live previews of each step run on the ONNX Runtime backend")
        ts = torch.tensor(list(timesteps), dtype=torch.long)
        factor = torch.from_numpy(guidance_factor)  # (B,) float32
        if self.guide is None:  # conditional: classifier-free guidance w x factor ((b,) tensor if it varies)
            uniform = bool((factor == factor[0]).all())
            return torch.cat([ddim_regenerate(self.model, x, a, self.alphas_cumprod, ts,
                                              self.guidance_scale * float(f[0]) if uniform else self.guidance_scale * f,
                                              self.clip_sample).cpu()
                              for x, a, f in self._chunks(x_t0, targets, factor)])
        g_targets = self.guide.targets_for(guide_targets, self.attribute_names)  # (B, k_clf)
        w = 1.0 if self.label_free else self.guidance_scale
        out = []
        for x, a, gt, f in self._chunks(x_t0, targets, g_targets, factor):
            guide = dataclasses.replace(self.guide, scale=self.guide.scale * f)  # (b,) scales
            out.append(ddim_regenerate(self.model, x, self._denoiser_attrs(a), self.alphas_cumprod, ts, w,
                                       self.clip_sample, guide=guide, guide_targets=gt).cpu())
        return torch.cat(out)

    def logits(self, images) -> np.ndarray:
        return self.checker.logits(images).numpy()


class PrivateEditor(EditPipeline):
    """The edit pipeline on a loaded denoiser (and, for the guided mode, a guidance classifier); also the
    sessions' ``EditFn``. Methods and the math: ``EditPipeline``; tensors in and out.

    ``guide`` (a ``GuidanceClassifier`` with scale > 0) selects the guided mode; ``checker`` is the classifier of
    the check: never the guide (ConfigError if it has the guide's weights), so a guided editor without one
    cannot check (``can_check`` False); a ``guide`` at scale 0 does not steer and checks (unless ``checker``
    is given). ``label_free``: the denoiser was trained without attribute labels (``cond_drop_prob`` 1), so it
    is only ever given zeros, and needs ``guide`` to edit; its attribute names mean nothing then, and
    ``from_models`` takes the editor's attributes from the guide (the guide and the dataset's CSV decide them).
    """

    def __init__(self, model, scheduler_config: Mapping[str, Any], attribute_names: Sequence[str], *,
                 num_steps: int = 50, guidance_scale: float = 2.0, inversion_guidance: float = 1.0,
                 clip_sample: bool | None = None, batch_size: int = 64, guide: GuidanceClassifier | None = None,
                 checker: GuidanceClassifier | None = None, label_free: bool = False, keep_unprotected: bool = True,
                 check_threshold: float = DEFAULT_CHECK_THRESHOLD, max_retries: int = DEFAULT_MAX_RETRIES):
        guidance_scale = check_guidance("--guidance", guidance_scale)
        check_guidance("inversion_guidance", inversion_guidance)
        check_check_options(check_threshold=check_threshold, max_retries=max_retries)
        if guide is not None and not guide.scale > 0:  # scale 0: the classifier does not steer, it only checks
            guide, checker = None, guide if checker is None else checker
        _check_not_the_guide(guide, checker)  # the check is never the model that guided the edit
        if label_free and guide is None:
            raise ConfigError(": this denoiser was trained without attribute labels, so it cannot edit attributes by "
                              "itself; give --classifier (a noise-conditional attribute classifier, `veil "
                              "train-classifier` with model.noise_conditional) and --classifier-scale > 0",
                              option="--checkpoint")
        engine = TorchBackend(model, scheduler_config, attribute_names, guidance_scale=guidance_scale,
                              clip_sample=clip_sample, batch_size=batch_size, guide=guide,
                              checker=checker, label_free=label_free)
        super().__init__(engine, num_steps=num_steps, inversion_guidance=inversion_guidance,
                         keep_unprotected=keep_unprotected, check_threshold=check_threshold, max_retries=max_retries)
        self.scheduler_config = dict(scheduler_config)
        self.checkpoint = None  # the loaded release and --classifier, when loaded from files (from_models)
        self.classifier: GuidanceClassifier | None = None
        self._judge: GuidanceClassifier | None = None

    # -- the torch facts (the exporter traces these) -------------------------------------------------------
    @property
    def model(self):
        return self.engine.model

    @model.setter
    def model(self, model) -> None:  # e.g. torch.compile(editor.model)
        self.engine.model = model

    @property
    def guide(self) -> GuidanceClassifier | None:
        return self.engine.guide

    @property
    def checker(self) -> GuidanceClassifier | None:
        return self.engine.checker

    @checker.setter
    def checker(self, checker: GuidanceClassifier | None) -> None:
        self.engine.checker = checker

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.engine.alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def clip_sample(self) -> bool:
        return self.engine.clip_sample

    @property
    def classifier_scale(self) -> float:
        """The classifier guidance scale s (0 without a guidance classifier)."""
        return float(self.guide.scale) if self.guide is not None else 0.0

    @property
    def resolution(self) -> int:
        return int(self.model.unet.config.sample_size)

    def timesteps(self, strength: float) -> torch.Tensor:
        """Ascending DDIM grid points 0, r, ..., t0 (int64 tensor)."""
        return edit_timesteps(strength=strength, num_steps=self.num_steps, num_train_timesteps=self.num_train_timesteps)

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, *, use_ema: bool = True, classifier=None, classifier_scale: float = 10.0,
                        checker=None, **kwargs) -> "PrivateEditor":
        """The editor of a ``veil train`` release; with ``classifier`` (a ``veil train-classifier`` release)
        and ``classifier_scale`` > 0 the guided mode, with scale 0 the classifier only checks; ``checker``
        (another classifier release) checks instead of it, and is the only check of a guided edit.
        ``kwargs``: the constructor's."""
        ckpt, guide, judge = _load_models(path, use_ema=use_ema, classifier=classifier,
                                          classifier_scale=classifier_scale, checker=checker)
        return cls.from_models(ckpt, classifier=guide, checker=judge, **kwargs)

    @classmethod
    def from_models(cls, ckpt, *, classifier: GuidanceClassifier | None = None,
                    checker: GuidanceClassifier | None = None, **kwargs) -> "PrivateEditor":
        """The editor of a loaded release ``ckpt``, with its ``costs``, ``model_privacy`` and ``data_spec``
        (the classifier's data when it has one: the private data it was trained on)."""
        from veil.lightning_modules.diffusion.sample import combined_privacy

        label_free = ckpt.cond_drop_prob == 1.0
        # a label-free denoiser never sees attributes: its recorded names (those of its public training data) are
        # ignored, and the guide's are the edit's, so a public label-free model edits any attribute set
        names = classifier.attribute_names if label_free and classifier is not None else ckpt.attribute_names
        editor = cls(ckpt.model, ckpt.scheduler_config, names, guide=classifier, checker=checker,
                     label_free=label_free, **kwargs)
        editor.checkpoint, editor.classifier, editor._judge = ckpt, classifier, checker
        editor.data_spec = classifier.data_spec if classifier is not None and classifier.data_spec else ckpt.data_spec
        editor.costs = editor.models_cost()
        editor.model_privacy = combined_privacy(ckpt, classifier)
        if checker is not None:  # its cost is its own; on the same data as another model, the epsilons add
            editor.model_privacy += (f"; check classifier: {editor.costs[-1]['privacy']} on {editor.costs[-1]['data']}"
                                     f" (on the same data as another model, their epsilons and deltas add)")
        return editor

    def models_cost(self, *, edited: Mapping[str, Any] | None = None) -> list[dict] | None:
        """``model_costs`` of the loaded models; ``edited`` (the data spec being edited) marks each model's
        ``edited_data``."""
        if self.checkpoint is None:
            return self.costs
        return model_costs(self.checkpoint, self.classifier, edited=edited, checker=self._judge)


def _load_models(path, *, use_ema: bool, classifier, classifier_scale: float, checker):
    """(the ``veil train`` release, the --classifier (steering, or checking only at scale 0), the --checker)."""
    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil.lightning_modules.diffusion.guidance import load_guidance_classifier

    ckpt = load_diffusion_checkpoint(path, use_ema=use_ema)
    guide = None if classifier is None else load_guidance_classifier(
        classifier, scheduler_config=ckpt.scheduler_config, scale=classifier_scale, check_only=classifier_scale == 0)
    judge = None if checker is None else load_guidance_classifier(
        checker, scheduler_config=ckpt.scheduler_config, scale=0.0, check_only=True)
    return ckpt, guide, judge


def load_checkpoint_editor(path, *, classifier=None, checker=None, classifier_scale: float = 10.0,
                           guidance: float | None = None, use_ema: bool = True, **kwargs) -> PrivateEditor:
    """``load_editor`` for a ``veil train`` release: ``guidance`` None is the checkpoint's default (2, or 0 for
    a label-free denoiser); ``kwargs``: the constructor's (num_steps, keep_unprotected, check_threshold, ...)."""
    from veil.lightning_modules.diffusion.sample import default_guidance

    ckpt, guide, judge = _load_models(path, use_ema=use_ema, classifier=classifier,
                                      classifier_scale=classifier_scale, checker=checker)
    return PrivateEditor.from_models(ckpt, classifier=guide, checker=judge,
                                     guidance_scale=default_guidance(ckpt) if guidance is None else guidance, **kwargs)
