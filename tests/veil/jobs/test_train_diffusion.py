"""End to end: `veil train` writes a release + owner-only state + privacy.json, resumes without
repeating noise, refuses a changed privacy plan, runs under DDP."""

import json
import subprocess
import sys
from pathlib import Path

import ddp_train_script
import pytest
import torch
from dp_helpers import TINY, train_cli

from veil.cli import main
from veil.errors import ConfigError, DataError
from veil.jobs.config import load_config
from veil.jobs.train import run_training

HERE = Path(__file__).parent
PRIVACY_KEYS = {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant"}


def _train(out, *extra, resume=False):
    return train_cli(out, TINY, *extra, resume=resume)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert _train(out) == 0
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """One 2 + 2 step resume, shared by the tests that only read it (in its own $VEIL_HOME, whose dataset
    database holds only this run): the noise vectors each half added, the first half's privacy.json."""
    import veil.kernels.optimizer as KO

    root = tmp_path_factory.mktemp("resumed")
    drawn: list[list[torch.Tensor]] = []
    original = KO.add_noise_reference_

    def spy(summed, *, std, generator=None):
        before = summed.clone()
        original(summed, std=std, generator=generator)
        drawn[-1].append((summed - before).flatten())
        return summed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KO, "add_noise_reference_", spy)
        mp.setenv("VEIL_HOME", str(root / "home"))
        drawn.append([])
        assert _train(root / "dp", "trainer.max_steps=2") == 0
        half = json.loads((root / "dp" / "privacy.json").read_text())
        drawn.append([])
        assert _train(root / "dp", resume=True) == 0  # TINY says max_steps=4
    return {"out": root / "dp", "home": root / "home", "drawn": drawn, "half": half}


