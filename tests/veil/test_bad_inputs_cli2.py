"""More bad inputs that escaped as exit 1 (an internal error) and now exit 2 with one line: a privacy database
that cannot be created (``--ledger``, ``--state``, ``VEIL_HOME``: under a regular file, which holds as root too),
an absurd ``trainer.max_steps``, a YAML config giving a key twice; and ``--config`` naming a shipped config."""

from __future__ import annotations

import pytest

from veil.cli import main
from veil.errors import ConfigError
from veil.jobs.config import CONFIG_DIR, load_config, resolve_config, shipped_names
from veil.jobs.train_classifier import load_recipe

DATA = ["--data", "source=synthetic,seed=0"]


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err and "internal error" not in err[0], captured.err
    return err[0]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("not a folder")
    return path


def test_a_ledger_that_cannot_be_created(a_file, capsys):
    code = main(["privacy", "set-budget", "4", "--reason", "r", *DATA, "--ledger", str(a_file / "l.sqlite")])
    line = _one_line(capsys)
    assert code == 2, line  # was 1: NotADirectoryError
    assert f"--ledger {a_file / 'l.sqlite'}: cannot create the privacy database" in line, line


def test_a_veil_home_that_cannot_be_created(a_file, monkeypatch, capsys):
    monkeypatch.setenv("VEIL_HOME", str(a_file / "home"))
    code = main(["privacy", "set-budget", "4", "--reason", "r", *DATA])
    line = _one_line(capsys)
    assert code == 2, line  # was 1
    assert f"VEIL_HOME={a_file / 'home'}: cannot create the privacy database" in line, line


def test_a_serve_state_that_cannot_be_created(exports, a_file, capsys):
    code = main(["serve", "--export", str(exports / "conditional"), "--port", "0", "--threads", "1",
                 "--state", str(a_file / "state.sqlite")])
    line = _one_line(capsys)
    assert code == 2, line  # was 1
    assert f"--state {a_file / 'state.sqlite'}: cannot create the privacy database" in line, line


@pytest.mark.parametrize("key", ["trainer.max_steps", "trainer.max_epochs"])
def test_an_absurd_step_count_is_a_range_error(tmp_path, key, capsys):
    code = main(["train", "--set", f"{key}={10**18}", "--out", str(tmp_path / "run")])
    line = _one_line(capsys)
    assert code == 2, line  # was 1: a MemoryError / "Maximum allowed size exceeded" in the accountant
    assert f"{key} must be <= 10,000,000, got" in line or f"{key} must be <= 1,000,000, got" in line, line
    assert not (tmp_path / "run").exists()


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("trainer:\n  max_steps: 5\n  max_steps: 0\n")  # HEAD: the last one, refused as < 1
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    line = _one_line(capsys)
    assert code == 2, line
    assert f"--config {config}: line 3: key 'max_steps' is given twice (first on line 2)" in line, line
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 1\nlr: 0.001\nepochs: 2\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'epochs' is given twice \(first on line 1\)"):
        load_recipe(str(recipe))


def test_config_names_a_shipped_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no lightning_modules/ here: as from an install
    assert resolve_config("synthetic32") == CONFIG_DIR / "synthetic32.yaml"
    assert resolve_config("synthetic32.yaml") == CONFIG_DIR / "synthetic32.yaml"
    assert load_config("synthetic32") == load_config(str(CONFIG_DIR / "synthetic32.yaml"))
    assert load_recipe("classifier32")[0] == load_recipe(str(CONFIG_DIR / "classifier32.yaml"))[0]
    (tmp_path / "synthetic32").write_text("trainer:\n  max_steps: 7\n")  # a file of that name wins
    assert load_config("synthetic32").trainer.max_steps == 7
    code = main(["train", "--config", "synthetic33", "--out", str(tmp_path / "run")])
    line = _one_line(capsys)
    assert code == 2 and "--config synthetic33: no such file, nor a shipped config's name" in line, line
    assert all(name in line for name in shipped_names("train")) and "classifier32" not in line, line
    code = main(["train-classifier", "--config", "synthetic32_long", "--out", str(tmp_path / "clf")])
    line = _one_line(capsys)
    assert code == 2 and "classifier32_guidance" in line and "synthetic32_public" not in line, line
