"""Public pretraining + private fine-tuning: trainable subsets, the start checkpoint, provenance."""

import copy
import json
import shutil

import pytest
import torch
from dp_helpers import TINY, TINY_MODEL, fit_batches, make_batch, train_cli

from veil.errors import ConfigError, PrivacyError
from veil.lightning_modules.data.specs import same_dataset
from veil.lightning_modules.diffusion_module import DPDiffusionModule
from veil.lightning_modules.models.params import (
    PARAMETER_GROUPS,
    lr_groups,
    resolve_trainable,
)
from veil.lightning_modules.models.unet import AttributeConditionalUNet
from veil.jobs.config import load_config
from veil.jobs.train import run_training


def _module(trainable, *, sigma=0.0, C=0.05, kernel="opacus", lr_scale=None):
    dp = dict(enabled=True, target_epsilon=None, noise_multiplier=sigma, max_grad_norm=C, kernel=kernel)
    return DPDiffusionModule(model_kwargs=TINY_MODEL, attribute_names=["a", "b", "c"], train_size=10,
                             sample_rate=0.5, planned_steps=10, dp=dp, optimizer="sgd", lr=1.0,
                             cond_drop_prob=0.0, attr_drop_prob=0.0, trainable=trainable, lr_scale=lr_scale)


def test_groups_and_patterns_resolve_to_parameter_names():
    model = AttributeConditionalUNet(**TINY_MODEL)
    cond = resolve_trainable(model, ["conditioning"])
    assert any(n.startswith("attribute_embedding.") for n in cond)
    assert any(".time_emb_proj." in n for n in cond) and not any(n.startswith("unet.time_embedding.") for n in cond)
    assert not any(".conv1." in n or "attentions" in n for n in cond)
    norms = resolve_trainable(model, ["norms"])
    assert norms and all("norm" in n for n in norms)
    both = resolve_trainable(model, ["conditioning", "norms"])
    assert set(both) == set(cond) | set(norms)
    assert resolve_trainable(model, None) == [n for n, _ in model.named_parameters()]
    assert resolve_trainable(model, ["unet.conv_out.*"]) == ["unet.conv_out.weight", "unet.conv_out.bias"]
    assert set(PARAMETER_GROUPS) == {"conditioning", "norms"}


def test_lr_scale_groups_and_bad_entries():
    model = AttributeConditionalUNet(**TINY_MODEL)
    groups = lr_groups(model, 0.1, {"attribute_embedding.*": 10, "norms": 2})
    by_lr = {round(g["lr"], 9): len(g["params"]) for g in groups}
    assert by_lr[1.0] == 4 and by_lr[0.2] == len(resolve_trainable(model, ["norms"]))
    assert sum(by_lr.values()) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="optim.lr_scale"):
        lr_groups(model, 0.1, {"monocle.*": 2})
    with pytest.raises(ConfigError, match="optim.lr_scale"):
        load_config(None, TINY + ["optim.lr_scale={norms: -1}"])


@pytest.mark.parametrize("bad", [["monocle.*"], [], "conditioning"])
def test_a_bad_trainable_entry_names_the_option(bad):
    with pytest.raises(ConfigError, match="optim.trainable"):
        resolve_trainable(AttributeConditionalUNet(**TINY_MODEL), bad)


@pytest.mark.parametrize("kernel", ["opacus", "fused"])
@pytest.mark.parametrize("trainable", [["conditioning"], ["conditioning", "norms"]])
def test_noise_free_update_clips_over_the_trainable_parameters_only(trainable, kernel):
    """Norms, clipping and the update use the trainable subset; frozen parameters do not move;
    optim.lr_scale multiplies the step of the parameters it names (SGD: exactly)."""
    torch.manual_seed(0)
    module = _module(trainable, C=0.01, kernel=kernel, lr_scale={"attribute_embedding.*": 3.0})
    x, a = make_batch(4)
    g = torch.Generator().manual_seed(3)
    t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 3, 16, 16, generator=g)

    def loss(model, rows):
        a_bar = module.alphas_cumprod[t[rows]].view(-1, 1, 1, 1)
        x_t = a_bar.sqrt() * x[rows] + (1 - a_bar).sqrt() * noise[rows]
        return (model(x_t, t[rows], a[rows]) - noise[rows]).pow(2).mean(dim=(1, 2, 3))

    before = copy.deepcopy(module.model)
    names = [n for n, p in before.named_parameters() if p.requires_grad]
    want = {n: torch.zeros_like(p) for n, p in before.named_parameters() if n in names}
    for i in range(4):
        ref = copy.deepcopy(before)
        loss(ref, torch.tensor([i])).sum().backward()
        grads = {n: p.grad for n, p in ref.named_parameters() if n in names}
        factor = min(1.0, 0.01 / (torch.sqrt(sum(v.pow(2).sum() for v in grads.values())).item() + 1e-6))
        for n in names:
            want[n] += factor * grads[n] / (0.5 * 10) * (3.0 if n.startswith("attribute_embedding.") else 1.0)
    rows = iter(range(4))
    module.per_row_loss = lambda x0, attrs: loss(module.model, torch.tensor([next(rows) for _ in range(len(x0))]))
    fit_batches(module, [(x, a)])
    after = dict(module.model.named_parameters())
    for n, p0 in before.named_parameters():
        if n in want:
            torch.testing.assert_close(p0.detach() - after[n].detach(), want[n], rtol=1e-4, atol=1e-7)  # p ~ 0.1: fp32 steps ~1e-8
        else:
            assert torch.equal(p0, after[n]), n
    assert module.privacy()["trainable_parameters"] == sum(v.numel() for v in want.values())


