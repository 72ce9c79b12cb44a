"""One level per protected attribute and dataset: a level chosen per image would say something about the image.

A level picked for one image by looking at it (more protection where the picture gives the attribute away)
is a choice made from that image's private values, and a published release shows its level (its epsilon,
and its pixels: a fresh face or a noised copy). So the dataset's database pins a level to each protected
attribute: the first release protecting the attribute pins the level it was made at, and every later
release protecting it must use the same (epsilon, strength, encoding), whoever makes it (``veil edit``, an
edit session, ``veil serve``'s clients). The owner changes it for the whole dataset, a recorded act
(``veil privacy set-level ATTRIBUTE LEVEL --reason R``, a row in ``policy_changes``), ideally chosen on
public data (``veil demo`` chooses on public faces). Previews at other levels stay free: they go to the
owner only.

    check_level(ledger, protected=["smiling"], level=lv)       # PrivacyError before any compute
    pin_level(tx, protected=["smiling"], level=lv)              # inside the release's transaction
    set_level(ledger, "smiling", LEVELS["high"], reason="...")  # the owner's dataset-wide change
    pinned_levels(ledger)                                       # {"smiling": {"name", "epsilon", ...}}

The pins live in the ``settings`` table (key ``level:<attribute>``). Plain stdlib; no torch.
"""

from __future__ import annotations

import json
from typing import Sequence

from veil.errors import ConfigError, PrivacyError
from veil.privacy.levels import PrivacyLevel

__all__ = ["check_level", "pin_level", "set_level", "pinned_levels", "same_level"]

_PREFIX = "level:"


def same_level(a: dict | None, b: dict) -> bool:
    """Whether two levels (``PrivacyLevel.to_json``) release the same way (the name does not matter)."""
    return a is not None and all(a.get(k) == b.get(k) for k in ("epsilon", "strength", "encoding"))


def pinned_levels(ledger) -> dict[str, dict]:
    """{attribute: pinned level (to_json)} of the dataset's database."""
    rows = ledger.db.execute("SELECT key, value FROM settings WHERE key LIKE ?", (_PREFIX + "%",))
    return {k[len(_PREFIX):]: json.loads(v) for k, v in rows if json.loads(v) is not None}


def _refuse(attribute: str, pinned: dict, level: PrivacyLevel) -> PrivacyError:
    return PrivacyError(
        f"release refused: this dataset releases {attribute!r} at level {pinned.get('name')!r} (epsilon "
        f"{pinned.get('epsilon')}, strength {pinned.get('strength')}, encoding {pinned.get('encoding')}), and this "
        f"release asks for {level.name!r} (epsilon {level.epsilon:g}, strength {level.strength:g}, encoding "
        f"{level.encoding}); a level chosen per image could reveal what the image shows, so it is one per dataset "
        f"and attribute: release at {pinned.get('name')!r}, or change it for the whole dataset with `veil privacy "
        f"set-level {attribute} LEVEL --reason \"...\"`")


def check_level(ledger, *, protected: Sequence[str], level: PrivacyLevel) -> None:
    """PrivacyError if an attribute of ``protected`` is pinned to another level (call it before any compute)."""
    pins = pinned_levels(ledger)
    for name in protected:
        if name in pins and not same_level(pins[name], level.to_json()):
            raise _refuse(name, pins[name], level)


def pin_level(tx, *, protected: Sequence[str], level: PrivacyLevel) -> None:
    """Inside a release's write transaction: pin ``level`` to each attribute of ``protected`` not pinned yet, and
    PrivacyError if one is pinned to another level (read under the transaction's lock, so two first releases
    at different levels cannot both pin)."""
    want = level.to_json()
    for name in protected:
        tx.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                   (_PREFIX + name, json.dumps(want)))
        row = tx.execute("SELECT value FROM settings WHERE key = ?", (_PREFIX + name,)).fetchone()
        pinned = json.loads(row[0])
        if pinned is None:  # unpinned by the owner: this release pins it again
            tx.execute("UPDATE settings SET value = ? WHERE key = ?", (json.dumps(want), _PREFIX + name))
        elif not same_level(pinned, want):
            raise _refuse(name, pinned, level)


def set_level(ledger, attribute: str, level: PrivacyLevel | None, *, reason: str) -> None:
    """The owner's dataset-wide change of ``attribute``'s level (None: unpinned, the next release pins it),
    recorded in ``policy_changes`` with who, when, old, new and why."""
    from veil.privacy.ledger import _who  # the ledger's own "who" (user@host)
    from veil.privacy.ledger_schema import log_policy_change

    if not isinstance(attribute, str) or not attribute:
        raise ConfigError(f"={attribute!r}: name the protected attribute", option="ATTRIBUTE")
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError(": say why the level changes (it is recorded with the change)", option="--reason")
    new = None if level is None else level.to_json()
    with ledger.db.transaction(locks=[f"veil:{_PREFIX}{attribute}"]) as tx:
        row = tx.execute("SELECT value FROM settings WHERE key = ?", (_PREFIX + attribute,)).fetchone()
        old = None if row is None else json.loads(row[0])
        tx.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                   "excluded.value", (_PREFIX + attribute, json.dumps(new)))
        log_policy_change(tx, _PREFIX + attribute, old, new, reason.strip(), who=_who())
