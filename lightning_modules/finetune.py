"""Public pretraining, then private fine-tuning: start weights and the parameters DP-SGD trains.

DP-SGD's noise has norm about sigma * C * sqrt(P) / B for P trained parameters and logical batch
B, so a private run learns fastest when it starts from a model that already draws images and
trains only the parameters it must. Two options of ``veil train`` do that:

- ``model.init_from: PUBLIC.ckpt`` starts model and EMA from the EMA weights of another
  ``veil train`` checkpoint, trained on *public* data (for example FFHQ before a private CelebA
  run, or synthetic faces of another seed). The privacy record of the new run covers the new
  run's data only and says where its start came from (``initialized_from``). Pretraining on the
  private data itself would spend budget no accountant counted, so ``check_disjoint`` refuses a
  start whose training data is the same dataset (same synthetic seed, same CelebA or folder root).
  Train the public model with ``optim.cond_drop_prob: 1.0`` to keep its labels out of it
  (attributes then always enter as 0): everything the fine-tuned model knows about attributes
  was then learned under DP. From such a start the attribute MLP's output layer is zeroed (its
  constant folded into the bias), so the private run begins as the public model whatever the
  attributes say.
- ``optim.trainable: [...]`` trains only the parameters whose names match a glob pattern or a
  named group (``PARAMETER_GROUPS``); the rest stay frozen and no per-sample gradient is kept for
  them. The ``conditioning`` group is the attribute MLP and every block's projection of the
  timestep-plus-attribute embedding (the timestep MLP itself stays frozen).
- ``dp.max_grad_norm`` must then fit the subset: per-sample gradients of ~100k conditioning
  parameters are far smaller than those of a whole model (median 0.015 at the public start of
  synthetic32_dp_finetune.yaml, measured on public images), and with C = 1 nothing is clipped
  while the noise, sigma * C, is sized for C: the step is almost all noise. Pick C near or below
  the median norm, measured on public data (``bench/clip_norms.py``).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veil.errors import ConfigError, PrivacyError

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
        raise ConfigError(f"optim.trainable must be a non-empty list of patterns or groups {sorted(PARAMETER_GROUPS)}, "
                          f"or null for all parameters; got {trainable!r}")
    chosen: set[str] = set()
    for entry in trainable:
        hits = {n for n in names if matches(n, entry)}
        if not hits:
            raise ConfigError(f"optim.trainable: {entry!r} matches no parameter; use a group "
                              f"{sorted(PARAMETER_GROUPS)} or a glob over names such as {names[0]!r}")
        chosen |= hits
    return [n for n in names if n in chosen]


def lr_groups(model: nn.Module, lr: float, lr_scale: dict[str, float] | None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters: lr * the factor of the first
    ``lr_scale`` entry (a group or glob) that matches the name, else lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale = lr_scale or {}
    for entry in scale:
        if not any(matches(n, entry) for n, _ in named):
            raise ConfigError(f"optim.lr_scale: {entry!r} matches no trainable parameter")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def same_dataset(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Do two data specs (``FaceDataModule.spec()``) draw from the same images?"""
    if not a or not b or a.get("source") != b.get("source"):
        return False
    if a["source"] == "synthetic":  # image i depends only on (seed, i)
        return a.get("seed") == b.get("seed")
    return Path(str(a.get("root"))).resolve() == Path(str(b.get("root"))).resolve()


def data_location(spec: dict[str, Any]) -> str:
    """'seed 0' (synthetic) or the data root: which images of its source a data spec draws."""
    return f"seed {spec.get('seed')}" if spec.get("source") == "synthetic" else str(spec.get("root"))


def check_disjoint(*, init_data: dict[str, Any] | None, train_data: dict[str, Any], path: Path) -> None:
    if init_data is None:
        raise PrivacyError(f"model.init_from {path}: the checkpoint does not say what data it was trained on, "
                           "so veil cannot check that it is not the private data; retrain it with veil train")
    if same_dataset(init_data, train_data):
        raise PrivacyError(
            f"model.init_from {path} was trained on the same {train_data['source']} data "
            f"({data_location(train_data)}) as this run; "
            "its privacy cost is not in this run's accounting. Start from a model trained on other (public) "
            "data, e.g. synthetic faces with another seed"
        )


def load_start(module, path: str | Path, *, data_spec: dict[str, Any]) -> dict[str, Any]:
    """Copy the EMA weights of checkpoint ``path`` into ``module.model`` and ``module.ema``.

    Checks that the architecture is the same and the data disjoint; returns the provenance record
    (path, sha256, its data, its privacy record, whether it saw attribute labels).
    """
    from veil.lightning_modules.sampling import load_diffusion_checkpoint

    path = Path(path)
    start = load_diffusion_checkpoint(path)  # CheckpointError if missing or not a diffusion checkpoint
    want = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(module.hparams.model_kwargs).items()}
    have = {k: tuple(v) if isinstance(v, list) else v for k, v in start.model_kwargs.items()}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ConfigError(f"model.init_from {path}: its model differs in {diff} "
                          f"({', '.join(f'{k}={have.get(k)!r}, config {want.get(k)!r}' for k in diff)})")
    check_disjoint(init_data=start.data_spec, train_data=data_spec, path=path)
    state = start.model.state_dict()
    used_labels = start.cond_drop_prob is None or start.cond_drop_prob < 1.0
    if not used_labels:
        # Trained on all-zero attributes, the attribute MLP c(a) = W2 silu(W1 a + b1) + b2 only ever
        # output its constant c(0); W1 is still the random init and would shift every block when
        # attributes are given. Fold c(0) into b2 and zero W2: the run starts as the public model
        # for any attributes, and W2's gradient, g_c (x) silu(W1 a + b1), carries the attributes
        # from the first step (zeroing W1 instead leaves W2's gradient attribute-free and W1's
        # damped by W2: a first CPU run learned nothing visible in 100 steps).
        b1 = state["attribute_embedding.0.bias"]
        w2, b2 = state["attribute_embedding.2.weight"], state["attribute_embedding.2.bias"]
        state["attribute_embedding.2.bias"] = b2 + w2 @ torch.nn.functional.silu(b1)  # c(0)
        state["attribute_embedding.2.weight"] = torch.zeros_like(w2)
    with torch.no_grad():
        module.model.load_state_dict(state)
        module.ema.load_state_dict(state)
    return {
        "path": str(path),
        "sha256": _sha256(path),
        "data_spec": start.data_spec,
        "privacy": start.privacy,
        "used_attribute_labels": used_labels,
    }
