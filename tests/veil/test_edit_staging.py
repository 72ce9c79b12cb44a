"""Issue 31: a `veil edit` killed with SIGKILL (no cleanup runs) leaves its hidden staging folder in --out; the
next edit into that --out removes it and says so in one line, and never touches the staging folder of an
edit that is still running (every edit holds --out's lock, ``veil.outputs.out_lock``, for its whole run)."""

import signal
import subprocess
import sys

import pytest

from veil.cli import main

# the start of a real edit (the job's own lock and staging), then killed in the middle
CHILD = """
import sys, time
from pathlib import Path
from veil.jobs import edit as J
from veil.outputs import out_lock
out = Path(sys.argv[1])
with out_lock(out) as lock, J._locked_staging(out, J.EDIT_FILES, lock, None) as stage:
    (stage / "revision").mkdir()
    (stage / "revision" / "half.png").write_bytes(b"half-written")
    print(stage.name, flush=True)
    time.sleep(300)
"""


@pytest.mark.usefixtures("single_thread")
def test_the_next_edit_removes_the_staging_folder_a_killed_edit_left(models, tmp_path, veil_home, capsys):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        stage = out / child.stdout.readline().strip()
        assert stage.name.startswith(".veil-edit-") and stage.is_dir()
        edit = ["edit", "--checkpoint", str(models / "cond"), "--no-check", "--protect", "smiling", "--first", "2",
                "--steps", "4", "--level", "max", "--out", str(out)]
        assert main(edit) == 2  # a live edit holds --out: refused at once, its staging folder left alone
        assert "another veil run is writing into this folder" in capsys.readouterr().err and stage.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert stage.is_dir()  # SIGKILL: nothing cleaned up
    assert main(edit) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "staging folder" in line]
    assert said == [f"veil edit: removed 1 staging folder left in {out} by an earlier edit that was killed "
                    f"({stage.name})"]
    assert not stage.exists() and not list(out.glob(".veil-*"))  # no staging folder, no lock file
    assert sorted(p.name for p in out.iterdir()) == ["before_after.png", "edit_report.json", "revision"]
