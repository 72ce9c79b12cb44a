"""One release, the only way veil publishes an edit: check the budget, draw, edit, record (refusals charged).

    level = resolve_level("high")
    done = release(ledger, image_ids=["img-7"], attributes=[{"smiling": 1, "hat": -1}], protected=["smiling"],
                   level=level, edit=edit, seed=None, models=editor.costs,
                   pixel_mus=editor.pixel_mus(strength=level.strength, encoding=level.encoding, check=True))
    done[0].record.release_id, done[0].image, done[0].refusal    # the ledger row, the edit, why it was refused

``edit(targets)`` is the caller's edit of the images towards ``targets`` (one dict of released attributes
per image, in order) and returns one ``Edited`` per image; ``EditRefused`` from it refuses every image of the
call. ``release`` knows nothing of tensors, so it stays torch-free; the edit job, ``EditSession`` and the
server (``veil serve``'s accept) all call it, with their own ``edit``:

0. The price (``veil.privacy.accounting.price_release``): the labels at the level's epsilon, and the pixels, one
   Gaussian mu per encoding the edit may draw (``pixel_mus``: the editor's ``pixel_mus``, every re-do its check
   may make included, so a re-do is in the price; inf for inversion, 0 when the image is not read). Every
   caller prices the same way, a client-chosen setting included.
1. ``level_policy.check_level`` (one level per protected attribute and dataset: a level chosen per image
   could say what the image shows) and ``PrivacyLedger.check`` for every image: a release the ledger would
   refuse is refused before any compute.
2. ``draw_release`` for every image: randomized response on the protected attributes (the others published
   exactly), from the OS's randomness unless a ``seed`` is given (tests, experiments: a seed is reproducible
   from (seed, image id, how many releases of the image there were before) and must stay secret).
3. ``edit(targets)``: the pixels. An edit that fails its check is *refused*: not published, but recorded and
   charged (the draw happened, and the refusal depends on it).
4. ``PrivacyLedger.record_many``: every row in one transaction that re-checks the budget under its lock and
   pins the level to the protected attributes (``level_policy.pin_level``). A
   caller's own rows go in the SAME transaction through ``hook`` (``ReleaseHook``): the server's stored HTTP
   answer and closed session, the edit job's files moved into ``--out``; if the hook raises, nothing is
   recorded. An error before step 4 (the edit's, a non-finite image, a failed write) records nothing.

Plain Python; no torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from veil.errors import ConfigError, EditRefused
from veil.privacy.accounting import price_release
from veil.privacy.db import Transaction
from veil.privacy.ledger import PrivacyLedger, ReleaseRecord
from veil.privacy.level_policy import check_level, pin_level
from veil.privacy.levels import PrivacyLevel
from veil.privacy.mechanism import derive_seed, privatize, secure_seed

__all__ = ["release", "record_releases", "draw_release", "Edited", "Released", "ReleaseHook"]


@dataclass(frozen=True)
class Edited:
    """What ``edit`` made of one image: the edit, or a refusal (the check did not read its released values)."""

    image: Any = None
    strength: float | None = None  # the strength the edit ended at (a re-do raises it); None: the level's
    refusal: str | None = None  # set: refused, not published (charged all the same)


@dataclass(frozen=True)
class Released:
    """One recorded release: the ledger row (with its SECRET seed), the edit (None when refused), and why not."""

    record: ReleaseRecord
    image: Any = None
    refusal: str | None = None

    @property
    def released_attributes(self) -> dict[str, int]:
        return dict(self.record.released_attributes)


@dataclass(frozen=True)
class ReleaseHook:
    """A caller's part of a release's transaction. ``opened(tx)`` runs first, under the lock and before the
    budget is read (raise to write nothing); ``recorded(tx, released)`` runs last, once the release rows are in
    (add rows with ``tx.execute``, publish files; raise to roll everything back)."""

    opened: Callable[[Transaction], None] | None = None
    recorded: Callable[[Transaction, list[Released]], None] | None = None


def draw_release(*, image_id: str, attributes: Mapping[str, int], protected: Sequence[str], epsilon: float,
                 seed: int | None, release_index: int) -> tuple[dict[str, int], int]:
    """Released attributes for one release and the seed that drew them.

    ``seed=None`` (the default everywhere) draws from the OS, so nobody can redo the coin flips.
    A given seed is reproducible: the stream is derived from (seed, image_id, release_index), so each
    release of an image draws afresh. Keep such a seed secret: whoever knows it can undo the mechanism.
    """
    used = secure_seed() if seed is None else derive_seed(seed, image_id, "release", release_index)
    return privatize(attributes, protected=protected, epsilon=epsilon, rng=random.Random(used)), used


def release(ledger: PrivacyLedger, *, image_ids: Sequence[str], attributes: Sequence[Mapping[str, int]],
            protected: Sequence[str], level: PrivacyLevel, edit: Callable[[list[dict[str, int]]], Sequence[Edited]],
            pixel_mus: Sequence[float], seed: int | None = None, models: list[dict] | None = None,
            hook: ReleaseHook | None = None) -> list[Released]:
    """Release an edit of each image (``attributes[k]``: the true values of ``image_ids[k]``) with ``protected``
    at ``level``, all recorded or none; see the module docstring. ``pixel_mus``: the Gaussian mu of each encoding
    the edit may draw (step 0). ``models``: the training privacy of the models that made the edit, recorded with
    each row. PrivacyError if the ledger refuses one."""
    image_ids = [str(i) for i in image_ids]
    originals = [{str(k): int(v) for k, v in a.items()} for a in attributes]
    protected = [str(p) for p in protected]
    if len(originals) != len(image_ids) or not image_ids:
        raise ConfigError(f"release: {len(image_ids)} image ids and {len(originals)} attribute sets; give one of "
                          f"each per image (at least one)")
    price = price_release(epsilon=level.epsilon, protected=protected, encoding=level.encoding,
                          pixel_mus=pixel_mus)  # 0.
    check_level(ledger, protected=protected, level=level)  # 1. one level per attribute and dataset, then the budget
    for image_id, original in zip(image_ids, originals):  # 1. refused before any compute
        ledger.check(image_id=image_id, protected=protected, epsilon=level.epsilon, price=price,
                     published=list(original))
    draws = [draw_release(image_id=i, attributes=o, protected=protected, epsilon=level.epsilon, seed=seed,
                          release_index=ledger.count(i)) for i, o in zip(image_ids, originals)]  # 2.
    try:  # 3.
        edits = list(edit([dict(r) for r, _ in draws]))
    except EditRefused as e:
        edits = [Edited(refusal=str(e)) for _ in image_ids]
    if len(edits) != len(image_ids):
        raise ValueError(f"release: edit returned {len(edits)} results for {len(image_ids)} images")
    rows = [dict(image_id=i, protected=protected, epsilon=level.epsilon,
                 strength=level.strength if e.strength is None else e.strength, seed=s, level=level.name,
                 released_attributes=r, outcome="released" if e.refusal is None else "refused", models=models,
                 price=price)
            for i, (r, s), e in zip(image_ids, draws, edits)]
    def opened(tx) -> None:  # the level pinned (or checked) in the same transaction as the rows
        pin_level(tx, protected=protected, level=level)
        if hook is not None and hook.opened is not None:
            hook.opened(tx)

    return record_releases(ledger, rows, images=[None if e.refusal else e.image for e in edits],
                           refusals=[e.refusal for e in edits],
                           hook=ReleaseHook(opened=opened, recorded=None if hook is None else hook.recorded))  # 4.


def record_releases(ledger: PrivacyLedger, rows: Sequence[Mapping], *, images: Sequence[Any] | None = None,
                    refusals: Sequence[str | None] | None = None, hook: ReleaseHook | None = None) -> list[Released]:
    """Step 4 alone, for releases drawn and edited already (``rows`` as ``PrivacyLedger.record_many`` takes
    them, ``images[k]`` the edit of row k): one transaction with ``hook``'s part; returns what was recorded."""
    rows = list(rows)
    images = [None] * len(rows) if images is None else list(images)
    refusals = [None] * len(rows) if refusals is None else list(refusals)
    done: list[Released] = []

    def before_commit(tx, records: list[ReleaseRecord]) -> None:
        done[:] = [Released(rec, im if rec.outcome == "released" else None, why)
                   for rec, im, why in zip(records, images, refusals)]
        if hook is not None and hook.recorded is not None:
            hook.recorded(tx, list(done))

    ledger.record_many(rows, opened=None if hook is None else hook.opened, before_commit=before_commit)
    return done
