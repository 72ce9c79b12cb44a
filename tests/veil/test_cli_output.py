"""What the CLI shows (issue 31): progress on stderr, other packages' noise in the command's log file and
not on the terminal, a training bar that never reads "Epoch 0/-2", and `veil unlearn`'s verdict table."""

import json
import logging
import time
import warnings

import pytest

from veil import console

NOISE = ("GPU available", "TPU available", "Tip:", "litlogger", "torchvision is not installed",
         "Optimal order is the", "Epoch 0/-2", "is deprecated")


def _logs(home):
    return "".join(p.read_text() for p in sorted((home / "logs").glob("veil-*.log"))) if (home / "logs").is_dir() else ""


def test_a_tiny_veil_train_prints_results_only_and_logs_the_noise(tmp_path, capfd, veil_home):
    from dp_helpers import TINY, train_cli

    assert train_cli(tmp_path / "run", TINY) == 0
    out, err = capfd.readouterr()
    assert "privacy spent" in out and "wrote" in out
    for text in NOISE:
        assert text not in out and text not in err, (text, out, err)
    kept = _logs(veil_home)
    assert "GPU available" in kept and "TPU available" in kept  # kept, not lost


def test_other_packages_log_records_and_warnings_go_to_the_log_file(capfd, veil_home):
    with console.command("export"):
        logging.getLogger("torch.onnx._internal.exporter._registration").warning(
            "torchvision is not installed. Skipping %s", "torchvision::nms")
        noisy = logging.getLogger("some_package")
        noisy.addHandler(logging.StreamHandler())  # as `import lightning` does
        noisy.warning("is deprecated: a banner")
        assert not noisy.handlers  # taken off for the command
        warnings.warn_explicit("Optimal order is the largest alpha.", UserWarning, "/site-packages/opacus/rdp.py", 3,
                               module="opacus.accountants.analysis.rdp")
        warnings.warn_explicit("old API is deprecated", FutureWarning, "/site-packages/lightning/x.py", 9,
                               module="lightning.x")
        logging.getLogger("veil.serve").warning("veil's own warning")
    out, err = capfd.readouterr()
    for text in NOISE:
        assert text not in out + err
    assert "veil's own warning" in err
    kept = _logs(veil_home)
    assert all(t in kept for t in ("torchvision is not installed", "a banner", "Optimal order is the", "old API"))
    assert len(logging.getLogger("some_package").handlers) == 1  # and put back after it


def test_stages_announce_themselves_and_heartbeats_keep_coming_on_stderr(capfd):
    with console.stage("not under a command"):  # library use: silent
        pass
    with console.command("sample", every=0.2):
        with console.stage("sampling 16 images"):
            time.sleep(0.9)
        time.sleep(0.5)  # outside any stage: "working"
    out, err = capfd.readouterr()
    assert out == "" and "not under a command" not in err
    lines = err.splitlines()
    assert lines[0] == "veil sample: sampling 16 images ..."
    assert sum(line.startswith("veil sample: sampling 16 images ... ") and line.endswith(" s") for line in lines) >= 2
    assert any(line.startswith("veil sample: working ... ") for line in lines)


def test_the_training_bar_counts_steps_not_epoch_minus_two(monkeypatch):
    import sys
    from types import SimpleNamespace

    from veil.jobs.train import progress_bar

    assert progress_bar(True) == [] or sys.stderr.isatty()  # not a terminal: no bar (the heartbeat covers it)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    (bar,) = progress_bar(True)
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=4)  # a run by steps
    assert bar._get_train_description(0).strip() == "Epoch 0 (to step 4)"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
    assert progress_bar(False) == []


REPORT = {"method": "second", "params": ["head"], "changed_train_samples": 12, "update_seconds": 0.012,
          "retrain_seconds": 3.4, "speedup": 283.0, "test_accuracy": {"before": 0.91, "after": 0.905, "retrained": 0.9},
          "changed_original_attribute_accuracy": {"before": 0.95, "after": 0.6, "retrained": 0.55},
          "gradient_residual": {"before": 0.3, "after": 1e-7, "retrained": 2e-4},
          "privacy": {"note": "not private: epsilon infinite", "ledger": "/x/ledger.sqlite"}}


@pytest.mark.parametrize("as_json", [False, True])
def test_veil_unlearn_ends_with_a_verdict_table_not_raw_json(monkeypatch, tmp_path, capsys, as_json):
    import veil.jobs.unlearn as UJ
    from veil.cli import main

    monkeypatch.setattr(UJ, "run_unlearn", lambda **kw: REPORT)
    out = tmp_path / "unl"
    assert main(["unlearn", "--model", "m", "--revision", "r", "--out", str(out)] + (["--json"] if as_json else [])) == 0
    printed = capsys.readouterr().out
    body, rest = printed.split("\nwrote ", 1)
    assert f"{out}/unlearn_report.json" in rest and "not private" in rest and printed.count("wrote ") == 1
    if as_json:
        assert json.loads(body)["test_accuracy"]["after"] == 0.905
        return
    assert "{" not in printed and len(printed.splitlines()) < 12
    assert "update 12 ms vs retraining 3.4 s (283x faster)" in body
    row = next(line for line in body.splitlines() if line.lstrip().startswith("test accuracy"))
    assert row.split()[-3:] == ["0.910", "0.905", "0.900"]
    assert "predicts the original value" in body and "gradient residual" in body
