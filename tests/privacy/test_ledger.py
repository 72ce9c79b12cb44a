"""The release side of the privacy database: composition per record (labels and pixels, issue 30), the
refusals, the stored budget no writer can overrun, atomic batches, crash safety, the schema migrations.

The tests of the label rules price their releases without pixels (``FRESH``: the image is not read, mu 0);
the pixel channel has its own tests below."""

import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.errors import ConfigError, DataError, PrivacyError
from veil.privacy.accounting import price_release
from veil.privacy.ledger import PrivacyLedger, ReleaseLedger

HERE = Path(__file__).parent
BOTH = {"smiling": -1, "eyeglasses": 1}


def _price(epsilon, protected, pixel_mus=(0.0,), encoding="fresh"):
    """A release's price; by default pixel-free (the image not read), so a test of the label rules sees labels only."""
    return price_release(epsilon=epsilon, protected=list(protected), encoding=encoding, pixel_mus=list(pixel_mus))


def _release(ledger, image_id="img-1", epsilon=1.0, seed=0, protected=("smiling", "eyeglasses"), released=None,
             price=None):
    return ledger.record(image_id=image_id, protected=list(protected), epsilon=epsilon, strength=0.7, seed=seed,
                         level="high", released_attributes=BOTH if released is None else released,
                         price=_price(epsilon, protected) if price is None else price)


def test_records_round_trip_and_compose_by_sum(tmp_path):
    # Each release protects two attributes: the record composes both labels of both releases (2 * 1 + 2 * 2.5);
    # the per-(image, attribute) label sums are still readable.
    with PrivacyLedger(tmp_path / "l.sqlite", budget=8.0) as ledger:
        a = _release(ledger, epsilon=1.0, seed=11)
        _release(ledger, epsilon=2.5, seed=12)
        _release(ledger, image_id="img-2", epsilon=4.0)
        assert ledger.spent("img-1", "smiling") == pytest.approx(3.5) == ledger.spent("img-1", "eyeglasses")
        assert ledger.spends("img-2") == {"eyeglasses": 4.0, "smiling": 4.0}
        assert ledger.spent("never", "smiling") == 0.0 and ledger.count("img-1") == 2
        assert ledger.guarantee("img-1").epsilon == pytest.approx(7.0, abs=1e-4)
        assert ledger.guarantee("img-2").epsilon == pytest.approx(8.0, abs=1e-4)  # exactly the budget: allowed
        assert ledger.remaining("img-1") == pytest.approx(1.0, abs=1e-4) and ledger.remaining("never") == 8.0
    with ReleaseLedger(tmp_path / "l.sqlite") as again:  # persisted; the old name still works
        recs = again.releases("img-1")
        assert [r.seed for r in recs] == [11, 12] and recs[0] == a
        assert recs[0].protected == ["smiling", "eyeglasses"] and recs[0].released_attributes["smiling"] == -1
        assert recs[0].budget == 8.0 and recs[0].released_at.endswith("+00:00")
        assert recs[0].price == _price(1.0, ["smiling", "eyeglasses"]) and again.prices("img-1")[1].label_epsilon == 2.5
        assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert again._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_release_past_the_budget_is_refused_with_the_numbers(tmp_path):
    # Two protected attributes: a release at epsilon e costs the record about 2e.
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=6.0)
    _release(ledger, epsilon=2.0)
    with pytest.raises(PrivacyError, match=r"record has spent epsilon 4 of its budget 6.*would take it to 7") as err:
        _release(ledger, epsilon=1.5)
    assert "img-1" in str(err.value) and "veil privacy set-budget" in str(err.value)
    with pytest.raises(PrivacyError, match="budget 6"):
        ledger.check(image_id="img-1", protected=["smiling", "eyeglasses"], epsilon=1.5,
                     price=_price(1.5, ["smiling", "eyeglasses"]))
    _release(ledger, epsilon=1.0)  # exactly at the budget is allowed
    assert ledger.spent("img-1", "smiling") == 3.0 and ledger.count("img-1") == 2
    assert ledger.guarantee("img-1").epsilon == pytest.approx(6.0, abs=1e-4)
    _release(ledger, epsilon=0.0)  # eps = 0 (a fair coin) with pixels not read costs nothing
    with pytest.raises(PrivacyError):
        _release(ledger, epsilon=math.inf)


