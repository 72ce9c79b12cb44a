"""End to end: `veil train` writes checkpoint + privacy.json, resumes exactly, runs under DDP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dp_helpers import TINY, train_cli

from veil.cli import main
from veil.errors import ConfigError, DataError
from veil.lightning_modules.training.config import load_config
from veil.lightning_modules.training.diffusion import run_training

HERE = Path(__file__).parent
PRIVACY_KEYS = {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant"}


def _train(out, *extra, resume=False):
    return train_cli(out, TINY, *extra, resume=resume)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert _train(out) == 0
    return out


def test_train_writes_checkpoint_and_privacy_record(trained):
    privacy = json.loads((trained / "privacy.json").read_text())
    assert PRIVACY_KEYS <= set(privacy) and privacy["steps"] == 4 and privacy["epsilon"] > 0
    ckpt = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=False)
    meta = ckpt["veil"]
    assert meta["attribute_names"] == ["smiling", "eyeglasses", "hat", "dark_hair", "beard", "pale_skin"]
    assert meta["model_kwargs"]["block_out_channels"] == (16, 32)
    assert meta["scheduler_config"]["num_train_timesteps"] == 1000
    assert meta["accountant_state"] is not None and meta["privacy"]["epsilon"] == pytest.approx(privacy["epsilon"])


def test_refuses_to_overwrite_a_run(trained, capsys):
    assert _train(trained) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_continues_the_accounting(trained, tmp_path):
    assert _train(tmp_path, "trainer.max_steps=2") == 0
    half = json.loads((tmp_path / "privacy.json").read_text())
    assert _train(tmp_path, resume=True) == 0  # TINY says max_steps=4
    resumed = json.loads((tmp_path / "privacy.json").read_text())
    full = json.loads((trained / "privacy.json").read_text())
    assert half["steps"] == 2 and resumed["steps"] == full["steps"] == 4
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-9)
    assert half["epsilon"] < resumed["epsilon"]


def test_sample_command_writes_a_grid(trained, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(trained / "last.ckpt"), "--attributes", "smiling=1,hat=0",
                 "--n", "4", "--steps", "3", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size[0] >= 32


def test_sample_is_seeded(trained):
    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil.lightning_modules.diffusion.sample import ddim_sample

    ckpt = load_diffusion_checkpoint(trained / "last.ckpt")
    attrs = torch.ones(2, 6)
    one = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=3, generator=torch.Generator().manual_seed(1))
    two = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=3, generator=torch.Generator().manual_seed(1))
    other = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=3, generator=torch.Generator().manual_seed(2))
    assert one.shape == (2, 3, 32, 32) and torch.equal(one, two) and not torch.equal(one, other)


def test_unknown_attribute_fails_before_training(tmp_path):
    cfg = load_config(None, TINY + ["data.attributes=[smiling,monocle]"])
    with pytest.raises(ConfigError, match="monocle"):
        run_training(cfg, tmp_path / "o")
    assert not (tmp_path / "o" / "last.ckpt").exists()


def test_missing_data_folder_fails_before_training(tmp_path):
    cfg = load_config(None, TINY + ["data.source=celeba", f"data.root={tmp_path / 'nowhere'}", "data.attributes=[Smiling]"])
    with pytest.raises(DataError, match="nowhere"):
        run_training(cfg, tmp_path / "o")


def test_ddp_two_processes_identical_parameters_and_global_epsilon(tmp_path):
    """2 CPU ranks (gloo): same parameters on both ranks; epsilon equals the 1-process run's."""
    script = HERE / "ddp_train_script.py"
    for name, devices in (("ddp", 2), ("single", 1)):
        subprocess.run([sys.executable, str(script), str(tmp_path / name), str(devices)], check=True,
                       cwd=tmp_path, capture_output=True, timeout=600)
    p0 = torch.load(tmp_path / "ddp" / "params_rank0.pt")
    p1 = torch.load(tmp_path / "ddp" / "params_rank1.pt")
    init = torch.load(tmp_path / "single" / "params_rank0.pt")
    assert torch.equal(p0, p1), "ranks drifted apart"
    assert not torch.equal(p0, init)  # it trained (and differs from the 1-process run's noise draws)
    ddp = json.loads((tmp_path / "ddp" / "privacy.json").read_text())
    single = json.loads((tmp_path / "single" / "privacy.json").read_text())
    assert ddp["steps"] == single["steps"] == 4 and ddp["sample_rate"] == single["sample_rate"]
    assert ddp["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)
