"""Classifier guidance: the noise-conditional classifier, its DP training, and the guided sampler."""

import pytest
import torch
from unlearn_helpers import RECIPE, datamodule, one_thread

from veil.errors import ConfigError
from veil.lightning_modules import checkpoints as CK
from veil.lightning_modules.diffusion import guidance as G
from veil.lightning_modules.diffusion import sample as S
from veil.lightning_modules.models.classifier import AttributeClassifier, attribute_bce
from veil.jobs import train_classifier as TC
from veil.jobs import unlearn as UJ

NOISY = {"channels": [8, 8, 8], "feature_dim": 8, "norm_num_groups": 4, "noise_conditional": True}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _noisy_model(k=3):
    torch.manual_seed(0)
    return AttributeClassifier(num_attributes=k, **NOISY)


def test_noise_conditional_classifier_depends_on_t_and_defaults_to_clean():
    model = _noisy_model()
    x = torch.randn(4, 3, 32, 32)
    zero = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(model(x), model(x, zero))
    assert not torch.allclose(model(x, zero), model(x, torch.full((4,), 700)))
    torch.testing.assert_close(model(x, torch.tensor([700])), model(x, torch.full((4,), 700)))  # broadcast
    # a clean-image classifier keeps its parameter names (old checkpoints still load)
    plain = AttributeClassifier(num_attributes=3, channels=(8, 8, 8), norm_num_groups=4, feature_dim=8)
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra and all(n.startswith(("time_mlp.", "time_shift.")) for n in extra)


def test_opacus_per_sample_gradients_of_the_noise_conditional_classifier():
    from veil.lightning_modules.dp.grad_sample import attach_grad_sampler

    model = _noisy_model()
    x, a = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 3)).float() * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    names = [n for n, _ in model.named_parameters()]
    reference = {n: [] for n in names}
    for i in range(4):
        model.zero_grad()
        attribute_bce(model(x[i : i + 1], t[i : i + 1]), a[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            reference[n].append(p.grad.clone())
    model.zero_grad()
    sampler = attach_grad_sampler(model)
    attribute_bce(model(x, t), a).mean().backward()
    for n, p in model.named_parameters():  # time_mlp and time_shift included
        torch.testing.assert_close(p.grad_sample, torch.stack(reference[n]), rtol=1e-4, atol=1e-6)
    sampler._close()


def test_noise_multiplicity_averages_each_examples_k_draws():
    """Under DP with K draws, an example's gradient is the mean of its K rows' gradients (same t, noise)."""
    from veil.lightning_modules.classifier_module import AttributeClassifierModule
    from veil.lightning_modules.dp.grad_sample import (
        attach_grad_sampler,
        fold_noise_draws,
    )

    k, b = 3, 4
    module = AttributeClassifierModule(
        model_kwargs={"num_attributes": 3, **NOISY}, attribute_names=["a", "b", "c"], train_size=100,
        sample_rate=0.04, planned_steps=1,
        dp={"enabled": True, "noise_multiplier": 1.0, "target_epsilon": None, "noise_multiplicity": k,
            "accountant": "rdp"})
    model = module.model
    x, a = torch.randn(b, 3, 32, 32), torch.randint(0, 2, (b, 3)).float() * 2 - 1
    torch.manual_seed(5)  # the draws of batch_loss, repeated by hand below
    t = torch.randint(0, 1000, (b * k,))
    noise = torch.randn(b * k, 3, 32, 32)
    abar = module.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x.repeat_interleave(k, 0) + (1 - abar).sqrt() * noise
    want = []
    for i in range(b):
        model.zero_grad()
        rows = slice(i * k, (i + 1) * k)
        attribute_bce(model(x_t[rows], t[rows]), a.repeat_interleave(k, 0)[rows]).mean().backward()
        want.append(model.head.weight.grad.clone())
    model.zero_grad()
    sampler = attach_grad_sampler(model)
    torch.manual_seed(5)
    loss, got_k = module.batch_loss(x, a)
    loss.backward()
    fold_noise_draws(model.parameters(), b, got_k)
    assert got_k == k
    torch.testing.assert_close(model.head.weight.grad_sample, torch.stack(want), rtol=1e-4, atol=1e-6)
    sampler._close()


def _train_guide(out, **overrides):
    dp = {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp",
          "max_physical_batch_size": 16, "noise_multiplicity": 2}
    recipe = TC.ClassifierRecipe(**{**RECIPE, "epochs": 1, "refit_head": False, "dp": dp,
                                    "model": {**NOISY}, **overrides})
    return TC.train_classifier(recipe=recipe, datamodule=datamodule(num_images=160, poisson=True), out=out)


def test_dp_training_of_a_guidance_classifier_records_schedule_and_noisy_accuracy(tmp_path):
    record = _train_guide(tmp_path)
    assert record["privacy"]["enabled"] and record["privacy"]["noise_multiplicity"] == 2
    assert set(record["test_accuracy_by_timestep"]) == {"0", "250", "500", "750"}
    assert all(0 <= v <= 1 for v in record["test_accuracy_by_timestep"].values())
    model, ckpt = CK.load_classifier(tmp_path)
    assert model.noise_conditional and ckpt["veil"]["scheduler_config"]["num_train_timesteps"] == 1000
    with pytest.raises(ConfigError, match="noise-conditional"):
        UJ.run_unlearn(model=tmp_path, revision=tmp_path, method="first", out=tmp_path / "u")
    with pytest.raises(ConfigError, match="refit_head"):
        TC.ClassifierRecipe(model={**NOISY})  # refit_head defaults to true


class _Brightness(torch.nn.Module):
    """A 'classifier' whose one logit is 0.1 x the summed pixel values: guidance toward +1 brightens."""

    def forward(self, x, t):
        return 0.1 * x.sum(dim=(1, 2, 3))[:, None]


def _guide(model=None, names=("bright",), scale=1.0, privacy=None, data_spec=None):
    from veil.lightning_modules.diffusion.schedule import default_scheduler_config

    return G.GuidanceClassifier(model or _Brightness(), list(names), privacy or {"enabled": False}, data_spec,
                                default_scheduler_config(), scale)


def test_log_prob_grad_is_the_gradient_of_the_specified_attributes_only():
    guide = _guide(names=("a", "b"))
    guide.model = AttributeClassifier(num_attributes=2, **NOISY)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 100])
    targets = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    xr = x.clone().requires_grad_(True)
    logits = guide.model(xr, t)
    want = torch.autograd.grad(torch.nn.functional.logsigmoid(logits[0, 0]) + torch.nn.functional.logsigmoid(
        -logits[1, 0]) + torch.nn.functional.logsigmoid(logits[1, 1]), xr)[0]
    torch.testing.assert_close(guide.log_prob_grad(x, t, targets), want)


