"""The SQLite release ledger: composition by sum, the budget refusal, atomic batches, crash safety."""

import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.errors import ConfigError, PrivacyError
from veil.privacy.ledger import ReleaseLedger

HERE = Path(__file__).parent


def _release(ledger, image_id="img-1", epsilon=1.0, seed=0):
    return ledger.record(image_id=image_id, protected=["smiling", "eyeglasses"], epsilon=epsilon, strength=0.7,
                         seed=seed, level="high", released_attributes={"smiling": -1, "eyeglasses": 1})


def test_records_round_trip_and_compose_by_sum(tmp_path):
    with ReleaseLedger(tmp_path / "l.sqlite", budget=5.0) as ledger:
        a = _release(ledger, epsilon=1.0, seed=11)
        _release(ledger, epsilon=2.5, seed=12)
        _release(ledger, image_id="img-2", epsilon=4.0)
        assert ledger.spent("img-1") == pytest.approx(3.5) and ledger.spent("img-2") == 4.0
        assert ledger.spent("never") == 0.0 and ledger.count("img-1") == 2
    with ReleaseLedger(tmp_path / "l.sqlite", budget=5.0) as again:  # persisted
        recs = again.releases("img-1")
        assert [r.seed for r in recs] == [11, 12] and recs[0] == a
        assert recs[0].protected == ["smiling", "eyeglasses"] and recs[0].released_attributes["smiling"] == -1
        assert recs[0].budget == 5.0 and recs[0].released_at.endswith("+00:00")
        assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_release_past_the_budget_is_refused_with_the_numbers(tmp_path):
    ledger = ReleaseLedger(tmp_path / "l.sqlite", budget=3.0)
    _release(ledger, epsilon=2.0)
    with pytest.raises(PrivacyError, match=r"spent epsilon 2 of its budget 3.*asks for 1.5") as err:
        _release(ledger, epsilon=1.5)
    assert "img-1" in str(err.value)
    with pytest.raises(PrivacyError):
        ledger.check(image_id="img-1", epsilon=1.5)
    _release(ledger, epsilon=1.0)  # exactly at the budget is allowed
    assert ledger.spent("img-1") == 3.0 and ledger.count("img-1") == 2
    _release(ledger, epsilon=0.0)  # eps = 0 (a fair coin) costs nothing
    with pytest.raises(PrivacyError):
        _release(ledger, epsilon=math.inf)


def test_a_batch_is_all_or_nothing(tmp_path):
    ledger = ReleaseLedger(tmp_path / "l.sqlite", budget=2.0)
    batch = [dict(image_id=i, protected=["smiling"], epsilon=1.5, strength=0.5, seed=0) for i in ("a", "b", "a")]
    with pytest.raises(PrivacyError, match="'a'"):
        ledger.record_many(batch)  # the second 'a' would reach 3.0 > 2.0
    assert ledger.releases() == []
    assert len(ledger.record_many(batch[:2])) == 2


def test_budget_none_is_unlimited_and_bad_budget_names_the_option(tmp_path):
    ledger = ReleaseLedger(tmp_path / "l.sqlite", budget=None)
    for _ in range(5):
        _release(ledger, epsilon=10.0)
    assert ledger.spent("img-1") == 50.0
    with pytest.raises(ConfigError, match="--budget"):
        ReleaseLedger(tmp_path / "m.sqlite", budget=-1)
    with pytest.raises(ConfigError, match="--ledger"):
        ReleaseLedger(tmp_path, budget=1)


def test_two_connections_share_one_budget(tmp_path):
    path = tmp_path / "l.sqlite"
    first, second = ReleaseLedger(path, budget=2.0), ReleaseLedger(path, budget=2.0)
    _release(first, epsilon=1.5)
    with pytest.raises(PrivacyError):
        _release(second, epsilon=1.0)


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
    db.close()
    with ReleaseLedger(path, budget=None) as reopened:  # and it opens and takes writes again
        assert reopened.integrity_check() == "ok"
        _release(reopened)
