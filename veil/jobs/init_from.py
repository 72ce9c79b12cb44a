"""Public pretraining, then private fine-tuning: start weights and the parameters DP-SGD trains.

DP-SGD's noise has norm about sigma * C * sqrt(P) / B for P trained parameters and logical batch
B, so a private run learns fastest when it starts from a model that already draws images and
trains only the parameters it must. Two options of ``veil train`` do that:

- ``model.init_from: PUBLIC.ckpt`` starts model and EMA from the EMA weights of another
  ``veil train`` checkpoint, trained on *public* data (for example FFHQ before a private CelebA
  run, or synthetic faces of another seed). The privacy record of the new run covers the new
  run's data only and says where its start came from (``initialized_from``). Pretraining on the
  private data itself would spend budget no accountant counted, so ``check_disjoint`` refuses a
  start whose training data is the same dataset (same synthetic seed; CelebA or folders: any image
  file in common, by content, so a copy of the private folder is refused).
  Train the public model with ``optim.cond_drop_prob: 1.0`` to keep its labels out of it
  (attributes then always enter as 0): everything the fine-tuned model knows about attributes
  was then learned under DP. From such a start the attribute MLP's output layer is zeroed (its
  constant folded into the bias), so the private run begins as the public model whatever the
  attributes say.
- ``optim.trainable: [...]`` trains only the parameters whose names match a glob pattern or a
  named group (``models.params.PARAMETER_GROUPS``); the rest stay frozen and no per-sample gradient is kept for
  them. The ``conditioning`` group is the attribute MLP and every block's projection of the
  timestep-plus-attribute embedding (the timestep MLP itself stays frozen).
- ``dp.max_grad_norm`` must then fit the subset: per-sample gradients of ~100k conditioning
  parameters are far smaller than those of a whole model (median 0.015 at the public start of
  synthetic32_dp_finetune.yaml, measured on public images), and with C = 1 nothing is clipped
  while the noise, sigma * C, is sized for C: the step is almost all noise. Pick C near or below
  the median norm, measured on public data (``bench/clip_norms.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from veil.errors import ConfigError, PrivacyError
from veil.lightning_modules.checkpoints import WEIGHTS_FILE, load_diffusion_checkpoint
from veil.lightning_modules.data.specs import data_location, same_dataset


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    path = Path(path)
    start = load_diffusion_checkpoint(path)  # CheckpointError if missing or not a diffusion checkpoint
    want = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(module.hparams.model_kwargs).items()}
    have = {k: tuple(v) if isinstance(v, list) else v for k, v in start.model_kwargs.items()}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ConfigError(f"{path}: its model differs in {diff} "
                          f"({', '.join(f'{k}={have.get(k)!r}, config {want.get(k)!r}' for k in diff)})",
                          option="model.init_from")
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
        "sha256": _sha256(start.path / WEIGHTS_FILE),  # of the release's weights
        "data_spec": start.data_spec,
        "privacy": start.privacy,
        "used_attribute_labels": used_labels,
    }
