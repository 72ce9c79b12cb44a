"""FaceDataModule: one LightningDataModule for synthetic faces, CelebA, or a folder + CSV, optionally revised.

    dm = FaceDataModule(source="synthetic", num_images=2048, resolution=32, batch_size=64)
    trainer = lightning.Trainer(use_distributed_sampler=False, ...)   # required, see below
    trainer.fit(model, datamodule=dm)

Splits are deterministic in ``seed`` (CelebA uses its official partition when the file is there).
The training loader samples for DP-SGD: with ``poisson=True`` each step takes every training image
independently with probability q = batch_size / train_size (Opacus's
``UniformWithReplacementSampler``), so batch sizes vary and may be empty; an epoch is int(1/q) steps.

Under DDP each rank samples its own disjoint shard (``train_indices[rank::world_size]``) at the
*global* rate q: the expected global batch stays ``batch_size``, each rank's is
``batch_size / world_size``, and every rank takes the same int(1/q) steps. Every rank's loader
has the whole training split as its dataset (``len(loader.dataset) == train_size``, which is what
Opacus derives the expected batch size from); only its batch sampler is restricted to the shard. Lightning's automatic
distributed sampler would re-shard (or fail on) this loader, so it must be off:
``Trainer(use_distributed_sampler=False)``; the loader refuses to run under DDP otherwise.
Each rank's Poisson sampler draws a fresh seed from the OS CSPRNG for every epoch (the batches
must stay secret: they are what amplification by sampling rests on), never from ``seed``; only
``poisson_seed`` (set by ``dp.reproducible_noise_seed``, tests and debugging, not private) makes
them reproducible, from (poisson_seed, rank, epoch).
``spec()`` is the JSON-able configuration that checkpoints and revision manifests store.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, Subset, SubsetRandomSampler

from veil.errors import ConfigError, DataError
from veil.privacy.randomness import secret_seed

__all__ = ["FaceDataModule", "FacePoissonSampler", "FaceCollate", "SOURCES"]

SOURCES = ("synthetic", "celeba", "folder")
DATASET_KEYS = ("source", "root", "csv", "attributes", "resolution", "num_images", "seed")


def mix_seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (seed, rank, epoch), for torch.Generator.manual_seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class FacePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler over ``positions``, reseeded every epoch: from the OS CSPRNG
    (``seed=None``, the default), or from (seed, rank, epoch) in the not-private reproducible mode.

    Each of ``positions`` (this rank's shard, as indices into the loader's dataset) is taken
    independently with probability ``sample_rate``. ``set_epoch(e)`` picks the epoch (Lightning
    calls it); without it, each new iteration moves on to the next epoch.
    """

    def __init__(
        self, *, positions: Sequence[int], sample_rate: float, seed: int | None = None, rank: int = 0,
        steps: int | None = None,
    ):
        super().__init__(
            num_samples=len(positions), sample_rate=sample_rate, generator=torch.Generator(), steps=steps
        )
        self.positions = list(positions)
        self.seed, self.rank, self.epoch = (None if seed is None else int(seed)), int(rank), 0
        # Lightning's _set_sampler_epoch calls set_epoch on `batch_sampler.sampler`, not on the batch sampler itself.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if self.seed is None:
            self.generator.manual_seed(secret_seed())  # secret batches; never stored, never repeated
        else:
            self.generator.manual_seed(mix_seed(self.seed, self.rank, self.epoch))
        self.epoch += 1
        return ([self.positions[i] for i in batch] for batch in super().__iter__())


class FaceCollate:
    """Stack (image, attrs) pairs; an empty Poisson batch becomes tensors of shape (0, 3, R, R) and (0, k)."""

    def __init__(self, resolution: int, num_attributes: int):
        self.resolution, self.num_attributes = resolution, num_attributes

    def __call__(self, batch):
        if len(batch) == 0:
            r = self.resolution
            return torch.zeros(0, 3, r, r), torch.zeros(0, self.num_attributes)
        images, attrs = zip(*batch)
        return torch.stack(images), torch.stack(attrs)  # (B, 3, R, R), (B, k)


