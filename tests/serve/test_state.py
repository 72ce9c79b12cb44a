"""veil.serve.state on both backends (SQLite file, PostgreSQL server): sessions, feedback, idempotent
accepts, the release budget under concurrency (two store instances standing for two replicas), and
consistency checks. The PostgreSQL cases use the throwaway server of conftest.py."""

import hashlib
import sqlite3
import threading

import pytest

from veil.errors import ConfigError, DataError, PrivacyError
from veil.privacy.accounting import price_release
from veil.privacy.ledger import PrivacyLedger
from veil.serve.state import SessionClosed, UnknownSession, open_state

LEVEL = {"name": "low", "epsilon": 1.0, "strength": 0.5, "encoding": "rr"}
ATTRIBUTES = {"smiling": 1, "eyeglasses": -1, "male": 0}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a store lives: a SQLite file path, or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    return request.getfixturevalue("pg_database")


@pytest.fixture
def stores(target):
    """``open_(budget=None)``: a store on ``target`` (each call another instance: another "replica")."""
    opened = []

    def open_(budget=None):
        opened.append(open_state(target, budget=budget))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


def raw(target, sql, args=()):
    """Run ``sql`` (``?`` placeholders) on ``target`` outside the store; rows, for a SELECT."""
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def new_session(store, image_id="img-1", protected=("smiling",)):
    return store.create_session(image_id=image_id, image_png=b"\x89PNG original " + image_id.encode(),
                                attributes=dict(ATTRIBUTES), guesses={"smiling": 0.9}, protected=list(protected),
                                level=dict(LEVEL))


def _price(epsilon):
    """Protecting smiling at ``epsilon``, the image not read: the budget tests here are about the labels."""
    return price_release(epsilon=epsilon, protected=["smiling"], encoding="fresh", pixel_mus=[0.0])


def release(image_id="img-1", epsilon=1.0, outcome="released", seed=123456789):
    return dict(image_id=image_id, protected=["smiling"], epsilon=epsilon, strength=0.5, seed=seed, level="low",
                released_attributes={"smiling": -1, "eyeglasses": -1}, outcome=outcome, models=None,
                price=_price(epsilon))


def respond(record):
    return {"release_id": record.release_id, "released": record.released_attributes, "outcome": record.outcome}


def test_sessions_are_created_read_and_updated_and_only_their_hash_is_stored(stores, target):
    store = stores()
    token = new_session(store)
    row = store.session(token)
    assert (row.image_id, row.attributes, row.guesses, row.protected, row.level) == (
        "img-1", ATTRIBUTES, {"smiling": 0.9}, ["smiling"], LEVEL)
    assert row.image_png == b"\x89PNG original img-1" and row.decision is None and row.release_id is None
    high = {**LEVEL, "name": "high", "epsilon": 4.0}
    row = store.update_session(token, level=high, protected=["smiling", "eyeglasses"])
    assert (row.level, row.protected) == (high, ["smiling", "eyeglasses"])
    assert store.session(token).level == high
    for bad in ("nope", "x" * 43, None, 12, new_session.__name__ * 3):
        with pytest.raises(UnknownSession):
            store.session(bad)
    stored = raw(target, "SELECT * FROM serve_sessions")
    assert len(stored) == 1 and token not in repr(stored)
    assert hashlib.sha256(token.encode()).hexdigest() in repr(stored)
    if store.backend == "sqlite":  # nor anywhere in the file or its write-ahead log
        data = b"".join(open(target + suffix, "rb").read() for suffix in ("", "-wal"))
        assert token.encode() not in data and hashlib.sha256(token.encode()).hexdigest().encode() in data


def test_feedback_is_recorded_and_a_rejected_session_is_closed(stores, target):
    store = stores()
    token = new_session(store)
    medium = {**LEVEL, "name": "medium", "epsilon": 2.0}
    assert store.feedback(token, action="preview", level=medium).level == medium
    assert store.feedback(token, action="reject", level=LEVEL, decision="rejected").decision == "rejected"
    assert store.session(token).decision == "rejected"
    with pytest.raises(SessionClosed):
        store.feedback(token, action="preview", level=LEVEL)
    with pytest.raises(SessionClosed):
        store.update_session(token, level=medium)
    with pytest.raises(SessionClosed):
        store.accept(token, key="k", release=release(), image_png=None, respond=respond)
    actions = raw(target, "SELECT action, level FROM serve_feedback ORDER BY feedback_id")
    assert [a for a, _ in actions] == ["preview", "reject"]
    assert store.releases() == [] and store.spends("img-1") == {}
    with pytest.raises(UnknownSession):
        store.feedback("y" * 43, action="preview", level=LEVEL)


