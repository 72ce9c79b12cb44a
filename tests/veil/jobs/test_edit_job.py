"""`veil edit` end to end on a tiny random checkpoint: files, the dataset's privacy database, the owner-only
revision and its published copy, sweep, refusals, errors."""

import json
import math
import stat

import numpy as np
import pytest
import torch
from dp_helpers import write_tiny_release
from PIL import Image

from veil.cli import build_parser, main
from veil.errors import DataError
from veil.lightning_modules.data import FaceDataModule
from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES
from veil.privacy.ledger import PrivacyLedger, ledger_path_for
from veil.privacy.levels import LEVELS

DATA = dict(source="synthetic", root=None, csv=None, attributes=None, resolution=32, num_images=24, seed=0,
            batch_size=8, poisson=True, val_fraction=0.05, test_fraction=0.05, revision=None, num_workers=0)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run folder with the model release `veil train` writes (OUT/model), random weights."""
    out = write_tiny_release(tmp_path_factory.mktemp("run"), data_spec=DATA)
    return str(out)


def _edit(checkpoint, out, *extra):
    """`veil edit` of the random tiny model: unchecked (there is no classifier here; test_guided_edit.py checks)."""
    check = [] if "--sweep" in extra else ["--no-check"]
    return main(["edit", "--checkpoint", checkpoint, "--protect", "eyeglasses,smiling", "--steps", "10",
                 "--out", str(out), *check, *extra])


def test_edit_writes_images_grid_report_ledger_and_revision(checkpoint, tmp_path, veil_home):
    assert _edit(checkpoint, tmp_path, "--ids", "synth-0-000003,synth-0-000010", "--level", "high", "--seed", "1") == 0
    report = json.loads((tmp_path / "edit_report.json").read_text())
    assert [r["id"] for r in report["images"]] == ["synth-0-000003", "synth-0-000010"]
    base = FaceDataModule(**DATA).dataset
    for r, index in zip(report["images"], (3, 10)):
        assert (r["epsilon"], r["strength"], r["encoding"]) == (LEVELS["high"].epsilon, LEVELS["high"].strength, "fresh")
        # issue 30: the record's composed guarantee, both channels: two labels at epsilon 1, pixels not read
        assert r["spent"]["epsilon"] == pytest.approx(2.0, abs=1e-4) and r["spent"]["pixels_epsilon"] == 0
        assert r["spent"]["delta"] == 1e-6 and r["spent"]["pixels_protected"] is True
        original = dict(zip(SYNTHETIC_ATTRIBUTES, base[index][1].int().tolist()))
        assert {k for k in original if original[k] != r["released_attributes"][k]} <= {"eyeglasses", "smiling"}
        assert np.array(Image.open(tmp_path / r["file"])).shape == (32, 32, 3)
    # item 11: the report holds no seed and no original attribute; what does is owner-only
    assert "seed" not in json.dumps(report["images"]) and "original" not in json.dumps(report)
    mode = lambda p: stat.S_IMODE((tmp_path / p).stat().st_mode)  # noqa: E731
    assert (mode("revision"), mode("revision/manifest.json"), mode("before_after.png")) == (0o700, 0o600, 0o600)
    assert Image.open(tmp_path / "before_after.png").size[0] > 64
    # item 8: the release went to the dataset's database, not to OUT
    assert report["ledger"] == str(ledger_path_for(DATA)) == str(veil_home / "datasets/synthetic-seed0.sqlite")
    assert not list(tmp_path.glob("*.sqlite"))
    with PrivacyLedger(report["ledger"]) as ledger:
        assert [(r.image_id, r.epsilon, r.level) for r in ledger.releases()] == \
            [("synth-0-000003", 1.0, "high"), ("synth-0-000010", 1.0, "high")]
    revised = FaceDataModule(**{**DATA, "revision": str(tmp_path / "revision")}).dataset  # the owner's revision loads
    assert revised.changed_ids == ["synth-0-000003", "synth-0-000010"]
    released = report["images"][0]["released_attributes"]
    assert revised[3][1].tolist() == [float(released[n]) for n in SYNTHETIC_ATTRIBUTES]
    # the publishable copy: no original attributes, and it does not pass for an owner revision
    assert main(["privacy", "publish-revision", "--revision", str(tmp_path / "revision"), "--out",
                 str(tmp_path / "pub")]) == 0
    assert "original_attributes" not in (tmp_path / "pub" / "manifest.json").read_text()
    with pytest.raises(DataError, match="veil-revision-published"):
        FaceDataModule(**{**DATA, "revision": str(tmp_path / "pub")}).dataset


@pytest.mark.parametrize("encoding", ["invert", "noise"])
def test_a_seed_makes_draws_reproducible_and_pixels_only_when_inverted(checkpoint, tmp_path, encoding):
    """--seed repeats the randomized response; the secret encoding noise of a noise edit never repeats."""
    for run in ("a", "b"):  # each its own database: the draw depends on how often the image was released before
        # issue 30: inversion needs the dataset to say its pixels are not protected; a noise edit at strength 1 is
        # priced (epsilon ~ 100 on the pixels here) beyond the default budget
        with PrivacyLedger(tmp_path / f"{run}.sqlite", budget=math.inf) as book:
            if encoding == "invert":
                book.set_pixel_policy("not-protected", reason="this test releases inversions")
        assert _edit(checkpoint, tmp_path / run, "--first", "3", "--level", "max", "--seed", "4",
                     "--encoding", encoding, "--ledger", str(tmp_path / f"{run}.sqlite")) == 0
    a, b = (json.loads((tmp_path / r / "edit_report.json").read_text())["images"] for r in ("a", "b"))
    assert [r["released_attributes"] for r in a] == [r["released_attributes"] for r in b]
    assert {r["encoding"] for r in a} == {encoding}
    pixels = lambda run: [np.array(Image.open(tmp_path / run / r["file"])) for r in a]
    same = [bool((x == y).all()) for x, y in zip(pixels("a"), pixels("b"))]
    assert same == [encoding == "invert"] * 3


def test_the_budget_counts_every_run_on_the_dataset(checkpoint, tmp_path, capsys):
    # Item 8: three runs at budget 8 (medium: epsilon 2 on each of two labels, 4 per release and record) used to
    # spend 12 each, each with a fresh OUT/ledger.sqlite.
    common = ("--first", "2", "--level", "medium")
    assert _edit(checkpoint, tmp_path / "one", *common, "--budget", "8") == 0  # creates the database at budget 8
    assert _edit(checkpoint, tmp_path / "two", *common) == 0  # 8 per record: at the budget
    assert _edit(checkpoint, tmp_path / "three", *common) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "spent epsilon 8 of its budget 8" in err and "would take it to 12" in err
    assert not (tmp_path / "three" / "revision").exists()
    # a larger --budget on the command line does not raise the stored one ...
    assert _edit(checkpoint, tmp_path / "four", *common, "--budget", "100") == 2
    assert "veil privacy set-budget 100" in capsys.readouterr().err
    with PrivacyLedger.for_dataset(DATA) as book:
        assert book.spent("synth-0-000000", "smiling") == 4.0 and len(book.releases()) == 4 and book.budget == 8.0
        assert book.guarantee("synth-0-000000").epsilon == pytest.approx(8.0, abs=1e-4)
    # ... the explicit, recorded command does
    assert main(["privacy", "set-budget", "12", "--reason", "one more release", "--data", "source=synthetic,seed=0"]) == 0
    assert _edit(checkpoint, tmp_path / "five", *common) == 0


def test_an_unwritable_out_is_refused_before_anything_is_spent(checkpoint, tmp_path, veil_home, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert _edit(checkpoint, tmp_path / "file" / "out", "--first", "2") == 2
    assert "--out" in capsys.readouterr().err and not (veil_home / "datasets").exists()


def test_sweep_previews_without_releasing(checkpoint, tmp_path, veil_home):
    assert _edit(checkpoint, tmp_path, "--first", "3", "--sweep") == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["level"]["name"] for row in sweep["rows"]] == ["low", "medium", "high", "max"]
    width, height = Image.open(tmp_path / "sweep.png").size
    assert height > width  # 5 rows (originals + 4 levels) of 3 images
    assert not (veil_home / "datasets").exists() and not (tmp_path / "revision").exists()
    # item 12: the previews are the owner's: no seed, no original attributes, owner-only files
    assert "original" not in json.dumps(sweep) and "seed" not in sweep
    assert {stat.S_IMODE((tmp_path / f).stat().st_mode) for f in ("sweep.json", "sweep.png")} == {0o600}
    assert _edit(checkpoint, tmp_path / "eps", "--first", "2", "--sweep", "--sweep-epsilons", "0,inf",
                 "--strength", "0.3") == 0
    rows = json.loads((tmp_path / "eps" / "sweep.json").read_text())["rows"]
    assert [(r["level"]["epsilon"], r["level"]["strength"]) for r in rows] == [(0.0, 0.3), ("inf", 0.3)]


def test_sweep_draws_from_a_secret_seed_by_default(checkpoint, tmp_path):
    # Item 12: --sweep used seed 0, so anyone with the ids could recompute which cells flipped. At epsilon 0
    # two sweeps of 8 images x 2 protected attributes agree by chance with probability 2^-16.
    draws = []
    for run in ("a", "b"):
        assert _edit(checkpoint, tmp_path / run, "--first", "8", "--sweep", "--sweep-epsilons", "0",
                     "--strength", "0.2") == 0
        draws.append(json.loads((tmp_path / run / "sweep.json").read_text())["rows"][0]["released_attributes"])
    assert draws[0] != draws[1]
    assert _edit(checkpoint, tmp_path / "c", "--first", "8", "--sweep", "--sweep-epsilons", "0", "--strength", "0.2",
                 "--seed", "3") == 0  # a given seed still reproduces (tests, experiments)
    assert _edit(checkpoint, tmp_path / "d", "--first", "8", "--sweep", "--sweep-epsilons", "0", "--strength", "0.2",
                 "--seed", "3") == 0
    same = [json.loads((tmp_path / r / "sweep.json").read_text())["rows"][0]["released_attributes"] for r in "cd"]
    assert same[0] == same[1]


@pytest.mark.parametrize("extra, option", [
    (("--first", "2", "--level", "ultra"), "--level"),
    (("--ids", "synth-0-999999"), "--ids"),
    (("--first", "2", "--protect", "mustache"), "--protect"),
    (("--first", "2", "--resolution", "64"), "--resolution"),
    (("--first", "2", "--strength", "1.5"), "--strength"),
    (("--first", "2", "--budget", "-1"), "--budget"),
    (("--first", "99"), "--first"),
])
def test_bad_options_are_named(checkpoint, tmp_path, capsys, veil_home, extra, option):
    argv = ["edit", "--checkpoint", checkpoint, "--protect", "smiling", "--steps", "10", "--out", str(tmp_path),
            "--no-check", *extra]
    try:
        code = main(argv)
    except SystemExit as e:  # refused by the argument's type while parsing (argparse exits 2)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse prints its usage above
    assert last.startswith("veil edit: error:") and option in last
    assert not (veil_home / "datasets").exists()  # refused before any database was opened


def test_every_edit_option_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = [a for a in sub.choices["edit"]._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions)


# ------------------------------------------------------------------ a release is all-or-nothing (issue 12)
def _nothing_released(out, veil_home):
    """No file of the edit in ``out`` (no staging folder either) and no release in any database."""
    if out.exists():
        assert [p.name for p in out.iterdir()] in ([], ["keep.txt"])
    for db in (veil_home / "datasets").glob("*.sqlite"):  # glob of a missing folder: nothing
        with PrivacyLedger(db) as book:
            assert book.releases() == []


def test_a_non_finite_edit_is_refused_and_not_charged(checkpoint, tmp_path, veil_home, capsys, monkeypatch):
    # --guidance nan used to release an all-black image, charged; a model that makes NaN pixels now releases nothing
    from veil.lightning_modules.editing.editor import PrivateEditor

    monkeypatch.setattr(PrivateEditor, "edit", lambda self, x, *a, **k: torch.full_like(x, float("nan")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _edit(checkpoint, out, "--first", "2") == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "nothing was released" in err and "Traceback" not in err
    _nothing_released(out, veil_home)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_write_error_charges_nothing_and_leaves_no_file(checkpoint, tmp_path, veil_home, capsys, monkeypatch):
    from veil.jobs import edit as job

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "_before_after", disk_full)
    assert _edit(checkpoint, tmp_path / "out", "--first", "2") == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # it made the folder, and took it back
    _nothing_released(tmp_path / "out", veil_home)


def test_a_failure_while_publishing_rolls_the_releases_back(checkpoint, tmp_path, veil_home, monkeypatch):
    # The files move into OUT inside the ledger transaction: if the last move fails, the ones moved are
    # taken back and the releases are rolled back.
    from veil.jobs import edit as job

    real = job.os.replace

    def fail_on_report(src, dst):
        if str(dst).endswith("edit_report.json"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(job.os, "replace", fail_on_report)
    assert _edit(checkpoint, tmp_path / "out", "--first", "2") == 2
    _nothing_released(tmp_path / "out", veil_home)
    monkeypatch.undo()
    assert _edit(checkpoint, tmp_path / "out", "--first", "2") == 0  # the same --out works afterwards
    with PrivacyLedger.for_dataset(DATA) as book:
        assert len(book.releases()) == 2


def test_a_budget_refusal_leaves_no_file(checkpoint, tmp_path, veil_home):
    assert _edit(checkpoint, tmp_path / "a", "--first", "2", "--level", "medium", "--budget", "4") == 0
    assert _edit(checkpoint, tmp_path / "b", "--first", "2", "--level", "medium") == 2
    assert not (tmp_path / "b").exists()
    with PrivacyLedger.for_dataset(DATA) as book:
        assert len(book.releases()) == 2
