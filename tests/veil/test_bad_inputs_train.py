"""Bad input to `veil train` and `veil train-classifier` (issue 12): one line naming the input, exit 2.

Every case runs the CLI in-process (``veil.cli.main``) and checks the four promises: exit status 2,
the message names the offending key, flag or file, no traceback, nothing recorded in the dataset's
privacy database, and the existing ``--out`` (a folder holding a note of the user's) untouched.
The last tests train: a run that diverges stops with an error and is not reported as private, and
an ``--out`` with spaces and non-ASCII characters works.
"""

import json
import math

import pytest
from dp_helpers import TINY, train_cli

from veil.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = {"source": "synthetic", "seed": 0}
NOTE = "my notes: keep me\n"


def _ledger_runs() -> list:
    """The training runs in the synthetic dataset's privacy database ([] when there is none)."""
    from veil.privacy.ledger import PrivacyLedger, ledger_path_for

    if not ledger_path_for(SPEC).exists():
        return []
    with PrivacyLedger.for_dataset(SPEC) as ledger:
        return ledger.training_runs()


@pytest.fixture
def out(tmp_path):
    """An existing output folder holding a file of the user's."""
    folder = tmp_path / "existing out"
    folder.mkdir()
    (folder / "notes.txt").write_text(NOTE)
    return folder


def _refused(capsys, code, names, out=None):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)
    assert _ledger_runs() == []
    if out is not None:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == NOTE
    return err


# Every numeric dp.* and trainer.* option, with NaN, infinity and a negative value. target_epsilon
# is exclusive with the tiny config's noise_multiplier, so its cases clear the latter.
NUMERIC = ["dp.target_epsilon", "dp.noise_multiplier", "dp.max_grad_norm", "dp.delta", "dp.noise_multiplicity",
           "dp.max_physical_batch_size", "dp.reproducible_noise_seed", "trainer.max_epochs", "trainer.max_steps",
           "trainer.devices", "trainer.checkpoint_every_n_steps", "trainer.log_every_n_steps"]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "-1"])
@pytest.mark.parametrize("key", NUMERIC)
def test_train_refuses_non_finite_and_negative_numbers(key, value, out, capsys):
    extra = ["dp.noise_multiplier=null"] if key == "dp.target_epsilon" else []
    _refused(capsys, train_cli(out, TINY + extra, f"{key}={value}"), [key], out)


@pytest.mark.parametrize("override, names", [
    ("data.batch_size=abc", ["data.batch_size", "'abc'"]),
    ("data.batch_size=true", ["data.batch_size", "bool"]),
    ("data.batch_size=.nan", ["data.batch_size"]),
    ("data.num_images=-5", ["data.num_images"]),
    ("data.val_fraction=.nan", ["data.val_fraction"]),
    ("data.val_fraction=-0.1", ["data.val_fraction"]),
    ("data.attributes=7", ["data.attributes"]),
    ("trainer.max_steps='5'", ["trainer.max_steps", "'5'"]),
    ("trainer.max_steps=true", ["trainer.max_steps"]),
    ("trainer.max_time=1:00:00", ["trainer.max_time"]),  # YAML 1.1 reads this as the integer 3600
    ("model.block_out_channels=abc", ["model.block_out_channels"]),
    ("model.block_out_channels=[16,abc]", ["model.block_out_channels[1]"]),
    ("model.attention_head_dim=24", ["model.block_out_channels", "model.attention_head_dim"]),  # 32 heads of 24?
    ("model.attention_head_dim=64", ["model.attention_head_dim"]),  # wider than the channels: was ZeroDivisionError
    ("model.attention_head_dim=0", ["model.attention_head_dim"]),
    ("model.norm_num_groups=5", ["model.norm_num_groups"]),
    ("model.attention_levels=[maybe,true]", ["model.attention_levels[0]"]),
    ("model.dropout=.nan", ["model.dropout"]),
    ("optim.lr=.nan", ["optim.lr"]),
    ("optim.lr=.inf", ["optim.lr"]),
    ("optim.lr=-1", ["optim.lr"]),
    ("optim.lr=abc", ["optim.lr"]),
    ("optim.weight_decay=-1", ["optim.weight_decay"]),
    ("optim.ema_decay=.nan", ["optim.ema_decay"]),
    ("optim.cond_drop_prob=.nan", ["optim.cond_drop_prob"]),
    ("seed=x", ["seed"]),
    ("seed=-1", ["seed"]),
    ("seed=.nan", ["seed"]),
    ("dp.enabled=maybe", ["dp.enabled"]),
    ("dp.secure_mode=true", ["dp.secure_mode"]),
    ("dp.accountant=gdp", ["dp.accountant"]),
    ("data.nmages=10", ["data.nmages"]),
])
def test_train_refuses_values_of_the_wrong_type_or_range(override, names, out, capsys):
    _refused(capsys, train_cli(out, TINY, override), names, out)


