"""``veil export``: the edit sampler as ONNX graphs, a metadata file, and a verification against PyTorch.

    export_model(checkpoint="runs/public", classifier="runs/guide", checker="runs/judge", out="exports/guided")

writes, into a staging folder moved to ``out`` only when everything passed:

    denoise_step.onnx   one guided DDIM step (``veil.export.graphs``)
    invert_step.onnx    one DDIM inversion step
    classifier.onnx     the check classifier at t = 0 (attribute guesses, the check): ``checker``, or the
                        classifier at scale 0; never the guide of a guided export (its gradients are in
                        denoise_step.onnx; a check by it is no evidence), so a guided export without a
                        checker has none, and its editor releases unchecked (``can_check`` False)
    veil_export.json    image size, attributes, backend, scheduler config and alpha_prod table, allowed steps
                        and strengths, the named levels, guidance defaults, each model's privacy record,
                        versions, the verification, and every file's sha256

Nothing private goes in: the graphs hold weights and the public schedule; the metadata holds the
models' published privacy records and data specs (as their own releases do); no noise key, no
randomized-response seed, no original attribute, no private statistic.

Verification: a whole edit (inversion + regeneration, and a noise-encoded one with the same fixed
noise on both sides) of fixed-seed images at batch 1 and ``VERIFY_BATCH`` through ``OrtEditor``
against ``PrivateEditor``; more than ``EDIT_TOLERANCE`` (max absolute difference, images in [-1, 1])
raises ``ExportError`` with the measured error, and nothing is written to ``out``.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import veil
from veil import console
from veil.errors import ConfigError, ExportError
from veil.editing.load import load_editor
from veil.export.runtime import EXPORT_FORMAT, META_FILE, file_sha256
from veil.privacy.levels import LEVELS

__all__ = ["export_model", "EDIT_TOLERANCE", "VERIFY_BATCH", "DATA_KEYS", "EXPORT_FILES"]

EXPORT_FILES = (META_FILE, "denoise_step.onnx", "invert_step.onnx", "classifier.onnx")

EDIT_TOLERANCE = 2e-3  # max |ORT - torch| over a whole 10 + 10 step edit, images in [-1, 1] (8-bit: 1 level = 7.8e-3)
VERIFY_BATCH = 8
VERIFY_STEPS = 10
DATA_KEYS = ("source", "seed", "num_images", "resolution", "root", "attributes_file", "val_fraction", "test_fraction")


def _verify_images(resolution: int, batch: int) -> torch.Tensor:
    """Smooth fixed-seed images in [-1, 1] (B,3,H,W): the verification needs numbers, not faces."""
    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(batch, 3, max(resolution // 4, 1), max(resolution // 4, 1), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)


def verify(editor, folder: Path, *, protected: list[str], steps: int = VERIFY_STEPS) -> dict[str, Any]:
    """Max |ORT - torch| of whole edits at batch 1 and VERIFY_BATCH, inverted and noise-encoded; raises
    ExportError beyond EDIT_TOLERANCE."""
    ort_editor = load_editor(folder, runtime="ort", steps=steps, providers="cpu", cache_dir=None)
    saved = editor.num_steps
    editor.num_steps = steps
    try:
        errors = {}
        for batch in (1, VERIFY_BATCH):
            x = _verify_images(ort_editor.resolution, batch)
            g = torch.Generator().manual_seed(99)
            k = len(editor.attribute_names)
            a = torch.where(torch.rand(batch, k, generator=g) < 0.5, 1.0, -1.0)
            targets = torch.where(torch.rand(batch, k, generator=g) < 0.5, 1.0, -1.0)
            noise = torch.randn(x.shape, generator=g)
            for encoding in ("invert", "noise"):
                kw = dict(strength=0.6, protected=protected, encoding=encoding,
                          noise=noise if encoding == "noise" else None)
                want = editor.edit(x, a, targets, **kw).numpy()
                got = ort_editor.edit(x.numpy(), a.numpy(), targets.numpy(),
                                      **{**kw, "noise": None if kw["noise"] is None else noise.numpy()})
                errors[f"{encoding}, batch {batch}"] = float(np.abs(got - want).max())
        if ort_editor.can_check:
            want = editor.checker.logits(x).numpy()
            errors["classifier logits"] = float(np.abs(ort_editor.logits(x.numpy()) - want).max())
    finally:
        editor.num_steps = saved
    worst = max(errors, key=errors.get)
    if not errors[worst] <= EDIT_TOLERANCE:
        raise ExportError(f"{folder}: ONNX Runtime differs from PyTorch by {errors[worst]:.3g} ({worst}; tolerance "
                          f"{EDIT_TOLERANCE:g}, all: {errors}); nothing was exported")
    return {"max_abs_error": errors, "tolerance": EDIT_TOLERANCE, "steps": steps, "strength": 0.6,
            "batches": [1, VERIFY_BATCH]}


def export_model(*, checkpoint, out, classifier=None, classifier_scale: float = 10.0, checker=None, steps: int = 50,
                 guidance: float | None = None, use_ema: bool = True) -> dict:
    """Export the editor of ``checkpoint`` (+ ``classifier``, + ``checker``: the check classifier, never the guide)
    to ``out``; returns the metadata written."""
    from veil.export import graphs
    from veil.outputs import check_out_dir, publish, staged_dir

    out = Path(out)
    editor = load_editor(checkpoint, runtime="torch", classifier=classifier, checker=checker,
                         classifier_scale=classifier_scale, steps=steps, guidance=guidance, use_ema=use_ema)
    ckpt, guide = editor.checkpoint, editor.classifier
    created = not out.exists()
    check_out_dir(out, holds=EXPORT_FILES)  # before any work: writable, and never replacing an export
    with staged_dir(out, created=created, prefix=".veil-export-") as stage:  # on failure: removed, OUT too if made here
        info = {}
        with console.stage("exporting the denoise step to ONNX (traced and checked: about a minute on a CPU, seconds for an "
                           "architecture exported before)"):
            info["denoise_step.onnx"] = graphs.export_denoise_step(editor, stage / "denoise_step.onnx")
        with console.stage("exporting the inversion step to ONNX"):
            info["invert_step.onnx"] = graphs.export_invert_step(editor, stage / "invert_step.onnx")
        if editor.checker is not None:
            with console.stage("exporting the classifier to ONNX"):
                info["classifier.onnx"] = graphs.export_classifier(editor.checker, stage / "classifier.onnx")
        source = guide.data_spec if guide is not None and guide.data_spec else ckpt.data_spec
        meta = {
            "format": EXPORT_FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "resolution": int(ckpt.model.unet.config.sample_size),
            "attribute_names": list(editor.attribute_names),  # a label-free denoiser's: the guide's
            "backend": editor.backend,
            "label_free": editor.label_free,
            "scheduler_config": dict(ckpt.scheduler_config),
            "alphas_cumprod": editor.alphas_cumprod.cpu().double().tolist(),
            "steps": {"default": steps, "min": 1, "max": editor.num_train_timesteps},
            "strength": {"min_exclusive": 0.0, "max": 1.0},
            "levels": {name: lv.to_json() for name, lv in LEVELS.items()},
            "guidance": {"guidance_scale": editor.guidance_scale, "inversion_guidance": editor.inversion_guidance,
                         "classifier_scale": float(guide.scale) if editor.backend == "guided" else None,
                         "keep_unprotected": editor.keep_unprotected, "clip_sample": editor.clip_sample},
            "classifier": None if editor.checker is None else {
                "attribute_names": list(editor.checker.attribute_names), "role": "check",
                "source": "--checker" if checker is not None else "--classifier at scale 0"},
            "check": _check_note(editor, checker),
            "costs": editor.models_cost(),
            "model_privacy": editor.model_privacy,
            "data_spec": {k: v for k, v in (source or {}).items() if k in DATA_KEYS},
            "graphs": info,
            "versions": {"veil": veil.__version__, "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
                         "onnx": _version("onnx"), "opset": graphs.OPSET},
        }
        _write_meta(stage, meta)
        protected = [n for n in editor.attribute_names
                     if editor.checker is None or n in editor.checker.attribute_names][:2]
        with console.stage("verifying whole edits on ONNX Runtime against PyTorch"):
            meta["verification"] = verify(editor, stage, protected=protected)
        _write_meta(stage, meta)
        # all or none, the metadata last: a crash half-way through the moves leaves no export that loads
        publish(stage, out, sorted(meta["files"]) + [META_FILE])
    return meta


def _check_note(editor, checker) -> str:
    """What veil_export.json says about the check of this export's releases."""
    if editor.checker is None:
        why = "a guided export is never checked by its guide: export with --checker" if editor.backend == "guided" \
            else "no classifier was given"
        return f"none: releases from this export are not checked ({why})"
    return ("classifier.onnx, " + ("the --checker (not the guide)" if checker is not None else
                                   "the --classifier at scale 0 (it does not steer)"))


def _write_meta(folder: Path, meta: dict) -> None:
    meta["files"] = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                     for p in sorted(folder.glob("*.onnx"))}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-gpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def check_export_options(*, steps, classifier_scale) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"={steps!r}: must be a whole number >= 1", option="--steps")
    if not classifier_scale >= 0:
        raise ConfigError(f"={classifier_scale!r}: must be >= 0", option="--classifier-scale")
