"""``EditPipeline``: the private edit, once, over any ``EditBackend`` (torch or ONNX Runtime); no torch.

Editing images x0 (B,3,H,W) in [-1,1] with their attributes a and released (privatized) attributes a~:

    1. t0 = the DDIM grid point nearest strength * T (``plan.edit_grid``);
    2. encode x0 at t0 without the true protected values, by the level's ``encoding``:
         "invert": DDIM inversion up the grid, under ``inversion_attributes(a)``: a with the PROTECTED
                   entries set to 0 (unknown), all zeros for a label-free denoiser; guidance
                   ``inversion_guidance`` (1 for a label-free one). Nearly invertible: it keeps the face,
                   and so what the pixels say about the protected values;
         "noise":  the forward process q(x_t0 | x0) with fresh secret noise (SDEdit) of x0 clipped to
                   [-1, 1]: only sqrt(alpha_prod_t0) of the image survives, a Gaussian mechanism priced by
                   ``pixel_mus`` (veil.privacy.accounting);
         "fresh":  the forward process of a blank image: pure noise, the image is not read (priced 0);
    3. regenerate from x_t0 down to a clean image towards a~ (classifier-free guidance, or classifier
       guidance towards ``guide_targets(a~)``: the released protected values and, with
       ``keep_unprotected``, the current unprotected ones);
    4. (``edit_checked``) the check classifier at t = 0 reads each released protected value off the
       edit; rows where P(shows the released value) < ``check_threshold`` are re-done along
       ``plan.retry_ladder`` (deeper and more guided), and rows that still fail are refused: an EditFn
       call with ``check=True`` raises ``EditRefused``; never released silently.

Step 2 never sees the true protected values: inverting under them would write them into x_t0, outside
the randomized response. This module is the only place that builds what inversion sees
(``inversion_attributes``); the backend's ``invert`` gets nothing else. Both walks are deterministic
(DDIM, eta = 0); a "noise" encoding draws its noise inside the backend from the OS CSPRNG.

Arrays are the backend's (see ``veil.editing.backend``): ``PrivateEditor`` takes and returns torch
tensors, ``OrtEditor`` numpy arrays; the EditFn call (``editor(images, originals=..., targets=...)``)
takes lists of (3,H,W) images and attribute dicts, as ``veil.privacy.session`` passes them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from veil.editing.backend import Array, EditBackend, OnStep
from veil.editing.plan import (
    DEFAULT_CHECK_THRESHOLD,
    DEFAULT_MAX_RETRIES,
    CheckedEdits,
    check_check_options,
    edit_grid,
    encoding_mus,
    retry_ladder,
)
from veil.errors import ConfigError, EditRefused
from veil.privacy.levels import check_encoding

__all__ = ["EditPipeline", "check_guidance"]

NO_CLASSIFIER = ("checking an edit or guessing attributes needs a check classifier: give --checker (or, without "
                 "guidance, --classifier at --classifier-scale 0; an export brings its own: `veil export --checker`); a "
                 "guided edit is never checked by its guide")


def check_guidance(option: str, w) -> float:
    """ConfigError naming ``option`` unless ``w`` is a finite number >= 0."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ConfigError(f"={w!r}: must be a finite number >= 0 (1 = plain conditional)", option=option)
    return float(w)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z) without overflow


