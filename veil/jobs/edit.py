"""`veil edit`: private attribute edits of dataset images, in batch, from the command line.

    run_edit(checkpoint=..., out=DIR, protect=["eyeglasses"], first=8, level="high")
        -> one release per image in the dataset's privacy database ($VEIL_HOME/datasets/<dataset>.sqlite,
           unless ``ledger`` names one), refused with PrivacyError if any (image, attribute) would pass the
           budget; then DIR/revision/ (edited PNGs + manifest: the owner's revision, FaceDataModule(revision=...)
           reads it), DIR/before_after.png (both owner-only) and DIR/edit_report.json (no seeds, no originals).
    run_sweep(checkpoint=..., out=DIR, protect=[...], first=8)
        -> DIR/sweep.png (row 0 originals, then one row per level or epsilon; columns = images) and
           DIR/sweep.json, owner-only; previews only: nothing is released and no ledger is opened.

A release is ``veil.privacy.release.release`` (the one EditSession and the server use: budget check,
draw, edit, record), batched over images. A release is all-or-nothing, in this order:

    1. check every option (numbers finite and in range, each naming its flag; a checked guided edit needs a
       separate --checker: ``veil.editing.plan.check_who_checks``) and --out (a folder veil can write,
       holding no earlier edit), before anything is loaded; take --out's lock (``veil.outputs.out_lock``:
       one run at a time) and remove the staging folders that killed runs left there (saying so);
    2. load the model and the data, check --protect / --ids / --first / --strength against them;
    3. open the dataset's privacy database and check every (image, attribute) against the budget;
    4. draw the released attributes, edit in one batch, refuse an edit that is not finite;
    5. write the revision and the grid into a hidden staging folder inside OUT (.veil-edit-*);
    6. in ONE ledger transaction: insert the releases, write the report (it names their release ids)
       beside the staged files, move the three into OUT (renames), commit.
       If anything fails up to and including the commit (a budget refusal, a write error, Ctrl-C), the
       transaction rolls back and the files are removed (OUT too, if this run created it): nothing
       is charged and nothing is left.

So no release is charged without its files, and no file is published without its release. A sweep
(previews only) follows steps 1, 2, 4 and 5, then moves its two files into OUT.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from veil.errors import CheckpointError, ConfigError, DataError
from veil.lightning_modules.data.datamodule import DATASET_KEYS, FaceDataModule
from veil.lightning_modules.data.grid import EDIT_LEGEND, edit_captions, save_before_after, save_grid
from veil.lightning_modules.data.revision import RevisionChange, write_revision
from veil.editing.plan import (
    DEFAULT_CHECK_THRESHOLD,
    DEFAULT_MAX_RETRIES,
    RETRY_GUIDANCE_FACTOR,
    RETRY_STRENGTH_STEP,
    check_who_checks,
)
from veil.editing.load import load_editor
from veil.editing.pipeline import EditPipeline
from veil.data_arg import check_recorded_data
from veil.outputs import check_out_dir, dumps_strict, out_lock, publish, remove_if_empty, staged_dir, unpublish
from veil.privacy.accounting import ENCODING_PIXELS, compose, price_release
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.levels import LEVELS, PrivacyLevel, resolve_level
from veil.privacy.mechanism import (
    check_epsilon,
    derive_seed,
    json_epsilon,
    privatize,
    secure_seed,
)
from veil.privacy.release import Edited, ReleaseHook, release

__all__ = ["run_edit", "run_sweep", "load_edit_inputs", "DEFAULT_CLASSIFIER_SCALE"]

DEFAULT_CLASSIFIER_SCALE = 10.0  # docs/training.md: the probe peaks near s = 10 for the epsilon-10 classifier


def load_edit_inputs(*, checkpoint, data: Mapping[str, Any] | None, ids: Sequence[str] | None, first: int | None,
                     protect: Sequence[str], steps: int, guidance: float | None, use_ema: bool = True,
                     classifier=None, classifier_scale: float = DEFAULT_CLASSIFIER_SCALE,
                     check_threshold: float = DEFAULT_CHECK_THRESHOLD, max_retries: int = DEFAULT_MAX_RETRIES,
                     keep_unprotected: bool = True, checker=None, runtime: str = "torch"):
    """(editor, datamodule, indices, protected) after validating every option against model and data.

    ``checker`` (a ``veil train-classifier`` release) checks the edits; a guided edit is checked by it or by
    nothing, never by ``classifier``: the classifier that steered an edit is fooled by its own guidance
    (measured: the guidance classifier scored 0.99+ "no eyeglasses" on edits that still showed them,
    docs/editing.md), and a checker with the guide's weights is refused.

    The backend follows from what is given: ``classifier`` with ``classifier_scale`` > 0 -> guided (the
    classifier steers the denoiser); scale 0 -> conditional, the classifier only checks the edits; no
    classifier -> conditional, unchecked. The images come from the classifier's dataset when one is given
    (the private data it was trained on; a label-free denoiser is usually trained on public data), else
    from the denoiser's; ``data`` overrides either. ``editor.costs`` says what the models cost.

    ``runtime="ort"``: ``checkpoint`` is a ``veil export`` folder and the editor runs on ONNX Runtime
    (``veil.editing.load.load_editor``); its classifier, backend, data and costs are the export's. Either
    way the editor is an ``EditPipeline``: the job hands it its own arrays (``editor.asarray``)."""
    if runtime not in ("torch", "ort"):
        raise ConfigError(f"{runtime!r}: choose torch or ort", option="--runtime")
    if runtime == "ort" and (classifier is not None or checker is not None):
        raise ConfigError(": with --runtime ort the export brings its own classifier (`veil export --classifier`); "
                          "re-export to change it", option="--classifier/--checker")
    editor = load_editor(checkpoint, runtime=runtime, classifier=classifier, checker=checker,
                         classifier_scale=classifier_scale, steps=steps, guidance=guidance, use_ema=use_ema,
                         keep_unprotected=keep_unprotected, check_threshold=check_threshold, max_retries=max_retries)
    attribute_names, res = editor.attribute_names, editor.resolution
    base = {k: v for k, v in (editor.data_spec or {}).items() if k in DATASET_KEYS}
    spec = {**base, **{k: v for k, v in (data or {}).items() if v is not None}}
    check_recorded_data(spec, data or {}, origin=_data_origin(editor, checkpoint, classifier, runtime))
    spec["attributes"] = list(attribute_names)
    if spec.setdefault("resolution", res) != res:
        raise ConfigError(f"{spec['resolution']}: the model was trained at {res}x{res}; use {res}",
                          option="--resolution")
    dm = FaceDataModule(**spec)
    dataset = dm.dataset
    if list(dataset.attribute_names) != list(attribute_names):
        raise ConfigError(f": the dataset's attributes {dataset.attribute_names} differ from the model's "
                          f"{attribute_names}", option="--data")
    names = ", ".join(attribute_names)
    if not protect:
        raise ConfigError(f": empty; name the attributes to privatize, comma-separated, from: {names}",
                          option="--protect")
    unknown = [p for p in protect if p not in attribute_names]
    if unknown:
        raise ConfigError(f"{','.join(protect)}: {', '.join(unknown)}: not "
                          f"{'an attribute' if len(unknown) == 1 else 'attributes'} of the model; choose from: {names}",
                          option="--protect")
    twice = sorted({p for p in protect if list(protect).count(p) > 1})
    if twice:
        raise ConfigError(f"{','.join(protect)}: {', '.join(twice)} listed twice; name each attribute once",
                          option="--protect")
    editor.protected_mask(protect)  # the classifier must know every protected attribute too
    if (ids is None) == (first is None):
        raise ConfigError(": give exactly one (a comma-separated list of ids, or a count)", option="--ids/--first")
    if first is not None:
        if not isinstance(first, int) or not 1 <= first <= len(dataset):
            raise ConfigError(f"{first}: must be between 1 and the dataset size {len(dataset)}", option="--first")
        indices = list(range(first))
    else:
        position = {item_id: i for i, item_id in enumerate(dataset.ids)}
        missing = [i for i in ids if i not in position]
        if missing or not ids:
            raise ConfigError(f": {missing[:5] or 'none given'} not in the dataset "
                              f"({len(dataset)} images, ids like {dataset.ids[0]!r})", option="--ids")
        twice = sorted({i for i in ids if list(ids).count(i) > 1})
        if twice:
            raise ConfigError(f": {', '.join(twice[:5])} listed twice; name each image once", option="--ids")
        indices = [position[i] for i in ids]
    # What the models themselves cost (their own records): reported with every edit, so a model trained
    # without DP, or with the not-private reproducible noise, is never presented as a private one (an
    # export's records are as `veil export` wrote them).
    editor.costs = editor.models_cost(edited=dm.dataset_spec())
    return editor, dm, indices, list(protect)


def _data_origin(editor, checkpoint, classifier, runtime: str) -> str:
    """Which file the edit's data spec came from, for messages: the export's, the classifier's or the denoiser's."""
    if runtime == "ort":
        return f"{checkpoint}/veil_export.json (--checkpoint)"
    clf = getattr(editor, "classifier", None)
    if clf is not None and clf.data_spec:
        return f"{classifier}/model/veil_model.json (--classifier)"
    return f"{checkpoint}/model/veil_model.json (--checkpoint)"


NEEDS_CHECKER = (": every released edit is checked to show its released values, and the check needs an "
                 "attribute classifier (`veil train-classifier`; with --classifier-scale 0 it only checks, the "
                 "conditional model still edits; a guided edit needs --checker, never its guide; with --runtime ort, "
                 "`veil export --checker` or `--classifier --classifier-scale 0`); or pass --no-check to release "
                 "unchecked edits")
STAGING_PREFIX = ".veil-edit-"


def _classifier_scale(editor: EditPipeline) -> float | None:
    return editor.classifier_scale if editor.backend == "guided" else None


def _selected(editor: EditPipeline, dataset, indices):
    """ids, images (B,3,H,W), attributes (B,k) (the editor's arrays: torch tensors, or numpy on ONNX Runtime)
    and the attributes as dicts of the chosen items."""
    items = [dataset[i] for i in indices]
    dicts = [_as_dict(editor.attribute_names, a) for _, a in items]
    x, a = editor.asarray([x for x, _ in items]), editor.attribute_matrix(dicts)
    return [dataset.ids[i] for i in indices], x, a, dicts


def _load_selected(**inputs):
    """(editor, datamodule, protected, (ids, images, attributes, attribute dicts)): ``load_edit_inputs``
    followed by ``_selected`` on the chosen items, the common start of an edit and a sweep."""
    editor, dm, indices, protected = load_edit_inputs(**inputs)
    return editor, dm, protected, _selected(editor, dm.dataset, indices)


def _as_dict(names, row) -> dict[str, int]:
    return {n: int(v) for n, v in zip(names, row.tolist())}


def _before_after(originals, edits, path: Path, captions=None) -> None:
    """Pairs of rows, 8 images wide: originals above their edits (tensors or arrays), the edits captioned (owner-only)."""
    save_before_after(originals, edits, path, captions=captions, legend=EDIT_LEGEND)


def _owner_only(path: Path) -> Path:
    """chmod 0700 (folder) or 0600 (file): what only the data owner may read."""
    os.chmod(path, 0o700 if path.is_dir() else 0o600)
    return path


def _owner_only_file(path: Path) -> Path:
    """``path`` as a new or truncated file with mode 0600 (created so before anything is written to it)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    return _owner_only(path)


EDIT_FILES = ("revision", "before_after.png", "edit_report.json")
SWEEP_FILES = ("sweep.png", "sweep.json")


def check_edit_options(*, guidance, steps, first=None, budget=None, seed=None) -> None:
    """ConfigError naming the flag of the first bad number; run before anything is loaded or spent.
    (--epsilon, --strength and --level are checked by ``resolve_level``, --sweep-epsilons by ``sweep_levels``.)"""
    def number(x):
        return not isinstance(x, bool) and isinstance(x, (int, float))

    if guidance is not None and (not number(guidance) or not math.isfinite(guidance) or guidance < 0):
        raise ConfigError(f"{guidance!r}: must be a finite number >= 0 (0 = unconditional, "
                          f"1 = plain conditional, default 2)", option="--guidance")
    for flag, value, low in (("--steps", steps, 1), ("--first", first, 1), ("--seed", seed, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{value!r}: must be a whole number >= {low}", option=flag)
    if budget is not None and (not number(budget) or math.isnan(budget) or budget < 0):
        raise ConfigError(f"{budget!r}: must be a number >= 0 (inf = unlimited)", option="--budget")


def _check_out(out: Path, holds: Sequence[str]) -> bool:
    """ConfigError unless ``out`` is a folder veil can write that holds none of ``holds``: checked before
    anything is loaded or spent. Returns whether the folder was created (to remove it if the command fails)."""
    used = [name for name in holds if (out / name).exists() or (out / name).is_symlink()]
    if used:
        raise ConfigError(f"{out}: already holds {', '.join(used)}; choose a new --out (veil edit never "
                          f"replaces earlier results; the dataset's privacy database keeps counting across runs)",
                          option="--out")
    created = not out.exists()
    check_out_dir(out)  # not a file, creatable, writable (ConfigError naming --out)
    return created


# The files of one command go through veil.outputs' staging (the one every command uses): written into a
# hidden folder inside OUT, moved into OUT by _publish (the edit: inside its ledger transaction), taken back
# by _unpublish if the commit fails afterwards.
def _staging(out: Path, created: bool):
    """A hidden folder inside OUT (``.veil-edit-*``) for the files of one command; removed (with OUT, if this
    command created it and it stayed empty) when the block raises, so a failed command leaves nothing behind."""
    return staged_dir(out, created=created, prefix=STAGING_PREFIX, unwritten="nothing was released")


@contextmanager
def _locked_staging(out: Path, holds: Sequence[str], lock, say: Callable[[str], None] | None):
    """Inside ``out_lock(out)``: --out checked to hold none of ``holds``, the staging folders of killed runs
    removed, then this run's staging folder (``_staging``; OUT removed on failure if the lock created it)."""
    _check_out(out, holds)
    remove_stale_staging(out, say)
    with _staging(out, bool(lock.created)) as stage:
        yield stage


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def remove_stale_staging(out: Path, say: Callable[[str], None] | None = None) -> list[str]:
    """Remove the staging folders (``.veil-edit-*``) that earlier edits into ``out`` left behind when they were
    killed (SIGKILL, a power cut: no ``finally`` ran), saying so in one line; returns their names. Call it only
    while holding ``out_lock(out)``: every edit holds it for its whole run, so a staging folder found then
    belongs to a process that is gone (its releases, if any, were committed with their files or rolled back)."""
    stale = sorted(p.name for p in out.glob(f"{STAGING_PREFIX}*") if p.is_dir() and not p.is_symlink())
    for name in stale:
        shutil.rmtree(out / name, ignore_errors=True)
    if stale:
        (say or _say)(f"veil edit: removed {len(stale)} staging folder{'s' if len(stale) > 1 else ''} left in {out} "
                      f"by an earlier edit that was killed ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''})")
    return stale


def _remove_if_empty(folder: Path) -> None:
    remove_if_empty(folder)


def _publish(stage: Path, out: Path, names: Sequence[str]) -> None:
    """Move ``names`` from the staging folder into OUT (renames in one folder); all or none of them, never
    replacing one that appeared since the --out check (ConfigError)."""
    publish(stage, out, names, unwritten="nothing was released")


def _unpublish(out: Path, names: Sequence[str]) -> None:
    """Remove ``names`` from OUT: the files of a release whose commit failed after they were published."""
    unpublish(out, names)


def _check_finite(images, image_ids: Sequence[str], *, guidance: float, what: str) -> None:
    """CheckpointError if an edit (a tensor or an array) holds NaN or infinite pixels (a broken model, or an
    extreme guidance)."""
    finite = np.isfinite(np.asarray(images)).reshape(len(image_ids), -1).all(1)
    bad = [i for i, ok in zip(image_ids, finite.tolist()) if not ok]
    if bad:
        raise CheckpointError(f"--checkpoint: the model's {what} of {len(bad)} of {len(image_ids)} images (e.g. "
                              f"{bad[0]!r}) is not finite (NaN/inf pixels) at --guidance {guidance:g}; {what}s are "
                              f"written only when finite, so nothing was released or charged; check the model "
                              f"(does `veil sample` give images?) or lower --guidance")


def _write_edit(stage: Path, *, dm, names, changes, image_ids, edited, grid: tuple,
                withheld: Sequence[str] = ()) -> dict[str, str]:
    """The owner-only revision (``changes``, ``image_ids``, ``edited``: the edits that passed the check; ``withheld``:
    the ids the check refused, listed as withheld) and
    before/after grid (``grid``: (originals, edits) of every image, refused ones too), in the staging folder;
    {id: file in OUT}."""
    (stage / "revision").mkdir(mode=0o700)
    write_revision(_owner_only(stage / "revision"), base_spec=dm.dataset_spec(), attribute_names=names,
                   changes=changes, images=dict(zip(image_ids, edited)), withheld=withheld)
    manifest = json.loads(_owner_only(stage / "revision/manifest.json").read_text())
    _before_after(*grid[:2], _owner_only_file(stage / "before_after.png"), captions=grid[2] if len(grid) > 2 else None)
    return {c["id"]: f"revision/{c['file']}" for c in manifest["changes"]}


def run_edit(*, checkpoint, out, protect: Sequence[str], data: Mapping[str, Any] | None = None,
             ids: Sequence[str] | None = None, first: int | None = None, level: str = "medium",
             epsilon: float | None = None, strength: float | None = None, encoding: str | None = None,
             guidance: float | None = None,
             steps: int = 50, seed: int | None = None, ledger: str | Path | None = None, budget: float | None = None,
             use_ema: bool = True, classifier=None, classifier_scale: float = DEFAULT_CLASSIFIER_SCALE,
             check: bool = True, check_threshold: float = DEFAULT_CHECK_THRESHOLD,
             max_retries: int = DEFAULT_MAX_RETRIES, keep_unprotected: bool = True, checker=None,
             runtime: str = "torch", say: Callable[[str], None] | None = None) -> dict:
    """Release private edits of the chosen images; returns the report also written to OUT/edit_report.json.

    Spends on the dataset's privacy database (``PrivacyLedger.for_dataset``; ``ledger`` overrides its
    path). ``budget`` sets the release budget of a new database; on an existing one it must match.
    ``classifier``: the guided backend (scale > 0) or the check only (scale 0); every edit is checked to
    show its released values (``check``, which needs a check classifier: ``checker``, or ``classifier`` at
    scale 0; a guided edit needs ``checker``, never its guide; ``check=False`` releases unchecked and says
    so). ``say``: where the one-line notices go (default: stderr). All or nothing: the steps of the module
    docstring.
    """
    out = Path(out)
    # 1. every option and --out, before anything is loaded or spent
    check_edit_options(guidance=guidance, steps=steps, first=first, budget=budget, seed=seed)
    lv = resolve_level(level, epsilon=epsilon, strength=strength, encoding=encoding)
    if check and classifier is None and checker is None and runtime == "torch":
        raise ConfigError(NEEDS_CHECKER, option="--classifier")
    check_who_checks(guided=runtime == "torch" and classifier is not None and classifier_scale > 0,
                     checker=checker is not None, check=check)
    with out_lock(out) as lock:  # one edit at a time into OUT: a staging folder found now is a dead run's
        with _locked_staging(out, EDIT_FILES, lock, say) as stage:
            # 2. models and data
            editor, dm, protected, (image_ids, x, a, originals) = _load_selected(
                checkpoint=checkpoint, data=data, ids=ids, first=first, protect=protect, steps=steps,
                guidance=guidance, use_ema=use_ema, classifier=classifier, classifier_scale=classifier_scale,
                check_threshold=check_threshold, max_retries=max_retries, keep_unprotected=keep_unprotected,
                checker=checker, runtime=runtime)
            editor.timesteps(lv.strength)  # --strength walks at least one DDIM step at these --steps
            if check and not editor.can_check:  # an export without a check classifier
                guided_export = editor.backend == "guided"
                raise ConfigError(f": {checkpoint} is a guided export made without `veil export --checker`, so it has "
                                  f"no check (its guide never checks); re-export with --checker, or pass --no-check"
                                  if guided_export else NEEDS_CHECKER, option="--checker" if guided_export else
                                  "--classifier")
            head = _report_head(editor, dm, lv, protected, checkpoint=checkpoint, classifier=classifier,
                                checker=checker, runtime=runtime, steps=steps, seed=seed, check=check)
            try:
                with PrivacyLedger.for_dataset(dm.dataset_spec(), budget=budget, path=ledger) as book:
                    return _release(book, stage=stage, out=out, editor=editor, dm=dm, lv=lv, protected=protected,
                                    image_ids=image_ids, x=x, a=a, originals=originals, seed=seed, check=check,
                                    report_head=head)
            except sqlite3.DatabaseError as e:  # a database damaged past its header: found while reading it
                where = ledger if ledger is not None else "the dataset's privacy database"
                raise DataError(f"--ledger {where}: unreadable privacy database ({e}); nothing was released") from None


def _report_head(editor: EditPipeline, dm, lv, protected, *, checkpoint, classifier, checker, runtime, steps, seed,
                 check: bool) -> dict:
    """What edit_report.json says before the releases: the models, the level, and the check (or NOT CHECKED)."""
    return {"checkpoint": str(checkpoint), "classifier": None if classifier is None else str(classifier),
            "checker": None if checker is None else str(checker), "runtime": runtime,
            "backend": editor.backend, "model_privacy": editor.model_privacy, "data": dm.dataset_spec(),
            "level": lv.to_json(), "protected": protected,
            "guidance": editor.guidance_scale if editor.backend == "conditional" and not editor.label_free else None,
            "classifier_scale": _classifier_scale(editor),
            "keep_unprotected": editor.keep_unprotected if editor.backend == "guided" else None,
            "steps": steps, "seed_given": seed is not None,
            "check": check_policy(editor) if check else
            {"enabled": False, "warning": "NOT CHECKED: nobody verified that these edits show their released "
                                          "values; an edit that still shows the value it replaced gives that value away"}}


def check_policy(editor: EditPipeline) -> dict:
    """What the check of a release does (edit_report.json, the CLI summary)."""
    return {"enabled": True, "threshold": editor.check_threshold, "max_retries": editor.max_retries,
            "retry": f"strength +{RETRY_STRENGTH_STEP:g} (at most 1) and guidance x{RETRY_GUIDANCE_FACTOR:g} per re-do",
            "on_failure": "refused: not in the revision, but charged in the ledger (outcome 'refused'), because the "
                          "randomized response was drawn and the refusal depends on it",
            "rule": "the checker, a classifier at t = 0 that did not guide the edit, must give each released "
                    "protected value a probability >= threshold"}


def release_costs(editor: EditPipeline, lv, protected: Sequence[str], book: PrivacyLedger, *, check: bool) -> dict:
    """What an edit costs, in one place: each model's training privacy and the release's own, both channels."""
    price = price_release(epsilon=lv.epsilon, protected=protected, encoding=lv.encoding,
                          pixel_mus=editor.pixel_mus(strength=lv.strength, encoding=lv.encoding, check=check))
    alone = compose([price], delta=book.release_delta, pixels_protected=book.pixel_policy == "protected")
    return {"models": editor.costs, "models_summary": editor.model_privacy,
            "release": {"mechanism": "randomized response on the labels; the pixels per their encoding",
                        "epsilon_per_protected_attribute": json_epsilon(lv.epsilon),
                        "pixels": {"encoding": lv.encoding, "mechanism": ENCODING_PIXELS[lv.encoding],
                                   "mu": json_epsilon(price.pixel_mu),
                                   "protected": book.pixel_policy == "protected"},
                        "price": price.to_json(), "alone": alone.to_json(),
                        "protected": list(protected), "composed_in": str(book.path),
                        "composition": "per record: labels and pixels of all its releases (refused ones included), "
                                       "composed by dp-accounting's PLD accountant at delta "
                                       f"{book.release_delta:g}"}}


def _release(book: PrivacyLedger, *, stage: Path, out: Path, editor, dm, lv, protected, image_ids, x, a, originals,
             seed, check: bool, report_head: dict) -> dict:
    """Steps 3-6 of the module docstring, on the open database ``book``, through ``veil.privacy.release.release``
    (it checks every (image, attribute) before the edit, draws, and records; refusals charged)."""
    names = editor.attribute_names
    checks, files = {}, {}

    # 4. one batched edit towards the draws, checked finite and (unless --no-check) checked to show the released
    #    values, re-done or refused where it does not; 5. the owner's revision of the edits that passed (it keeps
    #    the original attributes unlearning needs: owner-only; publish with `veil privacy publish-revision`) and
    #    the before/after grid (it shows the originals: owner-only), staged
    def edit(draws: list[dict]) -> list[Edited]:
        targets = editor.attribute_matrix(draws)  # (B,k), the editor's arrays (torch or numpy)
        if check:
            checked = editor.edit_checked(x, a, targets, strength=lv.strength, protected=protected,
                                          encoding=lv.encoding)
            edited, passed = checked.images, checked.passed.tolist()
            checks.update({i: checked.row(k) for k, i in enumerate(image_ids)})
        else:
            edited = editor.edit(x, a, targets, strength=lv.strength, protected=protected, encoding=lv.encoding)
            passed = [True] * len(image_ids)
        _check_finite(edited, image_ids, guidance=editor.guidance_scale, what="edit")
        keep = [k for k, ok in enumerate(passed) if ok]
        changes = [RevisionChange(image_ids[k], originals[k], draws[k], protected,
                                  json_epsilon(lv.epsilon, infinite=None),
                                  checks.get(image_ids[k], {}).get("strength", lv.strength)) for k in keep]
        try:
            files.update(_write_edit(stage, dm=dm, names=names, changes=changes, image_ids=[image_ids[k] for k in keep],
                                     edited=edited[keep],
                                     grid=(x, edited, edit_captions(draws, originals, protected=protected, level=lv.name,
                                                                    refused=[k for k, ok in enumerate(passed) if not ok])),
                                     withheld=[i for i, ok in zip(image_ids, passed) if not ok]))
        except OSError as e:
            raise DataError(f"--out {out}: writing the edit failed ({e.strerror or e}); nothing was released or "
                            f"charged") from None
        return [Edited(edited[k], strength=checks.get(i, {}).get("strength"),
                       refusal=None if ok else "the check did not read its released values")
                for k, (i, ok) in enumerate(zip(image_ids, passed))]

    report, published = {}, []  # published: set once the files are in OUT, so only those are taken back
    costs = release_costs(editor, lv, protected, book, check=check)

    # 6. the report (it needs the release ids) and the move into OUT, inside the ledger's transaction
    def publish(tx, released) -> None:
        spent = {i: book.guarantee(i).to_json() for i in image_ids}  # the record's composed guarantee, new rows in
        images = [{"id": r.record.image_id, "outcome": r.record.outcome, "file": files.get(r.record.image_id),
                   "released_attributes": r.released_attributes if r.refusal is None else None,
                   "epsilon": json_epsilon(lv.epsilon), "strength": lv.strength, "encoding": lv.encoding,
                   "release_id": r.record.release_id, "spent": spent[r.record.image_id],
                   **({"check": checks[r.record.image_id]} if check else {})} for r in released]
        n = sum(r.refusal is None for r in released)
        report.update(report_head, ledger=str(book.path), budget=book.budget, cost=costs, revision="revision",
                      grid="before_after.png", owner_only=["revision", "before_after.png"],
                      released=n, refused=len(released) - n,
                      redone=sum(1 for c in checks.values() if c["attempts"] > 1), images=images)
        try:
            (stage / "edit_report.json").write_text(dumps_strict(report, indent=1) + "\n")
            _publish(stage, out, EDIT_FILES)
        except OSError as e:
            raise DataError(f"--out {out}: writing the edit failed ({e.strerror or e}); nothing was released or "
                            f"charged") from None
        published.append(True)

    try:
        release(book, image_ids=image_ids, attributes=originals, protected=protected, level=lv, edit=edit, seed=seed,
                models=editor.costs, hook=ReleaseHook(recorded=publish),
                pixel_mus=editor.pixel_mus(strength=lv.strength, encoding=lv.encoding, check=check))
    except BaseException:
        if published:  # published, then the commit failed: take the files back (the releases were rolled back)
            _unpublish(out, EDIT_FILES)
        raise
    return report


def sweep_levels(*, epsilons: Sequence[float] | None, strength: float | None, level: str | None,
                 encoding: str | None = None) -> list[PrivacyLevel]:
    """The rows of a sweep: the named levels, or the given epsilons at one strength and encoding (--strength
    and --encoding, else --level's)."""
    if not epsilons:
        return list(LEVELS.values())
    return [resolve_level(level, epsilon=check_epsilon(e, option="--sweep-epsilons"), strength=strength,
                          encoding=encoding) for e in epsilons]


def run_sweep(*, checkpoint, out, protect: Sequence[str], data: Mapping[str, Any] | None = None,
              ids: Sequence[str] | None = None, first: int | None = None, epsilons: Sequence[float] | None = None,
              level: str | None = None, strength: float | None = None, encoding: str | None = None,
              guidance: float | None = None, steps: int = 50,
              seed: int | None = None, use_ema: bool = True, classifier=None,
              classifier_scale: float = DEFAULT_CLASSIFIER_SCALE, keep_unprotected: bool = True,
              runtime: str = "torch", say: Callable[[str], None] | None = None) -> dict:
    """Preview grid over privacy levels for the same images; releases nothing.

    The previews are the owner's: row 0 shows the originals and the rows together (several
    independent draws, possibly at epsilon inf) give the protected values away, so sweep.png and
    sweep.json are written owner-only (0600); sweep.json holds neither the seed nor the original
    attributes. ``seed=None`` (the default) draws it from the OS, as releases do.
    """
    out = Path(out)
    check_edit_options(guidance=guidance, steps=steps, first=first, seed=seed)
    rows = sweep_levels(epsilons=epsilons, strength=strength, level=level, encoding=encoding)
    seed = secure_seed() if seed is None else seed
    with out_lock(out) as lock, _locked_staging(out, SWEEP_FILES, lock, say) as stage:
        editor, dm, protected, (image_ids, x, a, originals) = _load_selected(
            checkpoint=checkpoint, data=data, ids=ids, first=first, protect=protect, steps=steps, guidance=guidance,
            use_ema=use_ema, classifier=classifier, classifier_scale=classifier_scale,
            keep_unprotected=keep_unprotected, runtime=runtime)
        for lv in rows:  # every row's --strength walks at least one DDIM step, before any preview is made
            editor.timesteps(lv.strength)
        grid, table = [x], []
        inverted: dict[tuple[float, str], torch.Tensor] = {}
        for k, lv in enumerate(rows):
            draws = [privatize(o, protected=protected, epsilon=lv.epsilon,
                               rng=random.Random(derive_seed(seed, i, "sweep", k))) for i, o in zip(image_ids, originals)]
            key = (lv.strength, lv.encoding)
            if key not in inverted:  # the encoding depends on strength only: share it across rows (one noise draw)
                inverted[key] = editor.encode(x, a, strength=lv.strength, protected=protected, encoding=lv.encoding)
            targets = editor.attribute_matrix(draws)
            grid.append(editor.regenerate(inverted[key], targets, strength=lv.strength, protected=protected))
            _check_finite(grid[-1], image_ids, guidance=editor.guidance_scale, what="preview")
            table.append({"level": lv.to_json(), "released_attributes": dict(zip(image_ids, draws))})
        report = {"checkpoint": str(checkpoint), "runtime": runtime,
                  "classifier": None if classifier is None else str(classifier),
                  "backend": editor.backend, "model_privacy": editor.model_privacy, "data": dm.dataset_spec(),
                  "protected": protected, "ids": image_ids,
                  "rows": table, "grid": "sweep.png",
                  "note": "previews for the data owner only (owner-only files): nothing was released and no ledger "
                          "entry was made; do not share them, together they give the protected values away"}
        try:
            save_grid(np.concatenate([np.asarray(g) for g in grid]), _owner_only_file(stage / "sweep.png"),
                      nrow=len(image_ids), scale=max(1, 128 // x.shape[-1]), legend=EDIT_LEGEND,
                      captions=[["original"]] * len(image_ids) + [c for lv, row in zip(rows, table) for c in edit_captions(
                          [row["released_attributes"][i] for i in image_ids], originals, protected=protected,
                          level=lv.name)])
            _owner_only_file(stage / "sweep.json").write_text(dumps_strict(report, indent=1) + "\n")
            _publish(stage, out, SWEEP_FILES)
        except OSError as e:
            raise DataError(f"--out {out}: writing the sweep failed ({e.strerror or e})") from None
    return report
