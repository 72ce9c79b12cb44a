"""The privacy database of one dataset: every release and every DP training run on it, and its budgets.

    ledger = PrivacyLedger.for_dataset({"source": "synthetic", "seed": 0})  # ~/.veil/datasets/synthetic-seed0.sqlite
    ledger.check(image_id="synth-0-000001", protected=["smiling"], epsilon=2.0, published=names)
    rec = ledger.record(image_id="synth-0-000001", protected=["smiling"], epsilon=2.0, strength=0.55, seed=s,
                        released_attributes={"smiling": -1, "eyeglasses": 1, ...})   # every value it publishes
    ledger.spent("synth-0-000001", "smiling")                         # 2.0
    run = ledger.start_training_run(run="runs/dp", kind="diffusion", private=True, planned_epsilon=10.0,
                                    delta=1e-6, details={...})       # PrivacyError before training if over
    ledger.finish_training_run(run, epsilon=9.98, delta=1e-6, steps=2000)
    ledger.training_spent()                                           # (sum of epsilons, sum of deltas)

**One database per dataset.** ``ledger_path_for(spec)`` is ``$VEIL_HOME/datasets/<slug>.sqlite``
(VEIL_HOME defaults to ``~/.veil``): ``synthetic-seed<N>`` for the synthetic faces (image i depends
only on (seed, i)), ``<source>-<folder name>-<12 hex of sha256(resolved root)>`` for CelebA and
folders. A moved folder gets a new database: pass the old one explicitly (``--ledger``).

**Releases compose per (image, attribute)** (local DP). A release of an image publishes a value for
each attribute in its ``released_attributes``: the protected ones through randomized response at
epsilon (charged epsilon each), the others exactly. The epsilons of one (image, attribute) add
(basic sequential composition: each release draws fresh randomness), and the release budget bounds
that sum. Two releases are refused because no epsilon describes them: publishing an attribute
exactly after an earlier release of the image protected it (it would publish the true value), and
protecting an attribute that an earlier release already published exactly (it protects nothing).

**Training runs compose by basic composition** (central DP): the dataset's training spend is
(sum of epsilons, sum of deltas) over every run on it; a non-private run, or one with no epsilon
bound, makes the sum infinite; a run still "running" or "failed" counts with its planned epsilon
(its noisy checkpoints exist). The optional training budget caps that sum, checked before a run starts.

**Budgets live in the database**: the release budget is set when the database is created and changed
only by ``set_budget(value, reason=...)`` (likewise ``set_training_budget``), each change a row in
``budget_changes`` (old, new, reason, who, when). Budgets are read inside the write transaction, so
a writer cannot spend past the stored budget whatever it was started with.

**Secrets.** The database holds each release's randomized-response seed and the released values:
with the seed, anyone can undo the coin flips. It is created owner-only (file 0600, a new folder
0700) and must never be shared; ``summary()`` holds no seed.

Durability: WAL journal with ``synchronous=FULL``; check and insert run in one ``BEGIN IMMEDIATE``
transaction, so two writers (a server and a CLI run) cannot both spend the last of a budget, and a
writer killed at any point leaves every committed row. Schema 3 (``PRAGMA user_version``); a schema-1
ledger (releases only, composed per image) or a schema-2 one (no release outcome, no model privacy)
is migrated in place when opened. Plain stdlib; no torch.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import socket
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from veil.errors import ConfigError, DataError, PrivacyError
from veil.privacy.ledger_schema import SCHEMA, SCHEMA_VERSION, add_v3_columns, migrate_v1
from veil.privacy.locations import dataset_slug, ledger_path_for, veil_home  # noqa: F401  (re-exported)
from veil.privacy.mechanism import check_epsilon, json_epsilon
from veil.privacy.training_runs import TrainingRunsMixin, _now, _TOL

__all__ = ["PrivacyLedger", "ReleaseLedger", "ReleaseRecord", "ledger_path_for", "dataset_slug", "veil_home",
           "DEFAULT_BUDGET", "SCHEMA_VERSION", "refuse_release"]

DEFAULT_BUDGET = 8.0  # per (image, attribute): two releases at "low", four at "medium", eight at "high"


@dataclass(frozen=True)
class ReleaseRecord:
    release_id: int
    image_id: str
    protected: list[str]
    epsilon: float
    strength: float
    seed: int  # secret
    level: str | None
    released_attributes: dict[str, int] | None
    budget: float | None
    released_at: str
    outcome: str = "released"  # "refused": drawn and charged, but its edit did not show it, so not published
    models: list[dict] | None = None  # training privacy of each model that made the edit (None: not recorded)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["epsilon"] = json_epsilon(self.epsilon)
        return d


def _check_budget(value, *, option: str) -> float:
    """A budget as a float, +inf for unlimited (None or inf); ConfigError naming ``option`` otherwise."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigError(f"{option}={value!r}: must be a number >= 0 (inf = unlimited)")
    return float(value)


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _jnum(x: float | None):
    """A number for JSON: None stays None, +inf becomes "inf"."""
    return None if x is None else json_epsilon(x)


