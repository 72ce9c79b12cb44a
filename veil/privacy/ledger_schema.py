"""The schema of a dataset's privacy database (``ledger.PrivacyLedger``), its version, and the upgrades.

Schema 4: ``releases`` (one row per release, with its SECRET randomized-response seed, its ``outcome``,
released or refused, the training privacy of the ``models`` that made the edit, and its ``price`` in both
channels, ``accounting.ReleasePrice``), ``policy_changes`` (the pixel policy and delta, each change with
who, when and why), ``attribute_spends``
(what each release spent per (image, attribute): epsilon, or NULL for a value published exactly),
``settings`` (the budgets, the dataset), ``budget_changes`` (every change: old, new, reason, who, when) and
``training_runs`` (``training_runs.TrainingRunsMixin``). Written once, in SQLite's dialect; ``veil.privacy.db``
derives PostgreSQL's types. The version is SQLite's ``PRAGMA user_version``, or the ``settings`` row
``schema`` on PostgreSQL (``read_version``/``write_version``). Schema 1 held only ``releases``, composed per
image; schema 2 lacked ``outcome`` and ``models``, schema 3 ``price`` (its releases are priced with
unbounded pixels: their edits were never limited); schemas 1 and 2 existed only as SQLite files and are migrated in
place when opened. Plain stdlib.
"""

from __future__ import annotations

import json
import math

from veil.errors import ConfigError, DataError
from veil.privacy.db import utc_now

