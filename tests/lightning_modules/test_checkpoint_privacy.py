"""Issue 30, item 5: every reader of a model release or owner checkpoint refuses a privacy record that
claims a negative, NaN or malformed epsilon: exit 2 naming the file and the field, instead of printing it
as the model's cost (``veil.privacy.model_privacy``)."""

import json

import pytest
import torch
from dp_helpers import write_tiny_release

from veil.cli import main
from veil.errors import DataError
from veil.lightning_modules import checkpoints as CK
from veil.lightning_modules.models.classifier import AttributeClassifier

DP = {"enabled": True, "private": True, "epsilon": 2.5, "delta": 1e-6}


def _damage(folder, epsilon_text: str) -> None:
    """Rewrite the release's privacy epsilon as raw JSON text (NaN is not writable through strict JSON)."""
    path = folder / "model" / "veil_model.json"
    meta = json.loads(path.read_text())
    meta["privacy"] = {**DP, "epsilon": "@EPS@"}
    path.write_text(json.dumps(meta).replace('"@EPS@"', epsilon_text))


@pytest.mark.parametrize("epsilon_text", ["-1", "NaN", '"-1"'])
def test_veil_sample_refuses_a_release_claiming_a_negative_or_nan_epsilon(tmp_path, capsys, epsilon_text):
    """The cheapest command that reads a release and prints its cost. The same release with epsilon 2.5 samples."""
    release = write_tiny_release(tmp_path / "run", data_spec={"source": "synthetic", "seed": 0}, privacy=DP)
    args = ["sample", "--checkpoint", str(release), "--n", "1", "--steps", "1", "--out"]
    assert main([*args, str(tmp_path / "ok.png")]) == 0
    assert "epsilon 2.500" in capsys.readouterr().out
    _damage(release, epsilon_text)
    assert main([*args, str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert "veil_model.json: privacy.epsilon" in err and "Traceback" not in err
    assert not (tmp_path / "bad.png").exists()


def test_classifier_release_and_owner_checkpoint_are_checked(tmp_path):
    kwargs = {"num_attributes": 2, "resolution": 32, "channels": [8, 8], "feature_dim": 8, "norm_num_groups": 4}
    model = AttributeClassifier(**kwargs)
    bad = {**DP, "epsilon": -2.0}
    CK.write_classifier_release(tmp_path / "clf", model, {"model_kwargs": kwargs, "attribute_names": ["a", "b"],
                                                          "privacy": DP})
    assert CK.load_classifier(tmp_path / "clf")[1]["veil"]["privacy"]["epsilon"] == 2.5
    CK.write_classifier_release(tmp_path / "bad", model, {"model_kwargs": kwargs, "privacy": bad})
    with pytest.raises(DataError, match="veil_model.json: privacy.epsilon is -2.0"):
        CK.load_classifier(tmp_path / "bad")
    owner = tmp_path / "owner" / "private" / "last.ckpt"
    owner.parent.mkdir(parents=True)
    torch.save({"veil": {"kind": CK.CLASSIFIER_KIND, "model_kwargs": kwargs, "privacy": bad},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, owner)
    with pytest.raises(DataError, match="last.ckpt: privacy.epsilon is -2.0"):
        CK.load_classifier(tmp_path / "owner", owner=True)
