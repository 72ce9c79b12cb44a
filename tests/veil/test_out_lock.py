"""Issue 30, item 5: two runs into one --out cannot both train while the account records one.

``veil.outputs.out_lock`` holds an exclusive flock on OUT/.veil-lock for the whole run; a second run is
refused at once (ConfigError naming --out, exit 2), before any work and without a ledger row, and its
failure removes nothing the running one wrote. The lock dies with its process and the file goes when the
run ends, so it is never taken for an earlier run's output. The locks here are held by plain ``fcntl``
(or a killed subprocess), not by veil, so the tests say what any holder means to a veil command."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from dp_helpers import TINY, train_cli
from unlearn_helpers import DATA, RECIPE

from veil.errors import ConfigError
from veil.jobs.train_classifier import ClassifierRecipe, train_classifier
from veil.jobs.unlearn import OUT_ENTRIES, run_unlearn
from veil.outputs import LOCK_FILE, check_out_dir, out_lock
from veil.privacy.ledger import PrivacyLedger


def _hold(folder):
    """An open file holding the exclusive flock on folder/.veil-lock, as a running veil command would."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def _runs(spec):
    with PrivacyLedger.for_dataset(spec) as ledger:
        return ledger.training_runs()


def test_veil_train_into_a_folder_another_run_holds_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold(out)
    (out / "config.json").write_text('{"the running run": true}\n')  # what the first run has written so far
    try:
        assert train_cli(out, TINY) == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert "--out" in err and "another veil run is writing into this folder" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, "config.json"])  # the running run's files stay
    assert (out / "config.json").read_text() == '{"the running run": true}\n'
    assert _runs({"source": "synthetic", "seed": 0}) == []  # nothing recorded in the dataset's account


def test_train_classifier_and_unlearn_are_refused_too(tmp_path):
    out = tmp_path / "clf"
    holder = _hold(out)
    try:
        with pytest.raises(ConfigError, match="^--out .*another veil run"):
            train_classifier(recipe=ClassifierRecipe(**RECIPE), data=DATA, out=out)
        with pytest.raises(ConfigError, match="^--out .*another veil run"):  # before --model is even read
            run_unlearn(model=tmp_path / "no-model", revision=tmp_path / "no-revision", method="first", out=out)
    finally:
        holder.close()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert _runs({"source": "synthetic", "seed": DATA["seed"]}) == []


def test_the_lock_is_exclusive_names_its_holder_and_goes_with_the_run(tmp_path):
    out = tmp_path / "new"
    with out_lock(out) as lock:
        assert lock.created and (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError, match=f"^--out {out}: another veil run .*process {os.getpid()} holds"):
            with out_lock(out):
                pass
        with out_lock(out, skip=True) as skipped:  # a DDP rank > 0: started by the holder, takes no lock
            assert skipped.created is None
    assert sorted(os.listdir(out)) == []  # the lock file went with the run
    with pytest.raises(RuntimeError), out_lock(tmp_path / "failed"):
        raise RuntimeError("the run failed")
    assert not (tmp_path / "failed").exists()  # created by the failed run and left empty: removed


def test_a_crashed_holder_frees_the_folder_and_its_stale_lock_file_is_not_a_result(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from veil.outputs import out_lock\n"
            "with out_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another veil run"):
            with out_lock(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the kernel drops the flock
        proc.wait(timeout=30)
    assert (out / LOCK_FILE).exists()  # stale file left behind by the crash
    assert check_out_dir(out, holds=OUT_ENTRIES) == out  # not taken for an earlier run's results
    t0 = time.monotonic()
    with out_lock(out) as lock:
        assert lock.created is False
    assert time.monotonic() - t0 < 5 and not (out / LOCK_FILE).exists()


def test_a_refused_run_records_nothing_and_the_next_run_records_its_own_row(tmp_path):
    """The lock is taken before the account: a ledger row exists only for the run that holds OUT."""
    ledger = tmp_path / "ledger.sqlite"
    out = tmp_path / "clf"
    holder = _hold(out)
    try:
        with pytest.raises(ConfigError, match="another veil run"):
            train_classifier(recipe=ClassifierRecipe(**RECIPE), data=DATA, out=out, ledger=ledger)
    finally:
        holder.close()
    assert not ledger.exists() or _runs_at(ledger) == []
    (out / LOCK_FILE).unlink()
    out.rmdir()
    record = train_classifier(recipe=ClassifierRecipe(**{**RECIPE, "epochs": 1}), data=DATA, out=out, ledger=ledger)
    assert record["steps"] > 0 and [r["kind"] for r in _runs_at(ledger)] == ["classifier"]
    assert LOCK_FILE not in os.listdir(out)
    assert json.loads((out / "private" / "ledger_run.json").read_text())["run_id"] == _runs_at(ledger)[0]["run_id"]


def _runs_at(ledger):
    with PrivacyLedger.for_dataset({"source": "synthetic", "seed": DATA["seed"]}, path=ledger) as db:
        return db.training_runs()
