"""Tests of veil.lightning_modules.data: synthetic faces, CelebA, folder + CSV, revisions, the DataModule.

Fast and deterministic: fake CelebA and CSV folders are written into tmp_path, synthetic sets are
small, and the one learned model (a tiny CNN on 1000 synthetic faces) trains in a few seconds.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from veil.lightning_modules.data.celeba import CELEBA_ATTRIBUTES, CelebA
from veil.lightning_modules.data.datamodule import FaceCollate, FaceDataModule
from veil.lightning_modules.data.image_folder import ImageFolderCSV
from veil.lightning_modules.data.revision import (
    RevisedDataset,
    RevisionChange,
    load_manifest,
    write_revision,
)
from veil.lightning_modules.data.synthetic_faces import (
    SYNTHETIC_ATTRIBUTES,
    SyntheticFaces,
    render_face,
    save_grid,
)

from veil.errors import ConfigError, DataError

GREEN = (40, 180, 60)


# -- synthetic faces --------------------------------------------------------------------------------
def test_synthetic_same_seed_is_byte_identical_and_seeds_differ():
    a, b = SyntheticFaces(num_images=6, seed=4), SyntheticFaces(num_images=6, seed=4)
    c = SyntheticFaces(num_images=6, seed=5)
    for i in range(6):
        assert np.array_equal(a.image_uint8(i), b.image_uint8(i))
        assert not np.array_equal(a.image_uint8(i), c.image_uint8(i))
    assert torch.equal(a.attribute_matrix, b.attribute_matrix)
    assert a.ids == [f"synth-4-{i:06d}" for i in range(6)] and len(set(c.ids)) == 6


def test_synthetic_image_depends_only_on_seed_and_index():
    small, large = SyntheticFaces(num_images=10, seed=2), SyntheticFaces(num_images=100, seed=2)
    for i in (0, 3, 9):
        assert torch.equal(small[i][0], large[i][0]) and torch.equal(small[i][1], large[i][1])


@pytest.mark.parametrize("resolution", [32, 64])
def test_synthetic_item_format(resolution):
    ds = SyntheticFaces(num_images=4, resolution=resolution, seed=0)
    image, attrs = ds[1]
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.1
    assert attrs.shape == (6,) and attrs.dtype == torch.float32 and set(attrs.tolist()) <= {-1.0, 1.0}
    assert ds.attribute_matrix.shape == (4, 6) and len(ds) == 4 and ds.resolution == resolution
    assert torch.equal(ds[-1][0], ds[3][0])


def test_synthetic_attribute_subset_keeps_values_and_order():
    full = SyntheticFaces(num_images=50, seed=1)
    sub = SyntheticFaces(num_images=50, seed=1, attributes=["pale_skin", "smiling"])
    assert sub.attribute_names == ["pale_skin", "smiling"]
    assert torch.equal(sub.attribute_matrix, full.attribute_matrix[:, [5, 0]])
    assert torch.equal(sub[7][0], full[7][0])  # hidden attributes are still drawn: the same picture


@pytest.mark.parametrize("kwargs, option", [
    (dict(attributes=["smiling", "glasses"]), "glasses"),
    (dict(resolution=40), "resolution"),
    (dict(resolution=16), "resolution"),
    (dict(num_images=0), "num_images"),
])
def test_synthetic_bad_arguments_raise_config_error(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        SyntheticFaces(**kwargs)


def test_synthetic_attributes_are_balanced_and_independent():
    m = SyntheticFaces(num_images=4096, seed=0).attribute_matrix  # (N, 6), no rendering needed
    assert m.mean(0).abs().max() < 0.08  # each mean of +-1 coins has sd 1/64
    corr = torch.corrcoef(m.T) - torch.eye(6)
    assert corr.abs().max() < 0.08


def test_render_face_counterfactuals_share_the_person():
    attrs = dict.fromkeys(SYNTHETIC_ATTRIBUTES, False)
    base = render_face(attrs, resolution=32, rng=np.random.default_rng(11))
    again = render_face(attrs, resolution=32, rng=np.random.default_rng(11))
    glasses = render_face({**attrs, "eyeglasses": True}, resolution=32, rng=np.random.default_rng(11))
    assert base.shape == (32, 32, 3) and base.dtype == np.uint8 and np.array_equal(base, again)
    changed = np.abs(glasses.astype(int) - base.astype(int)).max(axis=2) > 12
    assert 10 < changed.sum() < 300  # the glasses, not the whole picture
    with pytest.raises(ConfigError, match="hat"):
        render_face({"smiling": True}, resolution=32, rng=np.random.default_rng(0))


def test_save_grid_writes_png(tmp_path):
    images = SyntheticFaces(num_images=8, seed=0)
    path = save_grid(torch.stack([images[i][0] for i in range(8)]), tmp_path / "grid.png", nrow=4)
    with Image.open(path) as im:
        assert im.size == (4 * 34 + 2, 2 * 34 + 2) and im.mode == "RGB"


@pytest.fixture(scope="module")
def faces_and_cnn_accuracy():
    """1000 training / 300 held-out faces at 32px, and a tiny CNN's held-out accuracy per attribute."""
    ds = SyntheticFaces(num_images=1300, seed=7).render_all()
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (1300, 3, 32, 32)
    y = (ds.attribute_matrix > 0).float()  # (1300, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is faster than two on a shared, busy CPU
    torch.manual_seed(0)
    net = nn.Sequential(  # 32 -> 32 -> 16 -> 8 -> 4
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 6),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        for idx in torch.randperm(1000, generator=g).split(50):
            loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = ((net(x[1000:]) > 0).float() == y[1000:]).float().mean(0)  # (6,)
    torch.set_num_threads(threads)
    return x, y, accuracy