def _create_owner_only(path: Path) -> None:
    """An empty file readable by its owner only (0600), in folders created 0700."""
    for folder in reversed([p for p in (path.parent, *path.parent.parents) if not p.exists()]):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:  # another writer created it first: fine, it made it 0600 too
        return
    os.chmod(path, 0o600)


def refuse_release(image_id: str, protected: list[str], eps: float, published: list[str], pending: dict,
                   budget: float, pair: Callable[[str, str], list]) -> None:
    """PrivacyError naming the (image, attribute) a release would break; fills ``pending`` with the pairs.

    ``pair(image_id, name)`` reads [epsilon spent, protected releases, exact releases] of one (image,
    attribute) from the database; ``pending`` holds the pairs read so far, updated by the caller for the
    rows it has inserted in the same transaction. Shared by ``PrivacyLedger`` and the server's state store.
    """
    for name in dict.fromkeys(protected + published):
        if (image_id, name) not in pending:
            pending[image_id, name] = pair(image_id, name)
        spent, n_protected, n_exact = pending[image_id, name]
        if name in protected and n_exact:
            raise PrivacyError(
                f"release of {image_id!r} refused: {name!r} was published exactly (unprotected) by an earlier "
                f"release of this image, so protecting it now protects nothing; leave it out of --protect")
        if name not in protected and n_protected:
            raise PrivacyError(
                f"release of {image_id!r} refused: it would publish {name!r} exactly (unprotected), but earlier "
                f"releases of this image protected it (epsilon {spent:g} spent): that would give its true value "
                f"away; add {name!r} to --protect")
        if name in protected and spent + eps > budget + _TOL:
            raise PrivacyError(
                f"release of {image_id!r} refused: its attribute {name!r} has spent epsilon {spent:g} of its "
                f"budget {budget:g}, and this release asks for {eps:g} more ({spent + eps:g} > {budget:g}); "
                f"choose a more private level (smaller epsilon), or raise the dataset's budget with "
                f"`veil privacy set-budget` if that is really intended")


