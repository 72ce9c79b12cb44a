"""What ``veil serve`` remembers: edit sessions, owner feedback and privacy releases, in the dataset's database.

    store = open_state("~/.veil/datasets/synthetic-seed0.sqlite")    # SQLite: the dataset's privacy ledger
    store = open_state("postgresql://veil@db:5432/veil", budget=8.0)  # PostgreSQL: replicas share one ledger
    token = store.create_session(image_id="img-1", image_png=png, attributes={"smiling": 1}, guesses=None,
                                 protected=["smiling"], level={"name": "medium", "epsilon": 2.0, ...})
    store.feedback(token, action="preview", level=level)
    result = store.accept(token, key=idempotency_key, release=dict(image_id="img-1", ...), image_png=edited,
                          respond=lambda record: {...})             # the HTTP answer, stored for retries
    store.close()

**One transaction per release.** ``accept`` locks (SQLite: ``BEGIN IMMEDIATE``, the database's write
lock; PostgreSQL: ``pg_advisory_xact_lock`` on the image id), then replays a stored answer for a key it
has seen, refuses a decided session, checks the budget with the ledger's own rules
(``veil.privacy.ledger.refuse_release``, reading budget and spends inside the lock), inserts the release
as ordinary ledger rows (``releases`` + ``attribute_spends``; ``veil privacy`` sees them), stores the
answer under (session, key) and closes the session, and commits: threads, processes and replicas cannot
overspend, and a retried request never releases or spends twice.

**Sessions are capabilities**: ``create_session`` returns ``secrets.token_urlsafe(32)``; only its sha256
is stored, so the database alone does not let anyone act on a session.

**Secrets.** The database holds every release's randomized-response SEED (with it, anyone can undo the
coin flips), the owners' ORIGINAL images and their true attribute values: restrict access to it (the
SQLite file is 0600; give the PostgreSQL role to the server only). No method returns a seed, except the
``ReleaseRecord`` that ``accept`` hands to ``respond`` (and returns in ``AcceptResult.record``).

Plain stdlib (sqlite3); psycopg 3 and psycopg_pool are imported only for a ``postgresql://`` URL. No torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from veil.errors import ConfigError, DataError, VeilError
from veil.privacy.ledger import PrivacyLedger, ReleaseRecord, _check_budget, refuse_release
from veil.privacy.mechanism import check_epsilon, json_epsilon
from veil.privacy.training_runs import _now
from veil.serve.state_schema import SERVE_SCHEMA, create_postgres_schema, statements

__all__ = ["open_state", "StateStore", "SessionRow", "AcceptResult", "SessionClosed", "UnknownSession"]


class UnknownSession(VeilError, LookupError):
    """No session has this token (or the token is malformed): start a new session."""


class SessionClosed(VeilError, RuntimeError):
    """The session was already decided (accepted, refused or rejected): start a new session to edit again."""


@dataclass(frozen=True)
class SessionRow:
    image_id: str
    image_png: bytes
    attributes: dict
    guesses: dict | None
    protected: list
    level: dict
    decision: str | None  # None (open) | "accepted" | "refused" | "rejected"
    release_id: int | None
    created_at: str


@dataclass(frozen=True)
class AcceptResult:
    response: dict
    replayed: bool  # True: the key was seen before; nothing was released or spent by this call
    record: ReleaseRecord | None = field(default=None, repr=False)  # holds the SECRET seed; None when replayed


_SESSION_COLUMNS = "image_id, image_png, attributes, guesses, protected, level, decision, release_id, created_at"
_REPLAY = "SELECT response FROM serve_accepts WHERE token_hash = ? AND key = ?"
_PAIR = ("SELECT COALESCE(SUM(epsilon), 0), COUNT(epsilon), COUNT(*) FROM attribute_spends"
         " WHERE image_id = ? AND attribute = ?")


def _hash(token) -> str:
    if not isinstance(token, str) or not 20 <= len(token) <= 128:
        raise UnknownSession("unknown session: the token is malformed; start a new session")
    return hashlib.sha256(token.encode()).hexdigest()


def redact(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = (user.split(":", 1)[0] + ":***" if ":" in user else user) + "@" + host
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class _Sqlite:
    """One sqlite3 connection per thread (the server calls the store from a thread pool)."""

    backend = "sqlite"

    def __init__(self, path: Path):
        self.path, self.where = path, str(path)
        self._local, self._all, self._lock = threading.local(), [], threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self, image_id: str | None = None, *, write: bool = True):
        """BEGIN IMMEDIATE takes the database's one write lock (``image_id`` needs no lock of its own);
        a read-only transaction (``write=False``) is one consistent snapshot."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn.execute
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def problems(self) -> list[str]:
        found = self._conn().execute("PRAGMA integrity_check").fetchone()[0]
        return [] if found == "ok" else [f"SQLite integrity_check: {found}"]

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


