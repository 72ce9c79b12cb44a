"""`veil edit`: private attribute edits of dataset images, in batch, from the command line.

    run_edit(checkpoint=..., out=DIR, protect=["eyeglasses"], first=8, level="high")
        -> one release per image in the dataset's privacy database ($VEIL_HOME/datasets/<dataset>.sqlite,
           unless ``ledger`` names one), refused with PrivacyError if any (image, attribute) would pass the
           budget; then DIR/revision/ (edited PNGs + manifest: the owner's revision, FaceDataModule(revision=...)
           reads it), DIR/before_after.png (both owner-only) and DIR/edit_report.json (no seeds, no originals).
    run_sweep(checkpoint=..., out=DIR, protect=[...], first=8)
        -> DIR/sweep.png (row 0 originals, then one row per level or epsilon; columns = images) and
           DIR/sweep.json, owner-only; previews only: nothing is released and no ledger is opened.

The release logic is the one EditSession uses (privacy.session.draw_release, ledger budget checks),
batched over images: check --out and every budget first, draw, edit in one batch, record all
releases in one transaction, then write files (spend first, publish after: a failure in between
wastes budget but never publishes an unrecorded release)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from veil.errors import ConfigError
from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
from veil.lightning_modules.data.datamodule import DATASET_KEYS, FaceDataModule
from veil.lightning_modules.data.grid import save_grid
from veil.lightning_modules.data.revision import RevisionChange, write_revision
from veil.lightning_modules.diffusion.sample import privacy_phrase
from veil.lightning_modules.editing.editor import PrivateEditor
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.levels import LEVELS, PrivacyLevel, resolve_level
from veil.privacy.mechanism import derive_seed, json_epsilon, privatize, secure_seed
from veil.privacy.session import draw_release

__all__ = ["run_edit", "run_sweep", "load_edit_inputs"]


def load_edit_inputs(*, checkpoint, data: Mapping[str, Any] | None, ids: Sequence[str] | None, first: int | None,
                     protect: Sequence[str], steps: int, guidance: float, use_ema: bool = True):
    """(editor, datamodule, indices, protected) after validating every option against model and data."""
    ckpt = load_diffusion_checkpoint(checkpoint, use_ema=use_ema)
    editor = PrivateEditor(ckpt.model, ckpt.scheduler_config, ckpt.attribute_names, num_steps=steps,
                           guidance_scale=guidance)
    base = {k: v for k, v in (ckpt.data_spec or {}).items() if k in DATASET_KEYS}
    spec = {**base, **{k: v for k, v in (data or {}).items() if v is not None}}
    spec["attributes"] = list(ckpt.attribute_names)
    res = ckpt.model.unet.config.sample_size
    if spec.setdefault("resolution", res) != res:
        raise ConfigError(f"--resolution {spec['resolution']}: the model was trained at {res}x{res}; use {res}")
    dm = FaceDataModule(**spec)
    dataset = dm.dataset
    if list(dataset.attribute_names) != list(ckpt.attribute_names):
        raise ConfigError(f"--data: the dataset's attributes {dataset.attribute_names} differ from the model's "
                          f"{ckpt.attribute_names}")
    unknown = [p for p in protect if p not in ckpt.attribute_names]
    if unknown or not protect:
        raise ConfigError(f"--protect {','.join(protect)!r}: unknown {unknown or 'empty'}; "
                          f"choose from {ckpt.attribute_names}")
    if (ids is None) == (first is None):
        raise ConfigError("--ids/--first: give exactly one (a comma-separated list of ids, or a count)")
    if first is not None:
        if not isinstance(first, int) or not 1 <= first <= len(dataset):
            raise ConfigError(f"--first {first}: must be between 1 and the dataset size {len(dataset)}")
        indices = list(range(first))
    else:
        position = {item_id: i for i, item_id in enumerate(dataset.ids)}
        missing = [i for i in ids if i not in position]
        if missing or not ids:
            raise ConfigError(f"--ids: {missing[:5] or 'none given'} not in the dataset "
                              f"({len(dataset)} images, ids like {dataset.ids[0]!r})")
        if len(set(ids)) != len(ids):
            raise ConfigError("--ids: an id is listed twice")
        indices = [position[i] for i in ids]
    # What the model itself cost (the release's own record): reported with every edit, so a model trained
    # without DP, or with the not-private reproducible noise, is never presented as a private one.
    editor.model_privacy = privacy_phrase(ckpt.privacy)[1]
    return editor, dm, indices, list(protect)


def _selected(dataset, indices, names):
    """ids, images (B,3,H,W), attributes (B,k) and the attributes as dicts of the chosen items."""
    items = [dataset[i] for i in indices]
    x, a = torch.stack([x for x, _ in items]), torch.stack([a for _, a in items])
    return [dataset.ids[i] for i in indices], x, a, [_as_dict(names, row) for row in a]


def _as_dict(names, row) -> dict[str, int]:
    return {n: int(v) for n, v in zip(names, row.tolist())}


def _before_after(originals, edits, path: Path) -> None:
    """Pairs of rows, 8 images wide: originals above their edits."""
    rows = []
    for i in range(0, len(originals), 8):
        rows += [originals[i : i + 8], edits[i : i + 8]]
    width = min(8, len(originals))
    pad = lambda r: torch.cat([r, torch.ones(width - len(r), *r.shape[1:])]) if len(r) < width else r
    save_grid(torch.cat([pad(r) for r in rows]), path, nrow=width, scale=max(1, 128 // originals.shape[-1]))


def _owner_only(path: Path) -> Path:
    """chmod 0700 (folder) or 0600 (file): what only the data owner may read."""
    os.chmod(path, 0o700 if path.is_dir() else 0o600)
    return path


def _owner_only_file(path: Path) -> Path:
    """``path`` as a new or truncated file with mode 0600 (created so before anything is written to it)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    return _owner_only(path)


