"""``load_editor``: the edit pipeline of a ``veil train`` release or a ``veil export`` folder, on the right backend.

    editor = load_editor("runs/public", classifier="runs/guide", steps=50)   # a checkpoint: torch (PrivateEditor)
    editor = load_editor("exports/guided", providers="cpu")                   # an export: ONNX Runtime (OrtEditor)

Both are ``veil.editing.pipeline.EditPipeline``s (the same methods; torch tensors or numpy arrays), with
``costs``, ``model_privacy`` and ``data_spec`` filled in. torch is imported only for a checkpoint, so
``veil serve`` and other ONNX Runtime users never load it. This module sits above the torch library in
the import layers (it imports ``veil.lightning_modules.editing`` lazily); the rest of ``veil.editing``
imports no torch.
"""

from __future__ import annotations

from pathlib import Path

from veil.editing.pipeline import EditPipeline
from veil.editing.plan import DEFAULT_CHECK_THRESHOLD, DEFAULT_MAX_RETRIES
from veil.errors import ConfigError
from veil.export.runtime import META_FILE, OrtEditor

__all__ = ["load_editor", "DEFAULT_CLASSIFIER_SCALE"]

DEFAULT_CLASSIFIER_SCALE = 10.0  # docs/training.md: the probe peaks near s = 10 for the epsilon-10 classifier


def load_editor(source, *, runtime: str | None = None, classifier=None, checker=None,
                classifier_scale: float = DEFAULT_CLASSIFIER_SCALE, steps: int | None = None,
                guidance: float | None = None, use_ema: bool = True, keep_unprotected: bool | None = None,
                check_threshold: float = DEFAULT_CHECK_THRESHOLD, max_retries: int = DEFAULT_MAX_RETRIES,
                batch_size: int = 64, providers: str = "auto", threads: int | None = None,
                cache_dir=True) -> EditPipeline:
    """The editor of ``source``: a ``veil export`` folder (it holds ``veil_export.json``) runs on ONNX Runtime,
    anything else is read as a ``veil train`` release and runs on torch; ``runtime`` ("torch" or "ort")
    says which instead of looking.

    torch: ``classifier`` (a ``veil train-classifier`` release) steers the edit with ``classifier_scale`` > 0
    (guided) or only checks it at scale 0; ``checker`` (another classifier release) checks instead;
    ``guidance`` None is the checkpoint's default; ``steps`` None is 50; ``use_ema`` picks the weights.
    ONNX Runtime: the export brings its classifier, guidance and steps (``steps`` / ``guidance`` override
    them); ``providers``, ``threads``, ``cache_dir`` are ``OrtEditor``'s.
    ``keep_unprotected`` None: the default (classifier guidance also holds the unprotected attributes)."""
    if runtime is None:
        runtime = "ort" if (Path(source) / META_FILE).is_file() else "torch"
    if runtime not in ("torch", "ort"):
        raise ConfigError(f"{runtime!r}: choose torch or ort", option="--runtime")
    checks = dict(check_threshold=check_threshold, max_retries=max_retries, batch_size=batch_size)
    if runtime == "ort":
        if classifier is not None or checker is not None:
            raise ConfigError(f": {source} is a `veil export`, which brings its own classifier (`veil export "
                              f"--classifier`); re-export to change it", option="--classifier/--checker")
        return OrtEditor(source, num_steps=steps, guidance_scale=guidance, keep_unprotected=keep_unprotected,
                         providers=providers, threads=threads, cache_dir=cache_dir, **checks)
    from veil.lightning_modules.editing.editor import load_checkpoint_editor  # torch, only now

    return load_checkpoint_editor(source, classifier=classifier, checker=checker, classifier_scale=classifier_scale,
                                  guidance=guidance, use_ema=use_ema, num_steps=50 if steps is None else steps,
                                  keep_unprotected=True if keep_unprotected is None else keep_unprotected, **checks)
