"""`veil privacy`: the dataset's account (show), its budgets (set-budget, set-training-budget), and
publish-revision (a revision without the original attributes); all without torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from veil.cli import build_parser, main
from veil.errors import DataError
from veil.privacy.accounting import price_release
from veil.privacy.ledger import PrivacyLedger, ledger_path_for
from veil.privacy.revision_manifest import RevisionChange, load_manifest, pseudonym, publish_revision, \
    write_revision

DATA = "source=synthetic,seed=0"
SPEC = {"source": "synthetic", "seed": 0}


def test_the_command_imports_no_torch(tmp_path):
    code = "import sys, veil.cli.privacy; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def _spend():
    with PrivacyLedger.for_dataset(SPEC, budget=4.0) as ledger:
        run = ledger.start_training_run(run="runs/dp", kind="diffusion", private=True, planned_epsilon=8.0,
                                        delta=1e-6, details={})
        ledger.finish_training_run(run, epsilon=7.9, delta=1e-6, steps=500)
        ledger.start_training_run(run="runs/clf", kind="classifier", private=False, planned_epsilon=None, delta=None,
                                  details={})
        ledger.record(image_id="synth-0-000001", protected=["smiling"], epsilon=2.0, strength=0.55, seed=123456789,
                      released_attributes={"smiling": 1, "hat": -1},
                      price=price_release(epsilon=2.0, protected=["smiling"], encoding="fresh", pixel_mus=[0.0]))


def test_show_prints_training_runs_release_spends_and_budgets(capsys):
    assert main(["privacy", "show", "--data", DATA]) == 0
    assert "no privacy database" in capsys.readouterr().out  # nothing spent yet: said, not an error
    _spend()
    assert main(["privacy", "show", "--data", DATA]) == 0
    out = capsys.readouterr().out
    assert str(ledger_path_for(SPEC)) in out
    assert "#1 diffusion runs/dp: private, epsilon 7.9" in out and "#2 classifier runs/clf: NOT private" in out
    assert "composed: epsilon unbounded" in out and "no training budget" in out
    assert "1 releases of 1 images" in out and "smiling: protected on 1 images" in out and "least left 2" in out
    assert "123456789" not in out  # no seed
    assert main(["privacy", "show", "--data", DATA, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["training"]["epsilon"] == "inf" and summary["releases"]["budget"] == 4.0
    assert [r["status"] for r in summary["training"]["runs"]] == ["finished", "running"]


def test_set_budget_and_set_training_budget_are_recorded(capsys):
    _spend()
    assert main(["privacy", "set-budget", "6", "--reason", "three medium releases", "--data", DATA]) == 0
    assert main(["privacy", "set-training-budget", "20", "--reason", "cap", "--ledger", str(ledger_path_for(SPEC))]) == 0
    with PrivacyLedger.for_dataset(SPEC) as ledger:
        assert ledger.budget == 6.0 and ledger.training_budget == 20.0
        assert [c["reason"] for c in ledger.budget_changes()][-2:] == ["three medium releases", "cap"]
    with pytest.raises(SystemExit):
        main(["privacy", "set-budget", "6", "--data", DATA])  # --reason is required
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # refused by the value's type while parsing: one line, exit 2
        main(["privacy", "set-budget", "-1", "--reason", "x", "--data", DATA])
    assert refused.value.code == 2
    assert main(["privacy", "show"]) == 2
    assert main(["privacy", "show", "--data", "source=synthetic"]) == 2  # no seed: no location
    err = capsys.readouterr().err
    assert "set-budget" in err and "--data or --ledger" in err and "seed=" in err


def _owner_revision(path):
    names = ["smiling", "eyeglasses"]
    changes = [RevisionChange(f"synth-0-00000{i}", {"smiling": 1, "eyeglasses": -1}, {"smiling": -1, "eyeglasses": -1},
                              ["smiling"], 1.0, 0.7) for i in range(2)]
    images = {c.id: np.random.default_rng(i).uniform(-1, 1, (3, 8, 8)).astype(np.float32) for i, c in enumerate(changes)}
    write_revision(path, base_spec={"source": "folder", "root": "/home/owner/faces", "csv": "/home/owner/l.csv",
                                    "resolution": 8, "attributes": names}, attribute_names=names, changes=changes,
                   images=images)
    return path


def test_publish_revision_drops_what_decodes_the_originals(tmp_path, capsys):
    # Item 11: the owner's revision carries original_attributes; the published one must not.
    src = _owner_revision(tmp_path / "revision")
    book = tmp_path / "owner.sqlite"  # the dataset's privacy database (its root is not on this machine)
    PrivacyLedger(book).close()
    assert main(["privacy", "publish-revision", "--revision", str(src), "--out", str(tmp_path / "pub"),
                 "--ledger", str(book)]) == 0
    text = (tmp_path / "pub" / "manifest.json").read_text()
    assert "original_attributes" not in text and "/home/owner" not in text and "seed" not in text
    published, owner = json.loads(text), load_manifest(src)
    assert published["format"] == "veil-revision-published/1" and published["attribute_names"] == owner["attribute_names"]
    with PrivacyLedger(book) as ledger:
        key = ledger.pseudonym_key()
    for p, o in zip(published["changes"], owner["changes"]):
        assert p["id"] == pseudonym(o["id"], key=key)  # issue 34: named by pseudonym, not by file name
        assert {k: p[k] for k in ("released_attributes", "protected", "epsilon", "strength")} == \
            {k: o[k] for k in ("released_attributes", "protected", "epsilon", "strength")}
        assert (np.array(Image.open(tmp_path / "pub" / p["file"])) == np.array(Image.open(src / o["file"]))).all()
    with pytest.raises(DataError, match="veil-revision-published/1"):  # it cannot pass for an owner revision
        load_manifest(tmp_path / "pub")
    with pytest.raises(Exception, match="not empty"):
        publish_revision(src, tmp_path / "pub", id_key=key)
    assert main(["privacy", "publish-revision", "--revision", str(src), "--out", str(src / "inner"),
                 "--ledger", str(book)]) == 2
    assert "inside" in capsys.readouterr().err


def test_every_privacy_option_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions_parser = next(a for a in sub.choices["privacy"]._actions if a.dest == "action")
    for name, parser in actions_parser.choices.items():
        options = [a for a in parser._actions if a.dest != "help"]
        assert options and all(a.help for a in options), name
