"""DP-SGD arithmetic of ``DPDiffusionModule``: the clipped mean, noise, virtual steps, accounting."""

import copy

import pytest
import torch
from dp_helpers import TINY_MODEL, fit_batches, make_batch

from veil.lightning_modules.diffusion_module import DPDiffusionModule


def _module(*, sigma=0.0, C=0.05, kernel="opacus", physical=64, multiplicity=1, train_size=10, q=0.5,
            accountant="prv", optimizer="sgd", lr=1.0, reproducible=None, engine="ghost"):
    dp = dict(enabled=True, target_epsilon=None, noise_multiplier=sigma, max_grad_norm=C, accountant=accountant,
              kernel=kernel, engine=engine, max_physical_batch_size=physical, noise_multiplicity=multiplicity,
              reproducible_noise_seed=reproducible)
    return DPDiffusionModule(model_kwargs=TINY_MODEL, attribute_names=["a", "b", "c"], train_size=train_size,
                             sample_rate=q, planned_steps=10, dp=dp, optimizer=optimizer, lr=lr,
                             cond_drop_prob=0.0, attr_drop_prob=0.0)


class FixedDraws:
    """Deterministic stand-in for per_row_loss: the same t and noise for row i every time."""

    def __init__(self, module, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.module, self.pos = module, 0
        self.t = torch.randint(0, 1000, (n,), generator=g)
        self.noise = torch.randn(n, 3, 16, 16, generator=g)

    def loss(self, model, x0, attrs, rows):
        a_bar = self.module.alphas_cumprod[self.t[rows]].view(-1, 1, 1, 1)
        x_t = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * self.noise[rows]
        return (model(x_t, self.t[rows], attrs) - self.noise[rows]).pow(2).mean(dim=(1, 2, 3))

    def __call__(self, x0, attrs):
        rows = torch.arange(self.pos, self.pos + len(x0))
        self.pos += len(x0)
        return self.loss(self.module.model, x0, attrs, rows)


def _hand_clipped_mean(model, draws, x, a, *, C, expected_batch):
    """Per-example autograd, clip each to C (Opacus's min(1, C/(norm+1e-6))), sum, divide."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        model.zero_grad()
        draws.loss(model, x[i : i + 1], a[i : i + 1], torch.tensor([i])).sum().backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, C / (norm.item() + 1e-6))
        for acc, g in zip(total, grads):
            acc += factor * g
    return [t / expected_batch for t in total]


@pytest.mark.parametrize("engine", ["ghost", "opacus"])
@pytest.mark.parametrize("kernel", ["opacus", "fused"])
@pytest.mark.parametrize("physical", [64, 2])  # 2 < batch 5: three physical chunks = virtual steps
def test_noise_free_update_is_the_hand_computed_clipped_mean(physical, kernel, engine):
    torch.manual_seed(0)
    module = _module(sigma=0.0, C=0.05, physical=physical, kernel=kernel, engine=engine)
    x, a = make_batch(5)
    draws = FixedDraws(module, 5)
    before = copy.deepcopy(module.model)
    want = _hand_clipped_mean(copy.deepcopy(before), draws, x, a, C=0.05, expected_batch=0.5 * 10)
    module.per_row_loss = draws
    fit_batches(module, [(x, a)])
    for p0, p1, g in zip(before.parameters(), module.model.parameters(), want):
        torch.testing.assert_close(p0.detach() - p1.detach(), g, rtol=1e-4, atol=1e-7)  # SGD, lr = 1


@pytest.mark.parametrize("engine", ["ghost", "opacus"])
@pytest.mark.parametrize("kernel", ["opacus", "fused"])
def test_noise_is_secret_unless_explicitly_reproducible(kernel, engine):
    """The config seed (seed_everything) must not determine the DP noise: the same seed twice gives
    different updates. Only dp.reproducible_noise_seed (tests/debugging, stamped not private) repeats."""
    x, a = make_batch(4)

    def run(*, seed, reproducible=None):
        torch.manual_seed(0)
        module = _module(sigma=1.0, optimizer="sgd", lr=0.1, kernel=kernel, reproducible=reproducible, engine=engine,
                         accountant="rdp")  # the cheaper epsilon (PRV's took most of each step); noise is the point
        fit_batches(module, [(x, a)], seed=seed)
        return torch.cat([p.detach().flatten() for p in module.model.parameters()]), module

    secret = [run(seed=0)[0] for _ in range(2)]
    assert not torch.allclose(secret[0], secret[1]), "the config seed must not replay the noise"
    (one, module), (two, _), (other, _) = run(seed=0, reproducible=5), run(seed=0, reproducible=5), run(seed=0, reproducible=6)
    assert torch.equal(one, two), "the same reproducible seed gives the same parameters"
    assert not torch.allclose(one, other), "another reproducible seed draws other noise"
    assert module.privacy()["private"] is False and "reproducible" in module.privacy()["not_private_reason"]


@pytest.mark.parametrize("engine", ["ghost", "opacus"])
def test_noise_multiplicity_and_empty_batch_run(engine):
    torch.manual_seed(0)
    module = _module(sigma=1.0, multiplicity=3, physical=2, engine=engine)
    empty = (torch.zeros(0, 3, 16, 16), torch.zeros(0, 3))
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters()])
    fit_batches(module, [make_batch(3), empty])
    after = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    assert module.dp_steps == 2 and len(module.accountant.history) > 0
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_grows_and_matches_opacus_accountant(accountant):
    from opacus.accountants import create_accountant

    torch.manual_seed(0)
    module = _module(sigma=1.2, accountant=accountant, q=0.25, train_size=16)
    fit_batches(module, [make_batch(4, seed=s) for s in range(2)])
    eps2 = module.epsilon()
    fit_batches(module, [make_batch(4, seed=s) for s in range(2, 5)])
    eps5 = module.epsilon()
    direct = create_accountant(accountant)
    for _ in range(5):
        direct.step(noise_multiplier=1.2, sample_rate=0.25)
    assert 0 < eps2 < eps5
    assert module.accounting.delta == min(1e-5, 0.1 / 16)  # the default: well below 1/N
    assert eps5 == pytest.approx(direct.get_epsilon(delta=1e-5), rel=1e-6)
    rec = module.privacy()
    assert rec["steps"] == 5 and rec["noise_multiplier"] == 1.2 and rec["sample_rate"] == 0.25


def test_target_epsilon_solves_sigma_with_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    dp = dict(target_epsilon=3.0, noise_multiplier=None, accountant="rdp")
    module = DPDiffusionModule(model_kwargs=TINY_MODEL, attribute_names=["a", "b", "c"], train_size=100,
                               sample_rate=0.1, planned_steps=50, dp=dp)
    want = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, steps=50, accountant="rdp")
    assert module.noise_multiplier == pytest.approx(want)


def test_auto_kernel_is_fused_and_secure_mode_is_refused():
    from veil.errors import ConfigError
    from veil.kernels.optimizer import FusedDPOptimizer

    module = _module(kernel="auto")
    assert isinstance(module.configure_optimizers(), FusedDPOptimizer)
    dp = dict(target_epsilon=None, noise_multiplier=1.0, kernel="auto", secure_mode=True)
    with pytest.raises(ConfigError, match="torchcsprng"):
        DPDiffusionModule(model_kwargs=TINY_MODEL, attribute_names=["a", "b", "c"], train_size=10,
                          sample_rate=0.5, planned_steps=10, dp=dp)


def test_delta_of_one_over_n_is_refused():
    from veil.errors import ConfigError

    dp = dict(target_epsilon=None, noise_multiplier=1.0, delta=0.1)
    with pytest.raises(ConfigError, match="1/N"):
        DPDiffusionModule(model_kwargs=TINY_MODEL, attribute_names=["a", "b", "c"], train_size=10,
                          sample_rate=0.5, planned_steps=10, dp=dp)
