"""Issue 34: a label-free public denoiser (the demo's shipped UNet, trained on the synthetic faces) edits a folder
of the owner's photos whose CSV names other attributes: the guide and the CSV decide the attributes, the
denoiser's recorded names are ignored."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from veil.cli import main
from veil.jobs import train_classifier as TC
from veil.lightning_modules.data.datamodule import FaceDataModule
from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES

pytestmark = pytest.mark.usefixtures("single_thread")

PUBLIC_UNET = Path(__file__).resolve().parents[3] / "veil/demo/models/public_unet"
TINY = {"channels": [8, 8, 8], "feature_dim": 8, "norm_num_groups": 4}


def _folder(root: Path, n: int = 24) -> Path:
    """``n`` synthetic faces saved as an owner's photos, labels.csv naming ``glasses,smile`` (not the UNet's names)."""
    faces = FaceDataModule(source="synthetic", num_images=n, resolution=32, seed=5).dataset
    root.mkdir()
    glasses, smile = SYNTHETIC_ATTRIBUTES.index("eyeglasses"), SYNTHETIC_ATTRIBUTES.index("smiling")
    rows = ["file,glasses,smile"]
    for i in range(n):
        x, a = faces[i]
        pixels = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"photo_{i:02d}.png")
        rows.append(f"photo_{i:02d}.png,{int(a[glasses])},{int(a[smile])}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _train(out: Path, data: Path, *, noise_conditional: bool) -> Path:
    recipe = TC.ClassifierRecipe(epochs=1, batch_size=8, refit_head=False,
                                 model={**TINY, "noise_conditional": noise_conditional})
    dm = FaceDataModule(source="folder", root=str(data), csv=str(data / "labels.csv"), resolution=32,
                        batch_size=8, poisson=False, val_fraction=0.0, test_fraction=0.25)
    TC.train_classifier(recipe=recipe, datamodule=dm, out=out)
    return out


def test_label_free_public_unet_edits_a_folder_with_its_own_attribute_names(tmp_path):
    meta = json.loads((PUBLIC_UNET / "model/veil_model.json").read_text())
    assert meta["cond_drop_prob"] == 1.0 and "glasses" not in meta["attribute_names"]  # label-free, other names
    data = _folder(tmp_path / "photos")
    guide = _train(tmp_path / "guide", data, noise_conditional=True)
    judge = _train(tmp_path / "judge", data, noise_conditional=False)
    code = main(["edit", "--checkpoint", str(PUBLIC_UNET), "--classifier", str(guide), "--checker", str(judge),
                 "--data", "folder", "--root", str(data), "--csv", str(data / "labels.csv"), "--first", "2",
                 "--protect", "glasses", "--steps", "3", "--out", str(tmp_path / "edits")])
    assert code == 0  # HEAD: "'smiling' is not a column of .../labels.csv"
    revision = json.loads((tmp_path / "edits/revision/manifest.json").read_text())
    assert revision["attribute_names"] == ["glasses", "smile"]
    report = json.loads((tmp_path / "edits/edit_report.json").read_text())
    assert [i["id"] for i in report["images"]] == ["photo_00.png", "photo_01.png"]
    for row in report["images"]:
        if row["released_attributes"] is not None:
            assert set(row["released_attributes"]) == {"glasses", "smile"}


def test_a_label_free_editor_takes_the_guides_names_and_feeds_the_denoiser_zeros(tmp_path):
    """The editor's attributes are the guide's; the denoiser still gets zeros as wide as it was built (6)."""
    import torch

    from veil.lightning_modules.editing.editor import PrivateEditor

    data = _folder(tmp_path / "photos", n=16)
    guide = _train(tmp_path / "guide", data, noise_conditional=True)
    editor = PrivateEditor.from_checkpoint(PUBLIC_UNET, classifier=guide, classifier_scale=5.0, num_steps=2)
    assert editor.attribute_names == ["glasses", "smile"] and editor.label_free
    seen = []
    model = editor.model
    original = model.forward
    model.forward = lambda x, t, attrs: (seen.append(attrs.detach().clone()), original(x, t, attrs))[1]
    x = torch.zeros(1, 3, 32, 32)
    a = torch.tensor([[1.0, -1.0]])
    out = editor.edit(x, a, torch.tensor([[-1.0, -1.0]]), strength=0.5, protected=["glasses"], encoding="noise")
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert seen and all(s.shape == (1, 6) and not s.any() for s in seen)


def test_the_export_of_a_label_free_unet_edits_with_the_guides_attributes(models, tmp_path):
    """`veil export` of a label-free UNet (the suite's tiny one: 6 synthetic names, as the shipped UNet, whose
    export took a minute more) with a guide and a checker of 2 other attributes: verified against PyTorch, and
    the ONNX Runtime editor edits with the guide's names."""
    from veil.editing.load import load_editor

    unet = models / "unet"
    meta = json.loads((unet / "model/veil_model.json").read_text())
    assert meta["cond_drop_prob"] == 1.0 and len(meta["attribute_names"]) == 6  # label-free, other names
    data = _folder(tmp_path / "photos", n=16)
    guide = _train(tmp_path / "guide", data, noise_conditional=True)
    judge = _train(tmp_path / "judge", data, noise_conditional=False)
    assert main(["export", "--checkpoint", str(unet), "--classifier", str(guide), "--checker", str(judge),
                 "--steps", "2", "--out", str(tmp_path / "export")]) == 0  # HEAD: zeros as wide as the guide's
    meta = json.loads((tmp_path / "export/veil_export.json").read_text())
    assert meta["attribute_names"] == ["glasses", "smile"] and meta["label_free"] is True
    editor = load_editor(tmp_path / "export", runtime="ort", steps=2)
    assert list(editor.attribute_names) == ["glasses", "smile"] and editor.can_check
