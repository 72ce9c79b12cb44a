"""``--data SPEC``: the one way every command (and a config's ``data:``) names a dataset (no torch).

    folder:PATH[,csv=FILE][,KEY=VALUE...]     a folder of images and its label CSV (default PATH/labels.csv)
    celeba:PATH[,KEY=VALUE...]                CelebA (PATH holds img_align_celeba/ and the attribute list)
    synthetic[:SEED][,KEY=VALUE...]           the built-in synthetic faces (SEED: their generator seed)
    source=folder,root=PATH,csv=FILE          the older KEY=VALUE form, still accepted
    REVISION                                  a revision folder (manifest.json): its base dataset

``parse_data_arg`` turns any of these into the data spec the API takes ({"source": "folder", "root": ...}).
PATH is everything after the first ':' up to the first ',' (so it may hold further colons); ``~`` is expanded
and root, csv and revision paths are made absolute (a dataset is then the same one from any directory). The
KEY=VALUE values are read as YAML (``num_images=300`` an integer, ``attributes=[smiling]`` a list), the paths
as text. A source or key veil does not know is refused as a ``ConfigError`` naming ``--data`` (a source with an example,
a key with the valid ones and a guess, as ``veil.api`` words it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from veil.errors import ConfigError, DataError

SOURCES = ("folder", "celeba", "synthetic")
PATH_KEYS = ("root", "csv", "revision")
# the data options every command takes (veil.jobs.train_classifier.DATA_OPTIONS: the same words), and batch_size
# (veil train's data.batch_size; veil train-classifier refuses it with a hint: its recipe sets it)
OPTIONS = ("source", "root", "csv", "attributes", "resolution", "num_images", "seed", "val_fraction", "test_fraction",
           "revision", "num_workers")
KEYS = (*OPTIONS, "batch_size")
EXAMPLE = "e.g. --data folder:photos,csv=photos/labels.csv, --data synthetic:0 or --data celeba:/data/celeba"


def _fail(detail: str, option: str) -> ConfigError:
    return ConfigError(f"{detail}; {EXAMPLE}", option=option)


def _absolute(value: Any) -> str:
    return str(Path(str(value)).expanduser().resolve())


def _value(key: str, value: str, option: str) -> Any:
    if key in PATH_KEYS:
        return _absolute(value)
    try:
        return yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        raise _fail(f"{key}={value!r}: not a value (a number, a name, [a, list])", option) from None


def _pairs(items: list[str], spec: dict[str, Any], option: str) -> dict[str, Any]:
    import difflib

    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise _fail(f"expects SOURCE:PATH then KEY=VALUE options, got {item!r}", option)
        if key not in KEYS:
            guess = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""  # worded as veil.api's own check of the keys
            raise ConfigError(f": unknown option {key!r}{hint}; valid: {', '.join(OPTIONS)}", option=option)
        spec[key] = _value(key, value, option)
    return spec


def _split(text: str) -> list[str]:
    """``text`` split at the commas outside [brackets] (``attributes=[smiling,eyeglasses]`` is one item)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth <= 0:
            items.append(text[start:i].strip())
            start = i + 1
    return [*items, text[start:].strip()]


def revision_folder(text: str | None) -> Path | None:
    """The revision folder ``text`` names (a folder holding manifest.json), else None."""
    if not text or ("," in text and not Path(text).is_dir()):
        return None
    path = Path(text).expanduser()
    return path.resolve() if (path / "manifest.json").is_file() else None