def _draw(guide, targets, *, steps):
    """4 samples of a random tiny UNet (unconditional), the same initial noise every call."""
    from dp_helpers import TINY_MODEL

    from veil.lightning_modules.diffusion.schedule import default_scheduler_config
    from veil.lightning_modules.models.unet import AttributeConditionalUNet

    torch.manual_seed(0)
    unet = AttributeConditionalUNet(**TINY_MODEL).eval()
    return S.ddim_sample(unet, default_scheduler_config(), torch.zeros(4, 3), num_steps=steps, guidance_scale=0.0,
                         generator=torch.Generator().manual_seed(1), guide=guide, guide_targets=targets)


def test_guidance_steers_samples_and_scale_zero_changes_nothing():
    plain = _draw(None, None, steps=5)
    up, down = torch.ones(4, 1), -torch.ones(4, 1)
    torch.testing.assert_close(_draw(_guide(scale=0.0), up, steps=5), plain)
    brighter, darker = _draw(_guide(scale=5.0), up, steps=5), _draw(_guide(scale=5.0), down, steps=5)
    assert brighter.mean() > plain.mean() + 0.04 > darker.mean() + 0.08  # measured: 0.044, -0.018, -0.102
    unspecified = _draw(_guide(scale=5.0), torch.zeros(4, 1), steps=5)  # attribute 0 = unknown: no pull
    torch.testing.assert_close(unspecified, plain)


def test_strong_guidance_is_not_reversed_by_the_x0_clip():
    """At a large scale the guided x0 saturates at the clip; the step must then re-derive eps from
    the clipped x0, or the push survives reversed in DDIM's direction term (measured before the fix:
    guidance toward 'bright' gave all-black samples)."""
    plain = _draw(None, None, steps=10).mean()
    assert _draw(_guide(scale=200.0), torch.ones(4, 1), steps=10).mean() > plain + 0.1
    assert _draw(_guide(scale=200.0), -torch.ones(4, 1), steps=10).mean() < plain - 0.1


