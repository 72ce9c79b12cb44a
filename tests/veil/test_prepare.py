"""`veil prepare` on real photos that packages ship (scikit-image's astronaut and cat, matplotlib's portrait of
Grace Hopper): detection, the dataset folder it writes, the owner-only record, and the paste-back of edits."""

import json
import re
import stat

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

from veil.cli import main
from veil.errors import ConfigError, DataError
from veil.jobs.prepare import run_paste_back, run_prepare
from veil.jobs.prepare_faces import feather_mask, read_photo
from veil.privacy.revision_manifest import RevisionChange, write_revision

pytestmark = pytest.mark.usefixtures("single_thread")

FACE_NAME = re.compile(r"^face-[0-9a-f]{12}\.png$")


def _hopper() -> np.ndarray:
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.array(im.convert("RGB").resize((437, 512), Image.Resampling.BICUBIC))  # (512, 437, 3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of photos named as an owner might name them: a portrait, a cat, a group of three tiles
    (astronaut | cat | Grace Hopper) and a file that is not an image."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut, cat = data.astronaut(), np.array(Image.fromarray(data.chelsea()).resize((400, 512)))
    Image.fromarray(astronaut).save(folder / "eileen_collins_smiling.png")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(np.concatenate([astronaut, cat, _hopper()], axis=1)).save(folder / "group.png")  # 512 x 1349
    (folder / "notes.jpg").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def prepared(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "faces"
    return out, run_prepare(photos=[photos], out=out, size=64, attributes=["smiling"])


def _record(out) -> dict:
    return json.loads((out / "private/prepare.json").read_text())


def _photo(record, name) -> dict:
    return next(p for p in record["photos"] if p["name"] == name)


def test_the_astronaut_has_one_face_in_a_plausible_box_and_a_pseudonymous_crop(prepared):
    out, _ = prepared
    face, = _photo(_record(out), "eileen_collins_smiling.png")["faces"]
    left, top, w, h = face["box"]  # her face: about rows 30-220, cols 150-320 of the 512 x 512 photo (hair included)
    assert 150 <= left and left + w <= 320 and 30 <= top and top + h <= 220 and w >= 60
    assert FACE_NAME.match(face["id"])
    crop = np.array(Image.open(out / face["id"]))
    assert crop.shape == (64, 64, 3)
    # the crop is the face: centred, about half of it, and mostly skin in the middle
    middle = crop[24:40, 24:40].astype(float)
    assert middle[..., 0].mean() > middle[..., 2].mean() + 20  # skin: red over blue (the helmet and suit are not)


def test_labels_and_crops_carry_no_photo_name_or_box_only_the_private_record_does(prepared):
    out, summary = prepared
    shared = [p for p in out.iterdir() if p.name != "private"]
    assert sorted(p.name for p in shared if not FACE_NAME.match(p.name)) == ["labels.csv"]
    labels = (out / "labels.csv").read_text()
    assert labels.splitlines()[0] == "id,smiling" and len(labels.splitlines()) == 1 + summary["faces"]
    for p in shared:
        blob = p.read_bytes()
        assert b"eileen" not in blob and b"group" not in blob and b"prepare" not in blob
    record = (out / "private/prepare.json").read_text()
    assert "eileen_collins_smiling.png" in record and '"box"' in record
    assert stat.S_IMODE((out / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "private/prepare.json").stat().st_mode) == 0o600


def test_a_cat_is_no_face_and_a_broken_file_is_named_not_fatal(prepared):
    _, summary = prepared
    assert summary["no_face"] == ["chelsea.png"]
    assert [u["photo"] for u in summary["unreadable"]] == ["notes.jpg"] and "notes.jpg" in summary["unreadable"][0]["error"]
    assert summary["photos"] == 4 and summary["faces"] == 3


def test_a_group_photo_gives_one_face_per_person_left_to_right(prepared):
    out, _ = prepared
    faces = _photo(_record(out), "group.png")["faces"]
    centres = [f["box"][0] + f["box"][2] / 2 for f in faces]
    assert [f["index"] for f in faces] == [0, 1]
    assert 150 < centres[0] < 320  # the astronaut's tile is columns 0-511
    assert 912 < centres[1] < 1349  # Grace Hopper's is 912-1348; nothing on the cat (512-911)
    assert len({f["id"] for f in faces}) == 2


def test_labels_from_a_csv_by_photo_and_face_and_the_folder_loader_reads_the_crops(photos, tmp_path):
    from veil.lightning_modules.data.image_folder import ImageFolderCSV

    (tmp_path / "l.csv").write_text("photo,face,smiling,hat\neileen_collins_smiling.png,,1,-1\ngroup.png,1,0,1\n")
    out = tmp_path / "faces"
    summary = run_prepare(photos=[photos / "eileen_collins_smiling.png", photos / "group.png"], out=out, size=32,
                          csv_path=tmp_path / "l.csv")
    assert summary["unlabelled"] == 1  # the group's face 0 has no row
    record = _record(out)
    ids = {(p["name"], f["index"]): f["id"] for p in record["photos"] for f in p["faces"]}
    rows = dict(line.split(",", 1) for line in (out / "labels.csv").read_text().splitlines()[1:])
    assert rows[ids["eileen_collins_smiling.png", 0]] == "1,-1" and rows[ids["group.png", 1]] == "0,1"
    assert rows[ids["group.png", 0]] == ","
    kept = [i for i in rows if rows[i] != ","]  # the loader refuses empty cells: keep the labelled faces
    (out / "labels.csv").write_text("id,smiling,hat\n" + "".join(f"{i},{rows[i]}\n" for i in kept))
    ds = ImageFolderCSV(out, out / "labels.csv", resolution=32)
    assert ds.attribute_names == ["smiling", "hat"] and len(ds) == 2
    assert np.array_equal(ds.image_uint8(0), np.array(Image.open(out / ds.files[0])))  # the crop is what it trains on


def test_the_command_prints_the_summary_and_refuses_bad_input(photos, tmp_path, capsys):
    assert main(["prepare", "--photos", str(photos), "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "prepared 3 faces from 2 of 4 photos" in printed and "no face: chelsea.png" in printed
    assert "unreadable: " in printed and "notes.jpg" in printed and "no attribute columns yet" in printed
    assert main(["prepare", "--photos", str(photos), "--out", str(tmp_path / "d")]) == 2  # used --out
    assert main(["prepare", "--out", str(tmp_path / "e")]) == 2  # no --photos
    assert main(["prepare", "--paste-back", "--photos", str(photos), "--dataset", "x", "--edits", "y",
                 "--out", str(tmp_path / "f")]) == 2
    assert main(["prepare", "--photos", str(tmp_path / "absent"), "--out", str(tmp_path / "g")]) == 2
    assert "--photos" in capsys.readouterr().err
    with pytest.raises(DataError, match="no face found in 1 photos"):
        run_prepare(photos=[photos / "chelsea.png"], out=tmp_path / "h")
    assert not (tmp_path / "h").exists()  # nothing written
    with pytest.raises(ConfigError, match="--margin"):
        run_prepare(photos=[photos], out=tmp_path / "i", margin=5)


# ------------------------------------------------------------------ paste-back
def _fake_edit(out, dataset, ids, *, withheld=(), colour=None):
    """A revision laid out as `veil edit --out OUT` writes it: each face inverted (or a solid colour)."""
    images = {}
    for face_id in ids:
        x = np.asarray(Image.open(dataset / face_id), np.float32) / 127.5 - 1  # (s, s, 3) in [-1, 1]
        images[face_id] = (np.full_like(x, colour / 127.5 - 1) if colour is not None else -x).transpose(2, 0, 1)
    write_revision(out / "revision", base_spec={"source": "folder", "root": str(dataset), "resolution": 64},
                   attribute_names=["smiling"], images=images, withheld=list(withheld),
                   changes=[RevisionChange(id=i, original_attributes={"smiling": 1}, released_attributes={"smiling": -1})
                            for i in ids])
    return out


def _jumps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float32).mean(axis=2)
    return np.abs(np.diff(x, axis=1)), np.abs(np.diff(x, axis=0))


def test_paste_back_changes_the_released_face_only_and_smoothly(prepared, photos, tmp_path):
    out, _ = prepared
    record = _record(out)
    group = _photo(record, "group.png")
    released, refused = group["faces"][0]["id"], group["faces"][1]["id"]
    edits = _fake_edit(tmp_path / "edits", out, [released], withheld=[refused], colour=128)
    summary = run_paste_back(dataset=out, edits=edits, out=tmp_path / "shared")
    assert summary["written"] == ["group.png"] and summary["withheld"] == [refused]
    assert summary["not_written"] == ["eileen_collins_smiling.png"]  # no face of hers released: not written
    original, pasted = read_photo(photos / "group.png"), np.array(Image.open(tmp_path / "shared/group.png"))
    left, top, side = group["faces"][0]["square"]
    changed = np.argwhere(np.any(original != pasted, axis=2))
    assert changed[:, 0].min() >= top and changed[:, 0].max() < top + side  # nothing outside the face's square
    assert changed[:, 1].min() >= left and changed[:, 1].max() < left + side
    bl, bt, bw, bh = group["faces"][0]["box"]
    assert np.abs(pasted[bt + bh // 2, bl + bw // 2].astype(int) - 128).max() <= 1  # the middle is the edit
    # no seam: no jump between neighbouring pixels grows by more than the feather's slope allows, where pasting
    # the square with a hard edge would add the full step between the edit and the photo
    hard = original.copy()
    hard[max(top, 0):top + side, max(left, 0):left + side] = 128
    excess = [np.max(p - o) for p, o in zip(_jumps(pasted), _jumps(original))]
    hard_excess = [np.max(p - o) for p, o in zip(_jumps(hard), _jumps(original))]
    assert max(excess) < 15 and min(hard_excess) > 60, (excess, hard_excess)
    far, withheld_box = original.copy(), group["faces"][1]["box"]
    x, y, w, h = withheld_box
    assert np.array_equal(pasted[y:y + h, x:x + w], far[y:y + h, x:x + w])  # the refused face stays the original


def test_feather_mask_is_one_in_the_middle_zero_at_the_edges_and_smooth():
    for side in (101, 400):
        m = feather_mask(side)
        c = side // 2
        assert m[c, c] == 1 and m[0, c] == 0 and m[c, 0] == 0 and m[0, 0] == 0 and m.min() >= 0 and m.max() <= 1
        # smoothstep over 0.4 of the half side: its steepest step is 1.5 / (0.2 * side) per pixel
        steepest = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
        assert steepest <= 1.5 / (0.2 * side) * 1.05


def test_paste_back_refuses_a_changed_photo_and_edits_of_another_dataset(prepared, photos, tmp_path):
    out, _ = prepared
    with pytest.raises(DataError, match="not faces of"):
        run_paste_back(dataset=out, edits=_stranger(tmp_path), out=tmp_path / "x")
    copy = tmp_path / "copy"
    copy.mkdir()
    Image.fromarray(data.astronaut()).save(copy / "eileen.png")
    run_prepare(photos=[copy / "eileen.png"], out=tmp_path / "ds2")
    face2 = _record(tmp_path / "ds2")["photos"][0]["faces"][0]["id"]
    edits = _fake_edit(tmp_path / "b", tmp_path / "ds2", [face2])
    Image.fromarray(data.astronaut()[:, ::-1]).save(copy / "eileen.png")  # the photo changed after prepare
    with pytest.raises(DataError, match="changed since `veil prepare`"):
        run_paste_back(dataset=tmp_path / "ds2", edits=edits, out=tmp_path / "y")
    assert main(["prepare", "--paste-back", "--dataset", str(tmp_path), "--edits", str(edits), "--out",
                 str(tmp_path / "z")]) == 2  # not a prepared folder


def _stranger(tmp_path):
    """A revision whose one edit is of an id that is no face of the prepared dataset."""
    (tmp_path / "s").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "s/face-000000000000.png")
    return _fake_edit(tmp_path / "s_edit", tmp_path / "s", ["face-000000000000.png"])


def test_astronaut_end_to_end_prepare_tiny_edit_paste_back(tmp_path):
    """The walk-through on a tiny random model: prepare the astronaut at 32 px, `veil edit --no-check` the
    prepared folder, paste the released face back."""
    from photo_helpers import prepare_and_edit_astronaut

    ds, _ = prepare_and_edit_astronaut(tmp_path)
    assert main(["prepare", "--paste-back", "--dataset", str(ds), "--edits", str(tmp_path / "edits"),
                 "--out", str(tmp_path / "shared")]) == 0
    original, pasted = data.astronaut(), np.array(Image.open(tmp_path / "shared/astronaut.png"))
    left, top, side = _record(ds)["photos"][0]["faces"][0]["square"]
    assert np.array_equal(pasted[top + side + 5:], original[top + side + 5:])  # below the face: untouched
    assert np.abs(pasted[top:top + side, left:left + side].astype(int)
                  - original[top:top + side, left:left + side]).mean() > 5
