"""The release ledger: every private release of an image, in SQLite, with a per-image budget.

    ledger = ReleaseLedger("out/ledger.sqlite", budget=8.0)
    ledger.check(image_id="synth-0-000001", epsilon=2.0)          # PrivacyError if it would overspend
    rec = ledger.record(image_id=..., protected=["smiling"], epsilon=2.0, strength=0.55, seed=...)
    ledger.spent("synth-0-000001")                                # sum of epsilons released so far

Composition: releases of the same image compose by summing their epsilons (basic sequential
composition of epsilon-LDP mechanisms, which holds because each release draws fresh randomness).
The budget bounds that sum per image; a release that would pass it is refused with PrivacyError.
Check and insert run in one ``BEGIN IMMEDIATE`` transaction, so two writers (a server and a CLI run)
cannot both spend the last of a budget.

Durability: WAL journal with ``synchronous=FULL``: a release is on disk when ``record`` returns,
and a writer killed at any point (SIGKILL included) leaves every committed release and a database
that passes ``PRAGMA integrity_check``. Plain stdlib ``sqlite3``; no torch.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from veil.errors import ConfigError, PrivacyError
from veil.privacy.mechanism import check_epsilon, json_epsilon

__all__ = ["ReleaseLedger", "ReleaseRecord", "DEFAULT_BUDGET", "LEDGER_FILE"]

DEFAULT_BUDGET = 8.0  # two releases at "low", four at "medium", eight at "high"
LEDGER_FILE = "ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    release_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id            TEXT NOT NULL,
    protected           TEXT NOT NULL,   -- JSON list of attribute names
    epsilon             REAL NOT NULL,   -- per protected attribute; composes by sum per image
    strength            REAL NOT NULL,
    seed                INTEGER NOT NULL,
    level               TEXT,
    released_attributes TEXT,            -- JSON {name: -1|+1}
    budget              REAL,            -- the per-image budget in force (NULL = none)
    released_at         TEXT NOT NULL    -- ISO 8601, UTC
);
CREATE INDEX IF NOT EXISTS releases_by_image ON releases (image_id);
"""


@dataclass(frozen=True)
class ReleaseRecord:
    release_id: int
    image_id: str
    protected: list[str]
    epsilon: float
    strength: float
    seed: int
    level: str | None
    released_attributes: dict[str, int] | None
    budget: float | None
    released_at: str

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["epsilon"] = json_epsilon(self.epsilon)
        return d


def _check_budget(budget) -> float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or budget < 0:
        raise ConfigError(f"--budget={budget!r}: must be a number >= 0 (the most epsilon one image may spend)")
    return float(budget)


class ReleaseLedger:
    """SQLite ledger of releases at ``path`` (created with its folder); ``budget`` per image, None = unlimited."""

    def __init__(self, path, *, budget: float | None = DEFAULT_BUDGET, timeout_s: float = 30.0):
        self.path = Path(path)
        self.budget = _check_budget(budget)
        if self.path.exists() and self.path.is_dir():
            raise ConfigError(f"--ledger {self.path}: is a folder; give a file path, e.g. {self.path / LEDGER_FILE}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so check + insert is one transaction.
        self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    # -- reading ----------------------------------------------------------------------------------
    def spent(self, image_id: str) -> float:
        """Sum of the epsilons released for ``image_id`` (0.0 if none)."""
        row = self._db.execute("SELECT TOTAL(epsilon) FROM releases WHERE image_id = ?", (image_id,)).fetchone()
        return float(row[0])

    def count(self, image_id: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM releases WHERE image_id = ?", (image_id,)).fetchone()[0])

    def releases(self, image_id: str | None = None) -> list[ReleaseRecord]:
        """Every release (of ``image_id`` if given), oldest first."""
        sql, args = "SELECT * FROM releases", ()
        if image_id is not None:
            sql, args = sql + " WHERE image_id = ?", (image_id,)
        return [self._row_to_record(r) for r in self._db.execute(sql + " ORDER BY release_id", args)]

    def remaining(self, image_id: str) -> float:
        return math.inf if self.budget is None else self.budget - self.spent(image_id)

    # -- writing ----------------------------------------------------------------------------------
    def check(self, *, image_id: str, epsilon: float) -> None:
        """PrivacyError if releasing ``image_id`` at ``epsilon`` would pass the budget."""
        self._refuse_if_over(image_id, check_epsilon(epsilon), self.spent(image_id))

    def record(self, *, image_id: str, protected: Sequence[str], epsilon: float, strength: float, seed: int,
               level: str | None = None, released_attributes: Mapping[str, int] | None = None) -> ReleaseRecord:
        """Check the budget and append one release, atomically; returns the committed record."""
        return self.record_many([dict(image_id=image_id, protected=protected, epsilon=epsilon, strength=strength,
                                      seed=seed, level=level, released_attributes=released_attributes)])[0]

    def record_many(self, releases: Iterable[Mapping]) -> list[ReleaseRecord]:
        """Append several releases in one transaction: all are committed, or none (PrivacyError)."""
        releases = list(releases)
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        self._db.execute("BEGIN IMMEDIATE")  # take the write lock before reading what has been spent
        try:
            pending: dict[str, float] = {}
            ids = []
            for r in releases:
                eps = check_epsilon(r["epsilon"])
                image_id = str(r["image_id"])
                spent = pending.get(image_id, self.spent(image_id))
                self._refuse_if_over(image_id, eps, spent)
                pending[image_id] = spent + eps
                attrs = r.get("released_attributes")
                cur = self._db.execute(
                    "INSERT INTO releases (image_id, protected, epsilon, strength, seed, level, released_attributes,"
                    " budget, released_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (image_id, json.dumps(list(r["protected"])), eps, float(r["strength"]), int(r["seed"]),
                     r.get("level"), None if attrs is None else json.dumps(dict(attrs)), self.budget, now))
                ids.append(cur.lastrowid)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(f"SELECT * FROM releases WHERE release_id IN ({marks}) ORDER BY release_id", ids)
        return [self._row_to_record(r) for r in rows]

    def _refuse_if_over(self, image_id: str, epsilon: float, spent: float) -> None:
        if self.budget is not None and spent + epsilon > self.budget + 1e-12:
            raise PrivacyError(
                f"release of {image_id!r} refused: it has spent epsilon {spent:g} of its budget {self.budget:g}, "
                f"and this release asks for {epsilon:g} more ({spent + epsilon:g} > {self.budget:g}); "
                f"choose a more private level (smaller epsilon) or raise --budget if that is really intended"
            )

    # -- plumbing ---------------------------------------------------------------------------------
    @staticmethod
    def _row_to_record(row) -> ReleaseRecord:
        rid, image_id, protected, eps, strength, seed, level, attrs, budget, at = row
        return ReleaseRecord(rid, image_id, json.loads(protected), float(eps), float(strength), int(seed), level,
                             None if attrs is None else json.loads(attrs), budget, at)

    def integrity_check(self) -> str:
        """SQLite's own consistency check: 'ok' for a sound database."""
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ReleaseLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