def test_releases_compose_per_record(tmp_path):
    # Issue 30 (replacing item 9's per-(image, attribute) rule): protecting smiling at 2, then eyeglasses at 2,
    # costs the record (the person) 4: both labels are about the same face. Each release publishes only the
    # attribute it protects here, so neither was given away.
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=2.0)
    _release(ledger, epsilon=2.0, protected=["smiling"], released={"smiling": 1})
    with pytest.raises(PrivacyError, match="record has spent epsilon 2 of its budget 2"):  # per attribute: 2 <= 2
        _release(ledger, epsilon=2.0, protected=["eyeglasses"], released={"eyeglasses": -1})
    ledger.set_budget(4.0, reason="two labels per face")
    _release(ledger, epsilon=2.0, protected=["eyeglasses"], released={"eyeglasses": -1})
    assert ledger.spends("img-1") == {"eyeglasses": 2.0, "smiling": 2.0}  # still readable per attribute
    assert ledger.guarantee("img-1").labels_epsilon == pytest.approx(4.0, abs=1e-4)
    with pytest.raises(PrivacyError, match="record has spent epsilon 4 of its budget 4"):  # smiling alone: 2.5 <= 4
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
        ledger.check(image_id="img-1", protected=second["protected"], epsilon=1.0, published=list(second["released"]),
                     price=_price(1.0, second["protected"]))
    with pytest.raises(PrivacyError, match=match):
        _release(ledger, **second)
    with pytest.raises(PrivacyError, match=match):  # within one batch too
        fresh = PrivacyLedger(tmp_path / "fresh.sqlite")
        fresh.record_many([dict(image_id="x", strength=0.5, seed=0, epsilon=1.0, released_attributes=r["released"],
                                protected=r["protected"], price=_price(1.0, r["protected"])) for r in (first, second)])
    assert ledger.count("img-1") == 1 and fresh.releases() == []
    _release(ledger, **first)  # the same protected set again is fine


def test_a_batch_is_all_or_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=2.0)
    batch = [dict(image_id=i, protected=["smiling"], epsilon=1.5, strength=0.5, seed=0,
                  released_attributes={"smiling": 1}, price=_price(1.5, ["smiling"])) for i in ("a", "b", "a")]
    with pytest.raises(PrivacyError, match="'a'"):
        ledger.record_many(batch)  # the second 'a' would reach 3.0 > 2.0
    assert ledger.releases() == []
    assert len(ledger.record_many(batch[:2])) == 2
    with pytest.raises(ConfigError, match="every protected attribute"):
        _release(ledger, image_id="c", released={"smiling": 1})  # eyeglasses protected but not released
    # the record's composition counts the rows before it in the same batch: each attribute alone fits (1.5 <= 2),
    # the record does not (3 > 2)
    two = [dict(image_id="d", protected=[p], epsilon=1.5, strength=0.5, seed=0, released_attributes={p: 1},
                price=_price(1.5, [p])) for p in ("smiling", "eyeglasses")]
    with pytest.raises(PrivacyError, match="'d' refused: the record has spent epsilon 1.5 of its budget 2"):
        ledger.record_many(two)
    assert ledger.count("d") == 0
    with pytest.raises(ConfigError, match="price"):  # nothing is recorded unpriced
        ledger.record_many([{k: v for k, v in two[0].items() if k != "price"}])


