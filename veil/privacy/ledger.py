"""The privacy database of one dataset: every release and every DP training run on it, and its budgets.

    ledger = PrivacyLedger.for_dataset({"source": "synthetic", "seed": 0})  # ~/.veil/datasets/synthetic-seed0.sqlite
    ledger = PrivacyLedger("postgresql://veil@db:5432/veil")          # the one `veil serve` replicas share
    price = price_release(epsilon=2.0, protected=["smiling"], encoding="noise", pixel_mus=[0.5])
    ledger.check(image_id="synth-0-000001", protected=["smiling"], epsilon=2.0, price=price, published=names)
    rec = ledger.record(image_id="synth-0-000001", protected=["smiling"], epsilon=2.0, strength=0.55, seed=s,
                        released_attributes={"smiling": -1, "eyeglasses": 1, ...}, price=price)
    ledger.guarantee("synth-0-000001")                                # composed (epsilon, delta) of the record
    ledger.spent("synth-0-000001", "smiling")                         # 2.0 (label epsilons of one attribute)
    run = ledger.start_training_run(run="runs/dp", kind="diffusion", private=True, planned_epsilon=10.0,
                                    delta=1e-6, details={...})       # PrivacyError before training if over
    ledger.finish_training_run(run, epsilon=9.98, delta=1e-6, steps=2000)
    ledger.training_spent()                                           # (sum of epsilons, sum of deltas)

A release is made by ``veil.privacy.release.release`` (check, draw, edit, record); ``record_many`` here is
the one place that writes release rows, for every caller (the edit job, edit sessions, the server).

**One database per dataset.** ``ledger_path_for(spec)`` is ``$VEIL_HOME/datasets/<slug>.sqlite``
(VEIL_HOME defaults to ``~/.veil``): ``synthetic-seed<N>`` for the synthetic faces (image i depends
only on (seed, i)); for CelebA and folders, the database that shares the most image files with the
dataset, by content (``veil.privacy.locations``: a copied, moved or edited folder keeps its database;
only a dataset sharing no image file gets a new one, ``<source>-<folder name>-<12 hex>``). The same
database can live on PostgreSQL (a ``postgresql://`` URL: ``veil serve`` replicas share one); both go
through ``veil.privacy.db``, so ``veil privacy show --ledger postgresql://...`` reads the server's releases.

**Releases compose per record** (local DP; ``veil.privacy.accounting``). A release of an image publishes a
value for each attribute in its ``released_attributes`` (the protected ones through randomized response at
epsilon, the others exactly) and pixels (the edit of an encoding of the image). Each row holds its price in
both channels (``ReleasePrice``); the record's guarantee composes every release of it, refused ones
included, with dp-accounting's PLD accountant, at the dataset's ``release_delta`` (default 1e-6). The
release budget bounds that composed epsilon. The dataset's pixel policy ("protected", the default, or
"not-protected", set with ``set_pixel_policy``) says whether the pixels count: under "protected" a release
with unbounded pixels (DDIM inversion) is refused. Two releases are refused because no epsilon describes
them: publishing an attribute exactly after an earlier release of the image protected it (it would publish
the true value), and protecting an attribute that an earlier release already published exactly (it
protects nothing). ``spent(image, attribute)`` still reads the label epsilons of one attribute.

**Training runs compose by basic composition** (central DP): the dataset's training spend is
(sum of epsilons, sum of deltas) over every run on it; a non-private run, or one with no epsilon
bound, makes the sum infinite; a run still "running" or "failed" counts with its planned epsilon
(its noisy checkpoints exist). The optional training budget caps that sum, checked before a run starts.

**Budgets live in the database**: the release budget is set when the database is created and changed
only by ``set_budget(value, reason=...)`` (likewise ``set_training_budget``), each change a row in
``budget_changes`` (old, new, reason, who, when). Budgets are read inside the write transaction, so
a writer cannot spend past the stored budget whatever it was started with.

**Secrets.** The database holds each release's randomized-response seed and the released values:
with the seed, anyone can undo the coin flips. It also holds the key of the published revisions'
pseudonymous ids (``pseudonym_key``): with it, a pseudonym maps back to its file name. A SQLite file is created owner-only (file 0600, a new
folder 0700); a PostgreSQL role should be the owner's and the server's only. ``summary()`` holds no seed.

Durability: check and insert run in one write transaction that locks before it reads (SQLite: ``BEGIN
IMMEDIATE``; PostgreSQL: an advisory lock per image), so two writers (a server and a CLI run) cannot both
spend the last of a budget, and a writer killed at any point leaves every committed row. Schema 4
(``ledger_schema``); a schema-1 ledger (releases only, composed per image), a schema-2 one (no release
outcome, no model privacy) or a schema-3 one (no price: its releases count with unbounded pixels) is
migrated in place when opened. Plain stdlib and dp-accounting (psycopg for PostgreSQL); no torch.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from veil.errors import ConfigError, DataError, PrivacyError
from veil.privacy.db import SCHEMA_LOCK, PostgresDatabase, SqliteDatabase, create_owner_only, is_url, open_database, \
    sqlite_path, utc_now
from veil.privacy.ledger_schema import SCHEMA_VERSION, log_budget_change, log_policy_change, open_schema, \
    read_version
from veil.privacy.level_policy import pinned_levels
from veil.privacy.locations import dataset_slug, ledger_path_for, veil_home  # noqa: F401  (re-exported)
from veil.privacy.accounting import DEFAULT_RELEASE_DELTA, ENCODING_PIXELS, Guarantee, ReleasePrice, \
    check_pixel_policy, compose
from veil.privacy.mechanism import check_epsilon, json_epsilon
from veil.privacy.training_runs import TOLERANCE, TrainingRunsMixin

__all__ = ["PrivacyLedger", "ReleaseLedger", "ReleaseRecord", "ledger_path_for", "dataset_slug", "veil_home",
           "DEFAULT_BUDGET", "SCHEMA_VERSION", "refuse_release", "ledger_exists"]

DEFAULT_BUDGET = 8.0  # per record: its composed epsilon (labels and pixels) at the release delta

_RELEASE_COLUMNS = ("release_id, image_id, protected, epsilon, strength, seed, level, released_attributes, budget,"
                    " released_at, outcome, models, price")


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
    price: ReleasePrice | None = None  # both channels (None: before schema 4, priced with unbounded pixels)

    @property
    def charged(self) -> ReleasePrice:
        """What the record's account composes for this release (a schema-3 row: its labels, unbounded pixels)."""
        if self.price is not None:
            return self.price
        return ReleasePrice(self.epsilon, len(set(self.protected)), math.inf, "unrecorded")

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["epsilon"] = json_epsilon(self.epsilon)
        d["price"] = None if self.price is None else self.price.to_json()
        return d


