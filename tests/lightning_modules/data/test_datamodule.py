"""FaceDataModule: splits, Poisson and plain loaders, DDP shards, empty batches, specs, bad options.

Fast and deterministic: fake folders are written into tmp_path and synthetic sets are small.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_data import BASE_SPEC, make_celeba, make_folder, write_example_revision

from veil.errors import ConfigError, DataError
from veil.lightning_modules.data.datamodule import FaceCollate, FaceDataModule
from veil.lightning_modules.data.revision import (
    RevisedDataset,
)
from veil.lightning_modules.data.synthetic_faces import (
    SyntheticFaces,
)


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


def test_poisson_batches_are_secret_not_derived_from_the_seed():
    """Two runs of the same config (same seed) must draw different Poisson batches: batches that the
    config determines void amplification by sampling. Seeding torch's RNG changes nothing either."""
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(list(FaceDataModule(num_images=100, batch_size=10, seed=0).train_dataloader().batch_sampler))
    assert draws[0] != draws[1]


def test_poisson_epochs_differ_and_the_reproducible_mode_repeats():
    def sampler():
        dm = FaceDataModule(num_images=100, batch_size=10)
        dm.poisson_seed = 7  # dp.reproducible_noise_seed: tests and debugging, not private
        return dm.train_dataloader().batch_sampler

    first, second = sampler(), sampler()
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
    write_example_revision(base, tmp_path / "rev")
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