class _Postgres:
    """A psycopg connection pool; SQL is written with ``?`` and translated to ``%s``."""

    backend = "postgresql"

    def __init__(self, url: str, budget: float | None):
        self.where = redact(url)
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as e:
            raise ConfigError(f"--state {self.where}: PostgreSQL needs psycopg 3 and psycopg_pool ({e}); "
                              f"pip install 'psycopg[binary,pool]'") from None
        try:  # one plain connection first: a clear error now, not a pool timeout later
            with psycopg.connect(url, connect_timeout=10) as conn:
                create_postgres_schema(conn, budget=budget, where=self.where)
        except psycopg.Error as e:
            raise DataError(f"--state {self.where}: cannot open the PostgreSQL database ({str(e).strip()}); check "
                            f"that the server runs and is reachable, that the database exists and that the role "
                            f"may connect (or give a SQLite path instead)") from None
        self._pool = ConnectionPool(url, min_size=1, max_size=8, open=True, name="veil-serve-state")

    @contextmanager
    def transaction(self, image_id: str | None = None, *, write: bool = True):
        """One transaction; ``image_id`` serializes it with every other one on that image (advisory lock,
        released at commit). READ COMMITTED: each statement after the lock sees what the last holder wrote."""
        with self._pool.connection() as conn, conn.transaction():
            def execute(sql: str, args=()):
                return conn.execute(sql.replace("?", "%s"), args)
            if image_id is not None:
                execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (image_id,))
            yield execute

    def problems(self) -> list[str]:
        return []

    def close(self) -> None:
        self._pool.close()


def open_state(url_or_path, *, budget: float | None = None) -> "StateStore":
    """The store at ``url_or_path``: a ``postgresql://`` (or ``postgres://``) URL, else a SQLite file path
    (or ``sqlite:///abs/path``). ``budget``: the release budget for a new database (default DEFAULT_BUDGET;
    inf = unlimited); on an existing one it must equal the stored budget (PrivacyError); None keeps it."""
    target = str(url_or_path)
    budget = None if budget is None else _check_budget(budget, option="--budget")
    if target.startswith(("postgresql://", "postgres://")):
        return StateStore(_Postgres(target, budget))
    path = Path(target[len("sqlite://"):] if target.startswith("sqlite://") else target).expanduser()
    PrivacyLedger(path, budget=budget).close()  # creates or migrates the ledger, checks the budget, makes it 0600
    db = _Sqlite(path)
    try:
        with db.transaction() as execute:
            for statement in statements(SERVE_SCHEMA):
                execute(statement)
    except sqlite3.DatabaseError as e:
        db.close()
        raise DataError(f"--state {path}: cannot add the server's tables to the privacy database ({e}); "
                        f"check the file and its folder are writable") from None
    return StateStore(db)