class EditPipeline:
    """The private edit over ``engine`` (an ``EditBackend``); also the sessions' ``EditFn``.

    ``backend`` names the guidance mode ("guided" or "conditional", the engine's ``mode``); ``engine``
    is the runtime that walks the grid. Knobs of the edit itself live here and may be changed between
    calls: ``num_steps``, ``inversion_guidance``, ``keep_unprotected``, ``check_threshold``, ``max_retries``.
    ``costs`` / ``model_privacy`` / ``data_spec``: what the models cost and which data they are about, set
    by whoever loads them (``veil.editing.load.load_editor``).
    """

    def __init__(self, engine: EditBackend, *, num_steps: int, inversion_guidance: float = 1.0,
                 keep_unprotected: bool = True, check_threshold: float = DEFAULT_CHECK_THRESHOLD,
                 max_retries: int = DEFAULT_MAX_RETRIES):
        self.inversion_guidance = check_guidance("inversion_guidance", inversion_guidance)
        check_check_options(check_threshold=check_threshold, max_retries=max_retries)
        edit_grid(strength=1.0, num_steps=num_steps, num_train_timesteps=engine.num_train_timesteps)  # validate
        self.engine = engine
        self.num_steps, self.keep_unprotected = num_steps, bool(keep_unprotected)
        self.check_threshold, self.max_retries = float(check_threshold), max_retries
        self.costs: list[dict] | None = None
        self.model_privacy: str | None = None
        self.data_spec: dict | None = None

    # -- facts of the engine ---------------------------------------------------------------------------
    @property
    def attribute_names(self) -> list[str]:
        return self.engine.attribute_names

    @property
    def backend(self) -> str:
        """"guided" (a classifier steers the denoiser) or "conditional" (classifier-free guidance)."""
        return self.engine.mode

    @property
    def label_free(self) -> bool:
        return self.engine.label_free

    @property
    def guidance_scale(self) -> float:
        return self.engine.guidance_scale

    @property
    def num_train_timesteps(self) -> int:
        return self.engine.num_train_timesteps

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def can_check(self) -> bool:
        return "check" in self.engine.classifiers

    def models_cost(self, *, edited: Mapping[str, Any] | None = None) -> list[dict] | None:
        """What each model that makes the edit cost (``costs``); a backend that knows the models' data
        marks the ones trained on ``edited`` (a data spec), whose images then pay it too."""
        return self.costs

    # -- arrays and attributes ---------------------------------------------------------------------------
    def asarray(self, values) -> Array:
        """Images or attributes (an array, or a sequence of (3,H,W) / (k,) rows) as this editor's float32
        arrays: torch tensors on the torch backend, numpy on ONNX Runtime."""
        return self.engine.asarray(values)

    def _row(self, attributes: Mapping[str, int]) -> np.ndarray:
        unknown = sorted(set(attributes) - set(self.attribute_names))
        if unknown:
            raise ConfigError(f"attributes {unknown} are not known to the model ({self.attribute_names})")
        return np.array([float(attributes.get(n, 0)) for n in self.attribute_names], dtype=np.float32)

    def attribute_vector(self, attributes: Mapping[str, int]) -> Array:
        """{name: -1|0|+1} -> (k,) float in the model's attribute order; names not given are unknown (0)."""
        return self.engine.from_host(self._row(attributes))

    def attribute_matrix(self, rows: Sequence[Mapping[str, int]]) -> Array:
        """A list of attribute dicts -> (B,k), as ``attribute_vector`` per row."""
        return self.engine.from_host(np.stack([self._row(r) for r in rows]))

    def protected_mask(self, protected: Sequence[str]) -> np.ndarray:
        """Protected attribute names -> (k,) bool (numpy), True in their columns; ConfigError (option
        ``--protect``) if none, unknown to the model, or unknown to a classifier that must read them."""
        names = self.attribute_names
        if isinstance(protected, str) or not protected:
            raise ConfigError(f"={protected!r}: name at least one attribute to protect, as a list of names from "
                              f"{names}", option="--protect")
        unknown = sorted(set(protected) - set(names))
        if unknown:
            raise ConfigError(f": {unknown} are not attributes of the model ({names})", option="--protect")
        for role, known in self.engine.classifiers.items():
            missing = sorted(set(protected) - set(known))
            if missing:
                which = "the check classifier (--checker, or --classifier at scale 0)" if role == "check" else \
                    "the guidance classifier (--classifier)"
                raise ConfigError(f": {which} does not know {missing} (it knows {list(known)}); give one trained on "
                                  f"every protected attribute", option="--protect")
        return np.array([n in set(protected) for n in names])

    def inversion_attributes(self, originals: Array, *, protected: Sequence[str]) -> Array:
        """originals (B,k) -> (B,k) what inversion sees: the protected columns set to 0 (unknown); all of
        them 0 for a label-free denoiser. The one place that decides it (step 2 of the module docstring)."""
        a = self.engine.to_host(originals)
        if a.ndim != 2 or a.shape[1] != len(self.attribute_names):
            raise ValueError(f"attributes {tuple(a.shape)}: expected (B, {len(self.attribute_names)})")
        masked = np.where(self.protected_mask(protected), 0.0, a).astype(np.float32)
        return self.engine.from_host(np.zeros_like(masked) if self.label_free else masked)

    def guide_targets(self, targets: Array, *, protected: Sequence[str]) -> Array:
        """targets (B,k) -> what classifier guidance steers to: the released protected values and, with
        ``keep_unprotected``, the current values of the others (a release publishes them exactly)."""
        if self.keep_unprotected:
            return targets
        keep = self.protected_mask(protected)
        return self.engine.from_host(np.where(keep, self.engine.to_host(targets), 0.0).astype(np.float32))

    # -- steps 1-3 -----------------------------------------------------------------------------------------
    def _grid(self, strength: float) -> list[int]:
        return edit_grid(strength=strength, num_steps=self.num_steps, num_train_timesteps=self.num_train_timesteps)

    def timesteps(self, strength: float) -> list[int]:
        """Ascending DDIM grid 0, r, ..., t0 of an edit at ``strength`` (step 1)."""
        return self._grid(strength)

    def invert(self, images: Array, originals: Array, *, strength: float, protected: Sequence[str]) -> Array:
        """images (B,3,H,W), originals (B,k) -> x_t0 (B,3,H,W), inverted with the protected entries unknown."""
        a = self.inversion_attributes(originals, protected=protected)  # (B,k), protected columns 0
        w = 1.0 if self.label_free else self.inversion_guidance
        return self.engine.invert(self.engine.asarray(images), a, timesteps=self._grid(strength), guidance=w)

    def encode(self, images: Array, originals: Array, *, strength: float, protected: Sequence[str],
               encoding: str = "invert", noise: Array | None = None) -> Array:
        """Step 2: images (B,3,H,W) -> x_t0 by ``encoding`` ("invert" or "noise"). ``noise`` (B,3,H,W) replaces
        the secret encoding noise; tests and export verification only (a release must never pass it)."""
        check_encoding(encoding)
        if encoding == "invert":
            if noise is not None:
                raise ConfigError("noise=: DDIM inversion takes no noise (only the 'noise' encoding does)")
            return self.invert(images, originals, strength=strength, protected=protected)
        self.protected_mask(protected)  # the same checks as inversion makes
        x = self.engine.asarray(images)
        if noise is not None and tuple(noise.shape) != tuple(x.shape):
            raise ValueError(f"noise {tuple(noise.shape)}: expected the images' shape {tuple(x.shape)}")
        if encoding == "fresh":  # the image is not read: x_t0 is the forward process of a blank, pure noise
            x = self.engine.from_host(np.zeros(tuple(x.shape), dtype=np.float32))
        else:  # the Gaussian mechanism's sensitivity holds only for images in the domain: enforce it
            x = self.engine.from_host(np.clip(self.engine.to_host(x), -1.0, 1.0).astype(np.float32))
        return self.engine.add_noise(x, t0=self._grid(strength)[-1], noise=noise)

    def signal_fraction(self, strength: float) -> float:
        """alpha_prod at the t0 of ``strength``: the share sqrt(.) of the image that survives a "noise" encoding."""
        return float(np.asarray(self.engine.to_host(self.engine.alphas_cumprod), dtype=np.float64)[self._grid(strength)[-1]])

    def pixel_mus(self, *, strength: float, encoding: str, check: bool) -> list[float]:
        """The Gaussian mu of each encoding an edit at ``strength`` may draw (``veil.privacy.accounting``): the
        first try and, with ``check``, every re-do of ``retry_ladder``; [inf] for inversion, 0 for "fresh"."""
        alphas = np.asarray(self.engine.to_host(self.engine.alphas_cumprod), dtype=np.float64)
        return encoding_mus(alphas_cumprod=alphas, strength=strength, encoding=encoding, num_steps=self.num_steps,
                            resolution=self.resolution, max_retries=self.max_retries if check and self.can_check
                            else None)

    def regenerate(self, x_t0: Array, targets: Array, *, strength: float, protected: Sequence[str],
                   guidance_factor=1.0, on_step: OnStep | None = None) -> Array:
        """Step 3: x_t0 (B,3,H,W), targets (B,k) -> edits (B,3,H,W) in [-1,1]. ``guidance_factor`` (float or (B,))
        multiplies each row's guidance (the re-dos of ``edit_checked``); ``on_step(i, n, pred_x0)`` is called
        after each step with the predicted clean images (live previews; ONNX Runtime backend)."""
        x_t0, targets = self.engine.asarray(x_t0), self.engine.asarray(targets)
        factor = np.array(np.broadcast_to(self.engine.to_host(guidance_factor), (x_t0.shape[0],)), dtype=np.float32)
        guided = self.guide_targets(targets, protected=protected) if self.backend == "guided" else None
        return self.engine.regenerate(x_t0, targets, timesteps=self._grid(strength),
                                      guidance_factor=factor, guide_targets=guided,
                                      on_step=on_step)

    def edit(self, images: Array, originals: Array, targets: Array, *, strength: float, protected: Sequence[str],
             guidance_factor=1.0, encoding: str = "invert", noise: Array | None = None) -> Array:
        """Batched private edit (steps 1-3): (B,3,H,W), (B,k), (B,k) -> (B,3,H,W), a new array."""
        images = self.engine.asarray(images)
        originals, targets = self.engine.asarray(originals), self.engine.asarray(targets)
        if images.ndim != 4 or tuple(originals.shape) != tuple(targets.shape) or originals.shape[0] != images.shape[0]:
            raise ValueError(f"edit: images {tuple(images.shape)}, originals {tuple(originals.shape)}, "
                             f"targets {tuple(targets.shape)} do not line up as (B,3,H,W), (B,k), (B,k)")
        x_t0 = self.encode(images, originals, strength=strength, protected=protected, encoding=encoding, noise=noise)
        return self.regenerate(x_t0, targets, strength=strength, protected=protected, guidance_factor=guidance_factor)

    # -- step 4: does the edit show what it releases? ---------------------------------------------------------
    def logits(self, images: Array) -> np.ndarray:
        """The check classifier's logits (B, k_clf) of clean images, on the host."""
        if not self.can_check:
            raise ConfigError(NO_CLASSIFIER)
        return self.engine.logits(self.engine.asarray(images))

    def shown(self, edited: Array, targets: Array, *, protected: Sequence[str]) -> Array:
        """(B,p): the checker's P(the edit shows the released value) for each protected attribute (NaN where
        the target is 0: nothing was released to show)."""
        if not self.can_check:
            raise ConfigError(NO_CLASSIFIER)
        mask = self.protected_mask(protected)
        z = self.logits(edited)  # (B, k_clf)
        known = list(self.engine.classifiers["check"])
        cols = np.flatnonzero(mask)
        t = self.engine.to_host(targets)[:, cols].astype(np.float32)  # (B,p)
        p = _sigmoid(z[:, [known.index(self.attribute_names[c]) for c in cols]] * t)
        return self.engine.from_host(np.where(t != 0, p, np.nan).astype(np.float32))

    def retry_ladder(self, strength: float) -> list[tuple[float, float]]:
        """(strength, guidance factor) of the first try and each re-do (``plan.retry_ladder``)."""
        return retry_ladder(strength, self.max_retries)

    def edit_checked(self, images: Array, originals: Array, targets: Array, *, strength: float,
                     protected: Sequence[str], encoding: str = "invert") -> CheckedEdits:
        """Steps 1-4: edit, check each row shows its released protected values, re-do the rows that do not
        along ``retry_ladder`` (a "noise" re-do draws fresh noise); rows failing every attempt have ``passed``
        False (the caller refuses them)."""
        images = self.engine.asarray(images)
        originals, targets = self.engine.asarray(originals), self.engine.asarray(targets)
        mask = self.protected_mask(protected)
        b = images.shape[0]
        out = None
        shown = np.zeros((b, int(mask.sum())), dtype=np.float32)
        attempts = np.zeros(b, dtype=np.int64)
        used_s, used_g = np.zeros(b, dtype=np.float32), np.zeros(b, dtype=np.float32)
        pending = np.arange(b)
        for k, (s, g) in enumerate(self.retry_ladder(strength)):
            edited = self.edit(images[pending], originals[pending], targets[pending], strength=s, protected=protected,
                               guidance_factor=g, encoding=encoding)
            p = self.engine.to_host(self.shown(edited, targets[pending], protected=protected))
            if out is None:
                out = edited  # the first try edits every row (a new array); re-dos overwrite theirs
            else:
                out[pending] = edited
            shown[pending], attempts[pending], used_s[pending], used_g[pending] = p, k + 1, s, g
            pending = pending[~(p >= self.check_threshold).all(axis=1)]
            if not len(pending):
                break
        passed = (shown >= self.check_threshold).all(axis=1)
        host = self.engine.from_host
        return CheckedEdits(out, host(shown), host(passed), host(attempts), host(used_s), host(used_g),
                            self.check_threshold, tuple(n for n in self.attribute_names if n in set(protected)))

    def refuse_failed(self, checked: CheckedEdits) -> None:
        """Raise ``EditRefused`` naming the first row of ``checked`` that failed every attempt, if any."""
        failed = np.flatnonzero(~self.engine.to_host(checked.passed).astype(bool))
        if len(failed):
            i = int(failed[0])
            raise EditRefused(f"the edit does not show its released values after {int(checked.attempts[i])} "
                              f"attempts ({checked.row(i)['shown']}, threshold {self.check_threshold:g}); "
                              f"not released", checked)

    def propose(self, images: Array) -> list[dict[str, dict]]:
        """Attributes of images that arrive without labels, guessed by the check classifier at t = 0: per image
        {name: {"value": -1|+1, "confidence": P}} (value 0, confidence 0 where it does not know the attribute).
        The owner may correct them before an edit."""
        z = self.logits(images)
        known = list(self.engine.classifiers["check"])
        return [{n: ({"value": 1 if zr[known.index(n)] >= 0 else -1,
                      "confidence": round(float(_sigmoid(abs(float(zr[known.index(n)])))), 4)}
                     if n in known else {"value": 0, "confidence": 0.0}) for n in self.attribute_names}
                for zr in z]

    # -- the sessions' EditFn ----------------------------------------------------------------------------------
    def __call__(self, images: Sequence[Array], *, originals: Sequence[Mapping[str, int]],
                 targets: Sequence[Mapping[str, int]], strength: float, protected: Sequence[str],
                 check: bool = False, encoding: str = "invert") -> list[Array]:
        """The EditFn of privacy.session: lists of (3,H,W) images and attribute dicts in, list of edits out.
        ``check``: run step 4 and raise ``EditRefused`` if a row fails every re-do (a session's release).
        Previews of one image share one encoding (one inversion, or one noise draw) across the targets."""
        a, a_new = self.attribute_matrix(originals), self.attribute_matrix(targets)  # (B,k) each
        x = self.engine.asarray(list(images))  # (B,3,H,W)
        if check:
            result = self.edit_checked(x, a, a_new, strength=strength, protected=protected, encoding=encoding)
            self.refuse_failed(result)
            return list(result.images)
        a_inv = self.inversion_attributes(a, protected=protected)  # (B,k), what inversion sees
        seen = self.engine.to_host(a_inv)
        if all(im is images[0] for im in images) and bool((seen == seen[0]).all()):
            # previews of one image: encode once, regenerate every target from the same x_t0
            x_t0 = self.encode(x[:1], a_inv[:1], strength=strength, protected=protected, encoding=encoding)
            return list(self.regenerate(x_t0[[0] * len(images)], a_new, strength=strength, protected=protected))
        return list(self.edit(x, a, a_new, strength=strength, protected=protected, encoding=encoding))
