"""veil.outputs.staged_dir, the one helper every command writes --out through: the named entries move into
OUT all or none, a failure (Ctrl-C included) leaves OUT as it was (and removes it if the command made it),
--force replaces and puts back what it replaced on failure, and a run in place removes what it created."""

import os
from pathlib import Path

import pytest

from veil.errors import ConfigError, DataError
from veil.outputs import publish, staged_dir, unpublish


def _entries(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_the_named_entries_move_in_on_success_and_the_staging_folder_goes(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, ["data", "report.json"]) as stage:
        assert stage.parent == out and stage.name.startswith(".veil-stage-")
        (stage / "data").mkdir()
        (stage / "data" / "x.txt").write_text("x")
        (stage / "report.json").write_text("{}")
        (stage / "scratch.tmp").write_text("not published")
        assert not (out / "report.json").exists()  # nothing moves before the block ends
    assert _entries(out) == ["data", "data/x.txt", "report.json"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_leaves_nothing_and_removes_the_folder_it_created(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        with staged_dir(out, ["report.json"]) as stage:
            (stage / "report.json").write_text("{}")
            raise exc
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with staged_dir(kept, ["report.json"]) as stage:
            (stage / "report.json").write_text("{}")
            raise RuntimeError("late")
    assert _entries(kept) == ["mine.txt"]


def test_a_failed_move_takes_back_the_entries_already_moved(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = os.replace

    def fail_on_report(src, dst):
        if str(dst).endswith("report.json"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_report)
    with pytest.raises(OSError):
        with staged_dir(out, ["a.png", "b", "report.json"]) as stage:
            (stage / "a.png").write_text("a")
            (stage / "b").mkdir()
    assert not out.exists()


def test_an_entry_that_appeared_meanwhile_is_never_replaced_without_replace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError) as info:
        with staged_dir(out, ["a.txt", "report.json"]) as stage:
            (stage / "a.txt").write_text("new")
            (stage / "report.json").write_text("new")
            (out / "report.json").write_text("someone else's")
    assert str(info.value).startswith(f"--out {out}: report.json appeared while veil was working")
    assert info.value.option == "--out"
    assert _entries(out) == ["report.json"] and (out / "report.json").read_text() == "someone else's"


def test_replace_swaps_the_old_entries_out_and_puts_them_back_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "w.bin").write_text("old")
    (out / "report.json").write_text("old")
    (out / "notes.txt").write_text("the owner's")
    with staged_dir(out, ["model", "report.json"], replace=True) as stage:
        (stage / "model").mkdir()
        (stage / "model" / "w.bin").write_text("new")
        (stage / "report.json").write_text("new")
    assert _entries(out) == ["model", "model/w.bin", "notes.txt", "report.json"]
    assert (out / "model" / "w.bin").read_text() == (out / "report.json").read_text() == "new"
    real = os.replace

    def fail_on_report(src, dst):  # the new report's move in fails (after the model's)
        if Path(src).name == "report.json" and Path(src).parent.name.startswith(".veil-stage-"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_report)
    with pytest.raises(OSError):
        with staged_dir(out, ["model", "report.json"], replace=True) as stage:
            (stage / "model").mkdir()
            (stage / "model" / "w.bin").write_text("newer")
            (stage / "report.json").write_text("newer")
    assert _entries(out) == ["model", "model/w.bin", "notes.txt", "report.json"]
    assert (out / "model" / "w.bin").read_text() == (out / "report.json").read_text() == "new"


def test_publish_inside_the_block_and_unpublish_when_what_follows_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError):
        with staged_dir(out, created=True) as stage:
            (stage / "report.json").write_text("{}")
            publish(stage, out, ["report.json"])
            assert (out / "report.json").is_file()  # published at the caller's moment (a ledger transaction)
            try:
                raise RuntimeError("the commit failed")
            except RuntimeError:
                unpublish(out, ["report.json"])
                raise
    assert not out.exists()


def test_an_unwritable_out_is_a_data_error_naming_the_flag(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"^--model .*: cannot write there .*; nothing was released$"):
        with staged_dir(blocker / "sub", flag="--model", unwritten="nothing was released"):
            pass


def test_in_place_removes_what_the_run_created_unless_keep(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with staged_dir(out, in_place=True) as folder:
            assert folder == out
            out.mkdir()
            (out / "log.csv").write_text("")
            raise RuntimeError("diverged")
    assert not out.exists()
    out.mkdir()
    (out / "earlier.txt").write_text("stays")
    with pytest.raises(RuntimeError):
        with staged_dir(out, in_place=True):
            (out / "private").mkdir()
            (out / "private" / "last.ckpt").write_text("")
            raise RuntimeError("diverged")
    assert _entries(out) == ["earlier.txt"]
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out, in_place=True, keep=lambda: (out / "private").exists()):
            (out / "private").mkdir()
            raise KeyboardInterrupt
    assert _entries(out) == ["earlier.txt", "private"]  # a checkpoint to resume: kept