def test_unlimited_budget_and_bad_budget_names_the_option(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=math.inf)
    for _ in range(5):
        _release(ledger, epsilon=10.0)
    assert ledger.spent("img-1", "smiling") == 50.0 and ledger.budget is None
    assert ledger.guarantee("img-1").epsilon == pytest.approx(100.0, abs=1e-2)
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
    _release(first, epsilon=0.75)  # two labels: 1.5 of 2
    with pytest.raises(PrivacyError, match=r"holds the release budget 2 .*veil privacy set-budget 100"):
        PrivacyLedger(path, budget=100.0)
    second = PrivacyLedger(path)  # budget=None: the stored one
    assert second.budget == 2.0
    with pytest.raises(PrivacyError, match="budget 2"):
        _release(second, epsilon=0.5)  # 1.5 + 1 > 2
    # the budget is read inside the write transaction: a writer opened earlier sees a change at once
    second.set_budget(1.0, reason="tighter")
    with pytest.raises(PrivacyError, match="budget 1 "):
        _release(first, image_id="img-2", epsilon=0.75)  # 1.5 > 1 (each attribute alone: 0.75 <= 1)


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
    training privacy made the edit; a schema-2 database is upgraded in place (to schema 4), its rows read as
    released and unpriced."""
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
        assert (old.outcome, old.models, old.seed, old.price) == ("released", None, 7, None)
        assert old.charged.pixel_mu == math.inf  # never limited: unbounded
        new = ledger.record(image_id="img-2", protected=["smiling"], epsilon=1.0, strength=0.7, seed=3,
                            released_attributes={"smiling": -1}, outcome="refused", models=models,
                            price=_price(1.0, ["smiling"]))
        assert (new.outcome, new.models) == ("refused", models)
        assert ledger.spent("img-2", "smiling") == 1.0  # a refused draw is charged
        with pytest.raises(ConfigError, match="'lost' is not released or refused"):
            ledger.record(image_id="img-3", protected=["smiling"], epsilon=1.0, strength=0.7, seed=3,
                          released_attributes={"smiling": -1}, outcome="lost", price=_price(1.0, ["smiling"]))
    assert sqlite3.connect(str(path)).execute("PRAGMA user_version").fetchone()[0] == 4


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
        # the migrated release's pixels were never limited: under the default policy its record is spent
        with pytest.raises(PrivacyError, match="record has spent epsilon inf of its budget 4"):
            _release(ledger, protected=["smiling"], epsilon=2.0)
        ledger.set_pixel_policy("not-protected", reason="labels only")  # then the labels compose: 2 + 2
        _release(ledger, protected=["smiling"], epsilon=2.0)
        assert ledger.spent("img-1", "smiling") == 4.0
        assert ledger.guarantee("img-1").epsilon == pytest.approx(4.0, abs=1e-4)
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(DataError, match="newer veil"):
        PrivacyLedger(path)
    (tmp_path / "junk.sqlite").write_text("not a database at all, just text" * 100)
    with pytest.raises(DataError, match="not a veil privacy database"):
        PrivacyLedger(tmp_path / "junk.sqlite")


# -- issue 30: the pixel channel, the pixel policy, schema 4 --------------------------------------------------------

def test_max_costs_what_its_pixels_cost(tmp_path):
    # The hole: "max" (epsilon 0) cost nothing, so one face could be released without limit and the releases
    # averaged back to the original. Now a release at label epsilon 0 whose edit reads the image (a "noise"
    # encoding, mu 0.5) is charged its pixels, the record's guarantee grows with each, and the budget stops them.
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=8.0)
    noise = _price(0.0, ["smiling"], pixel_mus=[0.5], encoding="noise")
    seen = []
    with pytest.raises(PrivacyError, match=r"record has spent epsilon 7\.8.* of its budget 8.*pixels 8\.3"):
        for k in range(50):
            _release(ledger, epsilon=0.0, protected=["smiling"], released={"smiling": 1}, seed=k, price=noise)
            seen.append(ledger.guarantee("img-1"))
    assert len(seen) == ledger.count("img-1") == 9  # sqrt(9) * 0.5 = 1.5-GDP: epsilon 7.8; a tenth: 8.3 > 8
    assert all(a.epsilon < b.epsilon for a, b in zip(seen, seen[1:])) and seen[0].epsilon > 2
    last = seen[-1]
    assert (last.labels_epsilon, last.pixel_mu, last.releases) == (0.0, pytest.approx(1.5), 9)
    assert last.epsilon == pytest.approx(7.8066, abs=1e-3) and ledger.spent("img-1", "smiling") == 0.0
    assert ledger.remaining("img-1") == pytest.approx(8.0 - last.epsilon)
    fresh = _price(0.0, ["smiling"])  # the image not read: free, however often
    for k in range(20):
        _release(ledger, image_id="img-2", epsilon=0.0, protected=["smiling"], released={"smiling": 1}, price=fresh)
    assert ledger.guarantee("img-2").epsilon == 0.0


def test_unbounded_pixels_need_a_dataset_policy_that_says_so(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=4.0)
    assert ledger.pixel_policy == "protected" and ledger.policy_changes() == []
    inverted = _price(1.0, ["smiling", "eyeglasses"], pixel_mus=[math.inf], encoding="invert")
    with pytest.raises(PrivacyError, match="pixels have no bound.*set-pixels not-protected"):
        _release(ledger, price=inverted)
    with pytest.raises(PrivacyError, match="pixels have no bound"):
        ledger.check(image_id="img-1", protected=["smiling", "eyeglasses"], epsilon=1.0, price=inverted)
    assert ledger.count("img-1") == 0
    with pytest.raises(ConfigError, match="--reason"):
        ledger.set_pixel_policy("not-protected", reason=" ")
    with pytest.raises(ConfigError, match="set-pixels"):
        ledger.set_pixel_policy("sometimes", reason="x")
    ledger.set_pixel_policy("not-protected", reason="the owner publishes the faces; only the labels are private")
    [change] = ledger.policy_changes()
    assert (change["setting"], change["old_value"], change["new_value"]) == ("pixels", "protected", "not-protected")
    assert "only the labels" in change["reason"] and change["changed_at"].endswith("+00:00")
    for _ in range(2):  # the budget now limits the labels alone: two releases of two labels at epsilon 1
        _release(ledger, price=inverted)
    g = ledger.guarantee("img-1")
    assert not g.pixels_protected and g.pixels_epsilon == math.inf and g.epsilon == pytest.approx(4.0, abs=1e-4)
    with pytest.raises(PrivacyError, match="would take it to 6 .*not protected"):
        _release(ledger, price=inverted)
    assert ledger.summary()["records"]["pixels"] == "not-protected"
    ledger.set_pixel_policy("protected", reason="back")
    assert ledger.guarantee("img-1").epsilon == math.inf  # read under the policy in force


def test_a_price_that_disagrees_with_the_release_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=8.0)
    for price in (_price(0.0, ["smiling", "eyeglasses"]), _price(2.0, ["smiling"])):  # cheaper than protecting both
        with pytest.raises(ConfigError, match="is not that of protecting"):
            _release(ledger, epsilon=2.0, price=price)
    assert ledger.releases() == []


def test_the_summary_reports_each_records_composed_epsilon(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=8.0)
    assert ledger.summary()["records"]["max_epsilon"] == 0.0
    _release(ledger, epsilon=1.0)  # two labels at 1: about 2
    _release(ledger, image_id="img-2", epsilon=2.0, protected=["smiling"], released={"smiling": 1},
             price=_price(2.0, ["smiling"], pixel_mus=[1.0], encoding="noise"))
    r = ledger.summary()["records"]
    want = ledger.guarantee("img-2")
    assert r["max_epsilon"] == pytest.approx(want.epsilon) and want.epsilon > max(want.labels_epsilon, 4.88)
    assert (r["records"], r["budget"], r["delta"], r["pixels"]) == (2, 8.0, 1e-6, "protected")
    assert r["least_left"] == pytest.approx(8.0 - want.epsilon)
    assert r["max_labels_epsilon"] == pytest.approx(2.0, abs=1e-4)
    assert r["max_pixels_epsilon"] == pytest.approx(want.pixels_epsilon)


# veil at commit 2bd039d (schema 3): releases without a price, no policy_changes table, no pixel policy.
SCHEMA_3_RELEASES = """
CREATE TABLE releases (
    release_id INTEGER PRIMARY KEY AUTOINCREMENT, image_id TEXT NOT NULL, protected TEXT NOT NULL,
    epsilon REAL NOT NULL, strength REAL NOT NULL, seed INTEGER NOT NULL, level TEXT, released_attributes TEXT,
    budget REAL, released_at TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT 'released' CHECK (outcome IN ('released', 'refused')), models TEXT);