def test_train_refuses_a_set_that_is_not_yaml(out, capsys):
    _refused(capsys, train_cli(out, TINY, "data.attributes=[smiling"), ["--set", "data.attributes"], out)


@pytest.mark.parametrize("content, names", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", ["--config", "YAML"]),  # binary
    (b"dp: [unclosed\n", ["--config", "YAML"]),
    (b"- just\n- a list\n", ["--config", "mapping"]),
    (b"dp:\n  target_epsilon: .inf\n  noise_multiplier: null\n", ["dp.target_epsilon"]),
])
def test_train_refuses_a_bad_config_file(content, names, tmp_path, out, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    code = main(["train", "--config", str(config), "--out", str(out), "--no-progress"])
    _refused(capsys, code, names, out)


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text(NOTE)
    _refused(capsys, train_cli(target, TINY), ["--out", str(target), "file"])
    assert target.read_text() == NOTE


def test_train_refuses_an_out_it_cannot_create(tmp_path, capsys):
    """Tests run as root, so "unwritable" is a folder under a file."""
    (tmp_path / "a_file").write_text(NOTE)
    target = tmp_path / "a_file" / "run"
    _refused(capsys, train_cli(target, TINY), ["--out", str(target)])
    assert (tmp_path / "a_file").read_text() == NOTE


def test_train_refuses_a_missing_data_folder_and_leaves_no_folder(tmp_path, capsys):
    """Found after --out was created (at dm.setup): the new folder is removed again."""
    _refused(capsys, train_cli(tmp_path / "new", TINY, "data.source=celeba", f"data.root={tmp_path / 'nowhere'}"),
             ["nowhere"])
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------- train-classifier
def _clf(out, *args):
    return main(["train-classifier", "--out", str(out), "--data", "source=synthetic,num_images=64", *args])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_train_classifier_refuses_a_bad_dp_epsilon(value, out, capsys):
    _refused(capsys, _clf(out, f"--dp-epsilon={value}"), ["--dp-epsilon"], out)


@pytest.mark.parametrize("args, names", [
    (["--data", "source=synthetic,nmages=10"], ["--data", "'nmages'", "num_images"]),
    (["--data", "source=synthetic,num_images=abc"], ["num_images", "'abc'"]),
    (["--data", "source=synthetic,num_images=-3"], ["num_images"]),
    (["--data", "source=synthetic,batch_size=8"], ["--data", "batch_size", "--set batch_size"]),
    (["--data", "source=imagenet"], ["source", "imagenet"]),
    (["--set", "model.channels=abc"], ["model.channels"]),
    (["--set", "model.channels=[8,12]"], ["model.channels", "model.norm_num_groups"]),
    (["--set", "model.chanels=[8,16]"], ["model.chanels"]),
    (["--set", "epochs=.nan"], ["epochs"]),
    (["--set", "epochs='2'"], ["epochs", "'2'"]),
    (["--set", "lr=.inf"], ["lr"]),
    (["--set", "lr=-1"], ["lr"]),
    (["--set", "batch_size=abc"], ["batch_size"]),
    (["--set", "head_l2=.nan"], ["head_l2"]),
    (["--set", "refit_head=maybe"], ["refit_head"]),
    (["--set", "seed=x"], ["seed"]),
    (["--set", "dp.enabled=true", "--set", "refit_head=false", "--set", "dp.max_grad_norm=.inf"],
     ["dp.max_grad_norm"]),
    (["--set", "dp.enabled=true", "--set", "refit_head=false", "--set", "dp.noise=1"], ["dp.noise"]),
])
def test_train_classifier_refuses_bad_options(args, names, out, capsys):
    _refused(capsys, _clf(out, *args), names, out)


def test_train_classifier_refuses_an_out_that_is_a_file_or_under_one(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text(NOTE)
    _refused(capsys, _clf(target), ["--out", str(target)])
    _refused(capsys, _clf(target / "clf"), ["--out", str(target / "clf")])
    assert target.read_text() == NOTE


# ------------------------------------------------------------------------------------- runs that diverge
def test_a_diverging_run_stops_before_its_first_checkpoint_and_leaves_nothing(tmp_path, capsys):
    """lr = 1e30 overflows the weights in a step or two: the run stops with an error naming the cause,
    prints no "privacy spent", removes the folder it created, and its database row says failed."""
    out = tmp_path / "diverged"
    code = train_cli(out, TINY, "optim.lr=1.0e30", "trainer.checkpoint_every_n_steps=100")
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err, captured.err
    assert "NaN or infinite" in captured.err and "optim.lr" in captured.err
    assert "privacy spent" not in captured.out
    assert not out.exists()
    assert [r["status"] for r in _ledger_runs()] == ["failed"]


def test_a_run_that_diverges_after_a_checkpoint_does_not_claim_privacy(tmp_path, capsys, monkeypatch):
    """NaN loss at step 3, after the checkpoint of step 2: the release of step 2 stays (resumable),
    privacy.json says "private": false with the reason, and is strict JSON."""
    from veil.lightning_modules.diffusion_module import DPDiffusionModule

    chunk_loss = DPDiffusionModule.chunk_loss

    def nan_from_step_3(self, x0, attrs):
        loss, k = chunk_loss(self, x0, attrs)
        return (loss * float("nan") if self.dp_steps >= 2 else loss), k

    monkeypatch.setattr(DPDiffusionModule, "chunk_loss", nan_from_step_3)
    out = tmp_path / "diverged late"
    assert train_cli(out, TINY) == 2
    captured = capsys.readouterr()
    assert "step 3" in captured.err and "privacy spent" not in captured.out and "Traceback" not in captured.err
    record = json.loads((out / "privacy.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record["private"] is False and record["status"] == "failed" and "step 3" in record["not_private_reason"]
    assert (out / "model").is_dir() and (out / "private" / "last.ckpt").is_file()
    assert [r["status"] for r in _ledger_runs()] == ["failed"]


def test_a_diverging_classifier_run_leaves_nothing_and_counts_as_failed(tmp_path, capsys):
    out = tmp_path / "clf"
    code = _clf(out, "--set", "lr=1.0e30", "--set", "epochs=1", "--set", "batch_size=16")
    captured = capsys.readouterr()
    assert code == 2 and "NaN or infinite" in captured.err and "Traceback" not in captured.err, captured.err
    assert "wrote" not in captured.out and not out.exists()
    assert [r["status"] for r in _ledger_runs()] == ["failed"]


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the first step: one line, exit 130 (not Lightning's sys.exit(1)), the new --out removed,
    the database row marked failed."""
    import signal

    from veil.lightning_modules.diffusion_module import DPDiffusionModule

    def interrupt(self, x0, attrs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DPDiffusionModule, "chunk_loss", interrupt)
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = train_cli(tmp_path / "interrupted", TINY)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl-C
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "interrupted" in err, err
    assert not (tmp_path / "interrupted").exists()
    assert [r["status"] for r in _ledger_runs()] == ["failed"]


def test_out_with_spaces_and_unicode_works(tmp_path, capsys):
    out = tmp_path / "runs ünïcødé 顔" / "dp 32"
    assert train_cli(out, TINY) == 0
    assert "privacy spent" in capsys.readouterr().out
    record = json.loads((out / "privacy.json").read_text())
    assert record["private"] is True and math.isfinite(record["epsilon"])
    assert (out / "model").is_dir()
