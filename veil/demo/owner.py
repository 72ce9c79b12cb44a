"""Stage 2 of ``veil demo``: private edits of a share of the private images, decided by a scripted owner.

    attackers = level_attackers(editor, names=names, protected=["eyeglasses"], sizes=sizes, seed=1)
    result = scripted_owner(editor, ledger, items, protected=["eyeglasses"], attackers=attackers, threshold=0.75)

The owner of each image opens an ``EditSession`` (veil.privacy.session: previews are free, accept
releases a fresh draw, the ledger checks and records it) at ``start_level``, previews one candidate,
and asks the adaptive attacker of that level how sure it is of the image's ORIGINAL protected value
from the candidate. Above ``threshold`` the owner asks for more privacy and previews again; at or
below it (or at ``max``, where nothing is more private) the owner accepts.

The attackers (veil.demo.attacker): a naive CNN trained on original synthetic faces
of a seed of their own, then one adaptive copy per level fine-tuned on edits the same editor made at
that level of other faces (fresh randomized-response draws), with their ORIGINAL attributes. Half of
those edits train it, the other half measure it: its accuracy on the original protected value is what
the report compares with the randomized-response bound e^eps / (1 + e^eps) (the synthetic attributes
are fair coins, so that is the Bayes bound).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from veil.errors import EditRefused
from veil.lightning_modules.data.synthetic_faces import SyntheticFaces
from veil.demo.attacker import adaptive_attacker, predict, probability, train_attacker
from veil.privacy.levels import LEVEL_NAMES, LEVELS
from veil.privacy.mechanism import keep_probability, privatize
from veil.privacy.session import EditSession

__all__ = ["AttackerSizes", "level_attackers", "scripted_owner"]

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
                    seed: int = 1, progress=print) -> tuple[dict, dict, list[dict]]:
    """(naive attacker, {level: adaptive attacker}, [{level, accuracy, bound, n}]) for the protected attribute."""
    naive = train_attacker(names, resolution=resolution, num_images=sizes.naive_images, epochs=sizes.naive_epochs,
                           seed=ATTACKER_SEED)
    faces = SyntheticFaces(num_images=sizes.edits_per_level, resolution=resolution, seed=EDITED_SEED, attributes=names)
    x = torch.stack([faces[i][0] for i in range(len(faces))])  # (n,3,H,W)
    a = faces.attribute_matrix  # (n,k) in {-1,+1}
    col, rng = names.index(protected[0]), random.SystemRandom()
    attackers, rows, half = {}, [], len(x) // 2
    for name in LEVEL_NAMES:
        lv = LEVELS[name]
        released = torch.stack([editor.attribute_vector(privatize(_as_dict(names, r), protected=protected,
                                                                  epsilon=lv.epsilon, rng=rng)) for r in a])
        with torch.no_grad():
            edits = editor.edit(x, a, released, strength=lv.strength, protected=protected, encoding=lv.encoding)
        attackers[name] = adaptive_attacker(naive, edits[:half], a[:half], epochs=sizes.adaptive_epochs, seed=seed)
        guess = predict(attackers[name], edits[half:])[:, col]
        accuracy = float((guess == a[half:, col]).float().mean())
        rows.append({"level": name, "accuracy": round(accuracy, 4), "bound": round(keep_probability(epsilon=lv.epsilon), 4),
                     "n": len(x) - half})
        progress(f"  attacker at {name}: reads the original {protected[0]} off {accuracy:.0%} of held-out edits "
                 f"(randomized response alone allows {rows[-1]['bound']:.0%})")
    return naive, attackers, rows


def scripted_owner(editor, ledger, items, *, names: list[str], protected: list[str], attackers: dict,
                   threshold: float, start_level: str = "low", progress=print) -> dict:
    """Edit ``items`` [(image_id, image (3,H,W), attributes (k,))]; returns what happened and the accepted edits."""
    col = names.index(protected[0])
    out = {"accepted_at": {n: 0 for n in LEVEL_NAMES}, "more_private_requests": 0, "releases": 0, "refused": 0,
           "epsilons": [], "accepted": []}
    for k, (image_id, x, a) in enumerate(items):
        original = _as_dict(names, a)
        session = EditSession(image_id=image_id, image=x, attributes=original, protected=protected, editor=editor,
                              ledger=ledger, level=start_level, num_previews=1)
        while True:
            candidate = session.preview(1)[0]
            sure = float(probability(attackers[session.level.name], candidate.image[None])[0, col])
            sure = sure if original[protected[0]] > 0 else 1.0 - sure  # P(the original value)
            if sure <= threshold or session.level.name == LEVEL_NAMES[-1]:
                break
            session.feedback("more_private")
            out["more_private_requests"] += 1
        level = session.level.name
        try:
            release = session.accept()
        except EditRefused:
            out["refused"] += 1
            out["epsilons"].append(session.level.epsilon)
            continue
        out["releases"] += 1
        out["accepted_at"][level] += 1
        out["epsilons"].append(session.level.epsilon)
        out["accepted"].append({"id": image_id, "original": original, "released": release.released_attributes,
                                "edit": release.image, "image": x, "level": level,
                                "epsilon": session.level.epsilon, "strength": session.level.strength})
        progress(f"  image {k + 1}/{len(items)} {image_id}: accepted at {level} (attacker {sure:.0%} sure of the "
                 f"original), released {protected[0]}={release.released_attributes[protected[0]]:+d}")
    return out


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