def _validate(kw: dict) -> None:
    """ConfigError (naming the option) or DataError (naming the path) before anything is loaded.

    The options are named as "data option <key>": the user set them as ``data.<key>`` in a
    ``veil train`` config or ``--data <key>=...`` of ``veil train-classifier``, never as Python arguments."""
    if kw["source"] not in SOURCES:
        raise ConfigError(f"data option source: choose one of {list(SOURCES)}, got {kw['source']!r}")
    for name in ("resolution", "num_images", "batch_size"):
        if not isinstance(kw[name], int) or isinstance(kw[name], bool) or kw[name] < 1:
            raise ConfigError(f"data option {name}: must be a positive integer, got {kw[name]!r}")
    if not isinstance(kw["num_workers"], int) or isinstance(kw["num_workers"], bool) or kw["num_workers"] < 0:
        raise ConfigError(f"data option num_workers: must be an integer >= 0, got {kw['num_workers']!r}")
    if not isinstance(kw["seed"], int) or isinstance(kw["seed"], bool):
        raise ConfigError(f"data option seed: must be an integer, got {kw['seed']!r}")
    for name in ("val_fraction", "test_fraction"):
        if isinstance(kw[name], bool) or not isinstance(kw[name], (int, float)) or not 0 <= kw[name] < 1:
            raise ConfigError(f"data option {name}: must be a number in [0, 1), got {kw[name]!r}")
    if kw["val_fraction"] + kw["test_fraction"] >= 1:
        raise ConfigError("data options val_fraction + test_fraction must be < 1 to leave images for training")
    if kw["attributes"] is not None and (isinstance(kw["attributes"], str)
                                         or not isinstance(kw["attributes"], (list, tuple))):
        raise ConfigError(f"data option attributes: give a list of names, e.g. [{kw['attributes']!r}]")
    if kw["source"] in ("celeba", "folder") and not kw["root"]:
        raise ConfigError(f"data option root: source {kw['source']!r} needs root, the dataset folder")
    if kw["source"] == "folder" and not kw["csv"]:
        raise ConfigError("data option csv: source 'folder' needs csv, the label CSV file")
    for name in ("root", "csv", "revision"):
        if kw[name] is not None and not isinstance(kw[name], (str, Path)):
            raise ConfigError(f"data option {name}: must be a path, got {kw[name]!r}")
    if kw["root"] and kw["source"] != "synthetic" and not Path(kw["root"]).is_dir():
        raise DataError(f"{kw['root']}: dataset folder (data option root) not found; check the path")
    if kw["csv"] and kw["source"] == "folder" and not Path(kw["csv"]).is_file():
        raise DataError(f"{kw['csv']}: label CSV (data option csv) not found; check the path")
    if kw["revision"] and not Path(kw["revision"]).exists():
        raise DataError(f"{kw['revision']}: revision folder (data option revision) not found; pass one "
                        "write_revision made")


def _absolute(path, source: str) -> str:
    """A data path as recorded: absolute and resolved for CelebA and folders (synthetic faces read no path)."""
    return str(path) if source == "synthetic" else str(Path(path).expanduser().resolve())