def test_accept_releases_once_and_a_retry_replays_the_answer(stores, target):
    store, seen = stores(), []
    token = new_session(store)

    def answer(record):
        seen.append(record.seed)
        return respond(record)

    assert store.replay(token, "key-1") is None
    result = store.accept(token, key="key-1", release=release(), image_png=b"edited", respond=answer)
    assert store.replay(token, "key-1") == result.response and store.replay(token, "key-2") is None
    assert not result.replayed and seen == [123456789] and result.record.seed == 123456789
    rid = result.response["release_id"]
    assert store.spends("img-1") == {"smiling": 1.0}
    [listed] = store.releases()
    assert listed["release_id"] == rid and listed["epsilon"] == 1.0 and listed["released_attributes"] == {
        "smiling": -1, "eyeglasses": -1}
    assert not any("seed" in key for key in listed) and "123456789" not in repr(store.releases("img-1"))
    row = store.session(token)
    assert (row.decision, row.release_id) == ("accepted", rid)

    again = store.accept(token, key="key-1", release=release(seed=99), image_png=b"other", respond=answer)
    assert again.replayed and again.response == result.response and again.record is None and len(seen) == 1
    assert len(store.releases()) == 1 and store.spends("img-1") == {"smiling": 1.0}
    with pytest.raises(SessionClosed):
        store.accept(token, key="key-2", release=release(), image_png=None, respond=answer)

    [item] = store.revision_items()
    assert item["release_id"] == rid and item["original_attributes"] == ATTRIBUTES and item["image_png"] == b"edited"
    assert store.count_releases() == {"released": 1, "refused": 0}
    assert [a for (a,) in raw(target, "SELECT action FROM serve_feedback")] == ["accept"]
    assert store.consistency() == []


def test_a_refused_outcome_is_charged_closes_the_session_and_is_not_a_revision_item(stores):
    store = stores()
    token = new_session(store)
    result = store.accept(token, key="k", release=release(outcome="refused"), image_png=b"edited", respond=respond)
    assert result.response["outcome"] == "refused" and store.session(token).decision == "refused"
    assert store.spends("img-1") == {"smiling": 1.0} and store.count_releases() == {"released": 0, "refused": 1}
    assert store.revision_items() == [] and store.consistency() == []


