"""The command line is a thin layer over the Python API (issue 31): each of ``veil train``, ``train-classifier``,
``edit`` (release and ``--sweep``), ``export``, ``unlearn`` and ``privacy show`` parses its arguments, calls
one ``veil.api`` function with them, prints what it returns and exits 0; it never calls the job underneath
itself (the jobs are made to fail here, and the API functions are recorders)."""

from pathlib import Path

import pytest

from veil import api
from veil.cli import main

# What each API recorder returns: just what the command prints from.
TRAIN_RECORD = {"enabled": False, "steps": 3}
CLASSIFIER_RECORD = {"privacy": {"private": True, "epsilon": 8.0}, "steps": 5, "seconds": 1.5, "test_accuracy": 0.9}
SWEEP_REPORT = {"rows": [1, 2], "ids": ["synth-0-000001"], "backend": "conditional", "model_privacy": "M"}
EXPORT_META = {"verification": {"max_abs_error": {"edit": 1e-5}, "tolerance": 1e-3}, "files": ["denoise_step.onnx"],
               "backend": "conditional", "resolution": 32, "versions": {"opset": 18}, "model_privacy": "M",
               "check": "none", "graphs": {"denoise_step.onnx": {"translation": "cached"},
                                           "invert_step.onnx": {"translation": "translated"}}}
UNLEARN_REPORT = {"update_seconds": 0.01, "test_accuracy": {"before": 0.9, "after": 0.9},
                  "privacy": {"note": "not private", "ledger": "L.sqlite"}}
# The jobs under the API: the CLI must not call them itself.
JOBS = ("veil.jobs.train.run_training", "veil.jobs.train_classifier.train_classifier", "veil.jobs.edit.run_edit",
        "veil.jobs.edit.run_sweep", "veil.export.exporter.export_model", "veil.jobs.unlearn.run_unlearn",
        "veil.privacy.ledger.PrivacyLedger.summary")


class FakeEditor:
    """``api.load_editor``'s stand-in: records ``preview`` and ``release``."""

    def __init__(self, calls):
        self.calls = calls

    def preview(self, **kwargs):
        self.calls.append(("Editor.preview", (), kwargs))
        return api.Preview(Path(kwargs["out"]), SWEEP_REPORT)

    def release(self, **kwargs):
        self.calls.append(("Editor.release", (), kwargs))
        return api.EditResult(Path(kwargs["out"]), {"released": 2})


EDITOR = dict(runtime="ort", classifier="CLF", checker=None, classifier_scale=0.0, steps=6, guidance=None,
              use_ema=False, keep_unprotected=True, check_threshold=0.5, max_retries=2)
PICK = dict(protect=["eyeglasses", "smiling"], ids=["synth-0-000003", "synth-0-000010"], first=None,
            data={"source": "synthetic", "num_images": 8, "seed": None, "root": None, "csv": None, "resolution": None},
            level="high", strength=None, encoding=None, seed=7, out="E")
EDIT_ARGV = ["edit", "--checkpoint", "X", "--runtime", "ort", "--classifier", "CLF", "--classifier-scale", "0",
             "--steps", "6", "--no-ema", "--protect", "eyeglasses,smiling", "--ids", "synth-0-000003,synth-0-000010",
             "--data", "synthetic", "--num-images", "8", "--level", "high", "--seed", "7", "--out", "E"]

