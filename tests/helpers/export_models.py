"""Tiny models and their `veil export`s, made once per test run (exporting the guided step takes a minute or
more here, so tests/export and tests/serve share them): the session fixtures ``models`` and ``exports``,
registered for every test folder by tests/conftest.py."""

import pytest
from dp_helpers import TINY, train_cli
from unlearn_helpers import RECIPE, datamodule, one_thread

from veil.cli import main
from veil.jobs import train_classifier as TC

NOISY = {"channels": [8, 8, 8], "feature_dim": 8, "norm_num_groups": 4, "noise_conditional": True}
EXPORT_STEPS = 6
GUIDED_SCALE = 30.0


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A label-free tiny UNet and a tiny noise-conditional DP classifier (guided), a tiny conditional UNet."""
    with one_thread():
        root = tmp_path_factory.mktemp("export_models")
        assert train_cli(root / "unet", TINY, "optim.cond_drop_prob=1.0", "dp.enabled=false") == 0
        dp = {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp",
              "max_physical_batch_size": 16, "noise_multiplicity": 2}
        recipe = TC.ClassifierRecipe(**{**RECIPE, "epochs": 1, "refit_head": False, "dp": dp, "model": dict(NOISY)})
        TC.train_classifier(recipe=recipe, datamodule=datamodule(num_images=160, poisson=True), out=root / "guide")
        assert train_cli(root / "cond", TINY, "dp.enabled=false") == 0
        return root


@pytest.fixture(scope="session")
def exports(models, tmp_path_factory):
    """`veil export` of both backends: guided (scale 30), conditional with the classifier as its checker."""
    with one_thread():
        out = tmp_path_factory.mktemp("exports")
        assert main(["export", "--checkpoint", str(models / "unet"), "--classifier", str(models / "guide"),
                     "--classifier-scale", str(GUIDED_SCALE), "--steps", str(EXPORT_STEPS),
                     "--out", str(out / "guided")]) == 0
        assert main(["export", "--checkpoint", str(models / "cond"), "--classifier", str(models / "guide"),
                     "--classifier-scale", "0", "--steps", str(EXPORT_STEPS), "--out", str(out / "conditional")]) == 0
        return out
