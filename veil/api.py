"""veil's Python API: what the ``veil`` commands do, as functions (re-exported at ``veil``'s top level).

    import veil

    model = veil.train(config="synthetic32", out="runs/dp32", overrides={"dp.target_epsilon": 10})
    clf = veil.train_classifier(config="classifier32", out="runs/clf", dp_epsilon=8)
    editor = veil.load_editor("runs/dp32", classifier="runs/clf", classifier_scale=0)  # or a `veil export` folder
    editor.preview(first=8, protect=["eyeglasses"], out="preview")    # owner-only grid: nothing released
    edits = editor.release(first=8, protect=["eyeglasses"], level="high", out="edits")  # checked, priced, recorded
    veil.unlearn(model="runs/clf", revision=edits.revision, out="runs/unl")
    veil.privacy_account(ledger=edits.ledger)                           # everything spent on the dataset

Each function is a thin layer over the job its command runs (``veil.jobs.*``, ``veil.export.exporter``,
``veil.privacy.ledger``): the same validation, the same typed errors (``veil.errors``: ``ConfigError``
naming the option as the command line spells it, ``DataError``, ``PrivacyError``), the same all-or-nothing
``out`` folders and the same privacy database. There is one release path: ``Editor.release`` is
``veil.jobs.edit.run_edit`` (budget checked, drawn, edited, checked, charged in the dataset's ledger);
``Editor.preview`` is ``run_sweep`` (owner-only files; previews are the owner's and cost nothing, as in
``veil edit --sweep`` and the server's sessions). The commands (``veil.cli``) are a layer over these functions:
each parses its arguments, calls one, prints what it returns (tests/veil/test_cli_thin.py). Importing this module imports no torch; each function
imports its job when called (training, a checkpoint's edit and unlearning need torch, an export's preview
or release runs on ONNX Runtime but its job module still imports torch). ``export`` and ``privacy`` are
subpackages of ``veil``, so those two functions are ``export_onnx`` and ``privacy_account``.
Under DDP (``trainer.devices`` > 1) Lightning re-runs the calling script once per extra rank: use the
``veil`` command for multi-process runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

from veil.errors import ConfigError

__all__ = ["Run", "Editor", "EditResult", "Preview", "ExportResult", "train", "train_classifier", "unlearn",
           "load_editor", "export_onnx", "privacy_account"]

Overrides = Mapping[str, Any] | Sequence[str]


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Run:
    """A run ``train``, ``train_classifier`` or ``unlearn`` wrote: its folder and the job's record."""

    path: Path
    record: dict

    @property
    def model(self) -> Path:
        """The release to share (``OUT/model``)."""
        return self.path / "model"

    @property
    def epsilon(self) -> float:
        """The run's DP epsilon; inf when the run is not private (no guarantee)."""
        privacy = self.record.get("privacy", self.record)
        eps = privacy.get("epsilon")
        return float(eps) if privacy.get("private") and eps is not None else math.inf


@dataclass(frozen=True)
class EditResult:
    """A release (``Editor.release``): ``report`` is OUT/edit_report.json, as ``veil edit`` writes it."""

    out: Path
    report: dict

    @property
    def released(self) -> int:
        return self.report["released"]

    @property
    def refused(self) -> int:
        """Edits the check refused: not in the revision, charged all the same."""
        return self.report["refused"]

    @property
    def revision(self) -> Path:
        """The owner's revision (owner-only: it lists the original attributes)."""
        return self.out / self.report["revision"]

    @property
    def ledger(self) -> str:
        """The dataset's privacy database the releases were charged to."""
        return self.report["ledger"]

    @property
    def spent(self) -> dict[str, float]:
        """{image id: the epsilon its record has spent now, all its releases composed (labels and pixels)}."""
        return {im["id"]: float(im["spent"]["epsilon"]) for im in self.report["images"]}

    @property
    def price(self) -> dict:
        """What one such release costs alone: {"epsilon": ..., "delta": ...}."""
        return self.report["cost"]["release"]["alone"]


@dataclass(frozen=True)
class Preview:
    """An owner-only preview grid over privacy levels (``Editor.preview``): nothing released, nothing charged."""

    out: Path
    report: dict

    @property
    def grid(self) -> Path:
        return self.out / self.report["grid"]


@dataclass(frozen=True)
class ExportResult:
    """A verified ``veil export`` folder and its metadata (veil_export.json)."""

    path: Path
    meta: dict