def _check_budget(value, *, option: str) -> float:
    """A budget as a float, +inf for unlimited (None or inf); ConfigError naming ``option`` otherwise."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigError(f"={value!r}: must be a number >= 0 (inf = unlimited)", option=option)
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


def _check_price(image_id: str, price, protected: list[str], epsilon: float) -> None:
    """ConfigError unless ``price`` is a ReleasePrice whose labels are those of protecting ``protected`` at
    ``epsilon`` (a release cannot be charged less than what it publishes)."""
    if not isinstance(price, ReleasePrice):
        raise ConfigError(f"release of {image_id!r}: price={price!r} is not a veil.privacy.accounting.ReleasePrice "
                          f"(nothing is released unpriced)")
    if price.label_epsilon != epsilon or price.labels != len(set(protected)):
        raise ConfigError(f"release of {image_id!r}: its price ({price.labels} labels at epsilon "
                          f"{price.label_epsilon:g}) is not that of protecting {protected} at epsilon {epsilon:g}")


def _release_row(r: Mapping) -> dict:
    """One release as ``record_many`` takes it, its types checked: ConfigError saying what is wrong."""
    try:
        level = r.get("level")
        released = {str(k): int(v) for k, v in dict(r["released_attributes"]).items()}
        row = dict(image_id=str(r["image_id"]), protected=[str(p) for p in r["protected"]],
                   strength=float(r["strength"]), seed=int(r["seed"]), released_attributes=released,
                   level=level.get("name") if isinstance(level, dict) else level,  # the ledger keeps the level's name
                   outcome=r.get("outcome", "released"), models=r.get("models"))
        epsilon = r["epsilon"]
        price = r["price"]
        row["price"] = price if isinstance(price, ReleasePrice) else ReleasePrice.from_json(price)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"malformed release ({type(e).__name__}: {e}); it needs image_id, protected, epsilon, "
                          f"strength, seed, released_attributes and price (an accounting.ReleasePrice: nothing is "
                          f"recorded unpriced; level, outcome and models are optional)") from None
    row["epsilon"] = check_epsilon(epsilon)
    if not row["protected"] or not set(row["protected"]) <= set(row["released_attributes"]):
        raise ConfigError(f"release of {row['image_id']!r}: released_attributes {sorted(row['released_attributes'])} "
                          f"must hold every protected attribute {row['protected']} (and at least one)")
    _check_price(row["image_id"], row["price"], row["protected"], row["epsilon"])
    if row["outcome"] not in ("released", "refused"):
        raise ConfigError(f"release of {row['image_id']!r}: outcome {row['outcome']!r} is not released or refused")
    return row


def refuse_release(image_id: str, protected: list[str], eps: float, published: list[str], pending: dict,
                   budget: float, pair: Callable[[str, str], list]) -> None:
    """PrivacyError naming the (image, attribute) whose value a release would give away (``budget`` is not read
    here: it limits the record, see ``PrivacyLedger._refuse_record``); fills ``pending`` with the pairs.

    ``pair(image_id, name)`` reads [epsilon spent, protected releases, exact releases] of one (image,
    attribute) from the database; ``pending`` holds the pairs read so far, updated by the caller for the
    rows it has inserted in the same transaction.
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
        # the budget itself limits the record, both channels composed: ``PrivacyLedger._refuse_record``


