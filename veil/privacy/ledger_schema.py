"""The schema of a dataset's privacy database (``ledger.PrivacyLedger``), and the upgrade from schema 1.

Schema 3 (``PRAGMA user_version``): ``releases`` (one row per release, with its SECRET
randomized-response seed, its ``outcome``, released or refused, and the training privacy of the
``models`` that made the edit), ``attribute_spends`` (what each release spent per (image, attribute):
epsilon, or NULL for a value published exactly), ``settings`` (the budgets, the dataset),
``budget_changes`` (every change: old, new, reason, who, when) and ``training_runs``
(``training_runs.TrainingRunsMixin``). Schema 1 held only ``releases``, composed per image; schema 2 lacked
``outcome`` and ``models``; both are migrated in place when opened. Plain stdlib.
"""

from __future__ import annotations

import json

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    release_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id            TEXT NOT NULL,
    protected           TEXT NOT NULL,   -- JSON list of attribute names
    epsilon             REAL NOT NULL,   -- randomized response per protected attribute
    strength            REAL NOT NULL,
    seed                INTEGER NOT NULL, -- SECRET: undoes the randomized response
    level               TEXT,
    released_attributes TEXT,            -- JSON {name: -1|+1}: every value the release publishes
    budget              REAL,            -- the release budget in force (NULL = unlimited)
    released_at         TEXT NOT NULL,   -- ISO 8601, UTC
    outcome             TEXT NOT NULL DEFAULT 'released' CHECK (outcome IN ('released', 'refused')),
                                         -- refused: drawn and charged, but the edit did not show it: not published
    models              TEXT             -- JSON list: training privacy of each model that made the edit
);
CREATE INDEX IF NOT EXISTS releases_by_image ON releases (image_id);
CREATE TABLE IF NOT EXISTS attribute_spends (
    release_id INTEGER NOT NULL REFERENCES releases (release_id),
    image_id   TEXT NOT NULL,
    attribute  TEXT NOT NULL,
    epsilon    REAL                      -- randomized response at epsilon, NULL = published exactly
);
CREATE INDEX IF NOT EXISTS spends_by_pair ON attribute_spends (image_id, attribute);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE IF NOT EXISTS budget_changes (
    change_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    budget     TEXT NOT NULL CHECK (budget IN ('release', 'training')),
    old_value  REAL,                     -- NULL = none before (creation), +inf = unlimited
    new_value  REAL,                     -- +inf = unlimited
    reason     TEXT NOT NULL,
    changed_by TEXT NOT NULL,
    changed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS training_runs (
    run_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    run             TEXT NOT NULL,       -- run name or output folder
    kind            TEXT NOT NULL,       -- diffusion | classifier | ...
    private         INTEGER NOT NULL,
    planned_epsilon REAL,                -- NULL = unbounded
    epsilon         REAL,                -- when finished: NULL = unbounded or not private
    delta           REAL,
    steps           INTEGER,
    status          TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    details         TEXT NOT NULL,       -- JSON: what it trained
    started_at      TEXT NOT NULL,
    finished_at     TEXT
)
"""


def migrate_v1(db) -> str:
    """Schema 1 (releases composed per image) -> 2: re-read every release per (image, attribute)."""
    rows = db.execute("SELECT release_id, image_id, protected, epsilon, released_attributes FROM releases")
    n = 0
    for rid, image_id, protected, eps, released in rows.fetchall():
        protected = json.loads(protected)
        exact = [a for a in json.loads(released or "{}") if a not in protected]
        db.executemany("INSERT INTO attribute_spends VALUES (?, ?, ?, ?)",
                   [(rid, image_id, a, eps) for a in protected] + [(rid, image_id, a, None) for a in exact])
        n += 1
    return f"migrated from a schema-1 ledger ({n} releases re-read per image and attribute)"


V3_COLUMNS = {"outcome": "TEXT NOT NULL DEFAULT 'released' CHECK (outcome IN ('released', 'refused'))",
              "models": "TEXT"}


def add_v3_columns(db) -> str | None:
    """Schema 1 or 2 -> 3: add ``releases.outcome`` (earlier rows: released) and ``releases.models``
    (earlier rows: NULL, not recorded). Returns what was done, or None if nothing was missing."""
    have = {row[1] for row in db.execute("PRAGMA table_info(releases)")}
    missing = [c for c in V3_COLUMNS if c not in have]
    for column in missing:
        db.execute(f"ALTER TABLE releases ADD COLUMN {column} {V3_COLUMNS[column]}")
    return f"added {', '.join(missing)} to releases (schema 3)" if missing else None
