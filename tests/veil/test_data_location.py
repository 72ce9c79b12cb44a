"""Issue 34: a dataset is its content at a verified absolute location. `veil serve --dataset` refuses a folder
that is not the export's data; data.root is recorded absolute, and a recorded path that is relative, gone, or
now holds other images is refused saying which file it came from."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from veil.errors import ConfigError, DataError
from veil.lightning_modules.data.datamodule import FaceDataModule
from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES
from veil.privacy.locations import dataset_slug
from veil.serve.dataset import FolderDataset, check_export_data

pytestmark = pytest.mark.usefixtures("single_thread")


def _folder(root, seed=0, n=4):
    root.mkdir(parents=True)
    rows = ["file," + ",".join(SYNTHETIC_ATTRIBUTES)]
    for i in range(n):
        pixels = np.random.default_rng(seed * 100 + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"p{i}.png")
        rows.append(f"p{i}.png," + ",".join(["1"] * len(SYNTHETIC_ATTRIBUTES)))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _spec(root):
    return {"source": "folder", "root": str(root), "csv": str(root / "labels.csv"), "resolution": 32}


# ------------------------------------------------------------------ veil serve --dataset
def test_serve_dataset_must_be_the_exports_data_by_content(tmp_path):
    data, other = _folder(tmp_path / "photos"), _folder(tmp_path / "others", seed=1)
    check_export_data(data, _spec(data))
    shutil.copytree(data, tmp_path / "copy")  # moved or copied: the same images, the same dataset
    check_export_data(tmp_path / "copy", _spec(data))
    with pytest.raises(DataError, match="not one image file in common"):
        check_export_data(other, _spec(data))  # HEAD: any folder was served and charged by file name
    with pytest.raises(DataError, match="synthetic faces"):
        check_export_data(data, {"source": "synthetic", "seed": 0})
    with pytest.raises(DataError, match="relative"):
        check_export_data(data, {**_spec(data), "root": "photos"})
    with pytest.raises(DataError, match="records no data spec"):
        check_export_data(data, {})


def test_create_app_refuses_a_dataset_that_is_not_the_exports(tmp_path):
    from veil.serve.app import create_app

    data, other = _folder(tmp_path / "photos"), _folder(tmp_path / "others", seed=1)
    picked = FolderDataset(other, attribute_names=list(SYNTHETIC_ATTRIBUTES), resolution=32)
    with pytest.raises(DataError, match="not one image file in common"):  # before the editor or the store is touched
        create_app(editor=None, store=None, data_spec=_spec(data), dataset=picked)


# ------------------------------------------------------------------ data.root: absolute, verified, its origin said
def test_data_root_is_recorded_absolute(tmp_path, monkeypatch):
    _folder(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    spec = FaceDataModule(source="folder", root="photos", csv="photos/labels.csv", resolution=32).spec()
    assert spec["root"] == str((tmp_path / "photos").resolve()) and os.path.isabs(spec["csv"])
    assert FaceDataModule(source="synthetic", root=None).spec()["root"] is None


def _edit_inputs(run, **data):
    from veil.jobs.edit import load_edit_inputs

    return load_edit_inputs(checkpoint=run, data=data or None, ids=None, first=1, protect=["smiling"], steps=2,
                            guidance=None)


def test_a_recorded_root_that_is_relative_gone_or_replaced_is_refused_naming_its_origin(tmp_path, monkeypatch):
    from dp_helpers import write_tiny_release

    data = _folder(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    old = write_tiny_release(tmp_path / "old", data_spec={**_spec(data), "root": "photos", "csv": "photos/labels.csv"})
    with pytest.raises(ConfigError, match=r"data\.root 'photos' from .*old/model/veil_model\.json.*relative"):
        _edit_inputs(old)  # HEAD: used ./photos, whichever folder that is from here
    dm = _edit_inputs(old, source="folder", root=str(data), csv=str(data / "labels.csv"))[1]  # the fix it names
    assert dm.root == str(data.resolve())

    run = write_tiny_release(tmp_path / "run", data_spec=_spec(data))
    assert _edit_inputs(run)[1].root == str(data)
    dataset_slug(_spec(data))  # what recording a run or a release does: the index learns the folder's images
    for f in data.glob("*.png"):  # the same path now holds other photos under the same names
        Image.fromarray(np.random.default_rng(99).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f)
    with pytest.raises(DataError, match=r"data\.root .* from .*run/model/veil_model\.json.*no longer holds"):
        _edit_inputs(run)
    shutil.rmtree(data)
    with pytest.raises(DataError, match=r"data\.root .* from .*run/model/veil_model\.json.*no such folder"):
        _edit_inputs(run)


# ------------------------------------------------------------------ unlearn and revisions check recorded paths too
def _replace_images(data):
    dataset_slug(_spec(data))  # what recording a run or a release does: the index learns the folder's images
    for f in data.glob("*.png"):
        Image.fromarray(np.random.default_rng(99).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f)


def test_unlearn_checks_the_models_recorded_data_naming_the_model(tmp_path, monkeypatch):
    from veil.jobs.unlearn import UnlearningData

    data = _folder(tmp_path / "photos")
    (tmp_path / "rev").mkdir()
    monkeypatch.chdir(tmp_path)

    def build(spec):
        return UnlearningData.build({"veil": {"data_spec": spec}}, tmp_path / "rev", origin="the model runs/clf")

    with pytest.raises(ConfigError, match=r"--model.*data\.root 'photos' from the model runs/clf.*relative"):
        build({**_spec(data), "root": "photos"})  # HEAD: read ./photos, whichever folder that is from here
    _replace_images(data)
    with pytest.raises(DataError, match=r"from the model runs/clf: this folder no longer holds.*put that folder back"):
        build(_spec(data))  # HEAD: unlearned (and retrained) on other photos under the same names
    shutil.rmtree(data)
    with pytest.raises(DataError, match=r"data\.root .* from the model runs/clf: no such folder"):
        build(_spec(data))


def _revision(tmp_path, base):
    import json

    from veil.privacy.revision_manifest import FORMAT

    rev = tmp_path / "rev"
    rev.mkdir()
    (rev / "manifest.json").write_text(json.dumps({"format": FORMAT, "attribute_names": list(SYNTHETIC_ATTRIBUTES),
                                                   "base": base, "changes": []}))
    return rev


@pytest.mark.parametrize("use", ["--data REVISION", "train_classifier(data=REVISION)", "privacy_account"])
def test_a_revision_whose_base_folder_now_holds_other_images_is_refused_naming_the_revision(tmp_path, use):
    from veil import api
    from veil.data_arg import parse_data_arg

    data = _folder(tmp_path / "photos")
    rev = _revision(tmp_path, _spec(data))
    read = {"--data REVISION": lambda: parse_data_arg(str(rev), keep_revision=True),
            "train_classifier(data=REVISION)": lambda: api._classifier_data(str(rev)),
            "privacy_account": lambda: api.privacy_account(str(rev))}[use]
    read()  # the images it was made from: accepted
    _replace_images(data)
    with pytest.raises(DataError, match=r"from the revision .*rev \(its manifest\.json\): this folder no longer holds"):
        read()  # HEAD: trained on (or charged to) the other images the folder now holds


def test_a_revision_with_a_relative_base_is_refused(tmp_path):
    from veil.data_arg import parse_data_arg

    rev = _revision(tmp_path, {**_spec(_folder(tmp_path / "photos")), "root": "photos"})
    with pytest.raises(ConfigError, match=r"data\.root 'photos' from the revision .*relative"):
        parse_data_arg(str(rev))


# ------------------------------------------------------------------ serve names a pick by the CSV's spelling
def test_a_pick_is_the_record_veil_edit_charges_when_the_csv_and_the_disk_spell_a_name_apart(tmp_path):
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    data = _folder(tmp_path / "photos", n=2)
    (data / "p0.png").rename(data / decomposed)  # as a macOS copy stores it; the CSV is typed composed
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "stray.png")  # on disk, in no CSV row
    rows = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join([rows[0], rows[1].replace("p0.png", composed), rows[2]]) + "\n")
    charged = FaceDataModule(**{**_spec(data), "attributes": list(SYNTHETIC_ATTRIBUTES)}).dataset.ids
    assert charged == [composed, "p1.png"]  # the record ids veil edit charges: the CSV's spelling

    copy = tmp_path / "picked"
    shutil.copytree(data, copy)
    picked = FolderDataset(copy, attribute_names=list(SYNTHETIC_ATTRIBUTES), resolution=32)
    assert picked.identify_by_content(data, _spec(data)) == []
    assert picked.ids == [composed, "p1.png"]  # HEAD: the decomposed on-disk name, a second record of one photo
    assert picked.image_png(composed)
    stray = FolderDataset(copy, attribute_names=list(SYNTHETIC_ATTRIBUTES), resolution=32,
                          csv_path=_stray_csv(copy))
    assert stray.identify_by_content(data, _spec(data)) == ["stray.png"]  # not a record of the data: not offered
    (data / "labels.csv").unlink()
    with pytest.raises(DataError, match="data CSV .* is gone"):
        FolderDataset(copy, attribute_names=list(SYNTHETIC_ATTRIBUTES), resolution=32).identify_by_content(
            data, _spec(data))


def _stray_csv(folder):
    path = folder.parent / "stray.csv"
    ones = ",".join(["1"] * len(SYNTHETIC_ATTRIBUTES))
    path.write_text("file," + ",".join(SYNTHETIC_ATTRIBUTES) + f"\nstray.png,{ones}\n")
    return path