class FaceDataModule(L.LightningDataModule):
    """Splits and loaders over a face dataset; see the module docstring for DP sampling and DDP."""

    def __init__(
        self,
        *,
        source: str = "synthetic",
        root: str | None = None,
        csv: str | None = None,
        attributes: Sequence[str] | None = None,
        resolution: int = 32,
        num_images: int = 2048,
        seed: int = 0,
        batch_size: int = 64,
        poisson: bool = True,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        revision: str | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        kw = dict(source=source, root=root, csv=csv, attributes=attributes, resolution=resolution,
                  num_images=num_images, seed=seed, batch_size=batch_size, poisson=poisson,
                  val_fraction=val_fraction, test_fraction=test_fraction, revision=revision, num_workers=num_workers)
        _validate(kw)
        self.source, self.resolution, self.num_images, self.seed = source, resolution, num_images, seed
        # stored absolute and resolved (spec() goes into checkpoints, configs and revisions): a relative path would
        # name another folder, or none, when the run is used from another directory (issue 34)
        self.root = None if root is None else _absolute(root, source)
        self.csv = None if csv is None else _absolute(csv, source)
        self.revision = None if revision is None else str(revision)
        self.attributes = None if attributes is None else [str(a) for a in attributes]
        self.batch_size, self.poisson, self.num_workers = batch_size, bool(poisson), num_workers
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self._dataset: Dataset | None = None
        self._splits: dict[str, list[int]] | None = None
        # None: the Poisson batches are drawn from the OS CSPRNG. An int (dp.reproducible_noise_seed's
        # test/debug mode, not private) makes them reproducible; deliberately not part of spec().
        self.poisson_seed: int | None = None
        self.save_hyperparameters(self.spec())

    # -- configuration -------------------------------------------------------------------------------
    def spec(self) -> dict:
        """The constructor's keyword arguments as a JSON-serialisable dict: ``FaceDataModule(**dm.spec())``."""
        return dict(source=self.source, root=self.root, csv=self.csv, attributes=self.attributes,
                    resolution=self.resolution, num_images=self.num_images, seed=self.seed,
                    batch_size=self.batch_size, poisson=self.poisson, val_fraction=self.val_fraction,
                    test_fraction=self.test_fraction, revision=self.revision, num_workers=self.num_workers)

    def dataset_spec(self) -> dict:
        """Only the keys that define the base dataset (no revision): the ``base`` of a revision manifest."""
        return {k: self.spec()[k] for k in DATASET_KEYS}

    @classmethod
    def from_spec(cls, spec: dict, **overrides) -> "FaceDataModule":
        """Rebuild from ``spec()`` (as stored in a checkpoint), with any keyword replaced by ``overrides``."""
        kwargs = {**spec, **overrides}
        unknown = sorted(set(kwargs) - set(inspect.signature(cls.__init__).parameters) - {"self"})
        if unknown:
            raise ConfigError(f"unknown data option(s) {unknown}; valid: "
                              f"{sorted(set(inspect.signature(cls.__init__).parameters) - {'self'})}")
        return cls(**kwargs)

    # -- datasets --------------------------------------------------------------------------------------
    def build_dataset(self) -> Dataset:
        """The full dataset (every split), wrapped in a RevisedDataset when ``revision`` is set."""
        from veil.lightning_modules.data import (
            celeba,
            image_folder,
            revision,
            synthetic_faces,
        )

        if self.source == "synthetic":
            ds = synthetic_faces.SyntheticFaces(num_images=self.num_images, resolution=self.resolution,
                                                seed=self.seed, attributes=self.attributes)
        elif self.source == "celeba":
            ds = celeba.CelebA(self.root, attributes=self.attributes, resolution=self.resolution, split="all")
        else:
            ds = image_folder.ImageFolderCSV(
                self.root, self.csv, attributes=self.attributes, resolution=self.resolution
            )
        return revision.RevisedDataset(ds, self.revision) if self.revision else ds

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self.build_dataset()
        return self._dataset

    @property
    def attribute_names(self) -> list[str]:
        return list(self.dataset.attribute_names)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        ds = self.dataset
        partition = getattr(ds, "partition", None)
        if self.source == "celeba" and partition is not None:  # the official split: 0 train, 1 valid, 2 test
            p = np.asarray(partition)
            self._splits = {name: np.flatnonzero(p == k).tolist() for k, name in enumerate(("train", "val", "test"))}
        else:
            n = len(ds)
            order = np.random.default_rng(mix_seed(self.seed, 0x5B17)).permutation(n)
            n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
            self._splits = {
                "val": sorted(order[:n_val].tolist()),
                "test": sorted(order[n_val : n_val + n_test].tolist()),
                "train": sorted(order[n_val + n_test :].tolist()),
            }
        if not self._splits["train"]:
            raise ConfigError(f"val_fraction/test_fraction leave no training images out of {len(ds)}")
        render_all = getattr(getattr(ds, "base", ds), "render_all", None)
        if self.num_workers > 0 and render_all is not None:
            render_all()  # render synthetic faces once, before workers fork

    def split_indices(self, split: str) -> list[int]:
        """Indices into ``dataset`` of the 'train', 'val' or 'test' split."""
        self.setup()
        return list(self._splits[split])

    @property
    def train_dataset(self) -> Subset:
        return Subset(self.dataset, self.split_indices("train"))

    @property
    def val_dataset(self) -> Subset:
        return Subset(self.dataset, self.split_indices("val"))

    @property
    def test_dataset(self) -> Subset:
        return Subset(self.dataset, self.split_indices("test"))

    @property
    def train_size(self) -> int:
        return len(self.split_indices("train"))

    @property
    def sample_rate(self) -> float:
        """q = batch_size / train_size: the probability that a training image is in a given step's batch."""
        n = self.train_size
        if self.batch_size > n:
            raise ConfigError(f"batch_size={self.batch_size} is larger than the training set ({n} images); lower it")
        return self.batch_size / n

    # -- loaders ---------------------------------------------------------------------------------------
    def _collate(self) -> FaceCollate:
        return FaceCollate(self.resolution, len(self.attribute_names))

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            world_size = int(trainer.world_size)
            connector = getattr(trainer, "_accelerator_connector", None)
            if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
                raise ConfigError("use_distributed_sampler: FaceDataModule shards and samples itself; "
                                  "build the Trainer with use_distributed_sampler=False")
            return int(trainer.global_rank), world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def shard_indices(self, rank: int, world_size: int) -> list[int]:
        """This rank's disjoint share of the training indices: ``train[rank::world_size]``."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is not in [0, world_size={world_size})")
        return self.split_indices("train")[rank::world_size]

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        return self.make_train_loader(rank=rank, world_size=world_size)

    def make_train_loader(self, *, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The training loader of one rank (``train_dataloader`` finds rank and world size itself).

        Its dataset is the whole training split on every rank (so ``len(loader.dataset)`` is the
        global train size, as Opacus's accounting expects); its sampler only draws this rank's shard.
        """
        q = self.sample_rate
        shard = list(range(self.train_size))[rank::world_size]  # positions in the training split
        if not 0 <= rank < world_size or not shard:
            raise ConfigError(
                f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size <= train size {self.train_size}"
            )
        train = self.train_dataset
        common = dict(
            collate_fn=self._collate(), num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )
        if self.poisson:
            sampler = FacePoissonSampler(positions=shard, sample_rate=q, seed=self.poisson_seed, rank=rank,
                                         steps=int(1 / q))
            return DataLoader(train, batch_sampler=sampler, **common)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, rank))
        per_rank = max(1, self.batch_size // world_size)
        return DataLoader(train, batch_size=per_rank, sampler=SubsetRandomSampler(shard, generator=generator),
                          drop_last=True, **common)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(Subset(self.dataset, self.split_indices(split)), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self._collate(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