def test_targets_map_by_name_and_unknown_attributes_fail():
    guide = _guide(names=("hat", "smiling"))
    attrs = torch.tensor([[1.0, 0.0, -1.0]])  # over the denoiser's names
    torch.testing.assert_close(guide.targets_for(attrs, ["smiling", "beard", "hat"]), torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(ConfigError, match="beard"):
        guide.targets_for(torch.tensor([[0.0, 1.0, 0.0]]), ["smiling", "beard", "hat"])


def test_combined_privacy_says_whose_data_pays():
    syn = lambda seed: {"source": "synthetic", "seed": seed}  # noqa: E731
    dp = {"enabled": True, "private": True, "epsilon": 9.5, "delta": 1e-5}
    ckpt = CK.DiffusionCheckpoint(None, {}, [], {"enabled": False}, syn(1), {}, 1.0)
    line = S.combined_privacy(ckpt, _guide(privacy=dp, data_spec=syn(0)))
    assert "epsilon 9.500" in line and "different data" in line and S.LABEL_FREE in line
    assert "not private" in S.combined_privacy(ckpt, _guide(privacy=dp, data_spec=syn(1))).split("; ")[-1]
    both = CK.DiffusionCheckpoint(None, {}, [], {"enabled": True, "private": True, "epsilon": 1.0, "delta": 2e-5},
                                  syn(0), {}, 0.1)
    line = S.combined_privacy(both, _guide(privacy=dp, data_spec=syn(0)))
    assert "at most epsilon 10.500, delta 3e-05" in line  # item 13: the deltas add too


def test_combined_privacy_counts_unknown_data_as_the_same_and_handles_none():
    """Item 13: a missing data spec is "maybe the same data" (costs add), not "different data";
    an unbounded epsilon (None) and a record from before secret noise are reported as not private."""
    dp = {"enabled": True, "private": True, "epsilon": 2.0, "delta": 1e-6}
    unknown = CK.DiffusionCheckpoint(None, {}, [], dict(dp), None, {}, 0.1)
    line = S.combined_privacy(unknown, _guide(privacy=dp, data_spec={"source": "synthetic", "seed": 0}))
    assert "at most epsilon 4.000, delta 2e-06" in line and "different data" not in line
    unbounded = {"enabled": True, "private": True, "epsilon": None, "delta": 1e-6}
    line = S.combined_privacy(unknown, _guide(privacy=unbounded, data_spec=None))
    assert "not private" in line.split("; ")[-1]
    old = CK.DiffusionCheckpoint(None, {}, [], {"enabled": True, "epsilon": 1.0, "delta": 1e-6}, None, {}, 0.1)
    assert S.combined_privacy(old, None).startswith("denoiser: not private (trained before")


def test_load_guidance_classifier_checks_kind_and_schedule(models, tmp_path):
    from veil.lightning_modules.diffusion.schedule import default_scheduler_config

    root = models
    with pytest.raises(ConfigError, match="noise schedule"):
        G.load_guidance_classifier(root / "guide", scale=1.0,
                                   scheduler_config=default_scheduler_config(500))
    with pytest.raises(ConfigError, match="classifier-scale"):
        G.load_guidance_classifier(root / "guide", scale=-1, scheduler_config=default_scheduler_config())
    clean = TC.ClassifierRecipe(**{**RECIPE, "epochs": 1})
    TC.train_classifier(recipe=clean, datamodule=datamodule(num_images=96), out=tmp_path)
    with pytest.raises(ConfigError, match="clean images"):
        G.load_guidance_classifier(tmp_path, scale=1.0, scheduler_config=default_scheduler_config())


def test_cli_sample_with_a_guidance_classifier(models, tmp_path, capsys):
    from veil.cli import main

    root = models
    out = tmp_path / "g.png"
    args = ["sample", "--checkpoint", str(root / "unet"), "--classifier", str(root / "guide"),
            "--attributes", "smiling=1", "--n", "2", "--steps", "3", "--out", str(out)]
    assert main(args) == 0
    said = capsys.readouterr()
    assert out.is_file() and "guidance classifier: epsilon" in said.out and S.LABEL_FREE in said.out
    assert "never learned" not in said.err  # a label-free model samples unconditionally by default
    assert main(args[:-2] + ["--guidance", "2", "--force", "--out", str(out)]) == 0
    assert "never learned" in capsys.readouterr().err
