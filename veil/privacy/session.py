"""EditSession: one image, its owner's choices, previews, feedback and (at most) one release.

    ledger = PrivacyLedger.for_dataset(dm.dataset_spec())   # the dataset's one privacy database
    session = EditSession(image_id="synth-0-000007", image=x, attributes={"smiling": 1, ...},
                          protected=["smiling"], editor=private_editor, ledger=ledger, level="medium")
    candidates = session.preview()          # what a release could look like; spends nothing
    session.feedback("more_private")        # medium -> high (previews again if you like)
    outcome = session.feedback("accept")    # one fresh release: budget checked, spent, recorded

A release publishes every attribute of the image: the protected ones through randomized response,
the others exactly; the ledger charges each protected (image, attribute) and refuses a release that
would publish exactly what an earlier one protected (see veil.privacy.ledger).

Feedback is ``more_private | less_private | accept | reject``. Previews go to the owner only and
cost no budget. ``accept`` releases a *fresh* draw, not one of the previews: if the owner could pick
among previews, they could pick the one whose protected attributes were kept, and the released
value would no longer be randomized response at epsilon (with 4 previews at eps=1, the chance
that at least one keeps the true value is 99%).

An editor that can check its edits (``can_check``: PrivateEditor with a classifier) is asked to on
``accept``: an edit that does not show its released protected values even after its re-dos is
refused (``EditRefused``): the release is recorded as refused and charged (the draw happened, and the
refusal depends on it), the session closes with decision "refused", and nothing is published. An
editor without a check releases unchecked, and the release says so (``Release.checked``).

The session is plain Python (no torch): the edit is injected as an ``EditFn`` (PrivateEditor in
veil.lightning_modules.editing.editor, or an ONNX Runtime editor in serving), and images are whatever
that editor takes and returns. The editor is told which attributes are protected: its inversion must
not see their true values. ``accept`` releases through ``veil.privacy.release.release``, the one release
function (the edit job and the server call it too); a second accept raises ``SessionClosed``, as the
server does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from veil.errors import ConfigError, EditRefused, PrivacyError
from veil.privacy.ledger import PrivacyLedger, ReleaseRecord
from veil.privacy.levels import PrivacyLevel, less_private, more_private, resolve_level
from veil.privacy.mechanism import derive_seed, outcome_probability, privatize, secure_seed
from veil.privacy.release import Edited, draw_release, release

__all__ = ["EditFn", "Candidate", "Release", "FeedbackOutcome", "EditSession", "SessionClosed", "draw_release",
           "ACTIONS"]

ACTIONS = ("more_private", "less_private", "accept", "reject")


class SessionClosed(PrivacyError):
    """The session was already decided (accepted, refused or rejected): a session releases at most once, so a
    second accept is refused; start a new session to release again (at a further cost)."""


class EditFn(Protocol):
    """Edit ``images[i]`` (with attributes ``originals[i]``) towards ``targets[i]``; one output per input.

    ``protected`` names the attributes being privatized: the edit must not condition on their
    values in ``originals`` (inversion sees them as unknown). ``encoding`` is the level's ("invert" or
    "noise", see veil.privacy.levels). An editor with ``can_check`` True also takes ``check=True`` (a
    release) and then raises ``EditRefused`` for an edit that does not show its released values.
    """

    def __call__(self, images: Sequence[Any], *, originals: Sequence[Mapping[str, int]],
                 targets: Sequence[Mapping[str, int]], strength: float, protected: Sequence[str],
                 encoding: str) -> Sequence[Any]: ...


@dataclass(frozen=True)
class Candidate:
    """A preview: released attributes a release *could* have, the edit, and the chance of that outcome."""

    released_attributes: dict[str, int]
    image: Any
    level: PrivacyLevel
    probability: float  # P(released_attributes | original) under the level's randomized response


@dataclass(frozen=True)
class Release:
    """An accepted, recorded release: the edited image and the ledger row that paid for it."""

    record: ReleaseRecord
    image: Any
    original_attributes: dict[str, int]
    released_attributes: dict[str, int]
    checked: bool = False  # the editor's classifier confirmed the edit shows the released values


@dataclass(frozen=True)
class FeedbackOutcome:
    action: str
    level: PrivacyLevel
    decision: str | None  # None while open, then "accepted", "refused" (the edit failed its check) or "rejected"
    release: Release | None = None


class EditSession:
    """The owner's edit of one image: previews, feedback moving the level, one release on accept."""

    def __init__(self, *, image_id: str, image: Any, attributes: Mapping[str, int], protected: Sequence[str],
                 editor: EditFn, ledger: PrivacyLedger, level: str | PrivacyLevel = "medium",
                 seed: int | None = None, num_previews: int = 4):
        self.image_id, self.image, self.editor, self.ledger = str(image_id), image, editor, ledger
        self.attributes = {str(k): int(v) for k, v in attributes.items()}
        self.protected = [str(p) for p in protected]
        if not self.protected:
            raise ConfigError(": name at least one attribute to protect", option="--protect")
        unknown = [p for p in self.protected if p not in self.attributes]
        if unknown:
            raise ConfigError(f": {unknown} are not attributes of {self.image_id!r} ({list(self.attributes)})",
                              option="--protect")
        unset = [p for p in self.protected if self.attributes[p] not in (-1, 1)]
        if unset:
            raise ConfigError(f": {unset} of {self.image_id!r} are unknown (0); only a known value can be privatized",
                              option="--protect")
        if not isinstance(num_previews, int) or num_previews < 1:
            raise ConfigError(f"num_previews={num_previews!r}: must be a positive integer")
        self.level = level if isinstance(level, PrivacyLevel) else resolve_level(level)
        self.seed, self.num_previews = seed, num_previews
        self._preview_seed = secure_seed() if seed is None else seed
        self._preview_round = 0
        self.decision: str | None = None
        self.release: Release | None = None
        self.refusal: str | None = None
        self.history: list[dict] = []

    def preview(self, n: int | None = None) -> list[Candidate]:
        """``n`` candidate edits at the current level; no budget is spent and nothing is recorded."""
        n = self.num_previews if n is None else n
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r}: ask for at least one preview")
        rng = random.Random(derive_seed(self._preview_seed, self.image_id, "preview", self._preview_round))
        self._preview_round += 1
        lv = self.level
        targets = [privatize(self.attributes, protected=self.protected, epsilon=lv.epsilon, rng=rng) for _ in range(n)]
        images = self.editor([self.image] * n, originals=[self.attributes] * n, targets=targets, strength=lv.strength,
                             protected=list(self.protected), encoding=lv.encoding)
        return [Candidate(t, im, lv, outcome_probability(self.attributes, t, protected=self.protected, epsilon=lv.epsilon))
                for t, im in zip(targets, images)]

    def feedback(self, action: str) -> FeedbackOutcome:
        """Apply one of ACTIONS; ``accept`` returns the release in the outcome."""
        if action not in ACTIONS:
            raise ConfigError(f"feedback {action!r}: choose one of {list(ACTIONS)}")
        if self.decision is not None:
            if action == "accept" and self.decision == "accepted":
                raise SessionClosed(f"{self.image_id!r} was already released in this session; a session releases "
                                    f"exactly one edit (start a new session to release again, at a further cost)")
            raise ConfigError(f"session for {self.image_id!r} is closed ({self.decision}); start a new one")
        release = None
        if action == "more_private":
            self.level = more_private(self.level)
        elif action == "less_private":
            self.level = less_private(self.level)
        elif action == "accept":
            release = self._accept()
        else:
            self.decision = "rejected"
        self.history.append({"action": action, "level": self.level.to_json()})
        return FeedbackOutcome(action, self.level, self.decision, release)

    def accept(self) -> Release:
        """The release; ``EditRefused`` if its edit failed the check (then it is recorded as refused)."""
        outcome = self.feedback("accept")
        if outcome.decision == "refused":
            raise EditRefused(self.refusal)
        return outcome.release

    def _accept(self) -> Release | None:
        """One release (``veil.privacy.release.release``): budget checked before the edit, a fresh draw, the
        edit checked where the editor can; a refused edit is recorded and charged, and closes the session."""
        lv = self.level
        checked = bool(getattr(self.editor, "can_check", False))

        def edit(targets):
            return [Edited(self.editor([self.image], originals=[self.attributes], targets=targets, strength=lv.strength,
                                       protected=list(self.protected), encoding=lv.encoding,
                                       **({"check": True} if checked else {}))[0])]

        [done] = release(self.ledger, image_ids=[self.image_id], attributes=[self.attributes], protected=self.protected,
                         level=lv, edit=edit, seed=self.seed, models=getattr(self.editor, "costs", None),
                         pixel_mus=self.editor.pixel_mus(strength=lv.strength, encoding=lv.encoding, check=checked))
        if done.refusal is not None:  # charged: the draw happened and the refusal depends on it
            self.decision, self.refusal = "refused", f"{self.image_id!r}: {done.refusal}"
            return None
        self.decision = "accepted"
        self.release = Release(done.record, done.image, dict(self.attributes), done.released_attributes, checked)
        return self.release

    def state(self) -> dict:
        """JSON-able summary for a UI or a server's session table (``spent``: {attribute: epsilon} over the
        image's protected attributes, ``budget``: the dataset's per-record budget, None = unlimited)."""
        return {"image_id": self.image_id, "level": self.level.to_json(), "protected": list(self.protected),
                "decision": self.decision, "spent": self.ledger.spends(self.image_id), "budget": self.ledger.budget,
                "guarantee": self.ledger.guarantee(self.image_id).to_json(),
                "history": list(self.history),
                "release_id": None if self.release is None else self.release.record.release_id,
                "checked": None if self.release is None else self.release.checked, "refusal": self.refusal}