# ------------------------------------------------------------------ helpers
def _yaml_value(value: Any) -> str:
    """A Python value as the YAML text ``--set KEY=VALUE`` parses back to it (JSON is YAML, but for inf/nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    return json.dumps(value)


def _overrides(overrides: Overrides | None) -> list[str]:
    """``--set`` strings from a mapping {"dp.target_epsilon": 10} or a list ["dp.target_epsilon=10"]."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={_yaml_value(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"={overrides!r}: a mapping {{'dp.target_epsilon': 10}} or a list of 'KEY=VALUE' strings",
                          option="--set")
    return list(overrides)


# ------------------------------------------------------------------ training, unlearning, export
def train(*, out: str | Path, config: str | Path | None = None, overrides: Overrides | None = None,
          resume: bool = False, progress: bool = True, ledger: str | Path | None = None,
          data: Mapping[str, Any] | None = None) -> Run:
    """``veil train``: DP-SGD training of the attribute-conditional diffusion model into ``out``.

    ``config``: a YAML file or a shipped config's name; ``overrides``: ``--set`` keys, e.g.
    ``{"dp.target_epsilon": 10, "trainer.max_steps": 500}``; ``data``: a data spec (``veil.data_arg``'s, e.g.
    ``{"source": "folder", "root": ..., "csv": ...}``) replacing the config's dataset, before ``overrides``.
    The run is recorded in the dataset's privacy database (``ledger`` names another) and refused if it would
    pass the dataset's training budget."""
    from veil.jobs.config import load_config
    from veil.jobs.train import run_training

    given = {}
    if data:  # a new dataset: the config's location keys go unless given again; synthetic faces are
        # generated from the run's seed (there is no data.seed)
        given = {**({"data.root": None, "data.csv": None, "data.revision": None} if "source" in data else {}),
                 **{"seed" if key == "seed" else f"data.{key}": value for key, value in data.items()}}
    cfg = load_config(config, _overrides(given) + _overrides(overrides))
    record = run_training(cfg, out, resume=resume, progress=progress, ledger=ledger)
    return Run(Path(out), record)


def _classifier_data(data: Mapping[str, Any] | str | Path | None) -> dict:
    """``data``: FaceDataModule options (checked: a misspelt key is refused), or a revision folder."""
    from veil.jobs.train_classifier import check_data_options

    if data is None:
        return {}
    if isinstance(data, (str, Path)):
        from veil.data_arg import revision_base

        if not (Path(data) / "manifest.json").is_file():
            raise ConfigError(f"{data}: not a revision folder (manifest.json); give FaceDataModule options as a "
                              f"dict, e.g. {{'source': 'synthetic', 'num_images': 3000}}", option="--data")
        return {**revision_base(data), "revision": str(data)}
    return check_data_options(dict(data), flag="--data")


def train_classifier(*, out: str | Path, config: str | Path | None = None, data: Mapping[str, Any] | str | Path | None = None,
                     overrides: Overrides | None = None, dp_epsilon: float | None = None, progress: bool = False,
                     ledger: str | Path | None = None) -> Run:
    """``veil train-classifier``: the attribute classifier (a checker, a guide, or the model ``unlearn`` updates).

    ``data`` overrides the recipe's data section (or is a revision folder); ``dp_epsilon`` trains with DP-SGD
    to that epsilon (``dp.enabled``, ``dp.target_epsilon``, no head refit). ``Run.record["test_accuracy"]``
    is owner-only (held-out private images)."""
    from veil.jobs.train_classifier import load_recipe
    from veil.jobs.train_classifier import train_classifier as job

    overrides = _overrides(overrides)
    if dp_epsilon is not None:
        if isinstance(dp_epsilon, bool) or not isinstance(dp_epsilon, (int, float)) or \
                not (math.isfinite(dp_epsilon) and dp_epsilon > 0):
            raise ConfigError(f"must be a finite number > 0 (e.g. --dp-epsilon 8), got {dp_epsilon}",
                              option="--dp-epsilon")
        overrides += ["dp.enabled=true", f"dp.target_epsilon={float(dp_epsilon)!r}", "refit_head=false"]
    recipe, recipe_data = load_recipe(config, overrides)
    record = job(recipe=recipe, data={**recipe_data, **_classifier_data(data)}, out=out, progress=progress,
                 ledger=ledger)
    return Run(Path(out), record)


