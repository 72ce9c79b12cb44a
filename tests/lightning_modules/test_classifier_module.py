"""AttributeClassifier and its training: shapes, loss, DP compatibility, checkpoints, recipe, CLI."""

import json
from pathlib import Path

import pytest
import torch
from unlearn_helpers import RECIPE, datamodule, one_thread, train_tiny

from veil.errors import CheckpointError, ConfigError
from veil.lightning_modules import checkpoints as CK
from veil.lightning_modules.models.classifier import AttributeClassifier, attribute_bce
from veil.jobs import train_classifier as TC
from veil.lightning_modules.configs import CONFIG_DIR


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_shapes_and_features_feed_the_head():
    model = AttributeClassifier(num_attributes=5, resolution=32, channels=(8, 16, 16), norm_num_groups=4,
                                feature_dim=12)
    x = torch.randn(3, 3, 32, 32)
    feats = model.features(x)
    assert feats.shape == (3, 12)
    torch.testing.assert_close(model(x), model.head(feats))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_bad_model_arguments_name_the_option():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AttributeClassifier(num_attributes=2, channels=(6,), norm_num_groups=4)
    with pytest.raises(ConfigError, match="resolution"):
        AttributeClassifier(num_attributes=2, resolution=36, channels=(8, 8, 8), norm_num_groups=4)


def test_bce_maps_plus_minus_one_to_zero_one():
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    attrs = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    want = torch.stack([
        (torch.log1p(torch.exp(-logits[0, 0])) + torch.log1p(torch.exp(logits[0, 1]))) / 2,
        (torch.log1p(torch.exp(logits[1, 0])) + torch.log1p(torch.exp(logits[1, 1]))) / 2,
    ])
    torch.testing.assert_close(attribute_bce(logits, attrs), want)


def test_opacus_per_sample_gradients_match_a_per_example_loop():
    from veil.lightning_modules.dp.grad_sample import attach_grad_sampler

    torch.manual_seed(0)
    model = AttributeClassifier(num_attributes=3, channels=(8, 8, 8), norm_num_groups=4, feature_dim=8)
    x, a = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 3)).float() * 2 - 1
    reference = []
    for i in range(4):
        model.zero_grad()
        attribute_bce(model(x[i : i + 1]), a[i : i + 1]).sum().backward()
        reference.append(model.head.weight.grad.clone())
    model.zero_grad()
    sampler = attach_grad_sampler(model)
    attribute_bce(model(x), a).mean().backward()  # loss_reduction="mean": Opacus undoes the 1/B
    torch.testing.assert_close(model.head.weight.grad_sample, torch.stack(reference), rtol=1e-4, atol=1e-6)
    sampler._close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with one_thread():
        out = tmp_path_factory.mktemp("clf")
        return train_tiny(out), out


def test_training_learns_and_the_checkpoint_rebuilds_the_model(trained):
    record, out = trained
    assert record["test_accuracy"] > 0.65  # chance is 0.5; a 2-epoch 480-image run gets ~0.75
    model, ckpt = CK.load_classifier(out, owner=True)
    veil = ckpt["veil"]
    assert veil["kind"] == "veil/attribute-classifier"
    assert veil["recipe"]["head_l2"] == RECIPE["head_l2"] and veil["data_spec"]["num_images"] == 480
    assert set(veil["l2"]) == {"head.weight", "head.bias"} and veil["privacy"]["enabled"] is False
    dm = datamodule()
    x, attrs = TC.tensors(dm.dataset, dm.split_indices("test"))
    assert TC.test_accuracy(model, (x, attrs)) == pytest.approx(record["test_accuracy"])
    torch.testing.assert_close(veil["train_features"], TC.features_of(model, TC.tensors(
        dm.dataset, dm.split_indices("train"))[0]))


def test_refit_head_lands_on_the_convex_optimum(trained):
    from veil.lightning_modules.unlearning import influence as U

    _, out = trained
    model, ckpt = CK.load_classifier(out, owner=True)
    obj = U.Objective(model.head, ["weight", "bias"], attribute_bce, {"weight": 1e-2, "bias": 1e-2})
    grad = U.objective_gradient(obj, obj.flat(), [(ckpt["veil"]["train_features"], _train_attrs())])
    assert grad.norm() < 1e-6


def _train_attrs():
    dm = datamodule()
    return dm.dataset.attribute_matrix[dm.split_indices("train")]


def test_dp_training_records_privacy_and_refuses_a_head_refit(tmp_path):
    dp = {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp",
          "max_physical_batch_size": 16, "kernel": "opacus"}
    with pytest.raises(ConfigError, match="refit_head"):
        TC.ClassifierRecipe(dp=dp)
    recipe = TC.ClassifierRecipe(**{**RECIPE, "epochs": 1, "refit_head": False, "dp": dp})
    dm = datamodule(num_images=160, poisson=True)
    record = TC.train_classifier(recipe=recipe, datamodule=dm, out=tmp_path)
    privacy = record["privacy"]
    assert privacy["enabled"] and privacy["noise_multiplier"] == 1.0 and 0 < privacy["epsilon"] < 100
    assert privacy["steps"] == record["steps"] > 0
    _, ckpt = CK.load_classifier(tmp_path, owner=True)
    assert ckpt["veil"]["train_features"] is None  # nothing non-private travels with a DP model


def test_release_holds_weights_and_record_but_nothing_private(trained):
    """OUT/model is what gets shared: the weights rebuild the model, and neither the cached training
    features nor the accuracy on private held-out images are in it or in the public report."""
    record, out = trained
    release, _ = CK.load_classifier(out)  # the release, not the owner's checkpoint
    owner, ckpt = CK.load_classifier(out, owner=True)
    for a, b in zip(release.parameters(), owner.parameters()):
        assert torch.equal(a, b)
    meta = json.loads((out / "model" / "veil_model.json").read_text())
    assert "train_features" not in meta and meta["privacy"]["private"] is False
    assert sorted(p.name for p in (out / "model").iterdir()) == ["model.safetensors", "veil_model.json"]
    public = json.loads((out / "train_report.json").read_text())
    assert "test_accuracy" not in public and "test_accuracy" in json.loads(
        (out / "private" / "train_report.json").read_text())
    assert oct((out / "private").stat().st_mode & 0o777) == "0o700"
    assert oct((out / "private" / "last.ckpt").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(CheckpointError, match="owner-only"):
        CK.load_classifier(out / "private" / "last.ckpt")  # a guidance/sample user cannot read owner state


def test_shipped_config_parses():
    path = CONFIG_DIR / "classifier32.yaml"
    recipe, data = TC.load_recipe(str(path), ["epochs=2"])
    assert recipe.epochs == 2 and recipe.model["channels"] == [16, 32, 64]
    assert data["source"] == "synthetic" and data["num_images"] == 3000
    with pytest.raises(ConfigError, match="unknown classifier option"):
        TC.load_recipe(str(path), ["epoch=2"])


def test_cli_train_classifier(tmp_path, capsys):
    from veil.cli import main

    data = "source=synthetic,num_images=96,seed=1,val_fraction=0,test_fraction=0.25"
    sets = ["--set", "epochs=1", "--set", "batch_size=16", "--set", "model={channels: [8, 8, 8], feature_dim: 8, "
            "norm_num_groups: 4}"]
    assert main(["train-classifier", "--data", data, "--out", str(tmp_path), *sets]) == 0
    assert (tmp_path / "model" / "veil_model.json").is_file() and "test accuracy" in capsys.readouterr().out
    assert main(["train-classifier", "--data", "num_images", "--out", str(tmp_path / "x")]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
