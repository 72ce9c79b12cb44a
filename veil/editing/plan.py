"""What an edit runs, without torch: the DDIM grid of a strength and the check's re-do ladder.

Both editors use these: ``PrivateEditor`` (torch, ``veil.lightning_modules.editing.editor``) and
``OrtEditor`` (ONNX Runtime, ``veil.export.runtime``, which must not import torch), so the two walk
the same timesteps and re-do the same rows the same way.

Grid: 0, r, 2r, ..., (n-1) r with r = T // n (diffusers' "leading" spacing, steps_offset 0); the
edit at strength s walks 0 .. t0, t0 the grid point nearest s T, so strength 1 starts where
sampling starts. A strength whose t0 is grid point 0 would walk no step at all and release the image as it
is (``--strength 1e-300``): refused, naming the least strength that walks one step at these steps.

Who checks an edit (``check_who_checks``): the check classifier at t = 0 must read each released protected
value before a release is accepted, and in the guided mode that is never the classifier that guided the
edit (its own gradients fool it: a check by the guide is no evidence). A guided edit is checked by a
separate ``--checker`` or released with ``--no-check``; with ``--classifier-scale 0`` the classifier does
not steer, so it is an independent check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from veil.errors import ConfigError
from veil.privacy.levels import check_strength

__all__ = ["RETRY_STRENGTH_STEP", "RETRY_GUIDANCE_FACTOR", "DEFAULT_MAX_RETRIES", "DEFAULT_CHECK_THRESHOLD",
           "sample_grid", "edit_grid", "retry_ladder", "check_check_options", "CheckedEdits", "encoding_mus",
           "min_strength", "check_who_checks", "GUIDE_IS_NO_CHECK"]

RETRY_STRENGTH_STEP = 0.15  # each re-do of an edit that does not show its released values goes this much deeper
RETRY_GUIDANCE_FACTOR = 1.5  # ... and multiplies the guidance (classifier scale, or classifier-free w) by this
DEFAULT_MAX_RETRIES = 2
DEFAULT_CHECK_THRESHOLD = 0.5


def sample_grid(*, num_steps: int, num_train_timesteps: int) -> list[int]:
    """Ascending DDIM grid 0, r, ..., (n-1) r, r = T // n: the full walk of sampling."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(f"={num_steps!r}: must be an integer in [1, {num_train_timesteps}]", option="--steps")
    r = num_train_timesteps // num_steps
    return [k * r for k in range(num_steps)]


