"""veil.privacy.db, the one database layer, on both backends (a SQLite file, the throwaway PostgreSQL of
conftest.py): commit and rollback, a transaction joined by a nested one, ``?`` placeholders and the DDL
translation, RETURNING ids, and writers that lock before they read (two instances, many threads)."""

import threading

import pytest

from veil.errors import DataError
from veil.privacy.db import Rows, create_owner_only, open_database, redact, sqlite_path

DDL = """
CREATE TABLE IF NOT EXISTS things (
    thing_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name     TEXT NOT NULL,              -- free text
    weight   REAL,
    blob     BLOB
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        path = tmp_path / "db.sqlite"
        create_owner_only(path)
        return str(path)
    return request.getfixturevalue("pg_database")


@pytest.fixture
def databases(target):
    """``open_()``: another Database on ``target`` (another process, as far as locking goes)."""
    opened = []

    def open_():
        opened.append(open_database(target))
        opened[-1].create_tables(DDL)
        return opened[-1]

    yield open_
    for db in opened:
        db.close()


def names(db) -> list:
    return [n for (n,) in db.execute("SELECT name FROM things ORDER BY thing_id")]


def test_a_transaction_commits_at_the_end_and_rolls_back_when_it_raises(databases):
    db = databases()
    with db.transaction() as tx:
        first = tx.insert("INSERT INTO things (name, weight, blob) VALUES (?, ?, ?)", ("kept", 1.5, b"\x00\x01"),
                          returning="thing_id")
    with pytest.raises(RuntimeError, match="boom"):
        with db.transaction() as tx:
            tx.execute("INSERT INTO things (name) VALUES (?)", ("lost",))
            assert "lost" in names(db)  # this thread's reads join the open transaction
            raise RuntimeError("boom")
    assert names(db) == ["kept"] and names(databases()) == ["kept"]
    row = db.execute("SELECT thing_id, weight, blob FROM things WHERE name LIKE 'ke%' AND name = ?",
                     ("kept",)).fetchone()
    assert (row[0], row[1], bytes(row[2])) == (first, 1.5, b"\x00\x01")
    with db.transaction() as tx:  # the failed transaction left nothing behind: the next one works
        tx.execute("INSERT INTO things (name) VALUES (?)", ("next",))
    assert names(db) == ["kept", "next"]


def test_a_nested_transaction_joins_the_outer_one(databases):
    db, other = databases(), databases()
    with pytest.raises(KeyError):
        with db.transaction() as outer:
            outer.execute("INSERT INTO things (name) VALUES (?)", ("outer",))
            with db.transaction() as inner:  # joins: the same transaction, nothing committed at its end
                assert inner is outer
                inner.execute("INSERT INTO things (name) VALUES (?)", ("inner",))
            assert names(db) == ["outer", "inner"]
            raise KeyError("abort")
    assert names(db) == [] and names(other) == []
    with db.transaction(write=False):
        with pytest.raises(RuntimeError, match="cannot join a read-only"):
            with db.transaction():
                pass


def test_rows_are_read_to_the_end(databases):
    db = databases()
    with db.transaction() as tx:
        for name in ("a", "b", "c"):
            tx.execute("INSERT INTO things (name) VALUES (?)", (name,))
    rows = db.execute("SELECT name FROM things ORDER BY name")
    assert isinstance(rows, Rows) and rows.fetchone() == ("a",) and rows.fetchall() == [("b",), ("c",)]
    assert rows.fetchone() is None and list(rows) == []
    assert db.execute("UPDATE things SET weight = ? WHERE name <> ?", (2.0, "a")).rowcount == 2


def test_writers_lock_before_they_read(databases):
    # read-modify-write from many threads and two instances: no increment is lost
    dbs = [databases(), databases()]
    with dbs[0].transaction() as tx:
        tx.execute("INSERT INTO counters (name, value) VALUES (?, ?)", ("c", 0))
    start, errors = threading.Barrier(8), []

    def bump(db):
        start.wait()
        try:
            for _ in range(10):
                with db.transaction(locks=["counter c"]) as tx:
                    (value,) = tx.execute("SELECT value FROM counters WHERE name = ?", ("c",)).fetchone()
                    tx.execute("UPDATE counters SET value = ? WHERE name = ?", (value + 1, "c"))
        except Exception as e:  # noqa: BLE001 - collected and checked
            errors.append(e)

    threads = [threading.Thread(target=bump, args=(dbs[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and dbs[1].execute("SELECT value FROM counters").fetchone()[0] == 80


def test_the_schema_and_the_consistency_check(databases):
    db = databases()
    db.create_tables(DDL)  # again: IF NOT EXISTS
    with db.transaction(write=False) as tx:
        assert {"things", "counters"} <= tx.tables()
    assert db.integrity_check() == "ok" and db.problems() == []


def test_paths_urls_and_passwords():
    assert str(sqlite_path("sqlite:///tmp/x.sqlite")) == "/tmp/x.sqlite"
    assert redact("postgresql://veil:hunter2@db:5432/veil?password=x&sslmode=require") == \
        "postgresql://veil:***@db:5432/veil?password=***&sslmode=require"
    with pytest.raises(DataError) as e:  # nothing listens on port 9 of loopback
        open_database("postgresql://veil:hunter2@127.0.0.1:9/veil", option="--state")
    assert "hunter2" not in str(e.value) and str(e.value).startswith("--state postgresql://veil:***@127.0.0.1:9")