def test_same_dataset_compares_synthetic_seeds_and_roots(tmp_path):
    assert same_dataset({"source": "synthetic", "seed": 0}, {"source": "synthetic", "seed": 0})
    assert not same_dataset({"source": "synthetic", "seed": 1}, {"source": "synthetic", "seed": 0})
    assert same_dataset({"source": "celeba", "root": str(tmp_path)}, {"source": "celeba", "root": str(tmp_path / ".")})
    assert not same_dataset({"source": "celeba", "root": str(tmp_path)}, {"source": "folder", "root": str(tmp_path)})


def _faces(folder, *contents):
    folder.mkdir(parents=True)
    for i, content in enumerate(contents):
        (folder / f"{i:06d}.png").write_bytes(content)
    return {"source": "folder", "root": str(folder), "csv": str(folder / "labels.csv")}


def test_same_dataset_compares_content_so_a_copied_private_folder_is_refused(tmp_path):
    # Issue 30: same_dataset compared folder paths, so a copy of the private folder passed as "public".
    from veil.jobs.init_from import check_disjoint
    from veil.privacy.locations import ledger_path_for

    private = _faces(tmp_path / "private", b"face-a", b"face-b", b"face-c")
    copied = _faces(tmp_path / "elsewhere" / "public", b"face-a", b"face-b", b"face-c")
    assert same_dataset(copied, private) and same_dataset(private, copied)
    with pytest.raises(PrivacyError, match="same folder data"):
        check_disjoint(init_data=copied, train_data=private, path=tmp_path / "public.ckpt")
    assert same_dataset(_faces(tmp_path / "one_shared", b"face-c", b"someone else"), private)  # any image shared
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    (tmp_path / "celeba" / "img_align_celeba" / "000001.jpg").write_bytes(b"face-b")
    assert same_dataset({"source": "celeba", "root": str(tmp_path / "celeba")}, private)  # whatever the source
    other = _faces(tmp_path / "other", b"face-x", b"face-y")
    assert not same_dataset(other, private)
    check_disjoint(init_data=other, train_data=private, path=tmp_path / "public.ckpt")  # disjoint: accepted
    assert not same_dataset({"source": "synthetic", "seed": 0}, private)
    gone = _faces(tmp_path / "gone", b"face-a", b"face-z")
    ledger_path_for(gone)  # the index of the privacy databases now knows its images
    shutil.rmtree(tmp_path / "gone")
    assert same_dataset(gone, private) and not same_dataset(gone, other)  # from the index


def _train(out, *extra, resume=False):
    return train_cli(out, TINY, *extra, resume=resume)


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """A tiny non-private model of seed-1 synthetic faces trained without attribute labels."""
    out = tmp_path_factory.mktemp("public")
    assert _train(out, "seed=1", "dp.enabled=false", "optim.cond_drop_prob=1.0", "trainer.max_steps=2") == 0
    return out / "model"


def test_private_run_starts_from_the_public_weights_and_records_them(public, tmp_path):
    from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
    from veil.jobs.train import build_datamodule, build_module
    from veil.jobs.init_from import load_start

    cfg = load_config(None, TINY + [f"model.init_from={public}"])
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    provenance = load_start(module, public, data_spec=dm.spec())
    start = load_diffusion_checkpoint(public).model
    refolded = {"attribute_embedding.2.weight", "attribute_embedding.2.bias"}  # c(a) = c(0) at the start
    for key, value in start.state_dict().items():
        if key not in refolded:
            assert torch.equal(module.model.state_dict()[key], value) and torch.equal(module.ema.state_dict()[key], value)
    assert not module.model.attribute_embedding[2].weight.any()
    assert torch.equal(module.ema.attribute_embedding[2].bias, module.model.attribute_embedding[2].bias)
    assert provenance["used_attribute_labels"] is False and provenance["data_spec"]["seed"] == 1
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 900])
    with torch.no_grad():  # the start ignores attributes, exactly as the public model did
        unconditional = start(x, t, torch.zeros(2, 6))
        # float32 roundoff of the folded bias (b2 + W2 silu(b1)) is ~1e-6; attributes move outputs by ~0.1
        assert torch.allclose(module.model(x, t, torch.ones(2, 6)), unconditional, atol=1e-5)
        assert not torch.allclose(start(x, t, torch.ones(2, 6)), unconditional, atol=1e-2)

    assert _train(tmp_path, f"model.init_from={public}", "optim.trainable=[conditioning]", "trainer.max_steps=2") == 0
    record = json.loads((tmp_path / "privacy.json").read_text())
    assert record["epsilon"] > 0 and record["initialized_from"]["path"] == str(public)
    assert len(record["initialized_from"]["sha256"]) == 64 and record["trainable_parameters"] < 10**5
    assert _train(tmp_path, f"model.init_from={public}", "optim.trainable=[conditioning]", resume=True) == 0
    resumed = json.loads((tmp_path / "privacy.json").read_text())
    assert resumed["steps"] == 4 and resumed["initialized_from"] == record["initialized_from"]


def test_refuses_a_start_trained_on_the_private_data(public, tmp_path):
    cfg = load_config(None, TINY + ["seed=1", f"model.init_from={public}"])
    with pytest.raises(PrivacyError, match="same synthetic data"):
        run_training(cfg, tmp_path / "o")
    assert not (tmp_path / "o" / "model").exists()


def test_refuses_a_start_with_another_architecture(public, tmp_path, capsys):
    assert _train(tmp_path, f"model.init_from={public}", "model.block_out_channels=[8,16]") == 2
    assert "block_out_channels" in capsys.readouterr().err


def test_missing_start_checkpoint_names_the_option(tmp_path):
    cfg = load_config(None, TINY + [f"model.init_from={tmp_path / 'none.ckpt'}"])
    with pytest.raises(ConfigError, match="model.init_from"):
        run_training(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
