"""The release side of the privacy database: composition per (image, attribute), the refusals, the
stored budget no writer can overrun, atomic batches, crash safety, the schema-1 migration."""

import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.errors import ConfigError, DataError, PrivacyError
from veil.privacy.ledger import PrivacyLedger, ReleaseLedger

HERE = Path(__file__).parent
BOTH = {"smiling": -1, "eyeglasses": 1}


def _release(ledger, image_id="img-1", epsilon=1.0, seed=0, protected=("smiling", "eyeglasses"), released=None):
    return ledger.record(image_id=image_id, protected=list(protected), epsilon=epsilon, strength=0.7, seed=seed,
                         level="high", released_attributes=BOTH if released is None else released)


def test_records_round_trip_and_compose_by_sum(tmp_path):
    with PrivacyLedger(tmp_path / "l.sqlite", budget=5.0) as ledger:
        a = _release(ledger, epsilon=1.0, seed=11)
        _release(ledger, epsilon=2.5, seed=12)
        _release(ledger, image_id="img-2", epsilon=4.0)
        assert ledger.spent("img-1", "smiling") == pytest.approx(3.5) == ledger.spent("img-1", "eyeglasses")
        assert ledger.spends("img-2") == {"eyeglasses": 4.0, "smiling": 4.0}
        assert ledger.spent("never", "smiling") == 0.0 and ledger.count("img-1") == 2
    with ReleaseLedger(tmp_path / "l.sqlite") as again:  # persisted; the old name still works
        recs = again.releases("img-1")
        assert [r.seed for r in recs] == [11, 12] and recs[0] == a
        assert recs[0].protected == ["smiling", "eyeglasses"] and recs[0].released_attributes["smiling"] == -1
        assert recs[0].budget == 5.0 and recs[0].released_at.endswith("+00:00")
        assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert again._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_release_past_the_budget_is_refused_with_the_numbers(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=3.0)
    _release(ledger, epsilon=2.0)
    with pytest.raises(PrivacyError, match=r"spent epsilon 2 of its budget 3.*asks for 1.5") as err:
        _release(ledger, epsilon=1.5)
    assert "img-1" in str(err.value) and "veil privacy set-budget" in str(err.value)
    with pytest.raises(PrivacyError):
        ledger.check(image_id="img-1", protected=["smiling"], epsilon=1.5)
    _release(ledger, epsilon=1.0)  # exactly at the budget is allowed
    assert ledger.spent("img-1", "smiling") == 3.0 and ledger.count("img-1") == 2
    _release(ledger, epsilon=0.0)  # eps = 0 (a fair coin) costs nothing
    with pytest.raises(PrivacyError):
        _release(ledger, epsilon=math.inf)


def test_releases_compose_per_image_and_attribute(tmp_path):
    # Item 9: protecting smiling at 2, then eyeglasses at 2, spends 2 on each (image, attribute), not 4 on
    # the image. Each release publishes only the attribute it protects here, so neither was given away.
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=2.0)
    _release(ledger, epsilon=2.0, protected=["smiling"], released={"smiling": 1})
    _release(ledger, epsilon=2.0, protected=["eyeglasses"], released={"eyeglasses": -1})  # old ledger: 4 > 2
    assert ledger.spends("img-1") == {"eyeglasses": 2.0, "smiling": 2.0}
    with pytest.raises(PrivacyError, match="'smiling' has spent epsilon 2 of its budget 2"):
        _release(ledger, epsilon=0.5, protected=["smiling"], released={"smiling": 1})