def test_train_writes_release_owner_state_and_privacy_record(trained):
    privacy = json.loads((trained / "privacy.json").read_text())
    assert PRIVACY_KEYS <= set(privacy) and privacy["steps"] == 4 and privacy["epsilon"] > 0
    assert privacy["private"] is True and "not_private_reason" not in privacy
    meta = json.loads((trained / "model" / "veil_model.json").read_text())
    assert meta["attribute_names"] == ["smiling", "eyeglasses", "hat", "dark_hair", "beard", "pale_skin"]
    assert meta["model_kwargs"]["block_out_channels"] == [16, 32]
    assert meta["scheduler_config"]["num_train_timesteps"] == 1000
    assert meta["privacy"]["epsilon"] == pytest.approx(privacy["epsilon"])
    assert sorted(p.name for p in (trained / "model").iterdir()) == ["model.safetensors", "veil_model.json"]
    # owner-only: the resume state (accountant, optimizer) and the per-step statistics of private batches
    private = trained / "private"
    assert oct(private.stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in private.rglob("*") if f.is_file())
    ckpt = torch.load(private / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["veil"]["accountant_state"] is not None
    assert not (trained / "logs").exists() and list(private.glob("logs/*/metrics.csv"))
    public_text = "".join(f.read_text() for f in (trained / "privacy.json", trained / "config.json",
                                                  trained / "model" / "veil_model.json"))
    assert "train/loss" not in public_text and "batch_size" not in meta


def test_no_file_holds_a_noise_key(trained):
    """Item 3: whoever holds a checkpoint must not be able to regenerate the noise."""
    ckpt = torch.load(trained / "private" / "last.ckpt", map_location="cpu", weights_only=False)
    for state in ckpt["optimizer_states"]:
        assert state.get("veil_dp_noise", {}).keys() <= {"noise_step"}
    assert "philox" not in json.dumps(ckpt.get("veil", {}), default=str)


def test_two_runs_of_one_config_draw_different_noise(tmp_path):
    """Item 1: the config (and its seed) must not determine the noise or the batches. Same config
    twice: same initial weights, different trained weights."""
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert _train(tmp_path / name, "trainer.max_steps=1") == 0
    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


def test_reproducible_noise_is_an_explicit_not_private_mode(tmp_path, capsys):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        assert _train(tmp_path / name, "trainer.max_steps=1", "dp.reproducible_noise_seed=5") == 0
    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    privacy = json.loads((tmp_path / "a" / "privacy.json").read_text())
    assert privacy["private"] is False and "reproducible_noise_seed" in privacy["not_private_reason"]
    assert "NOT PRIVATE" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(tmp_path / "a"), "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert "not private" in capsys.readouterr().out


def test_resume_draws_fresh_noise(resumed):
    """Item 4: a 2 + 2 step resume must add no noise vector (nor a large share of values) it added before."""
    first, second = resumed["drawn"]
    assert first and second
    for a in first:
        for b in second:
            if a.shape == b.shape:
                assert (a == b).float().mean() < 0.01, "noise repeated across the resume"


def test_resume_refuses_a_changed_privacy_plan(tmp_path, capsys):
    """Item 7: sigma was solved for the planned steps; more steps would silently pass the target."""
    plan = ["dp.noise_multiplier=null", "dp.target_epsilon=5", "trainer.max_steps=1"]
    assert _train(tmp_path, *plan) == 0
    sigma = json.loads((tmp_path / "privacy.json").read_text())["noise_multiplier"]
    assert _train(tmp_path, *plan[:2], "trainer.max_steps=2", resume=True) == 2
    err = capsys.readouterr().err
    assert "ends at epsilon" in err and "dp.noise_multiplier=" in err
    assert _train(tmp_path, "dp.noise_multiplier=null", "dp.target_epsilon=2", "trainer.max_steps=1",
                  resume=True) == 2
    assert "dp.target_epsilon" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["dp"]["target_epsilon"] == 5  # not rewritten
    # the explicit re-plan: the same sigma, named, to more steps
    assert _train(tmp_path, "dp.target_epsilon=null", f"dp.noise_multiplier={sigma!r}", "trainer.max_steps=2",
                  resume=True) == 0
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy["steps"] == 2 and privacy["epsilon"] > 5


def test_delta_defaults_well_below_one_over_n_and_refuses_more(tmp_path, capsys):
    """Item 6: delta = 1/N lets a mechanism publish one record in full."""
    assert _train(tmp_path / "a", "trainer.max_steps=1") == 0
    privacy = json.loads((tmp_path / "a" / "privacy.json").read_text())
    n = round(privacy["sample_rate"] ** -1 * 16)  # q = batch_size / N
    assert privacy["delta"] == pytest.approx(min(1e-5, 0.1 / n))
    assert _train(tmp_path / "b", "dp.delta=0.02") == 2  # 0.02 > 1/86
    assert "1/N" in capsys.readouterr().err and not (tmp_path / "b" / "model").exists()


def test_secure_mode_is_refused_not_claimed(tmp_path, capsys):
    """Item 2: Opacus's secure mode needs torchcsprng; veil says so instead of reporting secure noise."""
    assert _train(tmp_path, "dp.secure_mode=true") == 2
    assert "torchcsprng" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run(trained, capsys):
    assert _train(trained) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_continues_the_accounting(trained, resumed):
    half = resumed["half"]  # after 2 steps; then resumed to TINY's max_steps=4
    resumed = json.loads((resumed["out"] / "privacy.json").read_text())
    full = json.loads((trained / "privacy.json").read_text())
    assert half["steps"] == 2 and resumed["steps"] == full["steps"] == 4
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-9)
    assert half["epsilon"] < resumed["epsilon"]


def test_sample_command_writes_a_grid(trained, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(trained), "--attributes", "smiling=1,hat=0",
                 "--n", "4", "--steps", "3", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size[0] >= 32


def test_sample_is_seeded(trained):
    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil.lightning_modules.diffusion.sample import ddim_sample

    ckpt = load_diffusion_checkpoint(trained / "model")
    attrs = torch.ones(2, 6)
    one = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=3, generator=torch.Generator().manual_seed(1))
    two = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=3, generator=torch.Generator().manual_seed(1))
    other = ddim_sample(ckpt.model, ckpt.scheduler_config, attrs, num_steps=3, generator=torch.Generator().manual_seed(2))
    assert one.shape == (2, 3, 32, 32) and torch.equal(one, two) and not torch.equal(one, other)