def test_attributes_are_learnable_by_a_small_cnn(faces_and_cnn_accuracy):
    _, _, accuracy = faces_and_cnn_accuracy
    for name, acc in zip(SYNTHETIC_ATTRIBUTES, accuracy.tolist()):
        assert acc > 0.8, f"{name}: held-out accuracy {acc:.3f}"


def test_no_single_pixel_decides_an_attribute(faces_and_cnn_accuracy):
    x, y, accuracy = faces_and_cnn_accuracy
    features = x[:1000].reshape(1000, -1).numpy()  # every (channel, pixel) value is a candidate
    order = np.argsort(features, axis=0)
    for k, name in enumerate(SYNTHETIC_ATTRIBUTES):
        labels = y[:1000, k].numpy()[order]  # (1000, 3072), sorted by each feature
        # accuracy of "positive above the threshold" for every cut of every feature, best of either sign
        above = (np.cumsum(1 - labels, 0) + labels.sum(0) - np.cumsum(labels, 0)) / len(labels)
        best = float(np.maximum(above, 1 - above).max())  # in-sample: an upper bound for a one-pixel rule
        assert best < 0.9 and best < accuracy[k] - 0.05, f"{name}: one pixel reaches {best:.3f}"


# -- CelebA -----------------------------------------------------------------------------------------
def _banded_image(width, height, first, last, axis):
    """GREEN with a red band before index ``first`` and a blue one from ``last`` on, along ``axis``."""
    pixels = np.full((height, width, 3), GREEN, np.uint8)
    np.moveaxis(pixels, axis, 0)[:first] = (220, 20, 20)
    np.moveaxis(pixels, axis, 0)[last:] = (20, 20, 220)
    return Image.fromarray(pixels)