@pytest.mark.parametrize("first, second, match", [
    # publishing exactly what an earlier release protected: the true value would be out
    (dict(protected=["smiling"], released={"smiling": 1}), dict(protected=["eyeglasses"], released=BOTH),
     "publish 'smiling' exactly"),
    # protecting what an earlier release already published exactly: protects nothing
    (dict(protected=["smiling"], released=BOTH), dict(protected=["eyeglasses"], released={"eyeglasses": 1}),
     "'eyeglasses' was published exactly"),
    # the example: smiling protected, then eyeglasses protected, every attribute published each time
    (dict(protected=["smiling"], released=BOTH), dict(protected=["eyeglasses"], released=BOTH), "refused"),
])
def test_releases_that_would_give_a_value_away_are_refused(tmp_path, first, second, match):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=8.0)
    _release(ledger, **first)
    with pytest.raises(PrivacyError, match=match):
        ledger.check(image_id="img-1", protected=second["protected"], epsilon=1.0, published=list(second["released"]))
    with pytest.raises(PrivacyError, match=match):
        _release(ledger, **second)
    with pytest.raises(PrivacyError, match=match):  # within one batch too
        fresh = PrivacyLedger(tmp_path / "fresh.sqlite")
        fresh.record_many([dict(image_id="x", strength=0.5, seed=0, epsilon=1.0, released_attributes=r["released"],
                                protected=r["protected"]) for r in (first, second)])
    assert ledger.count("img-1") == 1 and fresh.releases() == []
    _release(ledger, **first)  # the same protected set again is fine


def test_a_batch_is_all_or_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=2.0)
    batch = [dict(image_id=i, protected=["smiling"], epsilon=1.5, strength=0.5, seed=0,
                  released_attributes={"smiling": 1}) for i in ("a", "b", "a")]
    with pytest.raises(PrivacyError, match="'a'"):
        ledger.record_many(batch)  # the second 'a' would reach 3.0 > 2.0
    assert ledger.releases() == []
    assert len(ledger.record_many(batch[:2])) == 2
    with pytest.raises(ConfigError, match="every protected attribute"):
        _release(ledger, image_id="c", released={"smiling": 1})  # eyeglasses protected but not released


def test_unlimited_budget_and_bad_budget_names_the_option(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=math.inf)
    for _ in range(5):
        _release(ledger, epsilon=10.0)
    assert ledger.spent("img-1", "smiling") == 50.0 and ledger.budget is None
    with pytest.raises(ConfigError, match="--budget"):
        PrivacyLedger(tmp_path / "m.sqlite", budget=-1)
    with pytest.raises(ConfigError, match="--ledger"):
        PrivacyLedger(tmp_path, budget=1)
    with pytest.raises(ConfigError, match="no privacy database"):
        PrivacyLedger(tmp_path / "absent.sqlite", create=False)


def test_a_second_writer_cannot_overspend_with_a_larger_budget(tmp_path):
    # Item 8: the budget lives in the database. Old ledgers took each writer's own budget argument.
    path = tmp_path / "l.sqlite"
    first = PrivacyLedger(path, budget=2.0)
    _release(first, epsilon=1.5)
    with pytest.raises(PrivacyError, match=r"holds the release budget 2 .*veil privacy set-budget 100"):
        PrivacyLedger(path, budget=100.0)
    second = PrivacyLedger(path)  # budget=None: the stored one
    assert second.budget == 2.0
    with pytest.raises(PrivacyError):
        _release(second, epsilon=1.0)
    # the budget is read inside the write transaction: a writer opened earlier sees a change at once
    second.set_budget(1.0, reason="tighter")
    with pytest.raises(PrivacyError, match="budget 1"):
        _release(first, image_id="img-2", epsilon=1.5)


def test_ledger_survives_sigkill_mid_write(tmp_path):
    path = tmp_path / "ledger.sqlite"
    proc = subprocess.Popen([sys.executable, str(HERE / "ledger_writer_script.py"), str(path)],
                            stdout=subprocess.PIPE, text=True)
    reported = []
    deadline = time.monotonic() + 60
    try:
        while len(reported) < 40 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-loop: the writer is inside or between transactions
        proc.wait()
    assert len(reported) >= 40, "the writer did not commit 40 releases within 60 s"
    reported += [int(s) for s in proc.stdout.read().split()]  # ids printed before the kill landed
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    present = {r[0] for r in db.execute("SELECT release_id FROM releases")}
    assert set(reported) <= present
    assert max(present) - max(reported) <= 1  # at most the one commit whose id was never printed
    spends = db.execute("SELECT COUNT(*) FROM attribute_spends").fetchone()[0]
    assert spends == len(present)  # each release and its spend row committed together
    db.close()
    with PrivacyLedger(path) as reopened:  # and it opens and takes writes again
        assert reopened.integrity_check() == "ok"
        _release(reopened)