SCHEMA_VERSION = 4

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
    models              TEXT,            -- JSON list: training privacy of each model that made the edit
    price               TEXT             -- JSON accounting.ReleasePrice: labels and pixels (NULL: schema <= 3,
                                         -- priced as labels only, pixels unbounded)
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
CREATE TABLE IF NOT EXISTS policy_changes (
    change_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    setting    TEXT NOT NULL,            -- pixels | release_delta
    old_value  TEXT,                     -- JSON, NULL = none before (creation)
    new_value  TEXT NOT NULL,            -- JSON
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


def read_version(tx) -> int:
    """The schema version of the database ``tx`` is open on (0: no schema yet)."""
    if tx.backend == "sqlite":
        return int(tx.execute("PRAGMA user_version").fetchone()[0])
    if "settings" not in tx.tables():
        return 0
    row = tx.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone()
    return 0 if row is None else int(row[0])


def write_version(tx, version: int) -> None:
    if tx.backend == "sqlite":
        tx.execute(f"PRAGMA user_version = {int(version)}")
    else:
        tx.execute("INSERT INTO settings (key, value) VALUES ('schema', ?) ON CONFLICT (key) DO UPDATE"
                   " SET value = excluded.value", (str(int(version)),))


def migrate_v1(tx) -> str:
    """Schema 1 (releases composed per image) -> 2: re-read every release per (image, attribute). SQLite only."""
    rows = tx.execute("SELECT release_id, image_id, protected, epsilon, released_attributes FROM releases").fetchall()
    for rid, image_id, protected, eps, released in rows:
        protected = json.loads(protected)
        exact = [a for a in json.loads(released or "{}") if a not in protected]
        for a, spent in [(a, eps) for a in protected] + [(a, None) for a in exact]:
            tx.execute("INSERT INTO attribute_spends VALUES (?, ?, ?, ?)", (rid, image_id, a, spent))
    return f"migrated from a schema-1 ledger ({len(rows)} releases re-read per image and attribute)"


V3_COLUMNS = {"outcome": "TEXT NOT NULL DEFAULT 'released' CHECK (outcome IN ('released', 'refused'))",
              "models": "TEXT", "price": "TEXT"}  # price: schema 4


def add_v3_columns(tx) -> str | None:
    """Schema 1, 2 or 3 -> 4: add ``releases.outcome`` (earlier rows: released), ``releases.models`` (earlier
    rows: NULL, not recorded) and ``releases.price`` (earlier rows: NULL, pixels unpriced, so unbounded).
    Returns what was done, or None if nothing was missing."""
    if tx.backend == "postgresql":  # PostgreSQL databases start at schema 3: only the price is missing
        tx.execute("ALTER TABLE releases ADD COLUMN IF NOT EXISTS price TEXT")
        return "added price to releases (schema 4)"
    have = {row[1] for row in tx.execute("PRAGMA table_info(releases)")}
    missing = [c for c in V3_COLUMNS if c not in have]
    for column in missing:
        tx.execute(f"ALTER TABLE releases ADD COLUMN {column} {V3_COLUMNS[column]}")
    return f"added {', '.join(missing)} to releases (schema 4)" if missing else None


def log_budget_change(tx, which: str, old: float | None, new: float, reason: str, *, who: str) -> None:
    """A row of ``budget_changes``: the ``which`` ("release" | "training") budget went from ``old`` to ``new``."""
    tx.execute("INSERT INTO budget_changes (budget, old_value, new_value, reason, changed_by, changed_at)"
               " VALUES (?, ?, ?, ?, ?, ?)", (which, old, new, reason, who, utc_now()))


def open_schema(tx, *, requested: float | None, default: float, create: bool, option: str, where, who: str):
    """Create, upgrade or read the schema inside ``tx`` (the caller holds the schema lock). A new database
    stores the release budget ``requested`` (None: ``default``; inf = unlimited) and returns None, as does an
    upgraded one; an existing one returns its stored release budget (inf = unlimited), to compare.
    ``create=False`` refuses a PostgreSQL database without the tables (ConfigError naming ``option``); a
    newer schema is a DataError."""
    version, tables = read_version(tx), tx.tables()
    if version > SCHEMA_VERSION:
        raise DataError(f"{option} {where}: schema {version} was written by a newer veil "
                        f"(this one reads up to {SCHEMA_VERSION}); upgrade veil")
    if version == 0 and not create and tx.backend == "postgresql":
        raise ConfigError(f"{where}: no privacy database there (nothing was recorded in this database yet); "
                          f"check --ledger", option=option)
    if 2 <= version < SCHEMA_VERSION:
        add_v3_columns(tx)
        tx.run_ddl(SCHEMA)  # the tables schema 4 added (IF NOT EXISTS)
        _default_policy(tx)
        write_version(tx, SCHEMA_VERSION)
        return None
    if version == SCHEMA_VERSION:
        row = tx.execute("SELECT value FROM settings WHERE key = 'release_budget'").fetchone()
        return math.inf if row is None or json.loads(row[0]) is None else float(json.loads(row[0]))
    legacy = tx.backend == "sqlite" and "releases" in tables  # schema 1 (SQLite only)
    tx.run_ddl(SCHEMA)
    value = default if requested is None else requested
    why = "set when the database was created"
    if legacy:
        add_v3_columns(tx)
        why = migrate_v1(tx)
    tx.execute("INSERT INTO settings (key, value) VALUES ('release_budget', ?), ('training_budget', 'null'),"
               " ('created_at', ?)", (json.dumps(None if math.isinf(value) else value), json.dumps(utc_now())))
    log_budget_change(tx, "release", None, value, why, who=who)
    _default_policy(tx)
    write_version(tx, SCHEMA_VERSION)
    return None


def _default_policy(tx) -> None:
    """Schema 4's settings where missing: the pixels are protected (priced and limited), delta 1e-6 per record."""
    tx.execute("INSERT INTO settings (key, value) VALUES ('pixels', ?), ('release_delta', ?) ON CONFLICT (key)"
               " DO NOTHING", (json.dumps("protected"), json.dumps(1e-6)))


def log_policy_change(tx, setting: str, old, new, reason: str, *, who: str) -> None:
    """A row of ``policy_changes``: the dataset's ``setting`` ("pixels" | "release_delta") changed."""
    tx.execute("INSERT INTO policy_changes (setting, old_value, new_value, reason, changed_by, changed_at)"
               " VALUES (?, ?, ?, ?, ?, ?)", (setting, json.dumps(old), json.dumps(new), reason, who, utc_now()))