def make_celeba(root, n=9):
    """CelebA's layout: n JPEGs of 178x218, 40 random +-1 labels, official split i % 3. Returns (names, labels)."""
    (root / "img_align_celeba").mkdir(parents=True)
    labels = np.random.default_rng(0).choice([-1, 1], size=(n, 40))
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    # 178x218 -> the centred 178x178 square keeps rows 20..197; the bands lie outside it, on 16-row JPEG blocks
    image = _banded_image(178, 218, 16, 208, axis=0)
    for name in names:
        image.save(root / "img_align_celeba" / name, quality=95)
    rows = [f"{name}  " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, labels)]
    (root / "list_attr_celeba.txt").write_text("\n".join([str(n), " ".join(CELEBA_ATTRIBUTES), *rows]) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{m} {i % 3}\n" for i, m in enumerate(names)))
    return names, labels


def test_celeba_loads_crops_and_selects_attributes(tmp_path):
    names, labels = make_celeba(tmp_path)
    ds = CelebA(tmp_path, attributes=["Smiling", "Eyeglasses"], resolution=16, split="all")
    assert len(ds) == 9 and ds.ids == names and ds.attribute_names == ["Smiling", "Eyeglasses"]
    cols = [CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Eyeglasses")]
    assert torch.equal(ds.attribute_matrix, torch.tensor(labels[:, cols], dtype=torch.float32))
    image, attrs = ds[4]
    assert image.shape == (3, 16, 16) and attrs.shape == (2,)
    pixels = ds.image_uint8(4).astype(int)
    assert np.abs(pixels - np.array(GREEN)).max() < 16  # no red or blue: the bands were cropped away
    assert ds.partition == [i % 3 for i in range(9)]


@pytest.mark.parametrize("split, expected", [("train", [0, 3, 6]), ("valid", [1, 4, 7]), ("test", [2, 5, 8])])
def test_celeba_official_split(tmp_path, split, expected):
    names, _ = make_celeba(tmp_path)
    ds = CelebA(tmp_path, attributes=["Male"], resolution=8, split=split)
    assert ds.ids == [names[i] for i in expected]


def _corrupt(path, line_no, new_line):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = new_line
    path.write_text("\n".join(lines) + "\n")


ATTR = "list_attr_celeba.txt"


@pytest.mark.parametrize("damage, pattern", [
    (lambda r: (r / ATTR).unlink(), ATTR),
    (lambda r: shutil.rmtree(r / "img_align_celeba"), "img_align_celeba"),
    (lambda r: _corrupt(r / ATTR, 5, "000003.jpg 1 -1"), rf"{ATTR}, line 5: expected 41"),
    (lambda r: _corrupt(r / ATTR, 4, "000002.jpg " + "1 " * 39 + "yes"), r"line 4.*'Young'.*'yes'"),
    (lambda r: _corrupt(r / ATTR, 1, "12"), r"line 1: announces 12 images but lists 9"),
    (lambda r: (r / "img_align_celeba" / "000007.jpg").unlink(), "000007.jpg"),
    (lambda r: (r / "list_eval_partition.txt").unlink(), "list_eval_partition.txt"),
])
def test_celeba_file_errors_name_the_file(tmp_path, damage, pattern):
    make_celeba(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=pattern):
        CelebA(tmp_path, attributes=["Smiling"], resolution=8, split="train")


def test_celeba_argument_errors(tmp_path):
    make_celeba(tmp_path)
    with pytest.raises(ConfigError, match=r"'Smilling'.*did you mean \['Smiling'\]"):
        CelebA(tmp_path, attributes=["Smilling"], resolution=8)
    with pytest.raises(ConfigError, match="split"):
        CelebA(tmp_path, attributes=["Smiling"], split="validation")
    with pytest.raises(DataError, match="nowhere"):
        CelebA(tmp_path / "nowhere", attributes=["Smiling"])


# -- folder + CSV -----------------------------------------------------------------------------------
def make_folder(root, *, header="filename,smiling,hat,young", rows=None, file_column=0):
    """40x30 PNGs under ``root`` and ``root/labels.csv`` (header + rows); returns the CSV path."""
    root.mkdir(parents=True, exist_ok=True)
    image = _banded_image(40, 30, 5, 35, axis=1)  # 40x30 -> the centred 30x30 square keeps columns 5..34
    rows = rows or ["a.png,1,0,1", "b.png,0,1,1", "sub/c.png,1,1,0"]
    for row in rows:
        path = root / row.split(",")[file_column]
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


def test_image_folder_csv_loads_maps_01_and_crops(tmp_path):
    csv_path = make_folder(tmp_path / "faces")
    ds = ImageFolderCSV(tmp_path / "faces", csv_path, resolution=16)
    assert ds.ids == ["a.png", "b.png", "sub/c.png"] and ds.attribute_names == ["smiling", "hat", "young"]
    assert ds.attribute_matrix.tolist() == [[1, -1, 1], [-1, 1, 1], [1, 1, -1]]
    image, attrs = ds[2]
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    assert np.abs(ds.image_uint8(2).astype(int) - np.array(GREEN)).max() <= 2
    sub = ImageFolderCSV(tmp_path / "faces", csv_path, attributes=["young", "smiling"], resolution=8)
    assert sub.attribute_matrix.tolist() == [[1, 1], [1, -1], [-1, 1]]


def test_image_folder_csv_id_column(tmp_path):
    csv_path = make_folder(tmp_path / "f", header="smiling,image_id", rows=["1,a.png", "-1,b.png"], file_column=1)
    assert ImageFolderCSV(tmp_path / "f", csv_path, resolution=8).ids == ["a.png", "b.png"]
    (tmp_path / "f" / "other.csv").write_text("x,smiling,img\n1,1,a.png\n2,-1,b.png\n")
    ds = ImageFolderCSV(tmp_path / "f", tmp_path / "f" / "other.csv", id_column="img", attributes=["smiling"])
    assert ds.ids == ["a.png", "b.png"] and ds.attribute_matrix.tolist() == [[1], [-1]]
    with pytest.raises(ConfigError, match="id_column"):
        ImageFolderCSV(tmp_path / "f", csv_path, id_column="name")


@pytest.mark.parametrize("rows, error, pattern", [
    (["a.png,1,0,1", "b.png,0,1"], DataError, r"labels.csv, line 3: expected 4"),
    (["a.png,1,0,1", "b.png,0,2,1"], DataError, r"line 3, column 'hat'.*'2'"),
    (["a.png,1,0,1", "a.png,0,1,1"], DataError, r"listed twice"),
])
def test_image_folder_csv_malformed_rows(tmp_path, rows, error, pattern):
    csv_path = make_folder(tmp_path / "f", rows=rows)
    with pytest.raises(error, match=pattern):
        ImageFolderCSV(tmp_path / "f", csv_path)


def test_image_folder_csv_missing_things(tmp_path):
    csv_path = make_folder(tmp_path / "f")
    (tmp_path / "f" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b.png.*absent"):
        ImageFolderCSV(tmp_path / "f", csv_path)
    with pytest.raises(DataError, match="nope.csv"):
        ImageFolderCSV(tmp_path / "f", tmp_path / "nope.csv")
    with pytest.raises(DataError, match="missing_dir"):
        ImageFolderCSV(tmp_path / "missing_dir", csv_path)
    with pytest.raises(ConfigError, match=r"'smile'.*smiling"):
        ImageFolderCSV(tmp_path / "f", csv_path, attributes=["smile"])


# -- revisions --------------------------------------------------------------------------------------
BASE_SPEC = {"source": "synthetic", "num_images": 12, "resolution": 32, "seed": 3}


def _write_example_revision(base, out_dir):
    names = base.attribute_names
    changes, images = [], {}
    for i, flip in ((5, "smiling"), (2, "eyeglasses")):
        original = {n: int(v) for n, v in zip(names, base.attribute_matrix[i].tolist())}
        changes.append(RevisionChange(base.ids[i], original, {**original, flip: -original[flip]},
                                      protected=[flip], epsilon=1.0, strength=0.5))
        images[base.ids[i]] = torch.flip(base[i][0], dims=[2])  # (3, 32, 32), mirrored
    return write_revision(out_dir, base_spec=BASE_SPEC, attribute_names=names, changes=changes, images=images), images


def test_revision_round_trip(tmp_path):
    base = SyntheticFaces(num_images=12, seed=3)
    out_dir, images = _write_example_revision(base, tmp_path / "rev")
    manifest = load_manifest(tmp_path / "rev")
    assert out_dir == tmp_path / "rev" and manifest == load_manifest(out_dir / "manifest.json")
    assert manifest["format"] == "veil-revision/1" and manifest["base"] == BASE_SPEC
    assert [c["id"] for c in manifest["changes"]] == [base.ids[5], base.ids[2]]
    assert manifest["changes"][0]["file"] == f"images/{base.ids[5]}.png" and manifest["changes"][0]["epsilon"] == 1.0
    assert sorted(p.name for p in (tmp_path / "rev").iterdir()) == ["images", "manifest.json"]  # no temp files left

    revised = RevisedDataset(base, tmp_path / "rev")
    assert revised.changed_indices == [2, 5] and revised.changed_ids == [base.ids[2], base.ids[5]]
    assert len(revised) == 12 and revised.ids == base.ids and revised.resolution == 32
    for i, flip in ((5, "smiling"), (2, "eyeglasses")):
        image, attrs = revised[i]
        assert torch.allclose(image, images[base.ids[i]], atol=1 / 127.5 + 1e-6)
        k = base.attribute_names.index(flip)
        assert attrs[k] == -base.attribute_matrix[i, k] and torch.equal(revised.attribute_matrix[i], attrs)
    assert torch.equal(revised[0][0], base[0][0]) and torch.equal(revised[0][1], base.attribute_matrix[0])
    assert (revised.attribute_matrix != base.attribute_matrix).sum() == 2


def test_revision_errors(tmp_path):
    base = SyntheticFaces(num_images=12, seed=3)
    _write_example_revision(base, tmp_path / "rev")
    with pytest.raises(DataError, match=r"synth-3-000005"):
        RevisedDataset(SyntheticFaces(num_images=4, seed=3), tmp_path / "rev")
    with pytest.raises(DataError, match="cover"):
        RevisedDataset(CelebAStub(base.ids), tmp_path / "rev")
    with pytest.raises(DataError, match="manifest.json"):
        load_manifest(tmp_path / "empty")
    manifest = json.loads((tmp_path / "rev" / "manifest.json").read_text())
    (tmp_path / "rev" / "manifest.json").write_text(json.dumps({**manifest, "format": "veil-revision/9"}))
    with pytest.raises(DataError, match="veil-revision/1"):
        load_manifest(tmp_path / "rev")
    (tmp_path / "rev" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "rev" / manifest["changes"][0]["file"]).unlink()
    with pytest.raises(DataError, match=manifest["changes"][0]["file"]):
        load_manifest(tmp_path / "rev")
    with pytest.raises(ConfigError, match="released_attributes"):
        RevisionChange("x", {"smiling": 1}, {"smiling": 0})


class CelebAStub:
    """A base dataset with other attribute names."""

    def __init__(self, ids):
        self.ids, self.attribute_names, self.resolution = ids, ["Smiling"], 32
        self.attribute_matrix = torch.ones(len(ids), 1)


# -- DataModule -------------------------------------------------------------------------------------
def test_splits_are_disjoint_complete_and_deterministic():
    dm = FaceDataModule(num_images=200, seed=1)
    train, val, test = (set(dm.split_indices(s)) for s in ("train", "val", "test"))
    assert len(val) == len(test) == 10 and train | val | test == set(range(200))
    assert not (train & val or train & test or val & test)
    assert dm.split_indices("val") == FaceDataModule(num_images=200, seed=1).split_indices("val")
    assert dm.split_indices("val") != FaceDataModule(num_images=200, seed=2).split_indices("val")
    assert len(dm.train_dataset) == dm.train_size == 180 and len(dm.val_dataset) == 10


def test_poisson_loader_batch_sizes_and_steps():
    dm = FaceDataModule(num_images=420, batch_size=42, seed=0)  # 378 training images, q = 1/9
    loader = dm.train_dataloader()
    assert dm.sample_rate == pytest.approx(42 / 378) and len(loader) == int(1 / dm.sample_rate) == 9
    sizes = [len(b) for _ in range(8) for b in loader.batch_sampler]  # 72 Poisson batches
    assert len(sizes) == 72 and abs(np.mean(sizes) - 42) < 4  # sd of the mean is about 0.7
    images, attrs = next(iter(loader))
    assert images.shape[1:] == (3, 32, 32) and attrs.shape == (len(images), 6)


def test_poisson_epochs_differ_but_runs_repeat():
    first = FaceDataModule(num_images=100, batch_size=10).train_dataloader().batch_sampler
    second = FaceDataModule(num_images=100, batch_size=10).train_dataloader().batch_sampler
    epoch0, epoch1 = list(first), list(first)
    assert epoch0 != epoch1 and list(second) == epoch0
    first.set_epoch(1)
    assert list(first) == epoch1


def test_ddp_shards_are_disjoint_and_cover_the_train_set():
    dm = FaceDataModule(num_images=300, batch_size=30)
    shards = [dm.shard_indices(r, 2) for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == dm.split_indices("train")
    q, drawn = dm.sample_rate, []
    for rank in range(2):
        loader = dm.make_train_loader(rank=rank, world_size=2)
        assert loader.dataset.indices == dm.split_indices("train") and len(loader) == int(1 / q)
        batches = [b for _ in range(10) for b in loader.batch_sampler]
        drawn.append({loader.dataset.indices[p] for b in batches for p in b})
        assert drawn[rank] <= set(shards[rank]) and len(drawn[rank]) > 0.9 * len(shards[rank])
        assert abs(np.mean([len(b) for b in batches]) - dm.batch_size / 2) < 3  # 15 per rank: the expected batch is q N / world
    connector = SimpleNamespace(use_distributed_sampler=False)  # as Trainer(use_distributed_sampler=False) sets it
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, _accelerator_connector=connector)
    assert list(dm.train_dataloader().batch_sampler.positions) == list(range(1, 270, 2))
    connector.use_distributed_sampler = True
    with pytest.raises(ConfigError, match="use_distributed_sampler"):
        dm.train_dataloader()


def test_plain_loader_shards_too():
    dm = FaceDataModule(num_images=100, batch_size=16, poisson=False, val_fraction=0, test_fraction=0)
    seen = [{int(p) for p in dm.make_train_loader(rank=r, world_size=2).sampler} for r in range(2)]
    assert seen[0] == set(range(0, 100, 2)) and seen[1] == set(range(1, 100, 2))
    assert len(dm.make_train_loader(rank=0, world_size=2)) == 50 // 8


def test_empty_poisson_batches_collate_to_empty_tensors():
    images, attrs = FaceCollate(32, 6)([])
    assert images.shape == (0, 3, 32, 32) and attrs.shape == (0, 6)
    dm = FaceDataModule(num_images=60, batch_size=1, val_fraction=0, test_fraction=0, attributes=["hat", "beard"])
    batches = list(dm.train_dataloader())  # q = 1/60: about a third of the 60 batches are empty
    empty = [b for b in batches if len(b[0]) == 0]
    assert len(batches) == 60 and empty and all(b[0].shape == (0, 3, 32, 32) and b[1].shape == (0, 2) for b in empty)


def test_plain_loader_and_eval_loaders():
    dm = FaceDataModule(num_images=100, batch_size=16, poisson=False, val_fraction=0.1, test_fraction=0.1)
    batches = [len(x) for x, _ in dm.train_dataloader()]
    assert batches == [16] * (80 // 16)
    assert [len(x) for x, _ in dm.val_dataloader()] == [10] and len(dm.test_dataloader().dataset) == 10
    again = FaceDataModule(num_images=100, batch_size=16, poisson=False, val_fraction=0.1, test_fraction=0.1)
    assert torch.equal(next(iter(dm.train_dataloader()))[1], next(iter(again.train_dataloader()))[1])


@pytest.mark.parametrize("kwargs, option", [
    (dict(source="imagenet"), "source"),
    (dict(batch_size=0), "batch_size"),
    (dict(val_fraction=1.5), "val_fraction"),
    (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction"),
    (dict(source="celeba"), "root"),
    (dict(source="folder", root="."), "csv"),
    (dict(resolution=0), "resolution"),
    (dict(attributes="smiling"), "attributes"),
    (dict(num_workers=-1), "num_workers"),
])
def test_datamodule_bad_config_names_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        FaceDataModule(**kwargs)


def test_datamodule_late_errors(tmp_path):
    with pytest.raises(DataError, match="no_such_dir"):
        FaceDataModule(source="celeba", root=str(tmp_path / "no_such_dir"))
    with pytest.raises(ConfigError, match="batch_size=64"):
        FaceDataModule(num_images=50).sample_rate
    with pytest.raises(ConfigError, match="'glasses'"):
        FaceDataModule(attributes=["glasses"]).setup()


def test_datamodule_spec_round_trip_and_revision(tmp_path):
    base = SyntheticFaces(num_images=12, seed=3)
    _write_example_revision(base, tmp_path / "rev")
    dm = FaceDataModule(num_images=12, seed=3, batch_size=4, revision=str(tmp_path / "rev"), val_fraction=0.25)
    spec = json.loads(json.dumps(dm.spec()))
    assert spec["revision"] == str(tmp_path / "rev") and FaceDataModule.from_spec(spec).spec() == spec
    assert set(dm.dataset_spec()) >= set(BASE_SPEC) and "revision" not in dm.dataset_spec()
    ds = dm.build_dataset()
    assert isinstance(ds, RevisedDataset) and ds.changed_indices == [2, 5]
    with pytest.raises(ConfigError, match="batch"):
        FaceDataModule.from_spec(spec, batch=3)


def test_datamodule_celeba_and_folder_sources(tmp_path):
    make_celeba(tmp_path / "celeba", n=12)
    dm = FaceDataModule(source="celeba", root=str(tmp_path / "celeba"), attributes=["Smiling"], resolution=8,
                        batch_size=2)
    assert dm.split_indices("train") == [0, 3, 6, 9] and dm.split_indices("test") == [2, 5, 8, 11]
    assert dm.attribute_names == ["Smiling"] and next(iter(dm.val_dataloader()))[0].shape == (2, 3, 8, 8)
    csv_path = make_folder(tmp_path / "f")
    dm = FaceDataModule(source="folder", root=str(tmp_path / "f"), csv=str(csv_path), resolution=8, batch_size=1,
                        val_fraction=0, test_fraction=0)
    assert dm.train_size == 3 and dm.attribute_names == ["smiling", "hat", "young"]
