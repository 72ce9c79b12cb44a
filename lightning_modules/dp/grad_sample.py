"""Per-sample gradients for DP-SGD: Opacus's hooks, made correct for our UNet, and the noise-draw fold.

``attach_grad_sampler`` wraps a plain ``nn.Module`` in Opacus's ``GradSampleModule`` *after*
fixing a silent Opacus 1.6 bug: hooks-mode per-sample gradients of ``Conv2d`` are wrong when the
conv's input is not contiguous (channels_last views, which diffusers' attention blocks produce). A
forward pre-hook makes every conv input contiguous; Opacus's activation-capturing forward hook then
sees the contiguous tensor. ``tests/lightning_modules/dp/test_grad_sample.py`` fails without it.
"""

from __future__ import annotations

import torch
from torch import nn

from veil.errors import ConfigError


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def make_conv_inputs_contiguous(model: nn.Module) -> int:
    """Register a pre-hook on every Conv2d so its input is contiguous; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(_contiguous_input)
            count += 1
    return count


def attach_grad_sampler(model: nn.Module, *, fix_contiguity: bool = True):
    """Register Opacus per-sample-gradient hooks on ``model`` and return the GradSampleModule.

    The hooks live on ``model``'s layers, so calling ``model`` directly fills ``p.grad_sample``;
    the returned wrapper only has to be kept alive (and removed with ``_close()``).
    """
    from opacus import GradSampleModule

    if fix_contiguity:
        make_conv_inputs_contiguous(model)
    errors = GradSampleModule.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model is not DP-compatible: {errors}; replace BatchNorm with GroupNorm")
    return GradSampleModule(model, batch_first=True, loss_reduction="mean")


def fold_noise_draws(params, b: int, k: int) -> None:
    """Noise multiplicity: the K rows of each example are adjacent in the batch; make each parameter's
    per-sample gradient the mean over its example's K rows, (b*K, ...) -> (b, ...)."""
    if k > 1:
        for p in params:
            gs = p.grad_sample
            p.grad_sample = gs.view(b, k, *gs.shape[1:]).mean(dim=1)


def empty_grad_samples(params) -> None:
    """An empty Poisson chunk: zero-row per-sample gradients, so the DP optimizer still steps (and noises)."""
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
