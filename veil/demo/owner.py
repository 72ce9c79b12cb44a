"""The demo's scripted owner: ONE level for the dataset and protected attribute, chosen on public faces before
any release, then every private image released at it.

    naive, attackers, rows = level_attackers(editor, names=names, protected=["eyeglasses"], sizes=sizes,
                                             resolution=32)                    # edits of PUBLIC faces only
    allowed = level_prices(editor, ledger, protected=["eyeglasses"])           # what policy and budget allow
    choice = choose_level(rows, allowed=allowed)                               # {"level", "why", ...}
    result = scripted_owner(editor, ledger, items, names=names, protected=["eyeglasses"], level=choice["level"])
    attack = attack_releases(attackers[choice["level"]], result["accepted"], names=names,
                             protected=["eyeglasses"], epsilon=LEVELS[choice["level"]].epsilon)

Why one level (issue 30): a level picked per image by looking at it (raised when an attacker reads the
original value off a preview) is a choice made from the image's private values; the published revision
records each image's level, so the choice itself leaks, and the ledger does not price it. Here the choice
reads only public data (the synthetic faces of ``EDITED_SEED``, never the private ones), the dataset's
pixel policy and its budget, and the same level is used for every private image; no preview is needed.

The attackers (veil.demo.attacker): a naive CNN trained on original synthetic faces of ``ATTACKER_SEED``,
then per level an adaptive copy fine-tuned on edits the same editor made at that level of the public faces
of ``EDITED_SEED`` (fresh randomized-response draws), with their ORIGINAL attributes. The edits are split in
halves stratified on the protected value (``stratified_halves``: both halves have the same prior, up to one
image); one half trains the attacker, the other measures it: accuracy, Wilson 95% interval, against the
Bayes bound (``veil.privacy.bounds``) at the level's epsilon for the prior of that measured half
(``attack_row``). The same attacker is then run on the accepted releases of the private images, whose
original values the demo knows (``attack_releases``).

The rule (``choose_level``): among the named levels, least private first, skip those the dataset's ledger
would refuse for any record (``level_prices``: unbounded pixels under the "protected" pixel policy, or a
single release composing past the budget), and take the first whose attacker interval's lower end is at
most its bound (the attacker is not significantly better than the labels alone allow). If none passes,
the most private allowed level is taken and the choice says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from veil.errors import EditRefused, PrivacyError
from veil.lightning_modules.data.synthetic_faces import SyntheticFaces
from veil.demo.attacker import adaptive_attacker, attack_row, predict, stratified_halves, train_attacker
from veil.privacy.accounting import compose, price_release
from veil.privacy.levels import LEVEL_NAMES, LEVELS
from veil.privacy.mechanism import privatize
from veil.privacy.session import EditSession

__all__ = ["AttackerSizes", "level_attackers", "level_prices", "choose_level", "scripted_owner",
           "record_guarantees", "attack_releases", "utility", "ATTACKER_SEED", "EDITED_SEED"]

ATTACKER_SEED, EDITED_SEED = 2, 3  # synthetic seeds of the attackers' own faces (0 is private, 1 the UNet's public)


@dataclass(frozen=True)
class AttackerSizes:
    naive_images: int = 2048
    naive_epochs: int = 4
    edits_per_level: int = 96
    adaptive_epochs: int = 4


def _as_dict(names, row) -> dict[str, int]:
    return {n: int(v) for n, v in zip(names, row.tolist())}


def level_attackers(editor, *, names: list[str], protected: list[str], sizes: AttackerSizes, resolution: int,
                    levels=LEVEL_NAMES, seed: int = 1, progress=print) -> tuple[object, dict, list[dict]]:
    """(naive attacker, {level: adaptive attacker}, [row per level]) for ``protected[0]``, on edits of the public
    faces of ``EDITED_SEED`` (unchecked ``editor.edit``: no ledger, nothing private); each row is ``attack_row``'s
    (accuracy, ci95, prior_test, prior_train, bound, within_bound, n) with the level's name and setting."""
    naive = train_attacker(names, resolution=resolution, num_images=sizes.naive_images, epochs=sizes.naive_epochs,
                           seed=ATTACKER_SEED)
    faces = SyntheticFaces(num_images=sizes.edits_per_level, resolution=resolution, seed=EDITED_SEED, attributes=names)
    x = torch.stack([faces[i][0] for i in range(len(faces))])  # (n,3,H,W)
    a = faces.attribute_matrix  # (n,k) in {-1,+1}
    col, rng = names.index(protected[0]), random.SystemRandom()
    train, test = stratified_halves(a[:, col])
    train_prior = float((a[train, col] > 0).float().mean())
    attackers, rows = {}, []
    for name in levels:
        lv = LEVELS[name]
        released = torch.stack([editor.attribute_vector(privatize(_as_dict(names, r), protected=protected,
                                                                  epsilon=lv.epsilon, rng=rng)) for r in a])
        with torch.no_grad():
            edits = editor.edit(x, a, released, strength=lv.strength, protected=protected, encoding=lv.encoding)
        attackers[name] = adaptive_attacker(naive, edits[train], a[train], epochs=sizes.adaptive_epochs, seed=seed)
        row = attack_row(predict(attackers[name], edits[test])[:, col], a[test, col], epsilon=lv.epsilon,
                         train_prior=train_prior)
        rows.append({"level": name, "epsilon": lv.epsilon, "strength": lv.strength, "encoding": lv.encoding,
                     "data": f"edits of public synthetic faces (seed {EDITED_SEED})", **row})
        progress(f"  attacker at {name} (public edits): reads the original {protected[0]} off {row['accuracy']:.0%} "
                 f"[95% {row['ci95'][0]:.0%}-{row['ci95'][1]:.0%}] of {row['n']} held-out edits; the labels alone "
                 f"allow {row['bound']:.0%} at this prior ({row['prior_test']:.0%})")
    return naive, attackers, rows


