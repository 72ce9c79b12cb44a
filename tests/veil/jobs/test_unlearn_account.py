"""Issue 30, item 5: `veil unlearn` records its release in the dataset's account.

The update reads the private training set and the changed samples without noise, so its run is a
training run of kind "unlearn", not private (epsilon infinite): recorded in the database the model's
training was recorded in, refused before any computation by a finite training budget, marked failed
when it fails. The model here is a tiny DP classifier (the case the issue names)."""

import json
import math
import shutil

import pytest
from unlearn_helpers import DATA, RECIPE, datamodule, flip_revision, one_thread

from veil.cli import main
from veil.errors import PrivacyError
from veil.jobs import unlearn as UJ
from veil.jobs.train_classifier import ClassifierRecipe, train_classifier
from veil.lightning_modules import checkpoints as CK
from veil.privacy.ledger import PrivacyLedger

SPEC = {"source": "synthetic", "seed": DATA["seed"]}
DP = {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "rdp"}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def dp_model(tmp_path_factory):
    """A tiny DP classifier recorded in its own database (its OUT/private/ledger_run.json names it), a revision."""
    with one_thread():
        root = tmp_path_factory.mktemp("unlearn_account")
        recipe = ClassifierRecipe(**{**RECIPE, "epochs": 1, "refit_head": False, "dp": DP})
        train_classifier(recipe=recipe, data=DATA, out=root / "clf", ledger=root / "ledger.sqlite")
        revision = flip_revision(root / "rev", datamodule(), fraction=0.05)
        return root / "clf", revision, root / "ledger.sqlite"


def _runs(ledger):
    with PrivacyLedger.for_dataset(SPEC, path=ledger) as db:
        return db.training_runs(), db.training_spent()[0]


def test_unlearn_records_a_non_private_run_in_the_models_database(dp_model, tmp_path, capsys):
    clf, revision, ledger = dp_model
    before, spent = _runs(ledger)
    assert [(r["kind"], r["private"]) for r in before] == [("classifier", True)] and math.isfinite(spent)
    out = tmp_path / "unl"
    assert main(["unlearn", "--model", str(clf), "--revision", str(revision), "--method", "first",
                 "--out", str(out)]) == 0
    runs, spent = _runs(ledger)
    assert len(runs) == 2, "the unlearning run is missing from the dataset's account"
    printed = capsys.readouterr().out
    assert "not private" in printed and "epsilon infinite" in printed and str(ledger) in printed
    run = runs[-1]
    assert (run["kind"], run["private"], run["status"], run["epsilon"]) == ("unlearn", False, "finished", None)
    assert run["run"] == str(out.resolve()) and run["details"]["method"] == "first"
    assert run["details"]["model_private"] is True
    assert run["counted_epsilon"] == math.inf and spent == math.inf  # the dataset's training spend: unbounded
    report = json.loads((out / "unlearn_report.json").read_text())
    assert report["privacy"]["private"] is False and report["privacy"]["epsilon"] is None
    assert report["privacy"]["run_id"] == run["run_id"] and report["privacy"]["ledger"] == str(ledger)
    privacy = CK.load_classifier(out)[1]["veil"]["privacy"]  # the release says it too
    assert privacy["private"] is False and privacy["epsilon"] is None and privacy["trained_with"]["private"] is True


def _with_ledger(clf, folder, ledger):
    """A copy of the run folder ``clf`` whose training is recorded in ``ledger`` (its private/ledger_run.json)."""
    PrivacyLedger.for_dataset(SPEC, path=ledger).close()  # made when the training was recorded
    copy = shutil.copytree(clf, folder)
    run_file = copy / "private" / "ledger_run.json"
    run_file.write_text(json.dumps({**json.loads(run_file.read_text()), "ledger": str(ledger)}))
    return copy


def test_a_training_budget_refuses_unlearning_before_any_computation(dp_model, tmp_path, capsys, monkeypatch):
    clf, revision, _ = dp_model
    ledger = tmp_path / "budgeted.sqlite"
    with PrivacyLedger.for_dataset(SPEC, path=ledger) as db:
        db.set_training_budget(100.0, reason="test")
    clf = _with_ledger(clf, tmp_path / "clf", ledger)

    def no_compute(*a, **k):
        raise AssertionError("computed before the budget was checked")

    out = tmp_path / "unl"
    args = ["unlearn", "--model", str(clf), "--revision", str(revision), "--method", "first", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(UJ.UnlearningData, "build", no_compute)
        m.setattr(UJ, "unlearn_and_measure", no_compute)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "training budget" in err and "not private" in err and "Traceback" not in err
        assert not out.exists() and _runs(ledger) == ([], 0)
        with pytest.raises(PrivacyError, match="unlearn refused"):  # --ledger names the same database
            UJ.run_unlearn(model=dp_model[0], revision=revision, method="first", out=out, ledger=ledger)
    with PrivacyLedger.for_dataset(SPEC, path=ledger) as db:
        db.set_training_budget(None, reason="test: lifted")
    assert main(args) == 0 and [r["kind"] for r in _runs(ledger)[0]] == ["unlearn"]


def test_a_failed_unlearning_run_is_marked_failed_and_still_counts(dp_model, tmp_path, monkeypatch):
    clf, revision, _ = dp_model
    ledger = tmp_path / "own.sqlite"
    clf = _with_ledger(clf, tmp_path / "clf", ledger)

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(UJ, "write_json_atomic", fail)  # after the update, before anything is released
    with pytest.raises(RuntimeError, match="disk full"):
        UJ.run_unlearn(model=clf, revision=revision, method="first", out=tmp_path / "unl")
    assert not (tmp_path / "unl").exists()  # nothing released
    runs, spent = _runs(ledger)
    assert [(r["kind"], r["status"], r["counted_epsilon"]) for r in runs] == [("unlearn", "failed", math.inf)]
    assert spent == math.inf