class PrivacyLedger(TrainingRunsMixin):
    """The SQLite privacy database at ``path``: releases, training runs, budgets (see the module docstring).

    ``budget`` is the per-(image, attribute) release budget to store when the database is new (default
    DEFAULT_BUDGET; inf = unlimited); on an existing database it must equal the stored one (PrivacyError:
    change it with ``set_budget``); None keeps the stored one. ``create=False`` refuses a missing database.
    """

    def __init__(self, path, *, budget: float | None = None, create: bool = True, timeout_s: float = 30.0):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ConfigError(f"--ledger {self.path}: is a folder; give a file path, e.g. {self.path / 'ledger.sqlite'}")
        requested = None if budget is None else _check_budget(budget, option="--budget")
        if not self.path.exists():
            if not create:
                raise ConfigError(f"--ledger {self.path}: no privacy database there (nothing was recorded for this "
                                  f"dataset yet); check --data or --ledger")
            _create_owner_only(self.path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so check + insert is one transaction.
        self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._open_schema(requested)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise DataError(f"--ledger {self.path}: not a veil privacy database ({e}); give the dataset's "
                            f"database (a .sqlite file veil made) or leave out --ledger") from None
        except BaseException:
            self._db.close()
            raise
        # it holds secrets (release seeds): owner-only, whoever made it (only once it is known to be a database:
        # a text file given by mistake keeps its mode)
        if self.path.stat().st_mode & 0o077 and self.path.stat().st_uid == os.getuid():
            os.chmod(self.path, 0o600)

    @classmethod
    def for_dataset(cls, data_spec: dict, *, budget: float | None = None, path=None) -> "PrivacyLedger":
        """The database of the dataset ``data_spec`` describes (``path`` overrides ``ledger_path_for``)."""
        slug = dataset_slug(data_spec)  # refuses a spec without a location, even with an explicit path
        ledger = cls(ledger_path_for(data_spec) if path is None else path, budget=budget)
        where = {k: data_spec.get(k) for k in ("source", "seed", "root") if data_spec.get(k) is not None}
        if "root" in where:
            where["root"] = str(Path(str(where["root"])).expanduser().resolve())
        try:
            with ledger._write():
                ledger._db.execute("INSERT OR IGNORE INTO settings VALUES ('dataset', ?)",
                                   (json.dumps({"slug": slug, **where}),))
        except sqlite3.DatabaseError as e:  # damaged past the pages read when opening
            ledger.close()
            raise DataError(f"--ledger {ledger.path}: damaged privacy database ({e}); restore it from a backup "
                            f"(it holds every release of the dataset)") from None
        except BaseException:
            ledger.close()
            raise
        return ledger

    # -- schema and settings ----------------------------------------------------------------------
    @contextmanager
    def _write(self):
        self._db.execute("BEGIN IMMEDIATE")  # the write lock, before reading what has been spent
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _open_schema(self, requested: float | None) -> None:
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version > SCHEMA_VERSION:
                raise DataError(f"--ledger {self.path}: schema {version} was written by a newer veil "
                                f"(this one reads up to {SCHEMA_VERSION}); upgrade veil")
            if 2 <= version < SCHEMA_VERSION:
                add_v3_columns(self._db)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version < SCHEMA_VERSION:
                legacy = "releases" in tables
                for statement in SCHEMA.split(";"):  # not executescript: it would commit mid-transaction
                    self._db.execute(statement)
                value = DEFAULT_BUDGET if requested is None else requested
                why = "set when the database was created"
                if legacy:
                    add_v3_columns(self._db)
                    why = migrate_v1(self._db)
                self._db.execute("INSERT INTO settings VALUES ('release_budget', ?), ('training_budget', 'null'),"
                                 " ('created_at', ?)", (json.dumps(None if math.isinf(value) else value), json.dumps(_now())))
                self._log_change("release", None, value, why)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif requested is not None and not math.isclose(requested, self._budget(), rel_tol=0, abs_tol=_TOL):
                raise PrivacyError(
                    f"--budget {requested:g}: the privacy database {self.path} holds the release budget "
                    f"{self._budget():g} per image and attribute; a dataset's budget is set once, and changing it "
                    f"is an explicit, recorded act: `veil privacy set-budget {requested:g} --reason \"...\" "
                    f"--ledger {self.path}`; or leave out --budget to use the stored one")

    def _setting(self, key: str):
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _budget(self) -> float:
        value = self._setting("release_budget")
        return math.inf if value is None else float(value)

    def _log_change(self, which: str, old: float | None, new: float, reason: str) -> None:
        self._db.execute("INSERT INTO budget_changes (budget, old_value, new_value, reason, changed_by, changed_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (which, old, new, reason, _who(), _now()))

    def _set(self, which: str, value, reason: str) -> None:
        new = _check_budget(value, option="set-budget" if which == "release" else "set-training-budget")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError("--reason: say why the budget changes (it is recorded with the change)")
        key = f"{which}_budget"
        with self._write():
            old = self._setting(key)
            old = math.inf if old is None else float(old)
            self._db.execute("UPDATE settings SET value = ? WHERE key = ?",
                             (json.dumps(None if math.isinf(new) else new), key))
            self._log_change(which, old, new, reason.strip())

    @property
    def budget(self) -> float | None:
        """The per-(image, attribute) release budget (None = unlimited), as stored now."""
        value = self._budget()
        return None if math.isinf(value) else value

    @property
    def training_budget(self) -> float | None:
        """The dataset-wide cap on the composed training epsilon (None = no cap), as stored now."""
        return self._setting("training_budget")

    def set_budget(self, value: float | None, *, reason: str) -> None:
        """Change the release budget (None or inf = unlimited); recorded with who, when, old, new and why."""
        self._set("release", value, reason)

    def set_training_budget(self, value: float | None, *, reason: str) -> None:
        """Change the training budget (None or inf = no cap); recorded like ``set_budget``."""
        self._set("training", value, reason)

    def budget_changes(self) -> list[dict]:
        cols = ("change_id", "budget", "old_value", "new_value", "reason", "changed_by", "changed_at")
        rows = self._db.execute(f"SELECT {', '.join(cols)} FROM budget_changes ORDER BY change_id")
        return [{**dict(zip(cols, r)), "old_value": _jnum(r[2]), "new_value": _jnum(r[3])} for r in rows]

    # -- releases: reading ------------------------------------------------------------------------
    def _pair(self, image_id: str, attribute: str) -> list:
        """[epsilon spent, protected releases, exact releases] of one (image, attribute)."""
        spent, protected, n = self._db.execute(
            "SELECT TOTAL(epsilon), COUNT(epsilon), COUNT(*) FROM attribute_spends WHERE image_id = ? AND attribute = ?",
            (image_id, attribute)).fetchone()
        return [float(spent), int(protected), int(n) - int(protected)]

    def spent(self, image_id: str, attribute: str) -> float:
        """Sum of the epsilons at which ``attribute`` of ``image_id`` was released protected (0.0 if never)."""
        return self._pair(str(image_id), str(attribute))[0]

    def spends(self, image_id: str) -> dict[str, float]:
        """{attribute: epsilon spent} over the attributes of ``image_id`` that some release protected."""
        rows = self._db.execute("SELECT attribute, TOTAL(epsilon) FROM attribute_spends WHERE image_id = ? AND "
                                "epsilon IS NOT NULL GROUP BY attribute ORDER BY attribute", (str(image_id),))
        return {a: float(s) for a, s in rows}

    def remaining(self, image_id: str, attribute: str) -> float:
        return self._budget() - self.spent(image_id, attribute)

    def count(self, image_id: str) -> int:
        """How many releases of ``image_id`` there have been."""
        return int(self._db.execute("SELECT COUNT(*) FROM releases WHERE image_id = ?", (str(image_id),)).fetchone()[0])

    def releases(self, image_id: str | None = None) -> list[ReleaseRecord]:
        """Every release (of ``image_id`` if given), oldest first."""
        sql, args = "SELECT * FROM releases", ()
        if image_id is not None:
            sql, args = sql + " WHERE image_id = ?", (image_id,)
        return [self._row_to_record(r) for r in self._db.execute(sql + " ORDER BY release_id", args)]

    # -- releases: writing ------------------------------------------------------------------------
    def check(self, *, image_id: str, protected: Sequence[str], epsilon: float, published: Sequence[str] = ()) -> None:
        """PrivacyError if ``record`` would refuse this release: ``protected`` at ``epsilon``, and ``published``
        the attributes it publishes (those not in ``protected`` exactly). Call it before spending compute."""
        self._refuse(str(image_id), list(protected), check_epsilon(epsilon), list(published), {}, self._budget())

    def record(self, *, image_id: str, protected: Sequence[str], epsilon: float, strength: float, seed: int,
               released_attributes: Mapping[str, int], level: str | None = None, outcome: str = "released",
               models: list[dict] | None = None) -> ReleaseRecord:
        """Check the budget and append one release, atomically; returns the committed record. ``outcome``
        "refused" charges a draw whose edit was not published (its refusal depends on the draw)."""
        return self.record_many([dict(image_id=image_id, protected=protected, epsilon=epsilon, strength=strength,
                                      seed=seed, level=level, released_attributes=released_attributes,
                                      outcome=outcome, models=models)])[0]

    def record_many(self, releases: Iterable[Mapping], *,
                    before_commit: Callable[[list[ReleaseRecord]], None] | None = None) -> list[ReleaseRecord]:
        """Append several releases in one transaction: all are committed, or none (PrivacyError).

        ``before_commit(records)`` runs inside the transaction once the rows are in (``spent`` already
        counts them): a caller publishes the release's files there, so that if publishing raises, the
        releases are rolled back and nothing is charged (``veil edit``'s all-or-nothing release).
        """
        releases, ids, now = list(releases), [], _now()
        with self._write():
            budget, pending = self._budget(), {}
            for r in releases:
                image_id, protected, eps = str(r["image_id"]), [str(p) for p in r["protected"]], check_epsilon(r["epsilon"])
                released = {str(k): int(v) for k, v in dict(r["released_attributes"]).items()}
                if not protected or not set(protected) <= set(released):
                    raise ConfigError(f"release of {image_id!r}: released_attributes {sorted(released)} must hold "
                                      f"every protected attribute {protected} (and at least one)")
                if r.get("outcome", "released") not in ("released", "refused"):
                    raise ConfigError(f"release of {image_id!r}: outcome {r['outcome']!r} is not released or refused")
                self._refuse(image_id, protected, eps, list(released), pending, budget)
                cur = self._db.execute(
                    "INSERT INTO releases (image_id, protected, epsilon, strength, seed, level, released_attributes,"
                    " budget, released_at, outcome, models) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (image_id, json.dumps(protected), eps, float(r["strength"]), int(r["seed"]), r.get("level"),
                     json.dumps(released), None if math.isinf(budget) else budget, now, r.get("outcome", "released"),
                     None if r.get("models") is None else json.dumps(r["models"])))
                ids.append(cur.lastrowid)
                for name in released:
                    cost = eps if name in protected else None
                    self._db.execute("INSERT INTO attribute_spends VALUES (?, ?, ?, ?)", (ids[-1], image_id, name, cost))
                    pair = pending[image_id, name]  # [spent, protected releases, exact releases], for the next row
                    if cost is None:
                        pair[2] += 1
                    else:
                        pair[0], pair[1] = pair[0] + cost, pair[1] + 1
            marks = ",".join("?" * len(ids))
            rows = self._db.execute(f"SELECT * FROM releases WHERE release_id IN ({marks}) ORDER BY release_id", ids)
            records = [self._row_to_record(r) for r in rows]
            if before_commit is not None:
                before_commit(records)
        return records

    def _refuse(self, image_id: str, protected: list[str], eps: float, published: list[str], pending: dict,
                budget: float) -> None:
        refuse_release(image_id, protected, eps, published, pending, budget, self._pair)

    # -- the account ------------------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able account of the dataset: budgets, training runs composed, release spends per attribute."""
        budget, cap = self._budget(), self.training_budget
        eps, delta = self.training_spent()
        runs = [{**r, **{k: _jnum(r[k]) for k in ("planned_epsilon", "epsilon", "counted_epsilon")}}
                for r in self.training_runs()]
        per_attribute = {}
        for name, images, n, top, full, exact in self._db.execute(
                "SELECT attribute, SUM(n > 0), SUM(n), MAX(spent), SUM(n > 0 AND spent >= ? - 1e-12), SUM(exact > 0)"
                " FROM (SELECT image_id, attribute, TOTAL(epsilon) AS spent, COUNT(epsilon) AS n,"
                " COUNT(*) - COUNT(epsilon) AS exact FROM attribute_spends GROUP BY image_id, attribute)"
                " GROUP BY attribute ORDER BY attribute", (budget,)):
            per_attribute[name] = {"images_protected": images, "protected_releases": n, "max_spent": _jnum(top),
                                   "at_budget": full, "images_published_exactly": exact}
        top = self._db.execute("SELECT MAX(spent) FROM (SELECT TOTAL(epsilon) AS spent FROM attribute_spends"
                               " WHERE epsilon IS NOT NULL GROUP BY image_id, attribute)").fetchone()[0] or 0.0
        return {
            "database": str(self.path), "schema": SCHEMA_VERSION, "dataset": self._setting("dataset"),
            "budget_changes": self.budget_changes(),
            "training": {"composition": "basic: epsilons add, deltas add", "runs": runs, "epsilon": _jnum(eps),
                         "delta": delta, "budget": _jnum(cap), "left": None if cap is None else _jnum(cap - eps)},
            "releases": {"composition": "per (image, attribute): the epsilons of the releases that protected it add",
                         "releases": self._db.execute("SELECT COUNT(*) FROM releases").fetchone()[0],
                         "refused": self._db.execute("SELECT COUNT(*) FROM releases WHERE outcome = 'refused'")
                         .fetchone()[0],
                         "images": self._db.execute("SELECT COUNT(DISTINCT image_id) FROM releases").fetchone()[0],
                         "budget": _jnum(budget), "max_spent": _jnum(top), "least_left": _jnum(budget - top),
                         "attributes": per_attribute},
        }

    # -- plumbing ---------------------------------------------------------------------------------
    @staticmethod
    def _row_to_record(row) -> ReleaseRecord:
        rid, image_id, protected, eps, strength, seed, level, attrs, budget, at, outcome, models = row
        return ReleaseRecord(rid, image_id, json.loads(protected), float(eps), float(strength), int(seed), level,
                             None if attrs is None else json.loads(attrs), budget, at, outcome,
                             None if models is None else json.loads(models))

    def integrity_check(self) -> str:
        """SQLite's own consistency check: 'ok' for a sound database."""
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "PrivacyLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


ReleaseLedger = PrivacyLedger  # the name before the database also held training runs
