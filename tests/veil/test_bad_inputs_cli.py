"""Bad inputs thrown at the command line, in process (``veil.cli.main``): each case asserts the exit
status (2 for the user's mistakes, 130 for Ctrl-C, 1 for an internal error), that the one-line message
names the offending flag or file, that no traceback is printed, that nothing was written or charged
(no privacy database under $VEIL_HOME, no new file) and that existing outputs are untouched.

The model is a tiny random UNet release (written by ``write_release``); sampling it takes 2 DDIM steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dp_helpers import write_tiny_release

from veil.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A `veil train` run folder holding a model release of a tiny random UNet."""
    out = write_tiny_release(tmp_path_factory.mktemp("run"), data_spec={"source": "synthetic", "seed": 0})
    return out


def run(argv) -> tuple[int, str]:
    """(exit status, stderr) of ``veil ARGV`` in process; argparse's errors end in SystemExit."""
    import sys
    from io import StringIO

    err, old = StringIO(), sys.stderr
    sys.stderr = err
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    finally:
        sys.stderr = old
    return code, err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(code, err, *names, status=2):
    assert code == status, err
    assert "Traceback" not in err, err
    for name in names:
        assert str(name) in err, f"{name!r} not named in: {err}"


def assert_nothing_charged(veil_home: Path):
    assert not (veil_home / "datasets").exists() or not any((veil_home / "datasets").iterdir())


# ------------------------------------------------------------------ bad files given as a model
def _bad_file(kind: str, tmp: Path, release: Path) -> Path:
    """A path that is not a usable release, of ``kind``."""
    if kind == "random":
        (tmp / "random.bin").write_bytes(os.urandom(4096))
        return tmp / "random.bin"
    if kind == "huge random":
        (tmp / "huge.safetensors").write_bytes(os.urandom(3 * 2**20))
        return tmp / "huge.safetensors"
    if kind == "random ckpt":
        (tmp / "last.ckpt").write_bytes(os.urandom(4096))
        return tmp / "last.ckpt"
    if kind == "empty":
        (tmp / "empty").write_bytes(b"")
        return tmp / "empty"
    if kind == "folder":
        (tmp / "a folder").mkdir()
        return tmp / "a folder"
    if kind == "missing":
        return tmp / "nowhere é"
    if kind == "dangling link":
        (tmp / "link").symlink_to(tmp / "gone")
        return tmp / "link"
    copy = tmp / "copy" / "model"
    copy.mkdir(parents=True)
    for f in (release / "model").iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    if kind == "corrupt json":
        (copy / "veil_model.json").write_text('{"format": "veil-model/1", "kind": ')
    elif kind == "json without model_kwargs":
        meta = json.loads((copy / "veil_model.json").read_text())
        del meta["model_kwargs"]
        (copy / "veil_model.json").write_text(json.dumps(meta))
    elif kind == "truncated weights":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "empty weights":
        (copy / "model.safetensors").write_bytes(b"")
    return copy.parent


BAD_RELEASES = ["random", "random ckpt", "huge random", "empty", "folder", "missing", "dangling link", "corrupt json",
                "json without model_kwargs", "truncated weights", "empty weights"]


@pytest.mark.parametrize("kind", BAD_RELEASES)
def test_sample_bad_checkpoint_is_one_line(release, tmp_path, veil_home, kind):
    bad = _bad_file(kind, tmp_path, release)
    before = snapshot(tmp_path)
    code, err = run(["sample", "--checkpoint", bad, "--n", 2, "--steps", 2, "--out", tmp_path / "g.png"])
    assert_refused(code, err, "--checkpoint", bad.name if kind != "missing" else bad)
    assert len(err.strip().splitlines()) == 1 and snapshot(tmp_path) == before
    assert_nothing_charged(veil_home)


@pytest.mark.parametrize("kind", ["random", "empty", "folder", "truncated weights", "corrupt json"])
def test_sample_bad_classifier_names_the_classifier_flag(release, tmp_path, kind):
    bad = _bad_file(kind, tmp_path, release)
    code, err = run(["sample", "--checkpoint", release, "--classifier", bad, "--n", 2, "--steps", 2,
                     "--out", tmp_path / "g.png"])
    assert_refused(code, err, "--classifier", bad.name)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("kind", ["random", "random ckpt", "empty", "folder", "corrupt json", "truncated weights"])
def test_unlearn_bad_model_names_the_model_flag_and_leaves_no_out(release, tmp_path, kind):
    bad = _bad_file(kind, tmp_path, release)
    code, err = run(["unlearn", "--model", bad, "--revision", tmp_path, "--out", tmp_path / "unl"])
    assert_refused(code, err, "--model", bad.name)
    assert not (tmp_path / "unl").exists()  # created for the run, removed with it