def test_a_failing_respond_or_a_malformed_release_writes_nothing(stores, target):
    store = stores()
    token = new_session(store)

    def fail(record):
        raise RuntimeError("could not write the answer")
    with pytest.raises(RuntimeError, match="could not write"):
        store.accept(token, key="k", release=release(), image_png=b"edited", respond=fail)
    with pytest.raises(ConfigError, match="seed"):
        store.accept(token, key="k", release={**release(), "seed": None}, image_png=None, respond=respond)
    with pytest.raises(ConfigError, match="every protected attribute"):
        store.accept(token, key="k", release={**release(), "released_attributes": {"male": 1}}, image_png=None,
                     respond=respond)
    assert store.releases() == [] and store.spends("img-1") == {} and store.session(token).decision is None
    assert [raw(target, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("serve_accepts", "serve_release_images",
                                                                      "serve_feedback")] == [0, 0, 0]
    assert not store.accept(token, key="k", release=release(), image_png=None, respond=respond).replayed


def test_the_budget_refuses_the_third_release_and_writes_nothing(stores, target):
    store = stores(budget=2.0)
    assert store.budget == 2.0
    tokens = [new_session(store) for _ in range(3)]
    for i, token in enumerate(tokens[:2]):
        store.accept(token, key=f"k{i}", release=release(), image_png=b"edited", respond=respond)
    with pytest.raises(PrivacyError, match="spent epsilon 2 of its budget 2"):
        store.check_release(image_id="img-1", protected=["smiling"], epsilon=1.0, published=["eyeglasses"],
                            price=_price(1.0))
    with pytest.raises(PrivacyError, match="spent epsilon 2 of its budget 2"):
        store.accept(tokens[2], key="k2", release=release(), image_png=b"edited", respond=respond)
    assert len(store.releases()) == 2 and store.spends("img-1") == {"smiling": 2.0}
    assert store.session(tokens[2]).decision is None
    assert raw(target, "SELECT COUNT(*) FROM serve_accepts")[0][0] == 2
    assert raw(target, "SELECT COUNT(*) FROM serve_release_images")[0][0] == 2
    store.check_release(image_id="img-2", protected=["smiling"], epsilon=2.0, price=_price(2.0))  # its own budget


def test_a_stored_budget_is_kept_and_a_different_one_refused(stores):
    stores(budget=2.0)
    assert stores().budget == 2.0
    with pytest.raises(PrivacyError, match="--budget 3"):
        stores(budget=3.0)
    assert stores(budget=2.0).budget == 2.0


def _race(calls):
    """Run every call from its own thread, all released at once; [(result or exception)]."""
    start, out = threading.Barrier(len(calls)), [None] * len(calls)

    def go(i):
        start.wait()
        try:
            out[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - collected and checked by the test
            out[i] = e
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_two_replicas_cannot_overspend_the_budget(stores):
    replicas = [stores(budget=4.0), stores(budget=4.0)]
    tokens = [new_session(replicas[0]) for _ in range(24)]
    out = _race([lambda i=i: replicas[i % 2].accept(tokens[i], key=f"key-{i}", release=release(),
                                                     image_png=b"edited", respond=respond) for i in range(24)])
    won = [r for r in out if not isinstance(r, Exception)]
    assert len(won) == 4 and all(isinstance(r, PrivacyError) for r in out if r not in won), out
    ids = [r.response["release_id"] for r in won]
    assert sorted(ids) == [r["release_id"] for r in replicas[1].releases()]
    assert replicas[0].spends("img-1") == {"smiling": 4.0} == replicas[1].spends("img-1")
    assert replicas[0].consistency() == [] and replicas[1].consistency() == []


def test_one_key_sent_twice_at_once_releases_once(stores):
    replicas = [stores(), stores()]
    token = new_session(replicas[0])
    out = _race([lambda r=r: r.accept(token, key="same", release=release(), image_png=None, respond=respond)
                 for r in replicas])
    assert not any(isinstance(r, Exception) for r in out), out
    assert sorted(r.replayed for r in out) == [False, True] and out[0].response == out[1].response
    assert len(replicas[0].releases()) == 1 and replicas[0].spends("img-1") == {"smiling": 1.0}


def test_sqlite_releases_are_ordinary_ledger_rows(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with open_state(path, budget=2.0) as store:
        assert store.backend == "sqlite" and store.where == str(path)
        result = store.accept(new_session(store), key="k", release=release(), image_png=None, respond=respond)
    with PrivacyLedger(path) as ledger:
        [record] = ledger.releases()
        assert record.release_id == result.response["release_id"] and record.seed == 123456789
        assert ledger.spent("img-1", "smiling") == 1.0 and ledger.budget == 2.0 and record.budget == 2.0
    with pytest.raises(PrivacyError, match="set-budget"):
        open_state(f"sqlite://{path}", budget=8.0)


def test_consistency_finds_planted_problems(stores, target):
    store = stores(budget=2.0)
    rid = store.accept(new_session(store), key="k", release=release(), image_png=None,
                       respond=respond).response["release_id"]
    assert store.consistency() == []
    raw(target, "DELETE FROM attribute_spends WHERE release_id = ? AND attribute = 'eyeglasses'", (rid,))
    assert [p for p in store.consistency() if f"release {rid}" in p and "attribute_spends" in p]
    raw(target, "INSERT INTO attribute_spends (release_id, image_id, attribute, epsilon) VALUES (?, 'img-1', 'smiling', 5.0)",
        (rid,))
    assert [p for p in store.consistency() if "'smiling'" in p and "> the budget 2" in p]


def test_an_unreachable_postgresql_is_a_data_error_without_its_password():
    with socket_bound() as port:  # a port nothing listens on
        with pytest.raises(DataError) as e:
            open_state(f"postgresql://veil:hunter2@127.0.0.1:{port}/veil")
    assert "hunter2" not in str(e.value) and "postgresql://veil:***@127.0.0.1" in str(e.value)


class socket_bound:
    """A free local port, held (bound, not listening) so no server takes it meanwhile."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def test_an_unlimited_budget_is_stored_as_none(stores):
    store = stores(budget=float("inf"))
    assert store.budget is None and stores().budget is None
    store.accept(new_session(store), key="k", release=release(epsilon=100.0), image_png=None, respond=respond)
    assert store.spends("img-1") == {"smiling": 100.0} and store.consistency() == []
    if store.backend == "postgresql":
        assert store.where.startswith("postgresql://veil@127.0.0.1:")