"""


def test_a_schema_3_ledger_is_migrated_and_its_releases_count_as_unbounded_pixels(tmp_path):
    path = tmp_path / "v3.sqlite"
    with PrivacyLedger(path, budget=8.0):
        pass
    db = sqlite3.connect(str(path))
    db.execute("DROP TABLE releases")
    db.execute("DROP TABLE policy_changes")
    db.execute("DELETE FROM settings WHERE key IN ('pixels', 'release_delta')")
    db.execute(SCHEMA_3_RELEASES)
    db.execute("INSERT INTO releases VALUES (1, 'img-1', '[\"smiling\"]', 1.0, 0.4, 7, 'low', '{\"smiling\": 1}', 8.0,"
               " '2026-01-01T00:00:00+00:00', 'released', NULL)")
    db.execute("INSERT INTO attribute_spends VALUES (1, 'img-1', 'smiling', 1.0)")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    with PrivacyLedger(path) as ledger:
        assert ledger.pixel_policy == "protected" and ledger.release_delta == 1e-6 and ledger.budget == 8.0
        [old] = ledger.releases()
        assert old.price is None and ledger.prices("img-1")[0].pixel_mu == math.inf  # its edit was never limited
        assert ledger.spent("img-1", "smiling") == 1.0 and ledger.guarantee("img-1").epsilon == math.inf
        assert ledger.remaining("img-1") == 0.0 and ledger.summary()["records"]["max_epsilon"] == "inf"
        with pytest.raises(PrivacyError, match="record has spent epsilon inf"):
            _release(ledger, protected=["smiling"], released={"smiling": 1})
        _release(ledger, image_id="img-2", protected=["smiling"], released={"smiling": 1})  # a new record: priced
        assert ledger.releases("img-2")[0].price.pixel_mu == 0.0
        ledger.set_pixel_policy("not-protected", reason="the old releases were DDIM inversions")
        assert ledger.guarantee("img-1").epsilon == pytest.approx(1.0, abs=1e-4)
        assert ledger.policy_changes()[0]["new_value"] == "not-protected"
    assert sqlite3.connect(str(path)).execute("PRAGMA user_version").fetchone()[0] == 4