def unlearn(*, model: str | Path, revision: str | Path, out: str | Path, method: str = "replay",
            params: Sequence[str] | None | str = "default", force: bool = False, compare_retrain: bool = False,
            trainer: Overrides | None = None, ledger: str | Path | None = None, tau: float | None = None,
            damping: float | None = None, solver: str | None = None, curvature: str = "hessian",
            preconditioner: str | None = None, line_search: bool | None = None, cg_max_iter: int = 100,
            lissa_iterations: int = 300, lissa_scale: float | None = None, hessian_samples: int | None = None,
            seed: int = 0, passes: int = 2, lr: float = 3e-4, replay_ratio: float = 3.0,
            revised_terms: str = "protected") -> Run:
    """``veil unlearn``: update the classifier run ``model`` to ``revision`` in closed form, into ``out``.

    The defaults are the command's (``replay`` on every layer, docs/unlearning.md); ``params=None`` or ``["all"]``
    updates every parameter, ``"default"`` the method's own choice (the head; every layer for ``replay``); ``trainer``: ``{"trainer.devices": 2, ...}``. Recorded in the dataset's privacy
    database as a run that is not private (refused before any work under a finite training budget)."""
    from veil.jobs.unlearn import run_unlearn, trainer_config, wait_for_other_ranks

    if params == "default":
        params = None if method == "replay" else ["head"]
    params = None if params is None or "all" in params else list(params)
    report = run_unlearn(
        model=model, revision=revision, method=method, out=out, force=force, compare_retrain=compare_retrain,
        params=params, trainer=trainer_config(_overrides(trainer)), tau=tau, damping=damping, solver=solver,
        cg_max_iter=cg_max_iter, lissa_iterations=lissa_iterations, lissa_scale=lissa_scale,
        hessian_samples=hessian_samples, seed=seed, curvature=curvature,
        preconditioner=None if preconditioner == "none" else preconditioner, line_search=line_search, ledger=ledger,
        **({"passes": passes, "lr": lr, "replay_ratio": replay_ratio, "revised_terms": revised_terms}
           if method == "replay" else {}))
    wait_for_other_ranks()
    return Run(Path(out), report)


def export_onnx(*, checkpoint: str | Path, out: str | Path, classifier: str | Path | None = None,
                classifier_scale: float = 10.0, checker: str | Path | None = None, steps: int = 50,
                guidance: float | None = None, use_ema: bool = True) -> ExportResult:
    """``veil export``: the editor as ONNX graphs, verified against PyTorch before anything lands in ``out``;
    ``load_editor(out)`` then runs it on ONNX Runtime. ``checker`` checks the edits (a guided export is never
    checked by its guide)."""
    from veil.export.exporter import export_model

    meta = export_model(checkpoint=checkpoint, classifier=classifier, classifier_scale=classifier_scale,
                        checker=checker, steps=steps, guidance=guidance, use_ema=use_ema, out=out)
    return ExportResult(Path(out), meta)


def privacy_account(data: Mapping[str, Any] | str | Path | None = None, *,
                    ledger: str | Path | None = None) -> dict | None:
    """``veil privacy show --json``: everything spent on a dataset (training runs, releases per record, budgets);
    None when it has no privacy database. ``data``: a dataset spec ({"source": "synthetic", "seed": 0}) or a
    revision folder (its base); ``ledger``: the database itself (a path or a postgresql:// URL)."""
    from veil.privacy.db import is_url
    from veil.privacy.ledger import PrivacyLedger, ledger_exists, ledger_path_for

    if isinstance(data, (str, Path)):
        from veil.data_arg import revision_base

        data = revision_base(data, check=not ledger)  # without --ledger the base locates the database
    data = dict(data or {})
    if not data and not ledger:
        raise ConfigError("--data or --ledger: say which dataset's privacy database (e.g. --data source=synthetic,seed=0)")
    target = ledger if ledger and is_url(str(ledger)) else Path(ledger).expanduser() if ledger else ledger_path_for(data)
    if not ledger_exists(target):
        return None
    if isinstance(target, Path) and target.is_file() and target.stat().st_size == 0:  # SQLite would make it one
        raise ConfigError(f"{target}: an empty file, not a veil privacy database; give the database veil "
                          "made (default $VEIL_HOME/datasets/<dataset>.sqlite)", option="--ledger")
    book = PrivacyLedger.for_dataset(data, path=target) if data else PrivacyLedger(target, create=False)
    with book:
        return book.summary()


# ------------------------------------------------------------------ editing
def load_editor(source: str | Path, *, runtime: str | None = None, classifier: str | Path | None = None,
                checker: str | Path | None = None, classifier_scale: float | None = None, steps: int = 50,
                guidance: float | None = None, use_ema: bool = True, keep_unprotected: bool = True,
                check_threshold: float | None = None, max_retries: int | None = None) -> "Editor":
    """The editor of a ``veil train`` release (torch) or a ``veil export`` folder (ONNX Runtime; found by its
    veil_export.json unless ``runtime`` says). Options as ``veil edit``'s; nothing is loaded until used."""
    return Editor(source, runtime=runtime, classifier=classifier, checker=checker, classifier_scale=classifier_scale,
                  steps=steps, guidance=guidance, use_ema=use_ema, keep_unprotected=keep_unprotected,
                  check_threshold=check_threshold, max_retries=max_retries)


