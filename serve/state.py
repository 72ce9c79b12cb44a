"""What ``veil serve`` remembers: edit sessions, owner feedback and privacy releases, in the dataset's database.

    store = open_state("~/.veil/datasets/synthetic-seed0.sqlite")    # SQLite: the dataset's privacy ledger
    store = open_state("postgresql://veil@db:5432/veil", budget=8.0)  # PostgreSQL: replicas share one ledger
    token = store.create_session(image_id="img-1", image_png=png, attributes={"smiling": 1}, guesses=None,
                                 protected=["smiling"], level={"name": "medium", "epsilon": 2.0, ...})
    store.feedback(token, action="preview", level=level)
    result = store.accept_with(token, key=idempotency_key, respond=lambda released: {...},   # the HTTP answer
                               run=lambda hook: release(store.ledger, ..., hook=hook))     # veil.privacy.release
    store.close()

The database is the dataset's privacy database (``store.ledger``, a ``veil.privacy.ledger.PrivacyLedger``
on ``veil.privacy.db``, SQLite or PostgreSQL); this module adds the server's own tables (``state_schema``)
through the same layer, and never writes a release row itself.

**One transaction per release.** An accept is ``veil.privacy.release.release`` with this store's hook
(``accept_with``): the ledger's transaction locks the image (SQLite: ``BEGIN IMMEDIATE``, the database's
write lock; PostgreSQL: an advisory lock on the image id), then the hook replays a stored answer for a key
it has seen or refuses a decided session, the ledger checks the budget with its own rules and inserts the
release rows (``veil privacy`` sees them), and the hook stores the answer under (session, key), the edited
image, and closes the session, before one commit: threads, processes and replicas cannot overspend, and a
retried request never releases or spends twice. ``accept`` does the same for a release drawn and edited
elsewhere.

**Sessions are capabilities**: ``create_session`` returns ``secrets.token_urlsafe(32)``; only its sha256
is stored, so the database alone does not let anyone act on a session.

**Budgets follow the record, not the bytes.** ``register_dataset`` stores the perceptual fingerprint
(``veil.privacy.identity``) of each ``--dataset`` image under its id; ``create_session(fingerprint=...)``
gives an upload the id of the record it near-duplicates (a dataset image first, else the oldest earlier
upload), or registers it as a new record under the ``image_id`` given. Matching and registering happen in
the session's own write transaction, under one lock (SQLite's write lock; PostgreSQL: an advisory lock),
so two replicas given the same new face at once still make one record.

**Secrets.** The database holds every release's randomized-response SEED (with it, anyone can undo the
coin flips), the owners' ORIGINAL images and their true attribute values: restrict access to it (the
SQLite file is 0600; give the PostgreSQL role to the server only). No method returns a seed, except the
``ReleaseRecord`` that ``accept`` hands to ``respond`` (and returns in ``AcceptResult.record``).

sqlite3 and ``veil.privacy.identity`` (numpy, scipy, Pillow); psycopg 3 and psycopg_pool are imported only for a
``postgresql://`` URL. No torch.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable

from veil.errors import ConfigError, DataError, VeilError
from veil.privacy.db import utc_now
from veil.privacy.identity import Fingerprint, FingerprintIndex
from veil.privacy.ledger import PrivacyLedger, ReleaseRecord
from veil.privacy.mechanism import json_epsilon
from veil.privacy.release import Released, ReleaseHook, record_releases
from veil.privacy.session import SessionClosed
from veil.serve.state_schema import SERVE_SCHEMA

__all__ = ["open_state", "StateStore", "SessionRow", "AcceptResult", "SessionClosed", "UnknownSession"]


class UnknownSession(VeilError, LookupError):
    """No session has this token (or the token is malformed): start a new session."""


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


def _hash(token) -> str:
    if not isinstance(token, str) or not 20 <= len(token) <= 128:
        raise UnknownSession("unknown session: the token is malformed; start a new session")
    return hashlib.sha256(token.encode()).hexdigest()


def _read_session(tx, token_hash: str) -> SessionRow:
    row = tx.execute(f"SELECT {_SESSION_COLUMNS} FROM serve_sessions WHERE token_hash = ?", (token_hash,)).fetchone()
    if row is None:
        raise UnknownSession("unknown session: no session has this token; start a new session")
    image_id, png, attributes, guesses, protected, level, decision, release_id, created = row
    return SessionRow(image_id, bytes(png), json.loads(attributes), None if guesses is None else json.loads(guesses),
                      json.loads(protected), json.loads(level), decision, release_id, created)


def _update_open(tx, token_hash: str, sets: dict) -> SessionRow:
    """Set ``sets`` on the session if it is still open (one conditional UPDATE: a concurrent decision
    cannot slip between the check and the write); UnknownSession / SessionClosed otherwise."""
    assignments = ", ".join(f"{column} = ?" for column in sets)
    cur = tx.execute(f"UPDATE serve_sessions SET {assignments}, updated_at = ? WHERE token_hash = ?"
                     " AND decision IS NULL", (*sets.values(), utc_now(), token_hash))
    row = _read_session(tx, token_hash)
    if cur.rowcount != 1:
        raise SessionClosed(f"session already {row.decision}: start a new session to edit this image again")
    return row


FINGERPRINT_LOCK = "veil-serve-fingerprints"  # held by every write to serve_fingerprints: ids follow commits


class _Records:
    """This database's fingerprints, read incrementally (rows are only added, under FINGERPRINT_LOCK, so every
    new row has a larger id than those already read)."""

    def __init__(self):
        self.index, self.ids, self.dataset, self.last = FingerprintIndex(), [], [], 0

    def refresh(self, tx) -> None:
        for fid, image_id, kind, text in tx.execute(
                "SELECT fingerprint_id, image_id, kind, hash FROM serve_fingerprints WHERE fingerprint_id > ?"
                " ORDER BY fingerprint_id", (self.last,)).fetchall():
            self.index.add(Fingerprint.from_text(text))
            self.ids.append(image_id)
            self.dataset.append(kind == "dataset")
            self.last = int(fid)

    def match(self, fp: Fingerprint) -> str | None:
        """The record ``fp`` near-duplicates: a dataset image first, then the oldest; None if none does."""
        hits = self.index.within(fp)
        return self.ids[min(hits, key=lambda i: (not self.dataset[i], i))] if hits else None


class _Replayed(Exception):
    """An accept's key was answered already (found inside its transaction): nothing is written."""

    def __init__(self, response: dict):
        super().__init__("replayed")
        self.response = response