class StateStore:
    """Sessions, feedback and releases of one dataset's database; build it with ``open_state``."""

    def __init__(self, db):
        self._db = db
        self.backend, self.where = db.backend, db.where

    # -- sessions ---------------------------------------------------------------------------------
    def create_session(self, *, image_id: str, image_png: bytes, attributes: dict, guesses: dict | None,
                       protected: list, level: dict) -> str:
        """A new open session; returns its token (the only copy: the database keeps its sha256)."""
        if not isinstance(image_png, (bytes, bytearray)) or not isinstance(attributes, dict):
            raise ConfigError("create_session: image_png must be bytes and attributes a dict {name: -1|1|0}")
        token, now = secrets.token_urlsafe(32), _now()
        with self._db.transaction() as execute:
            execute(f"INSERT INTO serve_sessions (token_hash, {_SESSION_COLUMNS}, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
                    (_hash(token), str(image_id), bytes(image_png), json.dumps(attributes),
                     None if guesses is None else json.dumps(guesses), json.dumps(list(protected)),
                     json.dumps(level), now, now))
        return token

    def session(self, token: str) -> SessionRow:
        with self._db.transaction(write=False) as execute:
            return self._session(execute, _hash(token))

    @staticmethod
    def _session(execute, token_hash: str) -> SessionRow:
        row = execute(f"SELECT {_SESSION_COLUMNS} FROM serve_sessions WHERE token_hash = ?", (token_hash,)).fetchone()
        if row is None:
            raise UnknownSession("unknown session: no session has this token; start a new session")
        image_id, png, attributes, guesses, protected, level, decision, release_id, created = row
        return SessionRow(image_id, bytes(png), json.loads(attributes), None if guesses is None else json.loads(guesses),
                          json.loads(protected), json.loads(level), decision, release_id, created)

    def _update_open(self, execute, token_hash: str, sets: dict) -> SessionRow:
        """Set ``sets`` on the session if it is still open (one conditional UPDATE: a concurrent decision
        cannot slip between the check and the write); UnknownSession / SessionClosed otherwise."""
        assignments = ", ".join(f"{column} = ?" for column in sets)
        cur = execute(f"UPDATE serve_sessions SET {assignments}, updated_at = ? WHERE token_hash = ?"
                      " AND decision IS NULL", (*sets.values(), _now(), token_hash))
        row = self._session(execute, token_hash)
        if cur.rowcount != 1:
            raise SessionClosed(f"session already {row.decision}: start a new session to edit this image again")
        return row

    def update_session(self, token: str, *, level: dict | None = None, protected: list | None = None,
                       attributes: dict | None = None) -> SessionRow:
        """Change the owner's choices (and corrected attribute values) of an open session."""
        sets = {k: json.dumps(v) for k, v in (("level", level), ("protected", protected), ("attributes", attributes))
                if v is not None}
        with self._db.transaction() as execute:
            if not sets:
                return self._session(execute, _hash(token))
            return self._update_open(execute, _hash(token), sets)

    def feedback(self, token: str, *, action: str, level: dict, decision: str | None = None) -> SessionRow:
        """Record the owner's ``action`` at ``level``; ``decision="rejected"`` closes the session."""
        if decision not in (None, "rejected"):
            raise ConfigError(f"feedback decision={decision!r}: only 'rejected' (accepting goes through accept)")
        token_hash = _hash(token)
        sets = {"level": json.dumps(level), **({"decision": decision} if decision else {})}
        with self._db.transaction() as execute:
            row = self._update_open(execute, token_hash, sets)
            execute("INSERT INTO serve_feedback (token_hash, action, level, at) VALUES (?, ?, ?, ?)",
                    (token_hash, str(action), json.dumps(level), _now()))
        return row

    # -- releases ---------------------------------------------------------------------------------
    @property
    def budget(self) -> float | None:
        with self._db.transaction(write=False) as execute:
            return self._budget(execute)

    @staticmethod
    def _budget(execute) -> float | None:
        row = execute("SELECT value FROM settings WHERE key = 'release_budget'").fetchone()
        value = None if row is None else json.loads(row[0])
        return None if value is None or math.isinf(float(value)) else float(value)

    def _refuse(self, execute, image_id: str, protected: list, eps: float, published: list) -> float | None:
        """``refuse_release`` over this connection; returns the budget it checked against (None: unlimited)."""
        budget = self._budget(execute)

        def pair(image, name):
            spent, n_protected, n = execute(_PAIR, (image, name)).fetchone()
            return [float(spent), int(n_protected), int(n) - int(n_protected)]
        refuse_release(image_id, protected, eps, published, {}, math.inf if budget is None else budget, pair)
        return budget

    def check_release(self, *, image_id: str, protected, epsilon: float, published=()) -> None:
        """PrivacyError if this release would be refused now (as ``PrivacyLedger.check``)."""
        with self._db.transaction(write=False) as execute:
            self._refuse(execute, str(image_id), list(protected), check_epsilon(epsilon), list(published))

    def replay(self, token: str, key: str) -> dict | None:
        """The answer ``accept`` stored for (session, ``key``), or None if that key was not accepted (yet)."""
        with self._db.transaction(write=False) as execute:
            done = execute(_REPLAY, (_hash(token), str(key))).fetchone()
        return None if done is None else json.loads(done[0])

    def accept(self, token: str, *, key: str, release: dict, image_png: bytes | None,
               respond: Callable[[ReleaseRecord], dict]) -> AcceptResult:
        """Release and close the session, at most once per (session, ``key``); see the module docstring.
        ``respond`` runs inside the transaction, holding the image's lock: keep it quick; if it raises,
        nothing is written (nothing released, nothing spent)."""
        token_hash, r = _hash(token), _validated(release)
        if not isinstance(key, str) or not 1 <= len(key) <= 200:
            raise ConfigError("accept: the idempotency key must be a string of 1 to 200 characters")
        image_id = self.session(token).image_id  # a session's image never changes: safe to read before the lock
        with self._db.transaction(image_id) as execute:
            # 1. a retry: answer what the first request answered
            done = execute(_REPLAY, (token_hash, key)).fetchone()
            if done is not None:
                return AcceptResult(response=json.loads(done[0]), replayed=True)
            session = self._session(execute, token_hash)
            if session.decision is not None:
                raise SessionClosed(f"session already {session.decision}: start a new session to release again")
            if r["image_id"] != image_id:
                raise ConfigError(f"accept: release of {r['image_id']!r} on a session of {image_id!r}")
            # 2. the ledger's rules, against the budget and spends as committed now
            budget = self._refuse(execute, image_id, r["protected"], r["epsilon"], list(r["released_attributes"]))
            # 3. ordinary ledger rows
            now = _now()
            rid = execute("INSERT INTO releases (image_id, protected, epsilon, strength, seed, level,"
                          " released_attributes, budget, released_at, outcome, models)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING release_id",
                          (image_id, json.dumps(r["protected"]), r["epsilon"], r["strength"], r["seed"], r["level"],
                           json.dumps(r["released_attributes"]), budget, now, r["outcome"],
                           None if r["models"] is None else json.dumps(r["models"]))).fetchone()[0]
            for name in r["released_attributes"]:
                execute("INSERT INTO attribute_spends (release_id, image_id, attribute, epsilon) VALUES (?, ?, ?, ?)",
                        (rid, image_id, name, r["epsilon"] if name in r["protected"] else None))
            if image_png is not None and r["outcome"] == "released":
                execute("INSERT INTO serve_release_images (release_id, png) VALUES (?, ?)", (rid, bytes(image_png)))
            record = ReleaseRecord(int(rid), image_id, r["protected"], r["epsilon"], r["strength"], r["seed"],
                                   r["level"], r["released_attributes"], budget, now, r["outcome"], r["models"])
            # 4. the answer, kept for retries; the session is decided
            response = respond(record)
            execute("INSERT INTO serve_accepts (token_hash, key, release_id, response, at) VALUES (?, ?, ?, ?, ?)",
                    (token_hash, key, rid, json.dumps(response), now))
            decision = "accepted" if r["outcome"] == "released" else "refused"
            self._update_open(execute, token_hash, {"decision": decision, "release_id": int(rid)})
            execute("INSERT INTO serve_feedback (token_hash, action, level, at) VALUES (?, 'accept', ?, ?)",
                    (token_hash, json.dumps(session.level), now))
        return AcceptResult(response=response, replayed=False, record=record)

    # -- reading ----------------------------------------------------------------------------------
    def _rows(self, sql: str, args=()) -> list:
        with self._db.transaction(write=False) as execute:
            return execute(sql, args).fetchall()

    def spends(self, image_id: str) -> dict[str, float]:
        rows = self._rows("SELECT attribute, COALESCE(SUM(epsilon), 0) FROM attribute_spends WHERE image_id = ?"
                          " AND epsilon IS NOT NULL GROUP BY attribute ORDER BY attribute", (str(image_id),))
        return {a: float(s) for a, s in rows}

    def releases(self, image_id: str | None = None) -> list[dict]:
        """Every release (of ``image_id`` if given), oldest first; never the seed."""
        cols = ("release_id", "image_id", "protected", "epsilon", "strength", "level", "released_attributes",
                "outcome", "released_at")
        sql, args = f"SELECT {', '.join(cols)} FROM releases", ()
        if image_id is not None:
            sql, args = sql + " WHERE image_id = ?", (str(image_id),)
        out = []
        for row in self._rows(sql + " ORDER BY release_id", args):
            d = dict(zip(cols, row))
            d.update(protected=json.loads(d["protected"]), epsilon=json_epsilon(float(d["epsilon"])),
                     released_attributes=None if d["released_attributes"] is None else json.loads(d["released_attributes"]))
            out.append(d)
        return out

    def revision_items(self) -> list[dict]:
        """Every release published through ``accept``, with the owner's true values, oldest first."""
        rows = self._rows(
            "SELECT r.release_id, r.image_id, s.attributes, r.released_attributes, r.protected, r.epsilon, r.strength,"
            " i.png FROM releases r JOIN serve_accepts a ON a.release_id = r.release_id"
            " JOIN serve_sessions s ON s.token_hash = a.token_hash"
            " LEFT JOIN serve_release_images i ON i.release_id = r.release_id"
            " WHERE r.outcome = 'released' ORDER BY r.release_id")
        return [dict(release_id=rid, image_id=image, original_attributes=json.loads(attrs),
                     released_attributes=json.loads(released), protected=json.loads(protected),
                     epsilon=json_epsilon(float(eps)), strength=float(strength),
                     image_png=None if png is None else bytes(png))
                for rid, image, attrs, released, protected, eps, strength, png in rows]

    def count_releases(self) -> dict:
        counts = dict(self._rows("SELECT outcome, COUNT(*) FROM releases GROUP BY outcome"))
        return {"released": int(counts.get("released", 0)), "refused": int(counts.get("refused", 0))}

    def consistency(self) -> list[str]:
        """Problems found in the database ([] if sound); one snapshot."""
        problems = self._db.problems()
        with self._db.transaction(write=False) as execute:
            spends: dict[int, dict] = {}
            for rid, name, eps in execute("SELECT release_id, attribute, epsilon FROM attribute_spends"):
                spends.setdefault(rid, {})[name] = eps
            for rid, protected, eps, released in execute(
                    "SELECT release_id, protected, epsilon, released_attributes FROM releases ORDER BY release_id"):
                protected = set(json.loads(protected))
                want = {n: (float(eps) if n in protected else None) for n in json.loads(released or "{}")}
                have = {n: (None if e is None else float(e)) for n, e in spends.get(rid, {}).items()}
                if want != have:
                    problems.append(f"release {rid}: attribute_spends rows {have} do not match its release {want}")
            for token_hash, decision in execute(
                    "SELECT s.token_hash, s.decision FROM serve_sessions s LEFT JOIN releases r ON r.release_id ="
                    " s.release_id WHERE s.decision IN ('accepted', 'refused') AND r.release_id IS NULL"):
                problems.append(f"session {token_hash[:12]}... is {decision} but its release is missing")
            for token_hash, rid in execute(
                    "SELECT a.token_hash, a.release_id FROM serve_accepts a LEFT JOIN releases r"
                    " ON r.release_id = a.release_id WHERE r.release_id IS NULL"):
                problems.append(f"accept of session {token_hash[:12]}... names release {rid}, which is missing")
            budget = self._budget(execute)
            if budget is not None:
                for image, name, spent in execute(
                        "SELECT image_id, attribute, SUM(epsilon) FROM attribute_spends WHERE epsilon IS NOT NULL"
                        " GROUP BY image_id, attribute HAVING SUM(epsilon) > ?", (budget + 1e-9,)):
                    problems.append(f"{image!r} {name!r}: epsilon {float(spent):g} spent > the budget {budget:g}")
        return problems

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _validated(release: dict) -> dict:
    """``release`` with its types checked (ConfigError naming the field), as ``PrivacyLedger.record`` takes it."""
    try:
        r = dict(release)
        out = dict(image_id=str(r["image_id"]), protected=[str(p) for p in r["protected"]],
                   epsilon=check_epsilon(r["epsilon"]), strength=float(r["strength"]), seed=int(r["seed"]),
                   released_attributes={str(k): int(v) for k, v in dict(r["released_attributes"]).items()},
                   outcome=r.get("outcome", "released"), models=r.get("models"))
        level = r.get("level")
        out["level"] = level.get("name") if isinstance(level, dict) else level  # the ledger keeps the level's name
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"accept: malformed release ({type(e).__name__}: {e}); it needs image_id, protected, "
                          f"epsilon, strength, seed, level and released_attributes") from None
    if not out["protected"] or not set(out["protected"]) <= set(out["released_attributes"]):
        raise ConfigError(f"release of {out['image_id']!r}: released_attributes {sorted(out['released_attributes'])} "
                          f"must hold every protected attribute {out['protected']} (and at least one)")
    if out["outcome"] not in ("released", "refused"):
        raise ConfigError(f"release of {out['image_id']!r}: outcome {out['outcome']!r} is not released or refused")
    return out
