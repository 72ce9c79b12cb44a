"""The two checkpoint formats veil writes, and loading them back without the training config.

``veil train`` writes ``checkpoint["veil"]["kind"] == DIFFUSION_KIND`` (``DPDiffusionModule``),
``veil train-classifier`` / ``veil unlearn`` write ``CLASSIFIER_KIND`` (``AttributeClassifierModule``).
Each carries the constructor arguments of its plain ``nn.Module`` (``model_kwargs``), so
``load_diffusion_checkpoint`` and ``load_classifier`` rebuild the model alone, with its attribute
names, data spec and privacy record. One home for both, because sampling, editing, export and the
jobs all read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from veil.errors import CheckpointError
from veil.lightning_modules.models.classifier import AttributeClassifier
from veil.lightning_modules.models.unet import AttributeConditionalUNet

DIFFUSION_KIND = "veil/dp-diffusion"
CLASSIFIER_KIND = "veil/attribute-classifier"


@dataclass
class DiffusionCheckpoint:
    model: AttributeConditionalUNet
    scheduler_config: dict[str, Any]
    attribute_names: list[str]
    privacy: dict[str, Any]
    data_spec: dict[str, Any] | None
    model_kwargs: dict[str, Any]
    cond_drop_prob: float | None  # 1.0: trained without attribute labels (None: not recorded)
    initialized_from: dict[str, Any] | None = None  # provenance of a fine-tuned model's start


def load_diffusion_checkpoint(path: str | Path, *, use_ema: bool = True, map_location="cpu") -> DiffusionCheckpoint:
    """Rebuild the (EMA by default) denoiser of a ``veil train`` checkpoint, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the last.ckpt that `veil train` wrote")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    meta = ckpt.get("veil") if isinstance(ckpt, dict) else None
    if not meta or meta.get("kind") != DIFFUSION_KIND:
        raise CheckpointError(f"{path} is not a veil diffusion checkpoint (kind {meta and meta.get('kind')!r})")
    model = AttributeConditionalUNet(**meta["model_kwargs"])
    prefix = "ema." if use_ema else "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.eval()
    hparams = ckpt.get("hyper_parameters") or {}
    return DiffusionCheckpoint(
        model, meta["scheduler_config"], meta["attribute_names"], meta["privacy"], meta.get("data_spec"),
        model_kwargs=dict(meta["model_kwargs"]), cond_drop_prob=hparams.get("cond_drop_prob"),
        initialized_from=meta.get("initialized_from"),
    )



def load_classifier(path) -> tuple[AttributeClassifier, dict[str, Any]]:
    """(model, checkpoint) from a ``veil train-classifier`` / ``veil unlearn`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass OUT/last.ckpt of `veil train-classifier`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    kind = ckpt.get("veil", {}).get("kind") if isinstance(ckpt, dict) else None
    if kind != CLASSIFIER_KIND:
        raise CheckpointError(f"{path}: a {kind or 'non-veil'} checkpoint, expected {CLASSIFIER_KIND!r}; "
                              "train one with `veil train-classifier`")
    record = ckpt["veil"]
    model = AttributeClassifier(**record["model_kwargs"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the recorded model_kwargs ({e})") from None
    return model.eval(), ckpt
