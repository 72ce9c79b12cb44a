"""The Python API (``veil/api.py``): ``import veil`` stays torch-free, each function is its command's job (same
records, same ledger rows, same typed errors), and the README's "Python API" block runs as written (tiny sizes)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dp_helpers import TINY

import veil
from veil import api
from veil.cli import main
from veil.errors import CheckpointError, ConfigError, VeilError
from veil.privacy.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")

# train-classifier at the tests' size (tests/lightning_modules/test_classifier_module.py's)
TINY_CLASSIFIER = {"epochs": 1, "batch_size": 16, "dp.max_physical_batch_size": 16,
                   "model": {"channels": [8, 8, 8], "feature_dim": 8, "norm_num_groups": 4}}
TINY_DATA = {"num_images": 96, "test_fraction": 0.25}


def test_import_veil_loads_no_torch():
    """`import veil`, the API's names and a torch-free call (an export's editor, the account) import no torch:
    the server's install has none."""
    code = ("import sys, veil; e = veil.load_editor('nowhere', runtime='ort'); "
            "assert veil.privacy_account(data={'source': 'synthetic', 'seed': 5}) is None; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'onnxruntime')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert set(api.__all__) <= set(veil._API) | {"Overrides"} and veil.train is api.train
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        veil.nope  # noqa: B018


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny private `veil train` run made through the API (4 DP steps), recorded in its own database."""
    root = tmp_path_factory.mktemp("api_model")
    run = veil.train(out=root / "run", overrides=TINY, progress=False, ledger=root / "train.sqlite")
    return run


def test_train_returns_the_jobs_record_and_records_the_run(model):
    privacy = json.loads((model.path / "privacy.json").read_text())
    assert model.model.is_dir() and (model.model / "veil_model.json").is_file()
    assert model.record["steps"] == privacy["steps"] == 4 and model.record["epsilon"] == privacy["epsilon"]
    assert model.epsilon == pytest.approx(privacy["epsilon"]) and model.record["private"] is True
    with PrivacyLedger(model.path.parent / "train.sqlite", create=False) as book:
        (run,) = book.training_runs()
    assert (run["run"], run["status"], run["private"]) == (str(model.path.resolve()), "finished", True)


def _cli_edit(checkpoint, out, ledger, *extra):
    return main(["edit", "--checkpoint", str(checkpoint), "--protect", "eyeglasses,smiling", "--steps", "6",
                 "--ids", "synth-0-000003,synth-0-000010", "--level", "high", "--seed", "7", "--no-check",
                 "--ledger", str(ledger), "--out", str(out), *extra])


def test_release_charges_the_ledger_exactly_as_veil_edit(model, tmp_path):
    """The same release through the API and through `veil edit` (same seed, own databases): the same draws,
    the same ledger rows, the same price and the same composed spend per record."""
    editor = veil.load_editor(model.path, steps=6)
    edits = editor.release(protect=["eyeglasses", "smiling"], ids=["synth-0-000003", "synth-0-000010"],
                           level="high", seed=7, check=False, ledger=tmp_path / "api.sqlite", out=tmp_path / "api")
    assert _cli_edit(model.path, tmp_path / "cli", tmp_path / "cli.sqlite") == 0
    cli = json.loads((tmp_path / "cli" / "edit_report.json").read_text())
    assert edits.report == json.loads((tmp_path / "api" / "edit_report.json").read_text())
    assert (edits.released, edits.refused) == (cli["released"], cli["refused"]) == (2, 0)
    assert [im["released_attributes"] for im in edits.report["images"]] == \
        [im["released_attributes"] for im in cli["images"]]
    assert edits.spent == {im["id"]: pytest.approx(float(im["spent"]["epsilon"])) for im in cli["images"]}
    assert edits.spent["synth-0-000003"] == pytest.approx(2.0, abs=1e-4)  # high: epsilon 1 on each of two labels
    assert edits.price == cli["cost"]["release"]["alone"] and edits.ledger == str(tmp_path / "api.sqlite")
    rows = []
    for name in ("api", "cli"):
        with PrivacyLedger(tmp_path / f"{name}.sqlite", create=False) as book:
            rows.append([(r.image_id, r.epsilon, r.level, r.outcome, r.strength, r.price, r.released_attributes)
                         for r in book.releases()])
            assert book.guarantee("synth-0-000010").to_json() == \
                json.loads((tmp_path / name / "edit_report.json").read_text())["images"][1]["spent"]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    assert sorted(p.name for p in edits.revision.iterdir()) == sorted(p.name for p in (tmp_path / "cli/revision").iterdir())
    # the account is `veil privacy show --json`'s
    assert api.privacy_account(ledger=edits.ledger)["records"]["records"] == 2
    # a preview is `veil edit --sweep`: owner-only files, nothing charged
    preview = editor.preview(protect=["eyeglasses"], ids=["synth-0-000003"], out=tmp_path / "preview")
    assert preview.grid.is_file() and len(preview.report["rows"]) == 4 and (preview.grid.stat().st_mode & 0o077) == 0
    with PrivacyLedger(tmp_path / "api.sqlite", create=False) as book:
        assert len(book.releases()) == 2


def test_an_export_runs_on_onnx_runtime_through_the_same_release(exports, tmp_path):
    """`load_editor` on a `veil export` folder runs on ONNX Runtime (found by its veil_export.json), releases as
    `veil edit --runtime ort` does, and checks with the export's classifier. (The session's tiny exports: shared
    with tests/export and tests/serve.)"""
    export = exports / "conditional"
    editor = veil.load_editor(export, steps=6)
    assert editor.runtime == "ort" and type(editor.pipeline).__name__ == "OrtEditor"
    ids = ["synth-3-000001", "synth-3-000004"]  # the export's data: its classifier's (seed 3)
    edits = editor.release(protect=["eyeglasses"], ids=ids, level="high", seed=5, check=False,
                           ledger=tmp_path / "api.sqlite", out=tmp_path / "api")
    assert main(["edit", "--runtime", "ort", "--checkpoint", str(export), "--protect", "eyeglasses", "--ids",
                 ",".join(ids), "--level", "high", "--seed", "5", "--no-check", "--steps", "6", "--ledger",
                 str(tmp_path / "cli.sqlite"), "--out", str(tmp_path / "cli")]) == 0
    rows = []
    for name in ("api", "cli"):
        with PrivacyLedger(tmp_path / f"{name}.sqlite", create=False) as book:
            rows.append([(r.image_id, r.epsilon, r.level, r.outcome, r.price, r.released_attributes)
                         for r in book.releases()])
    assert rows[0] == rows[1] and [r[0] for r in rows[0]] == ids and edits.report["runtime"] == "ort"
    checked = editor.release(protect=["eyeglasses"], first=2, level="high", ledger=tmp_path / "api.sqlite",
                             out=tmp_path / "checked")
    assert checked.report["check"]["enabled"] and checked.released + checked.refused == 2


def _cli_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


def test_errors_are_the_commands_typed_errors(model, tmp_path, capsys):
    """Each bad input raises the error whose message the command prints (exit 2), before any work."""
    cases = [
        (lambda: veil.load_editor(model.path).release(protect=["eyeglasses"], first=2, out=tmp_path / "a"),
         ["edit", "--checkpoint", str(model.path), "--protect", "eyeglasses", "--first", "2", "--out",
          str(tmp_path / "a")], ConfigError),
        (lambda: veil.load_editor(model.path, classifier_scale=3),
         ["edit", "--checkpoint", str(model.path), "--classifier-scale", "3", "--protect", "eyeglasses", "--first",
          "2", "--out", str(tmp_path / "b")], ConfigError),
        (lambda: veil.load_editor(model.path, steps=6).release(protect=["beard", "moustache"], first=2, check=False,
                                                               out=tmp_path / "c"),
         ["edit", "--checkpoint", str(model.path), "--protect", "beard,moustache", "--first", "2", "--no-check",
          "--steps", "6", "--out", str(tmp_path / "c")], ConfigError),
        (lambda: veil.load_editor(tmp_path / "nothing").release(protect=["beard"], first=2, check=False,
                                                                out=tmp_path / "d"),
         ["edit", "--checkpoint", str(tmp_path / "nothing"), "--protect", "beard", "--first", "2", "--no-check",
          "--out", str(tmp_path / "d")], CheckpointError),
        (lambda: veil.train(out=tmp_path / "e", overrides={"trainer.max_steps": 0}),
         ["train", "--out", str(tmp_path / "e"), "--set", "trainer.max_steps=0"], ConfigError),
        (lambda: veil.train_classifier(out=tmp_path / "f", data={"num_image": 9}),
         ["train-classifier", "--out", str(tmp_path / "f"), "--data", "num_image=9"], ConfigError),
        (lambda: veil.train_classifier(out=tmp_path / "g", dp_epsilon=float("nan")),
         ["train-classifier", "--out", str(tmp_path / "g"), "--dp-epsilon", "nan"], ConfigError),
    ]
    for call, argv, kind in cases:
        with pytest.raises(VeilError) as caught:
            call()
        assert type(caught.value) is kind, caught.value
        assert _cli_error(argv, capsys) == f"veil {argv[0]}: error: {caught.value}"
    assert not any((tmp_path / name).exists() for name in "abcdefg")  # refused before anything was written
    with pytest.raises(ConfigError, match="--check-threshold"):
        veil.load_editor(model.path, check_threshold=1.0)
    with pytest.raises(ConfigError, match="--set"):
        veil.train(out=tmp_path / "h", overrides="trainer.max_steps=3")
    assert api._overrides({"a.b": float("inf"), "c": None, "d": [1, 2], "e": "sgd"}) == \
        ["a.b=.inf", "c=null", "d=[1, 2]", 'e="sgd"']


def readme_block() -> str:
    section = (ROOT / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_the_readme_block_runs(tmp_path, monkeypatch, capsys):
    """The README's block as written, in a fresh folder, with the tests' tiny sizes added to each call."""
    real = {name: getattr(api, name) for name in ("train", "train_classifier", "load_editor")}
    monkeypatch.setattr(api, "train", lambda **kw: real["train"](
        **{**kw, "overrides": api._overrides(kw.get("overrides")) + TINY, "progress": False}))
    monkeypatch.setattr(api, "train_classifier", lambda **kw: real["train_classifier"](
        **{**kw, "overrides": {**TINY_CLASSIFIER, **(kw.get("overrides") or {})}, "data": TINY_DATA}))
    monkeypatch.setattr(api, "load_editor", lambda source, **kw: real["load_editor"](source, **{**kw, "steps": 6}))
    monkeypatch.chdir(tmp_path)
    block = readme_block()
    assert len(block.strip().splitlines()) <= 14  # a dozen lines
    exec(compile(block, "README.md#python-api", "exec"), {})
    report = json.loads((tmp_path / "edits" / "edit_report.json").read_text())
    assert report["level"]["name"] == "high" and report["check"]["enabled"] and report["released"] + \
        report["refused"] == 8
    assert (tmp_path / "preview" / "sweep.png").is_file() and (tmp_path / "runs/unl/unlearn_report.json").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[2].endswith("}") and "'records': 8" in printed[2]
