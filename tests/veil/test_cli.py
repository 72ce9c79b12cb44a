"""The command line: help for every subcommand, one-line errors with exit status 2."""

import subprocess
import sys

import pytest

from veil.cli import build_parser, main

SUBCOMMANDS = ["train", "sample"]


def test_top_level_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "veil.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in SUBCOMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_option_is_documented(cmd):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        if action.dest != "help" and action.help != "==SUPPRESS==":
            assert action.help, f"veil {cmd} {action.option_strings} has no help text"


def test_bad_config_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "o"), "--set", "dp.target_epsilon=-1"])
    err = capsys.readouterr().err
    assert code == 2 and "dp.target_epsilon" in err and "Traceback" not in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_sample_rejects_non_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "x.ckpt"
    import torch

    torch.save({"state_dict": {}}, bogus)
    assert main(["sample", "--checkpoint", str(bogus), "--out", str(tmp_path / "g.png")]) == 2
    assert "owner-only training state" in capsys.readouterr().err  # a .ckpt is never a release
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    assert "no model release there" in capsys.readouterr().err
