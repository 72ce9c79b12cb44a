"""Which parameters of a model train: named groups and glob patterns over parameter names.

``optim.trainable: [...]`` trains only the parameters whose names match a glob pattern or a named
group (``PARAMETER_GROUPS``); the rest stay frozen and no per-sample gradient is kept for them. The
``conditioning`` group is the attribute MLP and every block's projection of the
timestep-plus-attribute embedding (the timestep MLP itself stays frozen). ``optim.lr_scale``
multiplies the learning rate of the parameters an entry matches. See ``training/init_from.py`` for
why a private fine-tuning run trains a subset.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

from veil.errors import ConfigError

PARAMETER_GROUPS: dict[str, tuple[str, ...]] = {
    # the attribute MLP and each ResNet block's projection of the (timestep + attribute) embedding
    "conditioning": ("attribute_embedding.*", "*.time_emb_proj.*"),
    # every GroupNorm scale and shift (ResNet blocks, attention, output)
    "norms": ("*norm*.weight", "*norm*.bias"),
}


def matches(name: str, entry: str) -> bool:
    """Does parameter ``name`` match ``entry``, a group of PARAMETER_GROUPS or a glob?"""
    return any(fnmatch.fnmatchcase(name, p) for p in PARAMETER_GROUPS.get(entry, (entry,)))


def resolve_trainable(model: nn.Module, trainable: Sequence[str] | None) -> list[str]:
    """Names of the parameters to train: all (``None``), or those matching any pattern or group."""
    names = [n for n, _ in model.named_parameters()]
    if trainable is None:
        return names
    if isinstance(trainable, str) or not trainable:
        raise ConfigError(f"must be a non-empty list of patterns or groups {sorted(PARAMETER_GROUPS)}, "
                          f"or null for all parameters; got {trainable!r}", option="optim.trainable")
    chosen: set[str] = set()
    for entry in trainable:
        hits = {n for n in names if matches(n, entry)}
        if not hits:
            raise ConfigError(f": {entry!r} matches no parameter; use a group "
                              f"{sorted(PARAMETER_GROUPS)} or a glob over names such as {names[0]!r}",
                              option="optim.trainable")
        chosen |= hits
    return [n for n in names if n in chosen]


def lr_groups(model: nn.Module, lr: float, lr_scale: dict[str, float] | None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters: lr * the factor of the first
    ``lr_scale`` entry (a group or glob) that matches the name, else lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale = lr_scale or {}
    for entry in scale:
        if not any(matches(n, entry) for n, _ in named):
            raise ConfigError(f": {entry!r} matches no trainable parameter", option="optim.lr_scale")
    factors: dict[float, list[nn.Parameter]] = {}
    for name, p in named:
        factor = next((float(f) for entry, f in scale.items() if matches(name, entry)), 1.0)
        factors.setdefault(factor, []).append(p)
    return [{"params": ps, "lr": lr * f} for f, ps in factors.items()]


def freeze_all_but(model: nn.Module, trainable: Sequence[str] | None) -> int:
    """Set requires_grad on the chosen parameters only; returns how many scalars are trained."""
    keep = set(resolve_trainable(model, trainable))
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        count += p.numel() if name in keep else 0
    return count
