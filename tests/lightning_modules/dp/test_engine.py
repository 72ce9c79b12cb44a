"""``dp.engine: ghost`` through the one DP step, against ``dp.engine: opacus`` and a per-example loop.

The ghost engine (``dp.ghost.GhostClipper`` + ``kernels.optimizer.GhostDPOptimizer``) must give the
update Opacus's per-sample hooks give, from the same draws: on the UNet with attention and on the
noise-conditional classifier, with noise multiplicity K = 4 and virtual steps (physical chunks smaller
than the batch), at sigma = 0 (the clipped mean itself) and with noise (the noise is sigma C / B on
top, drawn from the OS-seeded generator, so only its scale is checked). Under bf16 autocast the norms
and the clipped sum match the fp32 loop within bf16's precision. A layer it does not support is
refused by name when the optimizer is configured, before any step.
Run: OMP_NUM_THREADS=1 pytest tests/lightning_modules/dp/test_engine.py
"""

import copy

import pytest
import torch
from dp_helpers import TINY_MODEL, fit_batches, make_batch
from torch import nn

from veil.lightning_modules.classifier_module import AttributeClassifierModule
from veil.lightning_modules.diffusion_module import DPDiffusionModule
from veil.lightning_modules.dp.ghost import GhostClipper, UnsupportedLayer

pytestmark = pytest.mark.usefixtures("single_thread")