# id: (argv, the calls expected in order as (name, args, kwargs), what the command prints)
CASES = {
    "train": (["train", "--config", "synthetic32", "--set", "trainer.max_steps=3", "--out", "R", "--resume",
               "--no-progress", "--ledger", "L.sqlite"],
              [("train", (), dict(config="synthetic32", overrides=["trainer.max_steps=3"], data=None, out="R",
                                  resume=True, progress=False, ledger="L.sqlite"))],
              "non-private training: 3 steps"),
    "train-classifier": (["train-classifier", "--data", "source=synthetic,num_images=96", "--config", "classifier32",
                          "--set", "epochs=1", "--dp-epsilon", "8", "--out", "C", "--progress"],
                         [("train_classifier", (), dict(config="classifier32", overrides=["epochs=1"], dp_epsilon=8.0,
                                                        data={"source": "synthetic", "num_images": 96}, out="C",
                                                        progress=True, ledger=None))],
                         "5 steps in 1.5s (epsilon = 8.000)"),
    "edit": (EDIT_ARGV + ["--epsilon", "2", "--ledger", "L.sqlite", "--budget", "inf", "--no-check"],
             [("load_editor", ("X",), EDITOR),
              ("Editor.release", (), dict(PICK, epsilon=2.0, ledger="L.sqlite", budget=float("inf"), check=False))],
             "SUMMARY of 2"),
    "edit-sweep": (EDIT_ARGV + ["--sweep", "--sweep-epsilons", "0,inf"],
                   [("load_editor", ("X",), EDITOR), ("Editor.preview", (), dict(PICK, epsilons=[0.0, float("inf")]))],
                   "wrote E/sweep.png (2 levels x 1 images"),
    "export": (["export", "--checkpoint", "X", "--classifier", "CLF", "--checker", "J", "--classifier-scale", "3",
                "--guidance", "1.5", "--steps", "20", "--no-ema", "--out", "O"],
               [("export_onnx", (), dict(checkpoint="X", classifier="CLF", classifier_scale=3.0, checker="J",
                                         steps=20, guidance=1.5, use_ema=False, out="O"))],
               "wrote O: denoise_step.onnx + veil_export.json (conditional backend, 32x32, opset 18); 1 of 2 graphs "
               "filled from the graph cache"),
    "unlearn": (["unlearn", "--model", "M", "--revision", "REV", "--out", "U", "--method", "first", "--params", "head",
                 "--params", "proj", "--tau", "0.5", "--preconditioner", "none", "--line-search", "off",
                 "--set", "trainer.devices=1", "--force", "--json", "--ledger", "L.sqlite"],
                [("unlearn", (), dict(model="M", revision="REV", out="U", method="first", force=True,
                                      compare_retrain=False, params=["head", "proj"], trainer=["trainer.devices=1"],
                                      tau=0.5, damping=None, solver=None, cg_max_iter=100, lissa_iterations=300,
                                      lissa_scale=None, hessian_samples=None, seed=0, curvature="hessian",
                                      preconditioner="none", line_search=False, ledger="L.sqlite", passes=2,
                                      lr=3e-4, replay_ratio=3.0, revised_terms="protected"))],
                "privacy: not private (recorded in L.sqlite)"),
    "privacy-show": (["privacy", "show", "--data", "source=synthetic,seed=0", "--json"],
                     [("privacy_account", ({"source": "synthetic", "seed": 0},), dict(ledger=None))],
                     '"spent": 1'),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_command_calls_its_api_function_with_the_parsed_arguments(case, monkeypatch, capsys):
    argv, expected, shown = CASES[case]
    calls = []

    def recorder(name, result):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result(kwargs)
        return record

    def bypassed(*args, **kwargs):
        raise AssertionError("the command called the job itself, not through veil.api")

    for job in JOBS:
        monkeypatch.setattr(job, bypassed)
    fakes = {"train": lambda kw: api.Run(Path(kw["out"]), TRAIN_RECORD),
             "train_classifier": lambda kw: api.Run(Path(kw["out"]), CLASSIFIER_RECORD),
             "load_editor": lambda kw: FakeEditor(calls),
             "export_onnx": lambda kw: api.ExportResult(Path(kw["out"]), EXPORT_META),
             "unlearn": lambda kw: api.Run(Path(kw["out"]), UNLEARN_REPORT),
             "privacy_account": lambda kw: {"spent": 1}}
    for name, result in fakes.items():
        monkeypatch.setattr(api, name, recorder(name, result))
    monkeypatch.setattr("veil.cli.edit.summary", lambda report, out: f"SUMMARY of {report['released']}")

    assert main(argv) == 0, capsys.readouterr().err
    assert calls == expected  # one call per API function, with the parsed arguments
    out = capsys.readouterr().out
    assert shown in out and out.count(shown) == 1


def test_privacy_show_says_when_the_api_finds_no_database(monkeypatch, capsys, veil_home):
    """None from ``veil.api.privacy_account``: the command says where it looked (not an error)."""
    monkeypatch.setattr(api, "privacy_account", lambda data, *, ledger: None)
    assert main(["privacy", "show", "--ledger", str(veil_home / "nowhere.sqlite")]) == 0
    assert f"no privacy database at {veil_home / 'nowhere.sqlite'}" in capsys.readouterr().out