# ------------------------------------------------------------------ numbers: NaN, infinite, negative, zero
SAMPLE_NUMBERS = [("--n", "0"), ("--n", "-3"), ("--n", "abc"), ("--n", "1.5"), ("--steps", "0"), ("--steps", "nan"),
                  ("--guidance", "nan"), ("--guidance", "inf"), ("--classifier-scale", "-1"),
                  ("--classifier-scale", "nan"), ("--seed", "-1"), ("--seed", "x")]


@pytest.mark.parametrize("flag,value", SAMPLE_NUMBERS)
def test_sample_bad_numbers_are_refused_before_loading(tmp_path, monkeypatch, flag, value):
    import veil.lightning_modules.checkpoints as CK

    monkeypatch.setattr(CK, "load_diffusion_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    code, err = run(["sample", "--checkpoint", tmp_path, "--out", tmp_path / "g.png", f"{flag}={value}"])
    assert_refused(code, err, flag, value)
    assert not any(tmp_path.iterdir())


UNLEARN_NUMBERS = [("--tau", "nan"), ("--tau", "0"), ("--tau", "inf"), ("--damping", "-1"), ("--damping", "inf"),
                   ("--cg-max-iter", "0"), ("--lissa-iterations", "-5"), ("--lissa-scale", "nan"),
                   ("--hessian-samples", "0"), ("--seed", "-1")]


@pytest.mark.parametrize("flag,value", UNLEARN_NUMBERS)
def test_unlearn_bad_numbers_are_refused_before_any_work(tmp_path, flag, value):
    code, err = run(["unlearn", "--model", tmp_path, "--revision", tmp_path, "--out", tmp_path / "unl",
                     f"{flag}={value}"])
    assert_refused(code, err, flag, value)
    assert not (tmp_path / "unl").exists()


@pytest.mark.parametrize("argv,names", [
    (["privacy", "set-budget", "nan", "--reason", "r", "--data", "source=synthetic,seed=0"], ["nan"]),
    (["privacy", "set-budget", "-1", "--reason", "r", "--data", "source=synthetic,seed=0"], ["-1"]),
    (["privacy", "set-training-budget", "abc", "--reason", "r", "--data", "source=synthetic,seed=0"], ["abc"]),
    (["privacy", "show", "--data", "source=synthetic,seed=abc"], ["--data", "seed"]),
    (["privacy", "show", "--data", "nonsense"], ["--data", "nonsense"]),
])
def test_privacy_bad_values_create_no_database(veil_home, argv, names):
    code, err = run(argv)
    assert_refused(code, err, *names)
    assert_nothing_charged(veil_home)


@pytest.mark.parametrize("content", [b"", b"hello, not a database\n", None])
def test_privacy_bad_ledger_file_is_one_line_and_untouched(tmp_path, content):
    ledger = tmp_path / "my ledger é.sqlite"
    ledger.write_bytes(os.urandom(2 * 2**20) if content is None else content)
    before = ledger.read_bytes()
    code, err = run(["privacy", "show", "--ledger", ledger])
    assert_refused(code, err, "--ledger", ledger.name, "empty file" if content == b"" else "not a veil privacy database")
    assert ledger.read_bytes() == before


def test_privacy_publish_revision_missing_and_out_inside(tmp_path):
    code, err = run(["privacy", "publish-revision", "--revision", tmp_path / "no rev", "--out", tmp_path / "pub"])
    assert_refused(code, err, "no rev")
    assert not (tmp_path / "pub").exists()


# ------------------------------------------------------------------ --out of sample and unlearn
@pytest.mark.parametrize("out,names", [
    ("grid", ["--out", "no extension"]),
    ("grid.txt", ["--out", ".txt"]),
    ("grid.h5", ["--out", ".h5"]),
    ("a_file/grid.png", ["--out", "a_file", "is a file"]),
    ("a_file/deeper/grid.png", ["--out", "a_file"]),
    ("existing.png", ["--out", "already exists", "--force"]),
    ("a_dir", ["--out", "is a folder"]),
    ("a_dir.png", ["--out", "is a folder"]),
])
def test_sample_bad_out_is_refused_before_sampling(release, tmp_path, monkeypatch, out, names):
    import veil.lightning_modules.checkpoints as CK

    monkeypatch.setattr(CK, "load_diffusion_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "existing.png").write_bytes(b"an earlier grid")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_dir.png").mkdir()
    before = snapshot(tmp_path)
    code, err = run(["sample", "--checkpoint", release, "--out", tmp_path / out])
    assert_refused(code, err, *names)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == \
        ["a_dir", "a_dir.png", "a_file", "existing.png"]


@pytest.mark.parametrize("setup_out,names", [
    ("file", ["--out", "is a file"]),
    ("model", ["--out", "already holds model", "--force"]),
    ("unlearn_report.json", ["--out", "already holds unlearn_report.json"]),
    ("private", ["--out", "already holds private"]),
])
def test_unlearn_bad_or_used_out_is_refused_before_any_work(tmp_path, setup_out, names):
    out = tmp_path / "unl"
    if setup_out == "file":
        out.write_text("a file")
    else:
        out.mkdir()
        target = out / setup_out
        if setup_out in ("model", "private"):
            target.mkdir()
            (target / "earlier.bin").write_bytes(b"an earlier result")
        else:
            target.write_text('{"earlier": true}')
    before = snapshot(tmp_path)
    code, err = run(["unlearn", "--model", tmp_path / "no model", "--revision", tmp_path / "no rev", "--out", out])
    assert_refused(code, err, *names)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ valid unusual paths work
def test_sample_through_a_symlink_with_unicode_and_spaces(release, tmp_path, veil_home, capsys):
    link = tmp_path / "modèle à tester"
    link.symlink_to(release, target_is_directory=True)
    out = tmp_path / "sorties é" / "grille 1.png"  # a missing folder is created
    assert main(["sample", "--checkpoint", str(link), "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    first = out.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    code, err = run(["sample", "--checkpoint", link, "--n", 2, "--steps", 2, "--seed", 1, "--out", out])
    assert_refused(code, err, "--out", "already exists")
    assert out.read_bytes() == first
    jpg = out.with_suffix(".JPG")
    assert main(["sample", "--checkpoint", str(link), "--n", "2", "--steps", "2", "--seed", "1", "--force",
                 "--out", str(out)]) == 0
    assert out.read_bytes() != first
    assert main(["sample", "--checkpoint", str(link / "model"), "--n", "1", "--steps", "2", "--out", str(jpg)]) == 0
    assert jpg.read_bytes()[:2] == b"\xff\xd8"  # the extension picks the format
    assert_nothing_charged(veil_home)


# ------------------------------------------------------------------ the top of the CLI
def _patched_sample(monkeypatch, exc):
    """`veil sample`'s handler replaced by one that raises ``exc``."""
    from veil.cli import sample

    def boom(args):
        raise exc

    monkeypatch.setattr(sample, "_sample", boom)


@pytest.mark.parametrize("exc,status,names", [
    (RuntimeError("the sampler broke"), 1, ["internal error", "RuntimeError", "the sampler broke", "VEIL_DEBUG"]),
    (ZeroDivisionError("division by zero"), 1, ["internal error", "ZeroDivisionError"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
])
def test_escaping_errors_are_one_line(monkeypatch, tmp_path, veil_home, exc, status, names):
    monkeypatch.delenv("VEIL_DEBUG", raising=False)
    _patched_sample(monkeypatch, exc)
    code, err = run(["sample", "--checkpoint", tmp_path, "--out", tmp_path / "g.png"])
    assert_refused(code, err, *names, status=status)
    assert len(err.strip().splitlines()) == 1
    logs = list((veil_home / "logs").glob("veil-*.log")) if (veil_home / "logs").exists() else []
    if status == 1:  # the traceback is in the log the line names
        assert len(logs) == 1 and str(logs[0]) in err
        text = logs[0].read_text()
        assert "Traceback" in text and type(exc).__name__ in text and "boom" in text
    else:
        assert not logs


def test_veil_debug_prints_the_traceback(monkeypatch, tmp_path, veil_home):
    monkeypatch.setenv("VEIL_DEBUG", "1")
    _patched_sample(monkeypatch, RuntimeError("the sampler broke"))
    code, err = run(["sample", "--checkpoint", tmp_path, "--out", tmp_path / "g.png"])
    assert code == 1 and "Traceback" in err and "the sampler broke" in err
    assert not (veil_home / "logs").exists()


def test_argparse_errors_stay_exit_2():
    code, err = run(["sample", "--checkpoint"])
    assert_refused(code, err, "--checkpoint")
    code, err = run(["no-such-command"])
    assert_refused(code, err, "no-such-command")


def test_help_is_plain_text_with_the_workflow(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "``" not in out
    positions = [out.index(f"veil {cmd} ") for cmd in ("train", "sample", "edit", "privacy show", "unlearn")]
    assert positions[:4] == sorted(positions[:4])  # train -> sample/edit -> privacy show, then unlearn
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert "``" not in sub.format_help(), f"veil {name} --help shows reStructuredText markup"
