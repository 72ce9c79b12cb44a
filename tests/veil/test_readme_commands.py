"""README.md's "Command line" block, run top to bottom as written, from an empty folder, with tiny sizes.

Every line of the ```bash block after "## Command line" runs with its shell words exactly as printed
(``\\`` continuations joined, ``# comments`` dropped), in order, in a fresh folder with its own $VEIL_HOME, so
every folder a line reads must have been made by an earlier line and the ledger must accept every release (one
protected set and one level per dataset). The only change is extra arguments APPENDED to a line, listed in
EXTRA below: tiny sizes (``--set`` of training sizes, ``--steps`` of sampling and edits) and a free ``--port``
for ``veil serve``. Nothing from the session fixtures is reused: the block makes everything itself.

How each line runs: through veil's entry point ``veil.cli.main`` (what the ``veil`` script calls), in this
process (one torch import for the whole block); ``veil serve`` as a subprocess, stopped once /healthz and
/v1/info answer. One line is changed, not extended, with the reason in REPLACED: ``veil privacy show --ledger
postgresql://...`` needs a PostgreSQL server the tests do not have; it runs on the same dataset's SQLite
ledger instead (the same code path but the driver).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from export_models import NOISY

from veil.cli import main
from veil.serve.launch import free_port, wait_ready

README = Path(__file__).resolve().parents[2] / "README.md"


def _sets(*overrides: str) -> list[str]:
    return [word for kv in overrides for word in ("--set", kv)]


TINY_UNET = ("data.num_images=96", "data.batch_size=16", "model.block_out_channels=[16,32]",
             "model.attention_levels=[false,true]", "model.norm_num_groups=8", "model.attention_head_dim=8",
             "trainer.max_steps=4", "trainer.max_time=null", "trainer.checkpoint_every_n_steps=4",
             "trainer.accelerator=cpu")
TINY_DP = ("dp.target_epsilon=null", "dp.noise_multiplier=1.0", "dp.accountant=rdp", "dp.max_physical_batch_size=8")
TINY_CLASSIFIER = ("model.channels=[8,16,16]", "model.feature_dim=16", "model.norm_num_groups=4", "epochs=1",
                   "batch_size=64")
TINY_DP_CLASSIFIER = TINY_CLASSIFIER + ("dp.max_physical_batch_size=64", "data.num_images=640")
# the guide at the sizes of the session's tiny guide (tests/helpers/export_models.py's NOISY), and the UNet and the
# judge at theirs too: the block's `veil export` then captures the graphs the session's guided export translated
# and fills them (veil.export.graph_cache: 10 s instead of 30 s here), as a re-export of one architecture does
TINY_GUIDE = tuple(kv for kv in TINY_DP_CLASSIFIER if not kv.startswith("model.")) + tuple(
    f"model.{k}={v}".replace(" ", "") for k, v in NOISY.items() if k != "noise_conditional")
FREE_PORT = "<a free port>"  # filled in when the server starts

# What each line gets appended, keyed by its --out (or, without one, its first words). A line of the block
# missing here, or an entry no line uses, fails the test: the table and the README move together.
EXTRA: dict[str, list[str]] = {
    "runs/dp32": _sets(*TINY_UNET, *TINY_DP),
    "grid.png": ["--steps", "2"],
    "runs/public": _sets(*TINY_UNET),
    "runs/guide": _sets(*TINY_GUIDE, "dp.noise_multiplicity=2"),
    "guided.png": ["--steps", "2"],
    "runs/judge": _sets(*TINY_DP_CLASSIFIER),
    "edits/": ["--steps", "4"],
    "sweep/": ["--steps", "4"],
    "edits2/": ["--steps", "4"],
    "exports/guided": ["--steps", "4"],
    "edits3/": ["--steps", "4"],
    "veil serve --export": ["--port", FREE_PORT, "--threads", "1"],
    "runs/clf": _sets(*TINY_CLASSIFIER, "data.num_images=400"),
    "runs/unl": [],
    "veil privacy show": [],
    "edits/published": [],
}
# Lines run with a word replaced (never otherwise): the word, its stand-in, and why.
REPLACED = {"postgresql://veil@db/veil": ("home/datasets/synthetic-seed0.sqlite",
                                          "no PostgreSQL server in the tests: the same dataset's SQLite ledger")}


def readme_block() -> list[str]:
    """The block's commands, one per line (continuations joined, comments kept for shlex to drop)."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^## Command line\n.*?^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _key(words: list[str]) -> str:
    return words[words.index("--out") + 1] if "--out" in words else " ".join(words[:3])


def _serve(words: list[str], cwd: Path) -> None:
    """`veil serve ...` as written plus EXTRA's --port: up, answering, then Ctrl-C (it serves until stopped)."""
    port = str(free_port())
    with open(cwd / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "veil.cli", *words[1:]] +
                                [port if w == FREE_PORT else w for w in EXTRA[_key(words)]],
                                cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}", timeout=180)
            info = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=30)
            assert info.status_code == 200, info.text
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def test_every_line_names_its_tiny_flags():
    keys = [_key(shlex.split(line, comments=True)) for line in readme_block()]
    assert set(keys) == set(EXTRA), (set(keys) ^ set(EXTRA))
    assert len([k for k in keys if k.startswith("veil serve")]) == 1


def test_the_command_line_block_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VEIL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for line in readme_block():
        words = [REPLACED.get(w, (w,))[0] for w in shlex.split(line, comments=True)]
        assert words[0] == "veil", line
        if words[1] == "serve":
            _serve(words, tmp_path)
            continue
        try:
            code = main(words[1:] + EXTRA[_key(words)])
        except SystemExit as e:  # veil's parser refused the line (exit 2, one line on stderr)
            code = e.code
        printed = capsys.readouterr()
        assert code == 0, f"{line}\n(exit {code}) {printed.err[-3000:]}"
    # what the block claims to make, made
    for made in ("runs/dp32", "runs/public", "runs/guide", "runs/judge", "grid.png", "guided.png", "edits/revision",
                 "sweep", "edits2/revision", "exports/guided/veil_export.json", "edits3/revision", "runs/unl/model",
                 "edits/published"):
        assert (tmp_path / made).exists(), made