class _Accept:
    """The server's part of one accept's transaction (its ``ReleaseHook``): first replay a seen key or refuse a
    decided session; once the release row is in, store the edited image and the answer, close the session."""

    def __init__(self, token: str, key: str, respond: Callable[[Released], dict]):
        if not isinstance(key, str) or not 1 <= len(key) <= 200:
            raise ConfigError("accept: the idempotency key must be a string of 1 to 200 characters")
        self.token_hash, self.key, self.respond = _hash(token), key, respond
        self.session: SessionRow | None = None
        self.response: dict | None = None
        self.record: ReleaseRecord | None = None

    def opened(self, tx) -> None:
        done = tx.execute(_REPLAY, (self.token_hash, self.key)).fetchone()
        if done is not None:  # a retry: answer what the first request answered
            raise _Replayed(json.loads(done[0]))
        self.session = _read_session(tx, self.token_hash)
        if self.session.decision is not None:
            raise SessionClosed(f"session already {self.session.decision}: start a new session to release again")

    def recorded(self, tx, released: list[Released]) -> None:
        if len(released) != 1 or released[0].record.image_id != self.session.image_id:
            raise ConfigError(f"accept: release of {[r.record.image_id for r in released]} on a session of "
                              f"{self.session.image_id!r}")
        done = released[0]
        record, rid, now = done.record, done.record.release_id, done.record.released_at
        if done.image is not None:  # released (not refused): the edit that was published
            tx.execute("INSERT INTO serve_release_images (release_id, png) VALUES (?, ?)", (rid, bytes(done.image)))
        self.response, self.record = self.respond(done), record  # the answer, kept for retries
        tx.execute("INSERT INTO serve_accepts (token_hash, key, release_id, response, at) VALUES (?, ?, ?, ?, ?)",
                   (self.token_hash, self.key, rid, json.dumps(self.response), now))
        decision = "accepted" if record.outcome == "released" else "refused"
        _update_open(tx, self.token_hash, {"decision": decision, "release_id": rid})
        tx.execute("INSERT INTO serve_feedback (token_hash, action, level, at) VALUES (?, 'accept', ?, ?)",
                   (self.token_hash, json.dumps(self.session.level), now))