def parse_data_arg(text: str | None, *, option: str = "--data", keep_revision: bool = False) -> dict[str, Any]:
    """The data spec ``text`` names (see the module docstring); {} for None or ''. A revision folder gives its
    base dataset's spec, with ``revision: FOLDER`` added when ``keep_revision`` (training on the revision)."""
    if text is None or not str(text).strip():
        return {}
    text = str(text).strip()
    revision = revision_folder(text)
    if revision is not None:
        base = revision_base(revision)
        return {**base, "revision": str(revision)} if keep_revision else base
    head, *items = _split(text)
    if "=" in head:  # the KEY=VALUE form: source=folder,root=PATH,...
        spec = _pairs([head, *items], {}, option)
        if "source" in spec and spec["source"] not in SOURCES:
            raise _fail(f"unknown source {spec['source']!r}; one of {', '.join(SOURCES)}", option)
        return _default_csv(spec)
    source, sep, rest = head.partition(":")
    if source not in SOURCES:
        raise _fail(f"unknown source {source!r}: give SOURCE[:PATH] ({', '.join(SOURCES)}), KEY=VALUE pairs, or "
                    f"a revision folder (none there: no manifest.json)", option)
    spec: dict[str, Any] = {"source": source}
    if sep:
        if not rest:
            raise _fail(f"{head!r}: nothing after ':'", option)
        if source == "synthetic":
            try:
                spec["seed"] = int(rest)
            except ValueError:
                raise _fail(f"synthetic:{rest}: the seed must be an integer", option) from None
        else:
            spec["root"] = _absolute(rest)
    return _default_csv(_pairs(items, spec, option))


def _default_csv(spec: dict[str, Any]) -> dict[str, Any]:
    """A folder with a root and no csv: ROOT/labels.csv (what ``veil prepare`` writes)."""
    if spec.get("source") == "folder" and spec.get("root") and "csv" not in spec:
        spec["csv"] = str(Path(spec["root"]) / "labels.csv")
    return spec


def data_arg_help(default: str | None = None) -> str:
    """The ``--data`` help text every command shares."""
    tail = f" (default: {default})" if default else ""
    return ("the dataset: folder:PATH[,csv=FILE] (csv defaults to PATH/labels.csv), celeba:PATH, synthetic[:SEED], "
            "each with optional ,KEY=VALUE options (num_images, resolution, attributes=[a,b], ...), or a revision "
            f"folder; docs/data.md{tail}")


GIVE_DATA = "give the data yourself (--data folder:PATH[,csv=FILE])"


def check_recorded_data(spec: Mapping[str, Any], given: Mapping[str, Any], *, origin: str,
                        remedy: str = GIVE_DATA, option: str = "--data") -> None:
    """The data paths a model recorded (``origin``), checked before use: a relative one is refused (veil stores
    them absolute; it does not guess what an old one was relative to), a missing one is named with where it came
    from, and a folder that no longer holds the dataset recorded at that path (not one image in common, by
    content) is refused. Paths given with --data are the user's own and checked by the data module. ``remedy``
    ends each message (what the user can do where the command takes no --data); ``option`` names the flag."""
    if spec.get("source") not in ("celeba", "folder"):
        return
    for key in ("root", "csv"):
        value = spec.get(key)
        if value is None or given.get(key) is not None:
            continue
        if not Path(str(value)).expanduser().is_absolute():
            raise ConfigError(f": data.{key} {value!r} from {origin} is relative (recorded before veil stored data "
                              f"paths absolute), so it could name a different folder from here; veil does not guess: "
                              f"{remedy}", option=option)
        if not Path(str(value)).expanduser().exists():
            raise DataError(f"data.{key} {value} from {origin}: no such {'folder' if key == 'root' else 'file'} (moved "
                            f"or deleted?); {remedy}")
    if given.get("root") is None:
        from veil.privacy.locations import matches_recorded

        if matches_recorded(spec) is False:
            raise DataError(f"data.root {spec['root']} from {origin}: this folder no longer holds the dataset recorded "
                            f"there (not one image file in common, by content), so its images would be charged to "
                            f"another dataset's account; {remedy}")


def revision_base(revision: str | Path, *, check: bool = True) -> dict[str, Any]:
    """The base dataset spec a revision's manifest records, its paths checked as a model's are
    (``check_recorded_data``): a revision is tied to the images it was made from, so a base folder that moved,
    vanished or now holds other images is refused naming the revision, not used in its place. ``check=False``
    where the spec names nothing that is read or charged (the database was given with --ledger)."""
    from veil.privacy.revision_manifest import load_manifest

    base = dict(load_manifest(revision)["base"])
    if check:
        check_recorded_data(base, {}, origin=f"the revision {revision} (its manifest.json)",
                            option="--data/--revision",
                            remedy="a revision belongs to the images it was made from: put that folder back where "
                                   "it was recorded")
    return base