class FixedDraws:
    """The same (t, noise) for row r of the run every time, so both engines see the same losses."""

    def __init__(self, module, rows, res=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.module, self.pos = module, 0
        self.t = torch.randint(0, 1000, (rows,), generator=g)
        self.noise = torch.randn(rows, 3, res, res, generator=g)

    def __call__(self, x0, attrs):
        rows = torch.arange(self.pos, self.pos + len(x0))
        self.pos += len(x0)
        a_bar = self.module.alphas_cumprod[self.t[rows]].view(-1, 1, 1, 1)
        x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * self.noise[rows]
        return (self.module.model(x_t, self.t[rows], attrs) - self.noise[rows]).pow(2).mean(dim=(1, 2, 3))


def _diffusion(engine, *, sigma=0.0, C=0.05, k=4, physical=2, kernel="auto"):
    dp = dict(enabled=True, target_epsilon=None, noise_multiplier=sigma, max_grad_norm=C, accountant="rdp",
              kernel=kernel, engine=engine, max_physical_batch_size=physical, noise_multiplicity=k)
    torch.manual_seed(0)
    return DPDiffusionModule(model_kwargs=TINY_MODEL, attribute_names=["a", "b", "c"], train_size=10,
                             sample_rate=0.5, planned_steps=10, dp=dp, optimizer="sgd", lr=1.0,
                             cond_drop_prob=0.0, attr_drop_prob=0.0)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _diffusion_update(engine, batches, **kw):
    module = _diffusion(engine, **kw)
    rows = sum(len(x) for x, _ in batches) * kw.get("k", 4)
    module.per_row_loss = FixedDraws(module, rows)
    before = _flat(module.model)
    fit_batches(module, batches)
    return before - _flat(module.model), module


@pytest.mark.parametrize("k,physical", [(1, 64), (4, 2)])  # (4, 2): K = 4 and three chunks (virtual steps)
def test_ghost_update_equals_opacus_update_on_the_unet(k, physical):
    batches = [make_batch(5)]
    ghost, module = _diffusion_update("ghost", batches, k=k, physical=physical)
    opacus, _ = _diffusion_update("opacus", batches, k=k, physical=physical)
    assert module._ghost_clipper is not None and getattr(module, "_grad_sampler", None) is None
    assert ghost.abs().max() > 0
    # rtol 1e-4: the same products summed in another order (Gram matrices vs per-sample einsums)
    torch.testing.assert_close(ghost, opacus, rtol=1e-4, atol=1e-4 * float(opacus.abs().max()))


def test_ghost_update_of_two_steps_with_an_empty_batch_equals_opacus():
    empty = (torch.zeros(0, 3, 16, 16), torch.zeros(0, 3))
    batches = [make_batch(3), empty, make_batch(1, seed=2)]  # batch 3, an empty Poisson batch, batch 1
    ghost, module = _diffusion_update("ghost", batches, k=4, physical=2)
    opacus, _ = _diffusion_update("opacus", batches, k=4, physical=2)
    assert module.dp_steps == 3
    torch.testing.assert_close(ghost, opacus, rtol=1e-4, atol=1e-4 * float(opacus.abs().max()))


def test_ghost_noise_has_the_accounted_scale():
    """sigma = 10 swamps the clipped mean: the update is N(0, (sigma C / (q N))^2) per coordinate."""
    update, module = _diffusion_update("ghost", [make_batch(3)], sigma=10.0, C=0.05, k=2, physical=2)
    want = 10.0 * 0.05 / (0.5 * 10)
    assert module.privacy()["noise_multiplier"] == 10.0
    assert update.std().item() == pytest.approx(want, rel=0.05)  # ~1e4 coordinates


def _classifier(engine, *, k=4):
    dp = dict(enabled=True, target_epsilon=None, noise_multiplier=0.0, max_grad_norm=0.02, accountant="rdp",
              engine=engine, max_physical_batch_size=3, noise_multiplicity=k)
    torch.manual_seed(0)
    return AttributeClassifierModule(
        model_kwargs=dict(num_attributes=3, resolution=16, channels=[8, 16], feature_dim=16, norm_num_groups=4,
                          noise_conditional=True),
        attribute_names=["a", "b", "c"], train_size=10, sample_rate=0.5, planned_steps=4, dp=dp, lr=0.1)


def test_ghost_update_equals_opacus_update_on_the_noise_conditional_classifier():
    x, a = make_batch(5)
    updates = []
    for engine in ("ghost", "opacus"):
        module = _classifier(engine)
        before = _flat(module.model)
        torch.manual_seed(1)  # the classifier draws its own (t, noise): the same seed, the same draws
        module.batch_loss = _seeded(module.batch_loss)
        fit_batches(module, [(x, a)])
        updates.append(before - _flat(module.model))
    ghost, opacus = updates
    assert ghost.abs().max() > 0
    torch.testing.assert_close(ghost, opacus, rtol=1e-4, atol=1e-4 * float(opacus.abs().max()))


def _seeded(batch_loss):
    """batch_loss with its (t, noise) draws from a fixed stream per call (call i: seed 100 + i)."""
    calls = [0]

    def wrapped(x, attrs):
        state = torch.random.get_rng_state()
        torch.manual_seed(100 + calls[0])
        calls[0] += 1
        try:
            return batch_loss(x, attrs)
        finally:
            torch.random.set_rng_state(state)
    return wrapped


def _loop(model, row_loss, x, t, noise, a, k):
    """Per-example norms and clipped sums by plain autograd (fp32, no autocast)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(x) // k):
        s = slice(i * k, (i + 1) * k)
        g = torch.autograd.grad(row_loss(model, x[s], t[s], noise[s], a[s]).mean(), params)
        grads.append(torch.cat([v.flatten() for v in g]))
    return torch.stack(grads)


def _unet_row_loss(model, x, t, noise, a):
    return (model(x + noise * 0.5, t, a) - noise).pow(2).mean(dim=(1, 2, 3))


def test_bf16_autocast_matches_the_fp32_loop_within_bf16_precision():
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3 per operation) and autocast runs
    the convolutions and matmuls, forward and backward, in bf16, so the output gradients the clipper
    reads are bf16; it accumulates its Grams and sums in fp32. Measured against the fp32 loop (3 seeds):
    norms within 1e-3 relative, the clipped sum within 5e-3 of its largest entry. Tolerances: 1e-2 and
    2e-2 (a missing 1/K or clip factor is off by > 0.5)."""
    from veil.lightning_modules.models.unet import AttributeConditionalUNet

    torch.manual_seed(0)
    model = AttributeConditionalUNet(**TINY_MODEL)
    k, b = 2, 3
    x, a = make_batch(b * k)
    t = torch.randint(0, 1000, (b * k,))
    noise = torch.randn_like(x)
    per_example = _loop(copy.deepcopy(model), _unet_row_loss, x, t, noise, a, k)
    norms_true = per_example.norm(dim=1)
    C = float(norms_true.median())
    clipper = GhostClipper(model, max_grad_norm=C, noise_multiplicity=k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _unet_row_loss(model, x, t, noise, a)
        norms = clipper.backward(losses.float())
    want = (per_example * (C / (norms_true + 1e-6)).clamp(max=1.0)[:, None]).sum(0)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(norms, norms_true, rtol=1e-2, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))
    assert clipper.stored_tensors == 0


def test_veil_train_under_bf16_mixed_precision_with_the_ghost_engine(tmp_path):
    """Lightning's bf16-mixed (autocast around the step) through `veil train`: it trains and accounts."""
    import json

    from dp_helpers import TINY, train_cli

    assert train_cli(tmp_path / "bf16", TINY + ["trainer.precision=bf16-mixed", "trainer.max_steps=2"]) == 0
    privacy = json.loads((tmp_path / "bf16" / "privacy.json").read_text())
    assert privacy["steps"] == 2 and 0 < privacy["epsilon"] < float("inf")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dp"]["engine"] == "ghost"


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)


def test_an_unsupported_layer_is_refused_when_the_optimizer_is_configured():
    module = _diffusion("ghost")
    module.model.mid = _WithBatchNorm()  # any trainable module of a kind ghost clipping cannot handle
    with pytest.raises(UnsupportedLayer, match=r"mid\.norm \(BatchNorm2d\)"):
        module.configure_optimizers()


def test_engine_is_validated():
    from veil.errors import ConfigError

    with pytest.raises(ConfigError, match="dp.engine"):
        _diffusion("hooks")