def open_state(url_or_path, *, budget: float | None = None) -> "StateStore":
    """The store at ``url_or_path``: a ``postgresql://`` (or ``postgres://``) URL, else a SQLite file path
    (or ``sqlite:///abs/path``). ``budget``: the release budget for a new database (default DEFAULT_BUDGET;
    inf = unlimited); on an existing one it must equal the stored budget (PrivacyError); None keeps it."""
    ledger = PrivacyLedger(url_or_path, budget=budget, option="--state")  # creates or migrates it, checks the budget
    try:
        ledger.db.create_tables(SERVE_SCHEMA)
    except ledger.db.Error as e:
        ledger.close()
        raise DataError(f"--state {ledger.path}: cannot add the server's tables to the privacy database ({e}); "
                        f"check the file and its folder are writable (or the role may create tables)") from None
    except BaseException:
        ledger.close()
        raise
    return StateStore(ledger)


class StateStore:
    """Sessions, feedback and releases of one dataset's database; build it with ``open_state``."""

    def __init__(self, ledger: PrivacyLedger):
        self.ledger, self._db = ledger, ledger.db
        self.backend, self.where = self._db.backend, self._db.where
        self._records, self._records_lock = _Records(), threading.Lock()
        self._registered: list | None = None

    # -- sessions ---------------------------------------------------------------------------------
    def create_session(self, *, image_id: str, image_png: bytes, attributes: dict, guesses: dict | None,
                       protected: list, level: dict, fingerprint: Fingerprint | None = None) -> str:
        """A new open session; returns its token (the only copy: the database keeps its sha256).

        ``fingerprint`` (an upload's): the session's image is the record it near-duplicates, if any, else a new
        record registered as ``image_id`` (see the module docstring); read the id chosen from ``session``."""
        if not isinstance(image_png, (bytes, bytearray)) or not isinstance(attributes, dict):
            raise ConfigError("create_session: image_png must be bytes and attributes a dict {name: -1|1|0}")
        if fingerprint is not None and not isinstance(fingerprint, Fingerprint):
            raise ConfigError("create_session: fingerprint must be a veil.privacy.identity.Fingerprint")
        token, now = secrets.token_urlsafe(32), utc_now()
        with self._db.transaction(locks=[FINGERPRINT_LOCK] if fingerprint is not None else []) as tx:
            if fingerprint is not None:
                image_id = self._record_for(tx, fingerprint, new_id=str(image_id), now=now)
            tx.execute(f"INSERT INTO serve_sessions (token_hash, {_SESSION_COLUMNS}, updated_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
                       (_hash(token), str(image_id), bytes(image_png), json.dumps(attributes),
                        None if guesses is None else json.dumps(guesses), json.dumps(list(protected)),
                        json.dumps(level), now, now))
        return token

    def _record_for(self, tx, fp: Fingerprint, *, new_id: str, now: str) -> str:
        with self._records_lock:
            self._records.refresh(tx)
            found = self._records.match(fp)
        if found is None:
            tx.execute("INSERT INTO serve_fingerprints (image_id, kind, hash, at) VALUES (?, 'upload', ?, ?)"
                       " ON CONFLICT (image_id) DO NOTHING", (new_id, fp.to_text(), now))
        return new_id if found is None else found

    def register_dataset(self, ids: list, fingerprint_of: Callable[[str], Fingerprint]) -> int:
        """Store the fingerprint of each dataset image ``ids`` not stored yet (``fingerprint_of(id)``, computed
        outside any transaction); once per store and ``ids`` list. Returns how many were added."""
        with self._records_lock:
            if self._registered is ids:
                return 0
        with self._db.transaction(write=False) as tx:
            have = {row[0] for row in tx.execute("SELECT image_id FROM serve_fingerprints").fetchall()}
        rows = [(str(i), fingerprint_of(i).to_text()) for i in ids if str(i) not in have]
        if rows:
            now = utc_now()
            with self._db.transaction(locks=[FINGERPRINT_LOCK]) as tx:
                for image_id, text in rows:
                    tx.execute("INSERT INTO serve_fingerprints (image_id, kind, hash, at) VALUES (?, 'dataset', ?, ?)"
                               " ON CONFLICT (image_id) DO NOTHING", (image_id, text, now))
        with self._records_lock:
            self._registered = ids
        return len(rows)

    def session(self, token: str) -> SessionRow:
        with self._db.transaction(write=False) as tx:
            return _read_session(tx, _hash(token))

    def update_session(self, token: str, *, level: dict | None = None, protected: list | None = None,
                       attributes: dict | None = None) -> SessionRow:
        """Change the owner's choices (and corrected attribute values) of an open session."""
        sets = {k: json.dumps(v) for k, v in (("level", level), ("protected", protected), ("attributes", attributes))
                if v is not None}
        with self._db.transaction() as tx:
            if not sets:
                return _read_session(tx, _hash(token))
            return _update_open(tx, _hash(token), sets)

    def feedback(self, token: str, *, action: str, level: dict, decision: str | None = None) -> SessionRow:
        """Record the owner's ``action`` at ``level``; ``decision="rejected"`` closes the session."""
        if decision not in (None, "rejected"):
            raise ConfigError(f"feedback decision={decision!r}: only 'rejected' (accepting goes through accept)")
        token_hash = _hash(token)
        sets = {"level": json.dumps(level), **({"decision": decision} if decision else {})}
        with self._db.transaction() as tx:
            row = _update_open(tx, token_hash, sets)
            tx.execute("INSERT INTO serve_feedback (token_hash, action, level, at) VALUES (?, ?, ?, ?)",
                       (token_hash, str(action), json.dumps(level), utc_now()))
        return row

    # -- releases ---------------------------------------------------------------------------------
    @property
    def budget(self) -> float | None:
        return self.ledger.budget

    def check_release(self, *, image_id: str, protected, epsilon: float, price, published=()) -> None:
        """PrivacyError if this release (costing ``price``, an accounting.ReleasePrice) would be refused now
        (``PrivacyLedger.check``)."""
        self.ledger.check(image_id=image_id, protected=protected, epsilon=epsilon, price=price, published=published)

    def replay(self, token: str, key: str) -> dict | None:
        """The answer ``accept`` stored for (session, ``key``), or None if that key was not accepted (yet)."""
        with self._db.transaction(write=False) as tx:
            done = tx.execute(_REPLAY, (_hash(token), str(key))).fetchone()
        return None if done is None else json.loads(done[0])

    def accept_with(self, token: str, *, key: str, respond: Callable[[Released], dict],
                    run: Callable[[ReleaseHook], object]) -> AcceptResult:
        """Release and close the session, at most once per (session, ``key``); see the module docstring.

        ``run(hook)`` records one release of the session's image with ``hook`` (``veil.privacy.release.release``
        or ``record_releases``, passing ``hook=hook``); ``respond(released)`` makes the answer inside the
        transaction, holding the image's lock: keep it quick; if it raises, nothing is written."""
        accept = _Accept(token, key, respond)
        try:
            run(ReleaseHook(opened=accept.opened, recorded=accept.recorded))
        except _Replayed as replayed:
            return AcceptResult(response=replayed.response, replayed=True)
        return AcceptResult(response=accept.response, replayed=False, record=accept.record)

    def accept(self, token: str, *, key: str, release: dict, image_png: bytes | None,
               respond: Callable[[ReleaseRecord], dict]) -> AcceptResult:
        """``accept_with`` for a release drawn and edited already (``release`` as ``PrivacyLedger.record`` takes
        it, ``image_png`` its edit); ``respond(record)`` makes the answer."""
        return self.accept_with(token, key=key, respond=lambda done: respond(done.record),
                                run=lambda hook: record_releases(self.ledger, [release], images=[image_png], hook=hook))

    # -- reading ----------------------------------------------------------------------------------
    def _rows(self, sql: str, args=()) -> list:
        return self._db.execute(sql, args).fetchall()

    def spends(self, image_id: str) -> dict[str, float]:
        return self.ledger.spends(str(image_id))

    def releases(self, image_id: str | None = None) -> list[dict]:
        """Every release (of ``image_id`` if given), oldest first; never the seed."""
        return [{"release_id": r.release_id, "image_id": r.image_id, "protected": r.protected,
                 "epsilon": json_epsilon(r.epsilon), "strength": r.strength, "level": r.level,
                 "released_attributes": r.released_attributes, "outcome": r.outcome, "released_at": r.released_at}
                for r in self.ledger.releases(None if image_id is None else str(image_id))]

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
        with self._db.transaction(write=False) as tx:
            execute = tx.execute
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
            budget = self.budget
            if budget is not None:
                for image, name, spent in execute(
                        "SELECT image_id, attribute, SUM(epsilon) FROM attribute_spends WHERE epsilon IS NOT NULL"
                        " GROUP BY image_id, attribute HAVING SUM(epsilon) > ?", (budget + 1e-9,)):
                    problems.append(f"{image!r} {name!r}: epsilon {float(spent):g} spent > the budget {budget:g}")
        return problems

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