def min_strength(*, num_steps: int, num_train_timesteps: int) -> float:
    """The least strength whose edit walks at least one DDIM step: t0 = r needs strength * T / r > 1/2."""
    return (num_train_timesteps // num_steps) / (2 * num_train_timesteps)


def edit_grid(*, strength: float, num_steps: int, num_train_timesteps: int) -> list[int]:
    """Ascending DDIM grid points 0, r, ..., t0, t0 = grid point nearest strength * T; ConfigError naming
    --strength when t0 would be 0 (no step: the image released unchanged)."""
    strength = check_strength(strength, option="--strength")
    grid = sample_grid(num_steps=num_steps, num_train_timesteps=num_train_timesteps)
    if num_steps < 2:
        raise ConfigError(f"={num_steps!r}: an edit needs at least 2 DDIM steps (its grid 0, r, ... ends at the "
                          f"grid point below T: with one step it would walk none)", option="--steps")
    r = num_train_timesteps // num_steps
    k0 = min(num_steps - 1, round(strength * num_train_timesteps / r))
    if k0 < 1:
        raise ConfigError(f"={strength!r}: an edit at this strength walks no DDIM step (at {num_steps} steps it "
                          f"must be above {min_strength(num_steps=num_steps, num_train_timesteps=num_train_timesteps):g}"
                          f") and would release the image unchanged; give a strength in that range, or a named "
                          f"--level", option="--strength")
    return grid[: k0 + 1]


def retry_ladder(strength: float, max_retries: int) -> list[tuple[float, float]]:
    """(strength, guidance factor) of the first try and each re-do: strength + 0.15 per re-do (at most 1),
    guidance x 1.5 per re-do; ``max_retries`` re-dos."""
    return [(min(1.0, strength + i * RETRY_STRENGTH_STEP), RETRY_GUIDANCE_FACTOR**i) for i in range(max_retries + 1)]


def encoding_mus(*, alphas_cumprod, strength: float, encoding: str, num_steps: int, resolution: int,
                 max_retries: int | None) -> list[float]:
    """The Gaussian mu (``veil.privacy.accounting``) of each encoding an edit at ``strength`` may draw: the first
    try and, unless ``max_retries`` is None (no check), every re-do of ``retry_ladder``; [inf] for inversion,
    0 for "fresh" (not read). ``alphas_cumprod``: alpha_prod_t of the schedule, indexable by t."""
    from veil.privacy.accounting import gaussian_mu, image_sensitivity
    from veil.privacy.levels import check_encoding

    check_encoding(encoding)
    ladder = [(strength, 1.0)] if max_retries is None else retry_ladder(strength, max_retries)
    if encoding == "invert":
        return [math.inf]
    if encoding == "fresh":
        return [0.0] * len(ladder)
    sens = image_sensitivity((3, resolution, resolution))
    T = len(alphas_cumprod)
    return [gaussian_mu(signal=float(alphas_cumprod[edit_grid(strength=s, num_steps=num_steps,
                                                              num_train_timesteps=T)[-1]]), sensitivity=sens)
            for s, _ in ladder]


GUIDE_IS_NO_CHECK = (
    ": a guided edit is never checked by the classifier that guided it (its own gradients fool it, so its check is "
    "no evidence); give --checker (another `veil train-classifier` release, e.g. a small classifier of clean images "
    "on the same data: its epsilon counts in the dataset's account like the guide's) or --no-check (the edits are "
    "released unchecked, and the report and the revision say so)")


def check_who_checks(*, guided: bool, checker: bool, check: bool) -> None:
    """The one rule of who checks an edit, applied before anything is loaded: a ``guided`` edit (a classifier
    steers it) that is to be checked (``check``) needs a separate ``checker``; ConfigError naming --checker
    otherwise. (The torch editor never makes its guide the checker: ``PrivateEditor``.)"""
    if guided and check and not checker:
        raise ConfigError(GUIDE_IS_NO_CHECK, option="--checker")


def check_check_options(*, check_threshold, max_retries) -> None:
    """ConfigError naming --check-threshold or --max-retries when out of range."""
    if isinstance(check_threshold, bool) or not isinstance(check_threshold, (int, float)) or \
            not 0 < check_threshold < 1:
        raise ConfigError(f"={check_threshold!r}: must be a probability in (0, 1)", option="--check-threshold")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 5:
        raise ConfigError(f"={max_retries!r}: must be a whole number in [0, 5]", option="--max-retries")



@dataclass(frozen=True)
class CheckedEdits:
    """Edits and what the checker read off them (``edit_checked`` of either editor; torch tensors from
    ``PrivateEditor``, numpy arrays from ``OrtEditor``); B rows, p protected attributes.

    ``shown`` (B,p): P(the edit shows the released value) per protected attribute, final attempt;
    ``passed`` (B,): every protected value at or above the threshold; ``attempts`` (B,): 1 = first try;
    ``strength`` / ``guidance_factor`` (B,): what the final attempt used."""

    images: Any
    shown: Any
    passed: Any
    attempts: Any
    strength: Any
    guidance_factor: Any
    threshold: float
    protected: tuple[str, ...]

    def row(self, i: int) -> dict:
        """JSON-able check of row i, for reports."""
        return {"passed": bool(self.passed[i]), "attempts": int(self.attempts[i]),
                "strength": round(float(self.strength[i]), 4),
                "guidance_factor": round(float(self.guidance_factor[i]), 4),
                "shown": {p: round(float(v), 4) for p, v in zip(self.protected, self.shown[i].tolist())}}