def level_prices(editor, ledger, *, protected: list[str], levels=LEVEL_NAMES) -> dict[str, dict]:
    """{level: {"price", "guarantee", "refused"}}: what one release at each level costs a record (both channels,
    composed at the ledger's delta under its pixel policy) and why the ledger would refuse it for any record
    (None: it would not). Reads only the level, the editor's schedule and the dataset's policy and budget."""
    policy, delta, budget = ledger.pixel_policy, ledger.release_delta, ledger.budget
    check = bool(getattr(editor, "can_check", False))
    out = {}
    for name in levels:
        lv = LEVELS[name]
        price = price_release(epsilon=lv.epsilon, protected=protected, encoding=lv.encoding,
                              pixel_mus=editor.pixel_mus(strength=lv.strength, encoding=lv.encoding, check=check))
        guarantee = compose([price], delta=delta, pixels_protected=policy == "protected")
        refused = None
        if policy == "protected" and not price.pixels_bounded:
            refused = (f"its pixels have no bound ({lv.encoding} encoding) and the dataset's pixel policy is "
                       f"'protected'")
        elif budget is not None and guarantee.epsilon > budget + 1e-9:
            refused = f"one release costs epsilon {guarantee.epsilon:.3g}, over the budget {budget:g} per record"
        out[name] = {"price": price.to_json(), "guarantee": guarantee.to_json(), "refused": refused}
    return out


def choose_level(rows: list[dict], *, allowed: dict[str, dict]) -> dict:
    """The owner's level for the dataset (see the module docstring): {"level", "why", "passed"}; ``rows`` are
    ``level_attackers``' (public edits), ``allowed`` is ``level_prices``'."""
    by_level = {r["level"]: r for r in rows}
    candidates = [n for n in LEVEL_NAMES if n in allowed and allowed[n]["refused"] is None]
    if not candidates:
        raise PrivacyError("no named level can be released on this dataset: "
                           + "; ".join(f"{n}: {a['refused']}" for n, a in allowed.items())
                           + "; raise the budget with `veil privacy set-budget` if that is really intended")
    skipped = [f"{n} refused by the ledger ({a['refused']})" for n, a in allowed.items() if a["refused"]]
    for name in candidates:
        row = by_level.get(name)
        if row is None or row.get("n", 0) == 0:
            skipped.append(f"{name} not measured")
            continue
        lo, hi = row["ci95"]
        if row["within_bound"]:
            why = (f"{name} is the least private level the ledger allows whose adaptive attacker on public edits "
                   f"({row['accuracy']:.1%}, 95% interval {lo:.1%}-{hi:.1%}, n = {row['n']}) is not significantly "
                   f"above the Bayes bound {row['bound']:.1%} at epsilon {row['epsilon']:g} for that test set's "
                   f"prior {row['prior_test']:.1%}")
            return {"level": name, "why": why + ("; " + "; ".join(skipped) if skipped else ""), "passed": True}
        skipped.append(f"{name}: attacker {row['accuracy']:.1%} (interval {lo:.1%}-{hi:.1%}) above its bound "
                       f"{row['bound']:.1%}")
    name = candidates[-1]
    return {"level": name, "passed": False,
            "why": f"no allowed level kept the attacker within its bound ({'; '.join(skipped)}): the most private "
                   f"allowed level, {name}, is used"}


