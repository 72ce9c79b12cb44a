"""README.md's "Your own photos" block, run top to bottom as written, on a folder of real photos, at tiny sizes.

The folder is built from photos that packages ship (scikit-image's astronaut and cat, matplotlib's Grace
Hopper: the faces ``tests/veil/test_prepare.py`` finds), each also mirrored, plus a group photo and one with
no face, and the ``photo_labels.csv`` the block names. Every line runs with its shell words exactly as
printed (``\\`` continuations joined, ``# comments`` dropped) in a fresh folder with its own $VEIL_HOME,
through ``veil.cli.main`` (one torch import). The only change is extra arguments APPENDED to a line, from
EXTRA below (tiny classifier sizes, few DDIM steps); the ``PUBLIC_UNET=$(python -c ...)`` line runs in bash
and its value fills ``$PUBLIC_UNET`` in later lines, as a shell would.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

from veil.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.usefixtures("single_thread")


def _sets(*overrides: str) -> list[str]:
    return [word for kv in overrides for word in ("--set", kv)]


# six faces: DP batches of 2, one epoch, a tiny CNN
TINY_CLASSIFIER = ("model.channels=[8,16,16]", "model.feature_dim=16", "model.norm_num_groups=4", "epochs=1",
                   "batch_size=2", "dp.max_physical_batch_size=2")
# What each line gets appended, keyed by its --out (or, without one, its first three words). A line of the block
# missing here, or an entry no line uses, fails the test: the table and the README move together.
EXTRA: dict[str, list[str]] = {
    "faces": [],
    "runs/guide": _sets(*TINY_CLASSIFIER, "dp.noise_multiplicity=2"),
    "runs/checker": _sets(*TINY_CLASSIFIER),
    "edits": ["--steps", "4"],
    "veil privacy show": [],
    "published": [],
    "shared": [],
}
LABELS = """photo,face,smiling
astronaut.png,,1
astronaut_mirror.png,,1
hopper.jpg,,-1
hopper_mirror.png,,-1
group.png,0,1
group.png,1,-1
"""


def readme_block() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^## Your own photos\n.*?^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _key(words: list[str]) -> str:
    return words[words.index("--out") + 1] if "--out" in words else " ".join(words[:3])


def _photos(folder: Path) -> None:
    """What a data owner has: photos/ (mixed formats, a group, one without a face) and photo_labels.csv."""
    (folder / "photos").mkdir()
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        hopper = np.array(im.convert("RGB").resize((437, 512), Image.Resampling.BICUBIC))
    astronaut, cat = data.astronaut(), np.array(Image.fromarray(data.chelsea()).resize((400, 512)))
    for name, pixels in (("astronaut.png", astronaut), ("astronaut_mirror.png", np.fliplr(astronaut)),
                         ("hopper.jpg", hopper), ("hopper_mirror.png", np.fliplr(hopper)),
                         ("group.png", np.concatenate([astronaut, cat, hopper], axis=1)),
                         ("camera.png", data.camera())):
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / "photos" / name)
    (folder / "photo_labels.csv").write_text(LABELS)


def test_every_line_names_its_tiny_flags():
    keys = [_key(shlex.split(line, comments=True)) for line in readme_block() if not line.startswith("PUBLIC_UNET=")]
    assert sorted(keys) == sorted(EXTRA)


def test_the_own_photos_block_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VEIL_HOME", str(tmp_path / "home"))
    _photos(tmp_path)
    shell = {}
    for line in readme_block():
        if line.startswith("PUBLIC_UNET="):  # a shell assignment: bash runs it, with this interpreter as python
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            shell["$PUBLIC_UNET"] = subprocess.run(["bash", "-c", f"{line}\necho \"$PUBLIC_UNET\""], env=env,
                                                   capture_output=True, text=True, check=True).stdout.strip()
            assert (Path(shell["$PUBLIC_UNET"]) / "model" / "veil_model.json").is_file()
            continue
        words = [shell.get(w, w) for w in shlex.split(line, comments=True)]
        assert words[0] == "veil", line
        try:
            code = main(words[1:] + EXTRA[_key(words)])
        except SystemExit as e:
            code = e.code
        printed = capsys.readouterr()
        assert code == 0, f"{line}\n(exit {code}) {printed.err[-3000:]}"
        if words[1] == "privacy" and words[2] == "show":  # the account names both classifiers' DP training
            assert printed.out.count("private, epsilon 7.99") == 2, printed.out
    labels = (tmp_path / "faces" / "labels.csv").read_text().splitlines()
    assert labels[0] == "id,smiling" and len(labels) == 7 and all(r.endswith(("1", "-1")) for r in labels[1:])
    for made in ("runs/guide/model", "runs/checker/model", "edits/revision", "published/manifest.json",
                 "faces/private/prepare.json"):
        assert (tmp_path / made).exists(), made
    published = (tmp_path / "published" / "manifest.json").read_text()
    assert "face-" not in published and "astronaut" not in published  # pseudonyms, no file names
    shared = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert shared and set(shared) <= {"astronaut.png", "astronaut_mirror.png", "hopper.png", "hopper_mirror.png",
                                      "group.png"}
