"""`veil edit` end to end on a tiny random checkpoint: files, ledger, revision, sweep, refusals, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from veil.cli import build_parser, main
from veil.lightning_modules.checkpoints import DIFFUSION_KIND as CHECKPOINT_KIND
from veil.lightning_modules.data import FaceDataModule
from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES
from veil.lightning_modules.diffusion.schedule import default_scheduler_config
from veil.lightning_modules.models.unet import AttributeConditionalUNet
from veil.privacy.ledger import ReleaseLedger

KWARGS = dict(num_attributes=6, resolution=32, block_out_channels=(16, 32), attention_levels=(False, True),
              norm_num_groups=8, attention_head_dim=8)
DATA = dict(source="synthetic", root=None, csv=None, attributes=None, resolution=32, num_images=24, seed=0,
            batch_size=8, poisson=True, val_fraction=0.05, test_fraction=0.05, revision=None, num_workers=0)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as `veil train` writes it (the parts load_diffusion_checkpoint reads), random weights."""
    torch.manual_seed(0)
    model = AttributeConditionalUNet(**KWARGS)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": {f"ema.{k}": v for k, v in model.state_dict().items()},
                "veil": {"kind": CHECKPOINT_KIND, "model_kwargs": KWARGS, "scheduler_config": default_scheduler_config(),
                         "attribute_names": list(SYNTHETIC_ATTRIBUTES), "data_spec": DATA,
                         "privacy": {"enabled": False}}}, path)
    return str(path)


def _edit(checkpoint, out, *extra):
    return main(["edit", "--checkpoint", checkpoint, "--protect", "eyeglasses,smiling", "--steps", "10",
                 "--out", str(out), *extra])


def test_edit_writes_images_grid_report_ledger_and_revision(checkpoint, tmp_path):
    assert _edit(checkpoint, tmp_path, "--ids", "synth-0-000003,synth-0-000010", "--level", "high", "--seed", "1") == 0
    report = json.loads((tmp_path / "edit_report.json").read_text())
    assert [r["id"] for r in report["images"]] == ["synth-0-000003", "synth-0-000010"]
    for r in report["images"]:
        assert (r["epsilon"], r["strength"]) == (1.0, 0.7) and isinstance(r["seed"], int)
        assert {k for k in r["original_attributes"] if r["original_attributes"][k] != r["released_attributes"][k]} \
            <= {"eyeglasses", "smiling"}
        assert np.array(Image.open(tmp_path / r["file"])).shape == (32, 32, 3)
    assert Image.open(tmp_path / "before_after.png").size[0] > 64
    with ReleaseLedger(report["ledger"], budget=None) as ledger:
        assert [(r.image_id, r.epsilon, r.level) for r in ledger.releases()] == \
            [("synth-0-000003", 1.0, "high"), ("synth-0-000010", 1.0, "high")]
    revised = FaceDataModule(**{**DATA, "revision": str(tmp_path / "revision")}).dataset
    assert revised.changed_ids == ["synth-0-000003", "synth-0-000010"]
    released = report["images"][0]["released_attributes"]
    assert revised[3][1].tolist() == [float(released[n]) for n in SYNTHETIC_ATTRIBUTES]


def test_a_seed_makes_releases_reproducible(checkpoint, tmp_path):
    for run in ("a", "b"):
        assert _edit(checkpoint, tmp_path / run, "--first", "3", "--level", "max", "--seed", "4") == 0
    a, b = (json.loads((tmp_path / r / "edit_report.json").read_text())["images"] for r in ("a", "b"))
    assert [r["released_attributes"] for r in a] == [r["released_attributes"] for r in b]
    pixels = lambda run: [np.array(Image.open(tmp_path / run / r["file"])) for r in a]
    assert all((x == y).all() for x, y in zip(pixels("a"), pixels("b")))


def test_budget_is_enforced_across_runs_sharing_a_ledger(checkpoint, tmp_path, capsys):
    ledger = str(tmp_path / "shared.sqlite")
    common = ("--first", "2", "--ledger", ledger, "--budget", "3", "--level", "medium")
    assert _edit(checkpoint, tmp_path / "one", *common) == 0  # spends 2.0 per image
    assert _edit(checkpoint, tmp_path / "two", *common) == 2  # 4.0 > 3.0
    err = capsys.readouterr().err
    assert "refused" in err and "spent epsilon 2 of its budget 3" in err and "asks for 2" in err
    assert not (tmp_path / "two" / "revision").exists()
    with ReleaseLedger(ledger, budget=None) as book:
        assert book.spent("synth-0-000000") == 2.0 and len(book.releases()) == 2


def test_sweep_previews_without_releasing(checkpoint, tmp_path):
    assert _edit(checkpoint, tmp_path, "--first", "3", "--sweep") == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["level"]["name"] for row in sweep["rows"]] == ["low", "medium", "high", "max"]
    width, height = Image.open(tmp_path / "sweep.png").size
    assert height > width  # 5 rows (originals + 4 levels) of 3 images
    assert not (tmp_path / "ledger.sqlite").exists() and not (tmp_path / "revision").exists()
    assert _edit(checkpoint, tmp_path / "eps", "--first", "2", "--sweep", "--sweep-epsilons", "0,inf",
                 "--strength", "0.3") == 0
    rows = json.loads((tmp_path / "eps" / "sweep.json").read_text())["rows"]
    assert [(r["level"]["epsilon"], r["level"]["strength"]) for r in rows] == [(0.0, 0.3), ("inf", 0.3)]


@pytest.mark.parametrize("extra, option", [
    (("--first", "2", "--level", "ultra"), "--level"),
    (("--ids", "synth-0-999999"), "--ids"),
    (("--first", "2", "--protect", "mustache"), "--protect"),
    (("--first", "2", "--resolution", "64"), "--resolution"),
    (("--first", "2", "--strength", "1.5"), "--strength"),
    (("--first", "2", "--budget", "-1"), "--budget"),
    (("--first", "99"), "--first"),
])
def test_bad_options_are_named(checkpoint, tmp_path, capsys, extra, option):
    argv = ["edit", "--checkpoint", checkpoint, "--protect", "smiling", "--steps", "10", "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("veil edit: error:") and option in err
    assert not (tmp_path / "ledger.sqlite").exists() or option == "--budget"


def test_every_edit_option_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = [a for a in sub.choices["edit"]._actions if a.dest != "help"]
    assert actions and all(a.help for a in actions)