def scripted_owner(editor, ledger, items, *, names: list[str], protected: list[str], level: str,
                   progress=print) -> dict:
    """Release every one of ``items`` [(image_id, image (3,H,W), attributes (k,))] at ``level`` (one
    ``EditSession`` accept each, no preview); returns what happened and the accepted edits."""
    lv = LEVELS[level]
    out = {"level": level, "releases": 0, "refused": 0, "withheld": 0, "outcomes": {}, "accepted": []}
    for k, (image_id, x, a) in enumerate(items):
        original = _as_dict(names, a)
        session = EditSession(image_id=image_id, image=x, attributes=original, protected=protected, editor=editor,
                              ledger=ledger, level=lv, num_previews=1)
        try:
            release = session.accept()
        except EditRefused:  # recorded and charged by the ledger: the refusal depends on the draw
            out["refused"] += 1
            out["outcomes"][image_id] = "refused (the check)"
            continue
        except PrivacyError as e:  # the ledger refused before any draw (e.g. a resumed demo spent the budget)
            out["withheld"] += 1
            out["outcomes"][image_id] = f"withheld by the ledger: {e}"
            continue
        out["releases"] += 1
        out["outcomes"][image_id] = "released"
        out["accepted"].append({"id": image_id, "original": original, "released": release.released_attributes,
                                "edit": release.image, "image": x, "level": level,
                                "epsilon": lv.epsilon, "strength": lv.strength})
        progress(f"  image {k + 1}/{len(items)} {image_id}: released at {level}, "
                 f"{protected[0]}={release.released_attributes[protected[0]]:+d}")
    return out


def record_guarantees(ledger, image_ids: list[str], outcomes: dict[str, str]) -> dict:
    """Per record the ledger's composed guarantee (``ledger.guarantee``: every release of it, both channels) and
    the maximum over records: {"records": [...], "max": {...}, "delta", "pixel_policy"}."""
    records = [{"id": i, "outcome": outcomes.get(i, "not released here"), **ledger.guarantee(i).to_json()}
               for i in image_ids]
    num = lambda v: math.inf if v == "inf" else float(v)  # noqa: E731  (Guarantee.to_json writes inf as "inf")
    top = lambda key: max((num(r[key]) for r in records), default=None)  # noqa: E731
    jsonable = lambda v: "inf" if v is not None and math.isinf(v) else v  # noqa: E731
    return {"records": records, "delta": ledger.release_delta, "pixel_policy": ledger.pixel_policy,
            "max": {key: jsonable(top(key)) for key in ("epsilon", "labels_epsilon", "pixels_epsilon")}
            | {"pixels_protected": all(r["pixels_protected"] for r in records),
               "releases": max((r["releases"] for r in records), default=0)}}


@torch.no_grad()
def attack_releases(attacker, accepted: list[dict], *, names: list[str], protected: list[str], epsilon: float) -> dict:
    """The adaptive attacker of the released level on the ACCEPTED releases of the private images (their
    published edits), scored against their original values (``attack_row``: interval, prior, bound)."""
    col = names.index(protected[0])
    if not accepted:
        return {"n": 0, "accuracy": None, "ci95": [0.0, 1.0], "bound": None, "within_bound": False,
                "data": "accepted releases (none)"}
    edits = torch.stack([r["edit"] for r in accepted])
    truth = torch.tensor([r["original"][protected[0]] for r in accepted], dtype=torch.float32)
    row = attack_row(predict(attacker, edits)[:, col], truth, epsilon=epsilon)
    return {"level": accepted[0]["level"], "epsilon": epsilon, "data": "accepted releases of the private images",
            **row}


@torch.no_grad()
def utility(naive, accepted: list[dict], *, names: list[str], protected: list[str]) -> dict:
    """On the accepted edits: does the probe read the RELEASED protected value ("follows"), and do the
    unprotected attributes survive ("unprotected_kept")."""
    if not accepted:
        return {"follows": None, "unprotected_kept": None}
    edits = torch.stack([r["edit"] for r in accepted])
    read = predict(naive, edits)  # (n,k)
    cols = [names.index(p) for p in protected]
    keep = [i for i, n in enumerate(names) if n not in protected]
    released = torch.tensor([[r["released"][n] for n in names] for r in accepted], dtype=read.dtype)
    original = torch.tensor([[r["original"][n] for n in names] for r in accepted], dtype=read.dtype)
    return {"follows": round(float((read[:, cols] == released[:, cols]).float().mean()), 4),
            "unprotected_kept": round(float((read[:, keep] == original[:, keep]).float().mean()), 4)}
