"""What a training run writes, who may see it, and loading it back without the training config.

A run folder ``OUT`` (``veil train``, ``veil train-classifier``, ``veil unlearn``) holds:

    OUT/model/                 the RELEASE, meant for sharing: what a user of the model needs
        model.safetensors      weights (diffusion: ``ema.*`` and ``model.*``; classifier: ``model.*``)
        veil_model.json        format, kind, model_kwargs, scheduler config, attribute names, data spec,
                               the privacy record (and a classifier's recipe and L2 terms)
    OUT/private/               OWNER-ONLY (folder mode 0700, files 0600): never share
        last.ckpt              Lightning's resume state (optimizer moments, accountant, noise step counter;
                               a classifier's cached training features, which are un-noised functions of the
                               private images)
        logs/, *.json          per-step loss and batch size, accuracy on private held-out images
    OUT/privacy.json, OUT/config.json   public: the privacy record and the config

No file anywhere holds a noise key or a generator state (``dp/optimizer.py``). ``veil sample``,
``edit`` and ``export`` read only releases: ``load_diffusion_checkpoint`` and ``load_classifier``
take ``OUT``, ``OUT/model`` or ``OUT/model/veil_model.json`` and refuse a Lightning ``.ckpt`` (owner
state) unless the caller is an owner-side job that asks for it (``owner=True``: unlearning). Every
reader checks the privacy record it finds (``veil.privacy.model_privacy``): a negative, NaN or
malformed epsilon is refused (DataError), never passed on as the model's cost.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from veil.errors import CheckpointError
from veil.lightning_modules.models.classifier import AttributeClassifier
from veil.lightning_modules.models.unet import AttributeConditionalUNet
from veil.privacy.model_privacy import check_model_privacy

DIFFUSION_KIND = "veil/dp-diffusion"
CLASSIFIER_KIND = "veil/attribute-classifier"
RELEASE_FORMAT = "veil-model/1"
RELEASE_DIR, PRIVATE_DIR = "model", "private"
WEIGHTS_FILE, META_FILE = "model.safetensors", "veil_model.json"
OWNER_CHECKPOINTS = ("last.ckpt", "unlearned.ckpt")  # under OUT/private: train-classifier's, unlearn's


# ------------------------------------------------------------------------------------ owner-only state
def private_dir(out: str | Path) -> Path:
    """``OUT/private``, created owner-only (0700): the home of everything that must not be shared."""
    path = Path(out) / PRIVATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, stat.S_IRWXU)
    return path


def seal_private(out: str | Path) -> None:
    """Make every file under ``OUT/private`` owner-only (0600), folders 0700."""
    root = Path(out) / PRIVATE_DIR
    if not root.is_dir():
        return
    os.chmod(root, stat.S_IRWXU)
    for path in root.rglob("*"):
        os.chmod(path, stat.S_IRWXU if path.is_dir() else stat.S_IRUSR | stat.S_IWUSR)


# ------------------------------------------------------------------------------------ the release
def write_release(out: str | Path, *, kind: str, weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``OUT/model`` atomically (a temporary folder renamed over the old one); returns its path."""
    from safetensors.torch import save_file

    final = Path(out) / RELEASE_DIR
    tmp = Path(out) / f".{RELEASE_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
    (tmp / META_FILE).write_text(json.dumps({"format": RELEASE_FORMAT, "kind": kind, **meta}, indent=2,
                                            allow_nan=False) + "\n")
    old = Path(out) / f".{RELEASE_DIR}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def release_path(path: str | Path, *, what: str = "--checkpoint") -> Path:
    """The release folder that ``path`` names (``OUT``, ``OUT/model`` or its ``veil_model.json``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; pass the run folder (OUT) or OUT/{RELEASE_DIR} that "
                              "`veil train` / `veil train-classifier` wrote")
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    if path.is_dir() and not (path / META_FILE).is_file() and (path / RELEASE_DIR / META_FILE).is_file():
        path = path / RELEASE_DIR
    if path.is_dir() and (path / META_FILE).is_file():
        return path
    if path.is_file() and path.suffix == ".ckpt":
        raise CheckpointError(
            f"{what} {path}: a Lightning checkpoint is owner-only training state, not a model release; pass the run "
            f"folder (OUT) or OUT/{RELEASE_DIR}, which `veil train` / `veil train-classifier` write for sharing")
    raise CheckpointError(f"{what} {path}: no model release there (expected OUT or OUT/{RELEASE_DIR} with "
                          f"{META_FILE} and {WEIGHTS_FILE}, as `veil train` writes)")


# What a release's veil_model.json must hold, per kind, to be rebuilt (checked before any model is built).
_REQUIRED_META = {DIFFUSION_KIND: {"model_kwargs": dict, "scheduler_config": dict, "attribute_names": list},
                  CLASSIFIER_KIND: {"model_kwargs": dict}}


def read_release(path: str | Path, *, kind: str, what: str = "--checkpoint") -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(meta, weights, folder) of the release ``path`` names, checked to be of ``kind``.

    Every problem with the files (a random, empty or truncated file, a folder without a release,
    malformed JSON, missing records) is a CheckpointError naming ``what`` (the flag) and the file."""
    from safetensors.torch import load_file

    folder = release_path(path, what=what)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{what} {folder / META_FILE}: unreadable release record ({type(e).__name__}: {e}); "
                              "the release is damaged: copy it again or rerun the command that wrote it") from None
    if not isinstance(meta, dict) or meta.get("format") != RELEASE_FORMAT or meta.get("kind") != kind:
        got = meta.get("kind") if isinstance(meta, dict) else None
        raise CheckpointError(f"{what} {folder}: a {got or 'non-veil'} release, expected {kind!r}")
    for key, typ in _REQUIRED_META.get(kind, {}).items():
        if not isinstance(meta.get(key), typ):
            raise CheckpointError(f"{what} {folder / META_FILE}: {key!r} is missing or not a {typ.__name__}; "
                                  "the release is damaged: copy it again or rerun the command that wrote it")
    check_model_privacy(meta.get("privacy"), where=f"{what} {folder / META_FILE}")  # DataError: a cost it did not pay
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: any unreadable file is the user's to fix
        raise CheckpointError(f"{what} {folder / WEIGHTS_FILE}: unreadable weights ({type(e).__name__}: {e}); the "
                              "release is damaged or truncated: copy it again or rerun the command that wrote it") from None
    return meta, weights, folder