def _check_out(out: Path) -> None:
    """ConfigError unless ``out`` is a new edit folder veil can write: checked before any budget is spent."""
    if (out / "revision").exists():
        raise ConfigError(f"--out {out}: {out / 'revision'} exists; choose a new --out (the dataset's privacy "
                          f"database keeps counting across runs)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".veil-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e}); choose a folder you can write") from None


def run_edit(*, checkpoint, out, protect: Sequence[str], data: Mapping[str, Any] | None = None,
             ids: Sequence[str] | None = None, first: int | None = None, level: str = "medium",
             epsilon: float | None = None, strength: float | None = None, guidance: float = 2.0, steps: int = 50,
             seed: int | None = None, ledger: str | Path | None = None, budget: float | None = None,
             use_ema: bool = True) -> dict:
    """Release private edits of the chosen images; returns the report also written to OUT/edit_report.json.

    Spends on the dataset's privacy database (``PrivacyLedger.for_dataset``; ``ledger`` overrides its
    path). ``budget`` sets the release budget of a new database; on an existing one it must match.
    """
    out = Path(out)
    lv = resolve_level(level, epsilon=epsilon, strength=strength)
    _check_out(out)  # a used or unwritable --out is refused before anything is loaded or spent
    editor, dm, indices, protected = load_edit_inputs(checkpoint=checkpoint, data=data, ids=ids, first=first,
                                                      protect=protect, steps=steps, guidance=guidance, use_ema=use_ema)
    names = editor.attribute_names
    image_ids, x, a, originals = _selected(dm.dataset, indices, names)
    with PrivacyLedger.for_dataset(dm.dataset_spec(), budget=budget, path=ledger) as book:
        # 1. every (image, attribute) first, so nothing is edited when one would be refused
        for image_id in image_ids:
            book.check(image_id=image_id, protected=protected, epsilon=lv.epsilon, published=names)
        # 2. randomized response per image (fresh stream per release), 3. one batched edit
        draws = [draw_release(image_id=i, attributes=o, protected=protected, epsilon=lv.epsilon, seed=seed,
                              release_index=book.count(i)) for i, o in zip(image_ids, originals)]
        targets = torch.stack([editor.attribute_vector(r) for r, _ in draws])
        edited = editor.edit(x, a, targets, strength=lv.strength, protected=protected)
        # 4. spend: all releases in one transaction (the seeds stay in the owner-only database)
        records = book.record_many([dict(image_id=i, protected=protected, epsilon=lv.epsilon, strength=lv.strength,
                                         seed=s, level=lv.name, released_attributes=r)
                                    for i, (r, s) in zip(image_ids, draws)])
        spent = {i: {p: json_epsilon(book.spent(i, p)) for p in protected} for i in image_ids}
        ledger_path, book_budget = str(book.path), book.budget
    # 5. write: the owner's revision (it keeps the original attributes unlearning needs: owner-only; publish
    #    with `veil privacy publish-revision`), the before/after grid (it shows the originals: owner-only), the report
    changes = [RevisionChange(i, o, r, protected, json_epsilon(lv.epsilon, infinite=None), lv.strength)
               for i, o, (r, _) in zip(image_ids, originals, draws)]
    (out / "revision").mkdir(mode=0o700)
    write_revision(_owner_only(out / "revision"), base_spec=dm.dataset_spec(), attribute_names=names,
                   changes=changes, images=dict(zip(image_ids, edited)))
    manifest = json.loads(_owner_only(out / "revision/manifest.json").read_text())
    files = {c["id"]: f"revision/{c['file']}" for c in manifest["changes"]}
    _before_after(x, edited, _owner_only_file(out / "before_after.png"))
    report = {
        "checkpoint": str(checkpoint), "model_privacy": editor.model_privacy, "data": dm.dataset_spec(),
        "level": lv.to_json(), "protected": protected, "guidance": guidance, "steps": steps, "seed_given": seed is not None, "ledger": ledger_path,
        "budget": book_budget, "revision": "revision", "grid": "before_after.png",
        "owner_only": ["revision", "before_after.png"],
        "images": [{"id": i, "file": files[i], "released_attributes": r, "epsilon": json_epsilon(lv.epsilon),
                    "strength": lv.strength, "release_id": rec.release_id, "spent": spent[i]}
                   for i, (r, _), rec in zip(image_ids, draws, records)],
    }
    (out / "edit_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def sweep_levels(*, epsilons: Sequence[float] | None, strength: float | None, level: str | None) -> list[PrivacyLevel]:
    """The rows of a sweep: the named levels, or the given epsilons at one strength (--strength or --level's)."""
    if not epsilons:
        return list(LEVELS.values())
    return [resolve_level(level, epsilon=e, strength=strength) for e in epsilons]


def run_sweep(*, checkpoint, out, protect: Sequence[str], data: Mapping[str, Any] | None = None,
              ids: Sequence[str] | None = None, first: int | None = None, epsilons: Sequence[float] | None = None,
              level: str | None = None, strength: float | None = None, guidance: float = 2.0, steps: int = 50,
              seed: int | None = None, use_ema: bool = True) -> dict:
    """Preview grid over privacy levels for the same images; releases nothing.

    The previews are the owner's: row 0 shows the originals and the rows together (several
    independent draws, possibly at epsilon inf) give the protected values away, so sweep.png and
    sweep.json are written owner-only (0600); sweep.json holds neither the seed nor the original
    attributes. ``seed=None`` (the default) draws it from the OS, as releases do.
    """
    out = Path(out)
    seed = secure_seed() if seed is None else seed
    rows = sweep_levels(epsilons=epsilons, strength=strength, level=level)
    editor, dm, indices, protected = load_edit_inputs(checkpoint=checkpoint, data=data, ids=ids, first=first,
                                                      protect=protect, steps=steps, guidance=guidance, use_ema=use_ema)
    names = editor.attribute_names
    image_ids, x, a, originals = _selected(dm.dataset, indices, names)
    grid, table = [x], []
    inverted: dict[float, torch.Tensor] = {}
    for k, lv in enumerate(rows):
        draws = [privatize(o, protected=protected, epsilon=lv.epsilon,
                           rng=random.Random(derive_seed(seed, i, "sweep", k))) for i, o in zip(image_ids, originals)]
        if lv.strength not in inverted:  # inversion depends on strength only: share it across rows
            inverted[lv.strength] = editor.invert(x, a, strength=lv.strength, protected=protected)
        targets = torch.stack([editor.attribute_vector(d) for d in draws])
        grid.append(editor.regenerate(inverted[lv.strength], targets, strength=lv.strength))
        table.append({"level": lv.to_json(), "released_attributes": dict(zip(image_ids, draws))})
    out.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(grid), _owner_only_file(out / "sweep.png"), nrow=len(indices), scale=max(1, 128 // x.shape[-1]))
    report = {"checkpoint": str(checkpoint), "model_privacy": editor.model_privacy, "data": dm.dataset_spec(),
              "protected": protected, "ids": image_ids,
              "rows": table, "grid": "sweep.png",
              "note": "previews for the data owner only (owner-only files): nothing was released and no ledger "
                      "entry was made; do not share them, together they give the protected values away"}
    _owner_only_file(out / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    return report

