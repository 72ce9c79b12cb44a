"""The ghost engine with its Triton pieces switched on (interpreter, CPU tensors) equals its PyTorch path.

``dp.ghost.CONV_GHOST_BACKEND = "triton"`` routes every eligible Conv2d (groups 1, one call) of the
ghost path through ``veil.kernels.ghost_norm``; ``GhostDPOptimizer(fused_update="always")`` applies
noise and the SGD / AdamW update in ``veil.kernels.noise_update``'s one pass. On a GPU the same code
runs compiled (``-m gpu``). Shapes are tiny: the interpreter runs every program in Python.
"""

import copy

import pytest
import torch
from conftest import gpu_only, interpreter_only
from torch import nn

from veil.lightning_modules.dp import ghost as G


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def _clip(model, x, k, backend, monkeypatch):
    monkeypatch.setattr(G, "CONV_GHOST_BACKEND", backend)
    clipper = G.GhostClipper(model, max_grad_norm=0.05, noise_multiplicity=k, mode="ghost")
    norms = clipper.backward(model(x).pow(2).sum(dim=1))
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    clipper.remove()
    return norms, grads


def _compare(device, monkeypatch):
    import veil.kernels.ghost_norm as kernel

    calls = []
    real = kernel.conv2d_ghost_sq_norms
    monkeypatch.setattr(kernel, "conv2d_ghost_sq_norms", lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    for k in (1, 2):
        x = torch.randn(3 * k, 3, 8, 8, device=device)
        model = _net().to(device)
        ref_norms, ref_grads = _clip(copy.deepcopy(model), x, k, "auto" if device == "cpu" else "reference",
                                     monkeypatch)
        norms, grads = _clip(model, x, k, "triton", monkeypatch)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=0)
        torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-7)
    assert calls.count("triton") == 2 * 3  # the three convs, K = 1 and 2: the kernel ran


@interpreter_only
def test_conv_ghost_norm_kernel_in_the_clipper_equals_the_pytorch_path(monkeypatch):
    _compare("cpu", monkeypatch)


@pytest.mark.parametrize("_", [0], ids=["cuda"])
@gpu_only[0]
@gpu_only[1]
def test_conv_ghost_norm_kernel_in_the_clipper_on_cuda(_, monkeypatch):
    _compare("cuda", monkeypatch)


def _params(device):
    torch.manual_seed(1)
    return [torch.randn(s, device=device, requires_grad=True) for s in [(7, 5), (5,), (3, 2, 3, 3)]]


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum-nesterov-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def _run(name, fused, *, backend, sigma, device="cpu"):
    """Three DP steps of a GhostDPOptimizer on given clipped sums, the second with a virtual step."""
    from veil.kernels.optimizer import GhostDPOptimizer

    ps = _params(device)
    opt = GhostDPOptimizer(OPTIMIZERS[name](ps), noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=4,
                           seed=7, backend=backend, fused_update=fused)
    g = torch.Generator(device=device).manual_seed(2)
    for step in range(3):
        for virtual in ([True, False] if step == 1 else [False]):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, device=device)
            if virtual:
                opt.signal_skip_step(do_skip=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in ps])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_noise_update_equals_the_separate_stages_at_sigma_zero(name):
    """The reference path of the fused update on the CPU: torch.optim's arithmetic, the same parameters."""
    torch.testing.assert_close(_run(name, "always", backend="reference", sigma=0.0),
                               _run(name, "never", backend="reference", sigma=0.0), rtol=1e-6, atol=1e-7)


@interpreter_only
@pytest.mark.parametrize("name", ["sgd-momentum-nesterov-wd", "adamw"])
def test_fused_noise_update_kernel_draws_the_noise_of_the_separate_stages(name):
    """Triton (interpreter): with a seed the fused pass draws the same Philox noise as the noise stage,
    so noise + update in one pass equals noise stage, division and torch.optim's update."""
    fused = _run(name, "always", backend="triton", sigma=1.0)
    separate = _run(name, "never", backend="triton", sigma=1.0)
    assert not torch.equal(fused, _run(name, "always", backend="triton", sigma=0.0))  # the noise is there
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)


def test_fused_update_refuses_what_it_cannot_do():
    from veil.errors import ConfigError
    from veil.kernels.optimizer import GhostDPOptimizer

    ps = _params("cpu")
    opt = GhostDPOptimizer(torch.optim.RMSprop(ps, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                           expected_batch_size=4, fused_update="always")
    for p in ps:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ConfigError, match="RMSprop"):
        opt.step()
    auto = GhostDPOptimizer(torch.optim.RMSprop(ps, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                            expected_batch_size=4)
    assert auto._fused_backend() is None  # auto falls back to the separate stages
    with pytest.raises(ConfigError, match="fused_update"):
        GhostDPOptimizer(torch.optim.SGD(ps, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                         expected_batch_size=4, fused_update="sometimes")


@pytest.mark.parametrize("name", ["sgd-momentum-nesterov-wd", "adamw"])
@gpu_only[0]
@gpu_only[1]
def test_fused_noise_update_on_cuda(name):
    fused = _run(name, "auto", backend="auto", sigma=1.0, device="cuda")
    separate = _run(name, "never", backend="auto", sigma=1.0, device="cuda")
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)