class Editor:
    """Private edits of a dataset's images with one model (``veil edit``): ``preview`` (owner-only, free) and
    ``release`` (checked, priced and recorded in the dataset's privacy database, a revision in ``out``).

    Each call loads the model through the job (as each ``veil edit`` does); ``pipeline`` is the loaded
    ``EditPipeline`` for a look at the model (attribute names, what it cost)."""

    def __init__(self, source, *, runtime=None, classifier=None, checker=None, classifier_scale=None, steps=50,
                 guidance=None, use_ema=True, keep_unprotected=True, check_threshold=None, max_retries=None):
        from veil.editing.load import DEFAULT_CLASSIFIER_SCALE
        from veil.editing.plan import DEFAULT_CHECK_THRESHOLD, DEFAULT_MAX_RETRIES, check_check_options
        from veil.export.runtime import META_FILE

        if classifier is None and classifier_scale is not None:
            raise ConfigError(": only with --classifier", option="--classifier-scale")
        if runtime is None:
            runtime = "ort" if (Path(source) / META_FILE).is_file() else "torch"
        if runtime not in ("torch", "ort"):
            raise ConfigError(f"{runtime!r}: choose torch or ort", option="--runtime")
        check_threshold = DEFAULT_CHECK_THRESHOLD if check_threshold is None else check_threshold
        max_retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
        check_check_options(check_threshold=check_threshold, max_retries=max_retries)  # before anything loads
        self.source, self.runtime, self.checker = source, runtime, checker
        self.check_threshold, self.max_retries = check_threshold, max_retries
        self._model = dict(checkpoint=source, runtime=runtime, classifier=classifier, steps=steps, guidance=guidance,
                           use_ema=use_ema, keep_unprotected=keep_unprotected,
                           classifier_scale=DEFAULT_CLASSIFIER_SCALE if classifier_scale is None else classifier_scale)

    def __repr__(self) -> str:
        return f"Editor({str(self.source)!r}, runtime={self.runtime!r})"

    @cached_property
    def pipeline(self):
        """The loaded ``veil.editing.pipeline.EditPipeline`` (torch for a checkpoint, ONNX Runtime for an export)."""
        from veil.editing.load import load_editor as load

        m = self._model
        return load(self.source, runtime=self.runtime, classifier=m["classifier"], checker=self.checker,
                    classifier_scale=m["classifier_scale"], steps=m["steps"], guidance=m["guidance"],
                    use_ema=m["use_ema"], keep_unprotected=m["keep_unprotected"],
                    check_threshold=self.check_threshold, max_retries=self.max_retries)

    def preview(self, *, protect: Sequence[str], out: str | Path, first: int | None = None,
                ids: Sequence[str] | None = None, data: Mapping[str, Any] | None = None, level: str = "medium",
                epsilons: Sequence[float] | None = None, strength: float | None = None, encoding: str | None = None,
                seed: int | None = None) -> Preview:
        """``veil edit --sweep``: the chosen images at every level (or at ``epsilons``, one strength) in an
        owner-only grid, OUT/sweep.png. Nothing is released and no ledger is opened: previews are the owner's
        (together they give the protected values away; do not share them)."""
        from veil.jobs.edit import run_sweep

        report = run_sweep(out=out, protect=protect, data=data, ids=ids, first=first, epsilons=epsilons, level=level,
                           strength=strength, encoding=encoding, seed=seed, **self._model)
        return Preview(Path(out), report)

    def release(self, *, protect: Sequence[str], out: str | Path, first: int | None = None,
                ids: Sequence[str] | None = None, data: Mapping[str, Any] | None = None, level: str = "medium",
                epsilon: float | None = None, strength: float | None = None, encoding: str | None = None,
                seed: int | None = None, ledger: str | Path | None = None, budget: float | None = None,
                check: bool = True) -> EditResult:
        """``veil edit``: release private edits of the chosen images, all or nothing: every (image, attribute)
        checked against the dataset's budget, drawn by randomized response at ``level``, edited, checked
        (``check=False`` releases unchecked and says so), charged in the dataset's privacy database (refusals
        too), and written to ``out`` (revision/, before_after.png, edit_report.json). ``seed`` None (the
        default) draws the randomized response from the OS; a given seed must stay secret."""
        from veil.jobs.edit import run_edit

        if self.checker is not None and not check:
            raise ConfigError(": not with --no-check", option="--checker")
        report = run_edit(out=out, protect=protect, data=data, ids=ids, first=first, level=level, epsilon=epsilon,
                          strength=strength, encoding=encoding, seed=seed, ledger=ledger, budget=budget, check=check,
                          checker=self.checker, check_threshold=self.check_threshold, max_retries=self.max_retries,
                          **self._model)
        return EditResult(Path(out), report)