def _price(protected: str, epsilon: float, price: str | None) -> ReleasePrice:
    """A row's price; a schema-3 row (NULL): its labels, and pixels that were never limited (unbounded)."""
    if price is not None:
        return ReleasePrice.from_json(json.loads(price))
    return ReleasePrice(float(epsilon), len(set(json.loads(protected))), math.inf, "unrecorded")


def _cannot_create(path: Path, e: OSError, option: str) -> str:
    """The one line for a database file that cannot be created, naming $VEIL_HOME when it is under it."""
    home = veil_home()
    why = e.strerror or type(e).__name__
    if path.is_relative_to(home):
        return (f"VEIL_HOME={home}: cannot create the privacy database {path} ({why}: {e.filename}); set "
                f"VEIL_HOME to a folder veil may create, or name the database with {option}")
    return f"{option} {path}: cannot create the privacy database ({why}: {e.filename}); give a path veil may create"


def ledger_exists(target) -> bool:
    """Whether ``target`` (a SQLite path or a PostgreSQL URL) holds a privacy database; creates nothing."""
    if not is_url(target):
        return sqlite_path(target).exists()
    with open_database(target) as db, db.transaction(write=False) as tx:
        return read_version(tx) > 0


class PrivacyLedger(TrainingRunsMixin):
    """The privacy database at ``target`` (a SQLite path, or a ``postgresql://`` URL): releases, training runs,
    budgets (see the module docstring).

    ``budget`` is the per-record release budget (composed epsilon) to store when the database is new (default
    DEFAULT_BUDGET; inf = unlimited); on an existing database it must equal the stored one (PrivacyError:
    change it with ``set_budget``); None keeps the stored one. ``create=False`` refuses a missing database.
    ``option`` names ``target`` in messages (``--ledger``; the server's ``--state``).
    """

    def __init__(self, target, *, budget: float | None = None, create: bool = True, timeout_s: float = 30.0,
                 option: str = "--ledger"):
        requested = None if budget is None else _check_budget(budget, option="--budget")
        self.option = option
        if is_url(target):
            self._db = PostgresDatabase(str(target), option=option)
            self.path = self._db.where  # the URL without its password
        else:
            self.path = sqlite_path(target)
            if self.path.is_dir():
                raise ConfigError(f"{self.path}: is a folder; give a file path, e.g. {self.path / 'ledger.sqlite'}",
                                  option=option)
            if not self.path.exists():
                if not create:
                    raise ConfigError(f"{self.path}: no privacy database there (nothing was recorded for this "
                                      f"dataset yet); check --data or --ledger", option=option)
                try:
                    create_owner_only(self.path)
                except OSError as e:  # a folder on the way is a file, read-only, ...: bad input, exit 2
                    raise ConfigError(_cannot_create(self.path, e, option)) from None
            self._db = SqliteDatabase(self.path, timeout_s=timeout_s)
        try:
            self._open_schema(requested, create=create)
        except self._db.Error as e:
            self._db.close()
            raise DataError(self._unreadable(e)) from None
        except BaseException:
            self._db.close()
            raise
        # it holds secrets (release seeds): owner-only, whoever made it (only once it is known to be a database:
        # a text file given by mistake keeps its mode)
        if self._db.backend == "sqlite" and self.path.stat().st_mode & 0o077 and self.path.stat().st_uid == os.getuid():
            os.chmod(self.path, 0o600)

    @property
    def db(self):
        """The ``veil.privacy.db.Database`` underneath (a server adds its own tables through it)."""
        return self._db

    @property
    def where(self) -> str:
        return str(self.path)

    def _unreadable(self, e: Exception) -> str:
        if self._db.backend == "sqlite":
            return (f"{self.option} {self.path}: not a veil privacy database ({e}); give the dataset's database (a "
                    f".sqlite file veil made) or leave out {self.option}")
        return (f"{self.option} {self.path}: cannot create or read the privacy tables ({str(e).strip()}); check that "
                f"the role may create tables in this database")

    @classmethod
    def for_dataset(cls, data_spec: dict, *, budget: float | None = None, path=None) -> "PrivacyLedger":
        """The database of the dataset ``data_spec`` describes (``path`` overrides ``ledger_path_for``)."""
        slug = dataset_slug(data_spec)  # refuses a spec without a location, even with an explicit path
        ledger = cls(ledger_path_for(data_spec) if path is None else path, budget=budget)
        where = {k: data_spec.get(k) for k in ("source", "seed", "root") if data_spec.get(k) is not None}
        if "root" in where:
            where["root"] = str(Path(str(where["root"])).expanduser().resolve())
        try:
            with ledger._write() as tx:
                tx.execute("INSERT INTO settings (key, value) VALUES ('dataset', ?) ON CONFLICT (key) DO NOTHING",
                           (json.dumps({"slug": slug, **where}),))
        except ledger._db.Error as e:  # damaged past the pages read when opening
            ledger.close()
            raise DataError(f"{ledger.option} {ledger.path}: damaged privacy database ({e}); restore it from a "
                            f"backup (it holds every release of the dataset)") from None
        except BaseException:
            ledger.close()
            raise
        return ledger

    # -- schema and settings ----------------------------------------------------------------------
    def _write(self, *locks: str):
        """A write transaction (``veil.privacy.db``): SQLite's write lock, or PostgreSQL advisory locks on ``locks``."""
        return self._db.transaction(locks=locks)

    def _open_schema(self, requested: float | None, *, create: bool) -> None:
        with self._write(SCHEMA_LOCK) as tx:
            stored = open_schema(tx, requested=requested, default=DEFAULT_BUDGET, create=create, option=self.option,
                                 where=self.path, who=_who())
        if stored is not None and requested is not None and not math.isclose(requested, stored, rel_tol=0,
                                                                               abs_tol=TOLERANCE):
            raise PrivacyError(
                f"--budget {requested:g}: the privacy database {self.path} holds the release budget "
                f"{stored:g} per record; a dataset's budget is set once, and changing it "
                f"is an explicit, recorded act: `veil privacy set-budget {requested:g} --reason \"...\" "
                f"--ledger {self.path}`; or leave out --budget to use the stored one")

    def _setting(self, key: str):
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _budget(self) -> float:
        value = self._setting("release_budget")
        return math.inf if value is None else float(value)

    def _set(self, which: str, value, reason: str) -> None:
        new = _check_budget(value, option="set-budget" if which == "release" else "set-training-budget")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError(": say why the budget changes (it is recorded with the change)", option="--reason")
        key = f"{which}_budget"
        with self._write(f"veil:{key}") as tx:
            old = self._setting(key)
            old = math.inf if old is None else float(old)
            tx.execute("UPDATE settings SET value = ? WHERE key = ?",
                       (json.dumps(None if math.isinf(new) else new), key))
            log_budget_change(tx, which, old, new, reason.strip(), who=_who())

    @property
    def budget(self) -> float | None:
        """The per-record release budget (composed epsilon at release_delta) (None = unlimited), as stored now."""
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

    @property
    def pixel_policy(self) -> str:
        """"protected" (pixels priced and limited by the budget) or "not-protected" (labels only)."""
        return self._setting("pixels") or "protected"

    @property
    def release_delta(self) -> float:
        """The delta of every record's guarantee (the budget limits the epsilon at this delta)."""
        value = self._setting("release_delta")
        return DEFAULT_RELEASE_DELTA if value is None else float(value)

    def set_pixel_policy(self, policy: str, *, reason: str) -> None:
        """Say whether the dataset's pixels are protected; recorded with who, when, old, new and why. Under
        "not-protected" the budget limits the labels alone and every later release says its pixels are not
        protected (the only way to release a DDIM inversion, which has no pixel bound)."""
        new = check_pixel_policy(policy, option="set-pixels")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError(": say why the policy changes (it is recorded with the change)", option="--reason")
        with self._write("veil:pixels") as tx:
            old = self.pixel_policy
            tx.execute("UPDATE settings SET value = ? WHERE key = 'pixels'", (json.dumps(new),))
            log_policy_change(tx, "pixels", old, new, reason.strip(), who=_who())

    def pseudonym_key(self) -> bytes:
        """The dataset's secret key for pseudonymous revision ids (``revision_manifest.pseudonym``): 32 bytes from
        the OS CSPRNG, made on first use and kept only here (the owner-only database; ``summary()`` never shows
        it), so a record keeps its pseudonym across revisions and only the owner can map one back."""
        if self._setting("pseudonym_key") is None:
            with self._write("veil:pseudonym_key") as tx:
                tx.execute("INSERT INTO settings (key, value) VALUES ('pseudonym_key', ?) ON CONFLICT (key) DO NOTHING",
                           (json.dumps(secrets.token_hex(32)),))
        return bytes.fromhex(self._setting("pseudonym_key"))

    def record_ids(self) -> list[str]:
        """Every record id with a release (refused ones included), sorted: the ids a revision can name."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT image_id FROM releases ORDER BY image_id")]

    def policy_changes(self) -> list[dict]:
        cols = ("change_id", "setting", "old_value", "new_value", "reason", "changed_by", "changed_at")
        rows = self._db.execute(f"SELECT {', '.join(cols)} FROM policy_changes ORDER BY change_id")
        return [{**dict(zip(cols, r)), "old_value": json.loads(r[2]), "new_value": json.loads(r[3])} for r in rows]

    def budget_changes(self) -> list[dict]:
        cols = ("change_id", "budget", "old_value", "new_value", "reason", "changed_by", "changed_at")
        rows = self._db.execute(f"SELECT {', '.join(cols)} FROM budget_changes ORDER BY change_id")
        return [{**dict(zip(cols, r)), "old_value": _jnum(r[2]), "new_value": _jnum(r[3])} for r in rows]

    # -- releases: reading ------------------------------------------------------------------------
    def _pair(self, image_id: str, attribute: str) -> list:
        """[epsilon spent, protected releases, exact releases] of one (image, attribute)."""
        spent, protected, n = self._db.execute(
            "SELECT COALESCE(SUM(epsilon), 0), COUNT(epsilon), COUNT(*) FROM attribute_spends"
            " WHERE image_id = ? AND attribute = ?", (image_id, attribute)).fetchone()
        return [float(spent), int(protected), int(n) - int(protected)]

    def spent(self, image_id: str, attribute: str) -> float:
        """Sum of the epsilons at which ``attribute`` of ``image_id`` was released protected (0.0 if never)."""
        return self._pair(str(image_id), str(attribute))[0]

    def spends(self, image_id: str) -> dict[str, float]:
        """{attribute: epsilon spent} over the attributes of ``image_id`` that some release protected."""
        rows = self._db.execute("SELECT attribute, COALESCE(SUM(epsilon), 0) FROM attribute_spends WHERE image_id = ?"
                                " AND epsilon IS NOT NULL GROUP BY attribute ORDER BY attribute", (str(image_id),))
        return {a: float(s) for a, s in rows}

    def prices(self, image_id: str) -> list[ReleasePrice]:
        """What the account composes for ``image_id``: the price of each of its releases, refused ones included."""
        rows = self._db.execute("SELECT protected, epsilon, price FROM releases WHERE image_id = ? ORDER BY release_id",
                                (str(image_id),))
        return [_price(p, e, pr) for p, e, pr in rows]

    def guarantee(self, image_id: str, *, extra: Sequence[ReleasePrice] = ()) -> Guarantee:
        """The record's composed (epsilon, delta) over its releases (and ``extra`` ones, as if recorded)."""
        return compose(self.prices(image_id) + list(extra), delta=self.release_delta,
                       pixels_protected=self.pixel_policy == "protected")

    def remaining(self, image_id: str) -> float:
        """The record's budget left: the budget minus its composed epsilon (inf - inf: 0)."""
        budget, spent = self._budget(), self.guarantee(image_id).epsilon
        return 0.0 if math.isinf(spent) else budget - spent

    def count(self, image_id: str) -> int:
        """How many releases of ``image_id`` there have been."""
        return int(self._db.execute("SELECT COUNT(*) FROM releases WHERE image_id = ?", (str(image_id),)).fetchone()[0])

    def releases(self, image_id: str | None = None) -> list[ReleaseRecord]:
        """Every release (of ``image_id`` if given), oldest first."""
        sql, args = f"SELECT {_RELEASE_COLUMNS} FROM releases", ()
        if image_id is not None:
            sql, args = sql + " WHERE image_id = ?", (image_id,)
        return [self._row_to_record(r) for r in self._db.execute(sql + " ORDER BY release_id", args)]

    # -- releases: writing ------------------------------------------------------------------------
    def check(self, *, image_id: str, protected: Sequence[str], epsilon: float, price: ReleasePrice,
              published: Sequence[str] = ()) -> None:
        """PrivacyError if ``record`` would refuse this release: ``protected`` at ``epsilon`` costing ``price``,
        and ``published`` the attributes it publishes (those not in ``protected`` exactly). Call it before
        spending compute."""
        eps = check_epsilon(epsilon)
        _check_price(str(image_id), price, list(protected), eps)
        self._refuse(str(image_id), list(protected), eps, list(published), {}, self._budget())
        self._refuse_record(str(image_id), price, {}, self._budget(), self.pixel_policy, self.release_delta)

    def record(self, *, image_id: str, protected: Sequence[str], epsilon: float, strength: float, seed: int,
               released_attributes: Mapping[str, int], price: ReleasePrice, level: str | None = None,
               outcome: str = "released", models: list[dict] | None = None) -> ReleaseRecord:
        """Check the budget and append one release, atomically; returns the committed record. ``outcome``
        "refused" charges a draw whose edit was not published (its refusal depends on the draw)."""
        return self.record_many([dict(image_id=image_id, protected=protected, epsilon=epsilon, strength=strength,
                                      seed=seed, level=level, released_attributes=released_attributes,
                                      outcome=outcome, models=models, price=price)])[0]

    def record_many(self, releases: Iterable[Mapping], *, opened: Callable | None = None,
                    before_commit: Callable | None = None) -> list[ReleaseRecord]:
        """Append several releases in one transaction: all are committed, or none (PrivacyError). The one place
        that writes release rows.

        The transaction locks each release's image first. ``opened(tx)`` runs next, before the budget is read
        (a caller's own checks: raise to write nothing); ``before_commit(tx, records)`` runs last, once the rows
        are in (``spent`` already counts them): a caller adds its own rows there, or publishes the release's
        files, so that if it raises the releases are rolled back and nothing is charged.
        """
        rows, ids, now = [_release_row(r) for r in releases], [], utc_now()
        with self._write(*sorted({r["image_id"] for r in rows})) as tx:
            if opened is not None:
                opened(tx)
            budget, pending, priced = self._budget(), {}, {}
            policy, delta = self.pixel_policy, self.release_delta
            for r in rows:
                image_id, protected, eps = r["image_id"], r["protected"], r["epsilon"]
                released = r["released_attributes"]
                self._refuse(image_id, protected, eps, list(released), pending, budget)
                self._refuse_record(image_id, r["price"], priced, budget, policy, delta)
                ids.append(tx.insert(
                    "INSERT INTO releases (image_id, protected, epsilon, strength, seed, level, released_attributes,"
                    " budget, released_at, outcome, models, price) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (image_id, json.dumps(protected), eps, r["strength"], r["seed"], r["level"], json.dumps(released),
                     None if math.isinf(budget) else budget, now, r["outcome"],
                     None if r["models"] is None else json.dumps(r["models"]), json.dumps(r["price"].to_json())),
                    returning="release_id"))
                priced[image_id].append(r["price"])
                for name in released:
                    cost = eps if name in protected else None
                    tx.execute("INSERT INTO attribute_spends (release_id, image_id, attribute, epsilon)"
                               " VALUES (?, ?, ?, ?)", (ids[-1], image_id, name, cost))
                    pair = pending[image_id, name]  # [spent, protected releases, exact releases], for the next row
                    if cost is None:
                        pair[2] += 1
                    else:
                        pair[0], pair[1] = pair[0] + cost, pair[1] + 1
            marks = ",".join("?" * len(ids))
            records = [self._row_to_record(r) for r in tx.execute(
                f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE release_id IN ({marks}) ORDER BY release_id", ids)]
            if before_commit is not None:
                before_commit(tx, records)
        return records

    def _refuse(self, image_id: str, protected: list[str], eps: float, published: list[str], pending: dict,
                budget: float) -> None:
        refuse_release(image_id, protected, eps, published, pending, budget, self._pair)

    def _refuse_record(self, image_id: str, price: ReleasePrice, priced: dict, budget: float, policy: str,
                       delta: float) -> None:
        """PrivacyError if ``price`` would take the record past ``budget`` (composed, both channels, at ``delta``);
        ``priced`` holds the record's prices read so far (the caller appends what it inserts)."""
        if policy == "protected" and not price.pixels_bounded:
            raise PrivacyError(
                f"release of {image_id!r} refused: its pixels have no bound ({price.encoding} encoding: "
                f"{ENCODING_PIXELS.get(price.encoding, 'unpriced')}), and this dataset's pixels are protected; use "
                f"a level whose encoding is 'noise' or 'fresh', or, if only the labels are to be protected, say so "
                f"for the whole dataset: `veil privacy set-pixels not-protected --reason \"...\"`")
        if image_id not in priced:
            priced[image_id] = self.prices(image_id)
        after = compose(priced[image_id] + [price], delta=delta, pixels_protected=policy == "protected")
        if after.epsilon > budget + TOLERANCE:  # only then: what it had spent, for the message
            before = compose(priced[image_id], delta=delta, pixels_protected=policy == "protected")
            raise PrivacyError(
                f"release of {image_id!r} refused: the record has spent epsilon {before.epsilon:.4g} of its budget "
                f"{budget:g} (delta {delta:g}; labels and pixels composed over {before.releases} releases), and this "
                f"release would take it to {after.epsilon:.4g} (labels {after.labels_epsilon:.4g}, pixels "
                f"{after.pixels_epsilon:.4g}{'' if after.pixels_protected else ', not protected'}); choose a more "
                f"private level (smaller epsilon, a deeper 'noise' edit, or 'fresh'), or raise the dataset's budget "
                f"with `veil privacy set-budget` if that is really intended")

    # -- the account ------------------------------------------------------------------------------
    def summary(self) -> dict:
        """JSON-able account of the dataset: budgets, training runs composed, release spends per attribute."""
        budget, cap = self._budget(), self.training_budget
        eps, delta = self.training_spent()
        runs = [{**r, **{k: _jnum(r[k]) for k in ("planned_epsilon", "epsilon", "counted_epsilon")}}
                for r in self.training_runs()]
        per_attribute = {}
        for name, images, n, top, full, exact in self._db.execute(
                "SELECT attribute, SUM(CASE WHEN n > 0 THEN 1 ELSE 0 END), SUM(n), MAX(spent),"
                " SUM(CASE WHEN n > 0 AND spent >= ? THEN 1 ELSE 0 END), SUM(CASE WHEN exact > 0 THEN 1 ELSE 0 END)"
                " FROM (SELECT image_id, attribute, COALESCE(SUM(epsilon), 0) AS spent, COUNT(epsilon) AS n,"
                " COUNT(*) - COUNT(epsilon) AS exact FROM attribute_spends GROUP BY image_id, attribute) AS pairs"
                " GROUP BY attribute ORDER BY attribute", (budget - 1e-12,)):
            per_attribute[name] = {"images_protected": int(images), "protected_releases": int(n),
                                   "max_spent": _jnum(float(top)), "at_budget": int(full),
                                   "images_published_exactly": int(exact)}
        top = self._db.execute("SELECT MAX(spent) FROM (SELECT COALESCE(SUM(epsilon), 0) AS spent FROM attribute_spends"
                               " WHERE epsilon IS NOT NULL GROUP BY image_id, attribute) AS pairs").fetchone()[0] or 0.0
        count = lambda sql: int(self._db.execute(sql).fetchone()[0])  # noqa: E731
        records = [r[0] for r in self._db.execute("SELECT DISTINCT image_id FROM releases ORDER BY image_id")]
        guarantees = [self.guarantee(i) for i in records]
        worst = max((g.epsilon for g in guarantees), default=0.0)
        return {
            "database": str(self.path), "schema": SCHEMA_VERSION, "dataset": self._setting("dataset"),
            "budget_changes": self.budget_changes(),
            "training": {"composition": "basic: epsilons add, deltas add", "runs": runs, "epsilon": _jnum(eps),
                         "delta": delta, "budget": _jnum(cap), "left": None if cap is None else _jnum(cap - eps)},
            "records": {"composition": "per record (image): the labels' randomized responses and the pixels' Gaussian "
                                       "mechanisms of all its releases, composed by dp-accounting's PLD accountant",
                        "budget": _jnum(budget), "delta": self.release_delta, "pixels": self.pixel_policy,
                        "policy_changes": self.policy_changes(), "levels": pinned_levels(self),
                        "records": len(records),
                        "max_epsilon": _jnum(worst), "least_left": _jnum(budget - worst) if math.isfinite(worst) else 0.0,
                        "at_budget": sum(g.epsilon >= budget - 1e-6 for g in guarantees),
                        "max_labels_epsilon": _jnum(max((g.labels_epsilon for g in guarantees), default=0.0)),
                        "max_pixels_epsilon": _jnum(max((g.pixels_epsilon for g in guarantees), default=0.0))},
            "releases": {"composition": "label epsilons per (image, attribute), for reading; the budget limits the "
                                        "record (see records)",
                         "releases": count("SELECT COUNT(*) FROM releases"),
                         "refused": count("SELECT COUNT(*) FROM releases WHERE outcome = 'refused'"),
                         "images": count("SELECT COUNT(DISTINCT image_id) FROM releases"),
                         "budget": _jnum(budget), "max_spent": _jnum(float(top)), "least_left": _jnum(budget - top),
                         "attributes": per_attribute},
        }

    # -- plumbing ---------------------------------------------------------------------------------
    @staticmethod
    def _row_to_record(row) -> ReleaseRecord:
        rid, image_id, protected, eps, strength, seed, level, attrs, budget, at, outcome, models, price = row
        return ReleaseRecord(int(rid), image_id, json.loads(protected), float(eps), float(strength), int(seed), level,
                             None if attrs is None else json.loads(attrs), budget, at, outcome,
                             None if models is None else json.loads(models),
                             None if price is None else ReleasePrice.from_json(json.loads(price)))

    def integrity_check(self) -> str:
        """The database's own consistency check: 'ok' for a sound database (SQLite's integrity_check)."""
        return self._db.integrity_check()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "PrivacyLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


ReleaseLedger = PrivacyLedger  # the name before the database also held training runs