def test_unknown_attribute_fails_before_training(tmp_path):
    cfg = load_config(None, TINY + ["data.attributes=[smiling,monocle]"])
    with pytest.raises(ConfigError, match="monocle"):
        run_training(cfg, tmp_path / "o")
    assert not (tmp_path / "o" / "model").exists()


def test_missing_data_folder_fails_before_training(tmp_path):
    cfg = load_config(None, TINY + ["data.source=celeba", f"data.root={tmp_path / 'nowhere'}", "data.attributes=[Smiling]"])
    with pytest.raises(DataError, match="nowhere"):
        run_training(cfg, tmp_path / "o")


def test_ddp_two_processes_identical_parameters_and_global_epsilon(tmp_path):
    """2 CPU ranks (gloo): same parameters on both ranks; epsilon equals the 1-process run's. The default
    engine (ghost: clipped sums from one backward, all-reduced once, noise added on rank 0 only)."""
    script = HERE / "ddp_train_script.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "ddp"), "2"], check=True, cwd=tmp_path,
                   capture_output=True, timeout=600)
    ddp_train_script.main(str(tmp_path / "single"), 1)  # in this process: one interpreter start less
    p0 = torch.load(tmp_path / "ddp" / "params_rank0.pt")
    p1 = torch.load(tmp_path / "ddp" / "params_rank1.pt")
    init = torch.load(tmp_path / "single" / "params_rank0.pt")
    assert torch.equal(p0, p1), "ranks drifted apart"
    assert not torch.equal(p0, init)  # it trained (and differs from the 1-process run's noise draws)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["dp"]["engine"] == "ghost"
    ddp = json.loads((tmp_path / "ddp" / "privacy.json").read_text())
    single = json.loads((tmp_path / "single" / "privacy.json").read_text())
    assert ddp["steps"] == single["steps"] == 4 and ddp["sample_rate"] == single["sample_rate"]
    assert ddp["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)


def test_training_runs_are_recorded_in_the_dataset_database(tmp_path, resumed, monkeypatch):
    """Item 10: every run on a dataset (private or not) lands in that dataset's database, a resume
    continues its own row, and `veil privacy show` reports the composed total."""
    from veil.privacy.ledger import PrivacyLedger

    veil_home = resumed["home"]  # the 2 + 2 step resume ran there
    monkeypatch.setenv("VEIL_HOME", str(veil_home))
    assert _train(tmp_path / "control", "dp.enabled=false", "trainer.max_steps=1") == 0
    with PrivacyLedger.for_dataset({"source": "synthetic", "seed": 0}) as ledger:
        runs = ledger.training_runs()
        assert str(ledger.path).startswith(str(veil_home))
    assert [(r["kind"], r["private"], r["status"]) for r in runs] == [
        ("diffusion", True, "finished"), ("diffusion", False, "finished")]
    dp = json.loads((resumed["out"] / "privacy.json").read_text())
    assert runs[0]["steps"] == 4 and runs[0]["epsilon"] == pytest.approx(dp["epsilon"])
    assert runs[1]["counted_epsilon"] == float("inf")  # a non-private control spends everything
    assert main(["privacy", "show", "--data", "source=synthetic,seed=0"]) == 0


def test_a_run_over_the_training_budget_is_refused_before_it_starts(tmp_path, capsys):
    from veil.privacy.ledger import PrivacyLedger

    with PrivacyLedger.for_dataset({"source": "synthetic", "seed": 0}) as ledger:
        ledger.set_training_budget(3.0, reason="test")
    assert _train(tmp_path, "dp.noise_multiplier=null", "dp.target_epsilon=5", "trainer.max_steps=2") == 2
    assert "training budget" in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "private" / "last.ckpt").exists()
    assert _train(tmp_path / "ok", "dp.noise_multiplier=null", "dp.target_epsilon=2", "trainer.max_steps=1") == 0
    assert _train(tmp_path / "no", "dp.noise_multiplier=null", "dp.target_epsilon=2", "trainer.max_steps=1") == 2