# The schema-1 ledger (before it composed per attribute, veil at commit 7daab0f): the same table and columns.
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS releases (
    release_id INTEGER PRIMARY KEY AUTOINCREMENT, image_id TEXT NOT NULL, protected TEXT NOT NULL,
    epsilon REAL NOT NULL, strength REAL NOT NULL, seed INTEGER NOT NULL, level TEXT,
    released_attributes TEXT, budget REAL, released_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS releases_by_image ON releases (image_id);
"""


def test_a_schema_2_ledger_gains_outcome_and_models(tmp_path):
    """Schema 3 (issue 13): every release row says whether it was published or refused, and which models'
    training privacy made the edit; a schema-2 database is upgraded in place, its rows read as released."""
    from veil.privacy.ledger_schema import SCHEMA

    path = tmp_path / "v2.sqlite"
    with PrivacyLedger(path, budget=4.0):
        pass
    db = sqlite3.connect(str(path))  # rebuild releases as schema 2 had it (no outcome, no models)
    v2 = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS releases"): SCHEMA.index(");") + 2]
    v2 = v2.replace("released_at         TEXT NOT NULL,", "released_at         TEXT NOT NULL")
    v2 = v2[: v2.index("    outcome")] + ");"
    db.execute("DROP TABLE releases")
    db.execute(v2)
    assert {r[1] for r in db.execute("PRAGMA table_info(releases)")}.isdisjoint({"outcome", "models"})
    db.execute("INSERT INTO releases VALUES (1, 'img-1', '[\"smiling\"]', 1.0, 0.5, 7, 'high', "
               "'{\"smiling\": 1}', 4.0, '2026-01-01T00:00:00+00:00')")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    models = [{"role": "denoiser", "private": False, "data": "synthetic seed 1"}]
    with PrivacyLedger(path) as ledger:
        old = ledger.releases()[0]
        assert (old.outcome, old.models, old.seed) == ("released", None, 7)
        new = ledger.record(image_id="img-2", protected=["smiling"], epsilon=1.0, strength=0.7, seed=3,
                            released_attributes={"smiling": -1}, outcome="refused", models=models)
        assert (new.outcome, new.models) == ("refused", models)
        assert ledger.spent("img-2", "smiling") == 1.0  # a refused draw is charged
        with pytest.raises(ConfigError, match="'lost' is not released or refused"):
            ledger.record(image_id="img-3", protected=["smiling"], epsilon=1.0, strength=0.7, seed=3,
                          released_attributes={"smiling": -1}, outcome="lost")
    assert sqlite3.connect(str(path)).execute("PRAGMA user_version").fetchone()[0] == 3


def test_a_schema_1_ledger_is_migrated_and_read_per_attribute(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(str(path))
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO releases VALUES (1, 'img-1', '[\"smiling\"]', 2.0, 0.5, 7, 'medium', "
               "'{\"smiling\": 1, \"eyeglasses\": -1}', 8.0, '2025-01-01T00:00:00+00:00')")
    db.commit()
    db.close()
    with PrivacyLedger(path, budget=4.0) as ledger:
        assert ledger.spends("img-1") == {"smiling": 2.0} and ledger.releases()[0].seed == 7
        assert ledger.budget == 4.0 and "schema-1" in ledger.budget_changes()[0]["reason"]
        with pytest.raises(PrivacyError, match="publish 'smiling' exactly"):  # the migrated release protected it
            _release(ledger, protected=["hat"], released={"smiling": 1, "hat": 1})
        with pytest.raises(PrivacyError, match="'eyeglasses' was published exactly"):  # ... and published this
            _release(ledger, protected=["smiling", "eyeglasses"])
        _release(ledger, protected=["smiling"], epsilon=2.0)
        assert ledger.spent("img-1", "smiling") == 4.0
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(DataError, match="newer veil"):
        PrivacyLedger(path)
    (tmp_path / "junk.sqlite").write_text("not a database at all, just text" * 100)
    with pytest.raises(DataError, match="not a veil privacy database"):
        PrivacyLedger(tmp_path / "junk.sqlite")