def _strip(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ diffusion
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
    path: Path | None = None  # the release folder


def load_diffusion_checkpoint(path: str | Path, *, use_ema: bool = True, map_location="cpu") -> DiffusionCheckpoint:
    """Rebuild the (EMA by default) denoiser of a ``veil train`` release, in eval mode."""
    meta, weights, folder = read_release(path, kind=DIFFUSION_KIND)
    model = AttributeConditionalUNet(**meta["model_kwargs"])
    try:
        model.load_state_dict(_strip(weights, "ema." if use_ema else "model."))
    except RuntimeError as e:
        raise CheckpointError(f"--checkpoint {folder}: weights do not fit the recorded model_kwargs ({e})") from None
    model.to(map_location).eval()
    return DiffusionCheckpoint(
        model, meta["scheduler_config"], meta["attribute_names"], meta.get("privacy") or {}, meta.get("data_spec"),
        model_kwargs=dict(meta["model_kwargs"]), cond_drop_prob=meta.get("cond_drop_prob"),
        initialized_from=meta.get("initialized_from"), path=folder,
    )


# ------------------------------------------------------------------------------------ classifier
def load_classifier(path, *, owner: bool = False, what: str | None = None) -> tuple[AttributeClassifier, dict[str, Any]]:
    """(model, checkpoint) of a ``veil train-classifier`` / ``veil unlearn`` run.

    By default ``path`` names a release (``OUT`` or ``OUT/model``) and the checkpoint is
    ``{"veil": meta, "state_dict": {"model.*": ...}}``. ``owner=True`` (owner-side jobs such as
    unlearning) prefers the owner's checkpoint, ``OUT/private/last.ckpt`` (``unlearned.ckpt`` for an
    unlearning run) or a ``.ckpt`` given directly, whose ``veil`` record also holds the cached
    training features. ``what``: the flag errors name (default ``--model`` for owners, else ``--classifier``).
    """
    path = Path(path)
    what = what or ("--model" if owner else "--classifier")
    if owner:
        candidates = [path] if path.suffix == ".ckpt" else [path / PRIVATE_DIR / n for n in OWNER_CHECKPOINTS]
        for ckpt_file in candidates:
            if ckpt_file.is_file():
                return _load_classifier_ckpt(ckpt_file, what=what)
    meta, weights, folder = read_release(path, kind=CLASSIFIER_KIND, what=what)
    model = _build_classifier(meta["model_kwargs"], _strip(weights, "model."), where=f"{what} {folder}")
    return model, {"veil": meta, "state_dict": dict(weights)}


def _build_classifier(model_kwargs, state_dict, *, where: str) -> AttributeClassifier:
    """The classifier ``model_kwargs`` describe, with ``state_dict`` loaded, in eval mode; CheckpointError if they do not fit."""
    try:
        model = AttributeClassifier(**model_kwargs)
        model.load_state_dict(state_dict)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: weights do not fit the recorded model_kwargs ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the checkpoint is damaged") from None
    return model.eval()


def _load_classifier_ckpt(path: Path, *, what: str = "--model") -> tuple[AttributeClassifier, dict[str, Any]]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"{what} {path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    record = ckpt.get("veil") if isinstance(ckpt, dict) else None
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind != CLASSIFIER_KIND:
        raise CheckpointError(f"{what} {path}: a {kind or 'non-veil'} checkpoint, expected {CLASSIFIER_KIND!r}; "
                              "train one with `veil train-classifier`")
    if not isinstance(record.get("model_kwargs"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{what} {path}: lacks its model_kwargs or state_dict; the checkpoint is damaged")
    check_model_privacy(record.get("privacy"), where=f"{what} {path}")
    model = _build_classifier(record["model_kwargs"], _strip(ckpt["state_dict"], "model."), where=f"{what} {path}")
    return model, ckpt


CLASSIFIER_PUBLIC_KEYS = ("model_kwargs", "attribute_names", "data_spec", "recipe", "l2", "scheduler_config",
                          "privacy", "unlearning")


def write_classifier_release(out: str | Path, model: torch.nn.Module, veil_record: Mapping[str, Any]) -> Path:
    """``OUT/model`` of a classifier: its weights and the public part of its ``veil`` record
    (never ``train_features``, the un-noised features of the private training images)."""
    meta = {k: veil_record.get(k) for k in CLASSIFIER_PUBLIC_KEYS if k in veil_record}
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    return write_release(out, kind=CLASSIFIER_KIND, weights=weights, meta=meta)
