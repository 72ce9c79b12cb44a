"""Helpers for the classifier and unlearning tests: a tiny trained classifier and a flip revision."""

import contextlib

import torch
from revisions import synthetic_flip_revision

from veil.lightning_modules.data.datamodule import FaceDataModule
from veil.jobs.train_classifier import (
    ClassifierRecipe,
    train_classifier,
)

DATA = dict(source="synthetic", num_images=480, resolution=32, seed=3, val_fraction=0.0, test_fraction=0.25)
RECIPE = dict(epochs=2, lr=3e-3, batch_size=32, head_l2=1e-2,
              model={"channels": [8, 16, 16], "feature_dim": 16, "norm_num_groups": 4})


@contextlib.contextmanager
def one_thread():
    """Two threads on a shared 2-core machine spin against other processes (100x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def datamodule(**overrides) -> FaceDataModule:
    return FaceDataModule(**{**DATA, "batch_size": RECIPE["batch_size"], "poisson": False, **overrides})


def train_tiny(out, *, dm=None, **recipe_overrides) -> dict:
    recipe = ClassifierRecipe(**{**RECIPE, **recipe_overrides})
    return train_classifier(recipe=recipe, datamodule=dm or datamodule(), out=out)


def flip_revision(out, dm, fraction=0.05, seed=0):
    return synthetic_flip_revision(out, datamodule=dm, fraction=fraction, attribute="eyeglasses", seed=seed)
