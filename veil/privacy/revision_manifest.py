"""Dataset revision manifests (no torch: the serving path reads and writes them too).

Dataset revisions: the originals untouched, the accepted edits beside them, and a manifest.

A revision is a folder:

    manifest.json        {"format": "veil-revision/1",
                          "base": {...},                  # FaceDataModule kwargs that rebuild the base dataset
                          "attribute_names": [...],
                          "created": "2025-01-01T12:00:00+00:00",
                          "changes": [{"id", "file": "images/<id>.png", "original_attributes": {name: +-1},
                                       "released_attributes": {name: +-1}, "protected": [names],
                                       "epsilon": float | null, "strength": float | null}, ...],
                          "withheld": [id, ...]}      # refused by the check: charged, not published
    images/<id>.png      uint8 RGB at the base resolution

``write_revision`` writes one (the manifest last, atomically, so a reader never sees a manifest
whose images are missing); ``load_manifest`` validates one; ``revision.RevisedDataset(base, dir)`` (torch)
serves the base dataset with the changed items replaced by their edited image and released attributes.
The manifest itself is plain JSON; ``write_revision`` accepts numpy arrays as well as tensors.

**Published revisions name records by pseudonym.** The owner's revision keeps the ids (file names, which for
real photos often name the person or the very attribute protected); ``publish_revision`` (``veil privacy
publish-revision``, the server's ``GET /v1/revision``) renames each record ``pseudonym(id, key=...)``:
``r-`` and 16 hex of HMAC-SHA256 under the dataset's secret key, which lives only in the owner's privacy
database (``PrivacyLedger.pseudonym_key``). The same record keeps the same pseudonym in every revision
(consumers update, unlearning matches); nobody without the key can recompute or invert one, and the owner
maps them back with ``reveal_ids`` (``veil privacy reveal-ids``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from veil.errors import ConfigError, DataError

__all__ = ["FORMAT", "MANIFEST", "RevisionChange", "write_revision", "load_manifest", "publish_revision",
           "PUBLISHED_FORMAT", "pseudonym", "reveal_ids", "load_published"]

FORMAT = "veil-revision/1"
MANIFEST = "manifest.json"


@dataclass
class RevisionChange:
    """One accepted edit: the attributes the image had, those released with it, and how it was privatized."""

    id: str
    original_attributes: Mapping[str, int]
    released_attributes: Mapping[str, int]
    protected: Sequence[str] = field(default_factory=tuple)
    epsilon: float | None = None
    strength: float | None = None

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"RevisionChange.id={self.id!r}: give the item's string id")
        for name in ("original_attributes", "released_attributes"):
            values = getattr(self, name)
            bad = {k: v for k, v in values.items() if v not in (-1, 1)}
            if bad:
                raise ConfigError(f"RevisionChange.{name} for {self.id!r}: values must be -1 or +1, got {bad}")
            setattr(self, name, {str(k): int(v) for k, v in values.items()})
        self.protected = [str(p) for p in self.protected]
        for key in ("epsilon", "strength"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ConfigError(f"RevisionChange.{key}={value!r} for {self.id!r}: must be finite and >= 0, or None")

    def to_json(self, file: str) -> dict:
        return {
            "id": self.id,
            "file": file,
            "original_attributes": dict(self.original_attributes),
            "released_attributes": dict(self.released_attributes),
            "protected": list(self.protected),
            "epsilon": None if self.epsilon is None else float(self.epsilon),
            "strength": None if self.strength is None else float(self.strength),
        }


def _image_file_names(ids: Sequence[str]) -> dict[str, str]:
    """A safe, unique ``images/<name>.png`` for each id (ids may hold '/' or other odd characters)."""
    names, used = {}, set()
    for item_id in ids:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", item_id).lstrip(".") or "item"
        name, k = stem, 1
        while name.lower() in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name.lower())
        names[item_id] = f"images/{name}.png"
    return names


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_changes(changes: Sequence[RevisionChange], names: list[str], images: Mapping) -> None:
    ids = [c.id for c in changes]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"changes: an id appears twice ({sorted({i for i in ids if ids.count(i) > 1})[:3]})")
    for c in changes:
        for label in ("original_attributes", "released_attributes"):
            if set(getattr(c, label)) != set(names):
                keys = sorted(getattr(c, label))
                raise ConfigError(f"changes[{c.id!r}].{label}: keys {keys} differ from attribute_names {names}")
        if not set(c.protected) <= set(names):
            extra = sorted(set(c.protected) - set(names))
            raise ConfigError(f"changes[{c.id!r}].protected: {extra} are not in attribute_names")
        if c.id not in images:
            raise ConfigError(f"images: no edited image for changed id {c.id!r}")


def write_revision(
    out_dir,
    *,
    base_spec: dict,
    attribute_names: Sequence[str],
    changes: Sequence[RevisionChange],
    images: Mapping[str, object],  # numpy arrays or torch tensors, (3, H, W) in [-1, 1]
    withheld: Sequence[str] = (),
) -> Path:
    """Write the edited ``images`` (id -> (3,H,W) in [-1,1]) and the manifest into ``out_dir``.

    ``withheld``: ids whose release was drawn, recorded and charged but refused by the check (no image, no
    values): listed, so that a record missing from the revision is said to be withheld rather than silently
    absent (its refusal is in its price: every attempt the check could make was charged).
    Returns ``out_dir``. The manifest is written last and atomically (temp file + os.replace).
    """
    withheld = [str(i) for i in withheld]
    if len(set(withheld)) != len(withheld) or set(withheld) & {c.id for c in changes}:
        raise ConfigError(f"withheld={withheld[:3]}...: ids must be distinct and not among the changes")
    names = [str(n) for n in attribute_names]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"attribute_names={names!r}: give distinct names")
    try:
        base_json = json.loads(json.dumps(dict(base_spec)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"base_spec: must be JSON-serialisable ({e})") from None
    _check_changes(changes, names, images)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    files = _image_file_names([c.id for c in changes])
    size = base_json.get("resolution")
    for c in changes:
        pixels = _to_uint8(images[c.id])  # (H, W, 3)
        if size is not None and pixels.shape[:2] != (size, size):
            found = f"{pixels.shape[1]}x{pixels.shape[0]}"
            raise ConfigError(f"images[{c.id!r}]: {found}, expected the base resolution {size}x{size}")
        _atomic_write_bytes(out_dir / files[c.id], lambda p, px=pixels: Image.fromarray(px).save(p, format="PNG"))
    manifest = {
        "format": FORMAT,
        "base": base_json,
        "attribute_names": names,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "changes": [c.to_json(files[c.id]) for c in changes],
        "withheld": withheld,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    _atomic_write_bytes(out_dir / MANIFEST, lambda p: p.write_text(text, encoding="utf-8"))
    return out_dir


def _validate_change(c, k: int, names: list[str], root: Path, where: str) -> None:
    if not isinstance(c, dict) or not isinstance(c.get("id"), str) or not isinstance(c.get("file"), str):
        raise DataError(f"{where}: changes[{k}] needs string 'id' and 'file' fields")
    for label in ("original_attributes", "released_attributes"):
        values = c.get(label)
        ok = isinstance(values, dict) and set(values) == set(names) and all(v in (-1, 1) for v in values.values())
        if not ok:
            raise DataError(f"{where}: changes[{k}] ({c['id']!r}).{label} must map each of {names} to -1 or +1")
    if not isinstance(c.get("protected", []), list) or not set(c.get("protected", [])) <= set(names):
        raise DataError(f"{where}: changes[{k}] ({c['id']!r}).protected must be a list of attribute names")
    for key in ("epsilon", "strength"):
        value = c.get(key)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise DataError(f"{where}: changes[{k}] ({c['id']!r}).{key} must be a number or null, got {value!r}")
    image = (root / c["file"]).resolve()
    if root.resolve() not in image.parents or not image.is_file():
        raise DataError(f"{root / c['file']}: edited image of {c['id']!r} is missing (named in {where})")


def _read_manifest(path, *, missing: str) -> tuple[Path, object]:
    """(the manifest.json path, its parsed JSON) of a revision folder or manifest file; DataError ``missing``
    when there is none, or naming why it cannot be read."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / MANIFEST
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable JSON manifest ({e})") from None


def load_manifest(path) -> dict:
    """Read and validate a revision manifest (``path`` is the revision folder or its manifest.json)."""
    path, manifest = _read_manifest(path, missing="revision manifest not found; pass the folder that write_revision "
                                                  "created")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: expected format {FORMAT!r}, found {found!r}")
    names = manifest.get("attribute_names")
    is_str_list = isinstance(names, list) and all(isinstance(n, str) for n in names)
    if not is_str_list or not names or len(set(names)) != len(names):
        raise DataError(f"{path}: 'attribute_names' must be a non-empty list of distinct strings")
    if not isinstance(manifest.get("base"), dict) or not isinstance(manifest.get("changes"), list):
        raise DataError(f"{path}: expected a 'base' object and a 'changes' list")
    for k, change in enumerate(manifest["changes"]):
        _validate_change(change, k, names, path.parent, str(path))
    ids = [c["id"] for c in manifest["changes"]]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: an id is listed twice in 'changes'")
    withheld = manifest.setdefault("withheld", [])  # revisions written before issue 30 list none
    if not isinstance(withheld, list) or not all(isinstance(i, str) for i in withheld) or set(withheld) & set(ids):
        raise DataError(f"{path}: 'withheld' must be a list of ids not among the changes")
    return manifest


PUBLISHED_FORMAT = "veil-revision-published/1"
_PUBLIC_BASE_KEYS = ("source", "attributes", "resolution", "num_images", "seed")  # no local paths


def pseudonym(record_id: str, *, key: bytes) -> str:
    """The published name of the record ``record_id``: ``r-`` + the first 16 hex of HMAC-SHA256(key, id)."""
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise ConfigError("pseudonym: key must be the dataset's secret key (PrivacyLedger.pseudonym_key(), 32 bytes)")
    return "r-" + hmac.new(bytes(key), str(record_id).encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def _pseudonyms(ids: Sequence[str], key: bytes) -> dict[str, str]:
    names = {i: pseudonym(i, key=key) for i in ids}
    if len(set(names.values())) != len(names):  # 64 bits: never expected; refuse rather than merge two records
        raise DataError("two records of this revision share a pseudonym; publish it with --ids file-names")
    return names


def publish_revision(src_dir, out_dir, *, id_key: bytes | None, ids: str = "pseudonymous") -> Path:
    """Write a publishable copy of the owner's revision ``src_dir`` into the new folder ``out_dir``.

    It holds the edited images (re-encoded as plain PNGs) and, per change, only what was released: id,
    file, released_attributes, protected, epsilon, strength. It drops what decodes the originals or
    points at the owner's machine: original_attributes and the base dataset's root and csv paths.
    ``ids="pseudonymous"`` (the default) names every record, changed or withheld, by ``pseudonym(id,
    key=id_key)`` (``id_key``: the dataset's ``PrivacyLedger.pseudonym_key()``), its image file too;
    ``ids="file-names"`` keeps the owner's ids (``id_key`` unused). Randomized-response seeds are never in a
    revision (they stay in the privacy database). Its format is ``PUBLISHED_FORMAT``: ``load_manifest`` (and
    so RevisedDataset and unlearning, which need the original attributes) refuses it by name. Returns ``out_dir``.
    """
    if ids not in ("pseudonymous", "file-names"):
        raise ConfigError(f"{ids!r}: choose pseudonymous (the default) or file-names", option="--ids")
    src, out = Path(src_dir), Path(out_dir)
    manifest = load_manifest(src)  # validates the owner revision, every image present
    src = src.parent if src.suffix == ".json" else src
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; give a new folder for the published revision",
                          option="--out")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ConfigError(f"{out}: must not be inside the owner's revision {src}", option="--out")
    record_ids = [c["id"] for c in manifest["changes"]] + list(manifest["withheld"])
    name = {i: i for i in record_ids} if ids == "file-names" else _pseudonyms(record_ids, id_key)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = _image_file_names([name[c["id"]] for c in manifest["changes"]])
    changes = []
    for c in manifest["changes"]:
        with Image.open(src / c["file"]) as im:  # decode and re-encode: no ancillary chunks or metadata carried over
            pixels = np.array(im.convert("RGB"), np.uint8)
        file = files[name[c["id"]]]
        _atomic_write_bytes(out / file, lambda p, px=pixels: Image.fromarray(px).save(p, format="PNG"))
        changes.append({"id": name[c["id"]], "file": file, "released_attributes": dict(c["released_attributes"]),
                        "protected": list(c.get("protected", [])), "epsilon": c.get("epsilon"),
                        "strength": c.get("strength")})
    published = {
        "format": PUBLISHED_FORMAT,
        "note": "published revision: edited images and released attributes only; the original attributes stay "
                "with the data owner",
        "ids": ids,
        "ids_note": ("each record is named by a keyed hash of its id (HMAC-SHA256, the key in the owner's privacy "
                     "database): the same record keeps its name in every revision; only the owner can map it back"
                     if ids == "pseudonymous" else "records are named by the owner's ids (file names), by choice"),
        "base": {k: v for k, v in manifest["base"].items() if k in _PUBLIC_BASE_KEYS},
        "attribute_names": list(manifest["attribute_names"]),
        "created": manifest.get("created"),
        "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "changes": changes,
        "withheld": [name[i] for i in manifest["withheld"]],
        "withheld_note": "drawn, recorded and charged, but the edit did not show its released values: not published "
                         "(the refusal depends on the draw; its price covers every attempt)",
    }
    text = json.dumps(published, indent=1) + "\n"
    _atomic_write_bytes(out / MANIFEST, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def load_published(path) -> dict:
    """Read a published revision's manifest (``path``: its folder or manifest.json); DataError if it is not one."""
    path, manifest = _read_manifest(path, missing="no published revision here; pass the folder `veil privacy "
                                                  "publish-revision` wrote")
    if not isinstance(manifest, dict) or manifest.get("format") != PUBLISHED_FORMAT \
            or not isinstance(manifest.get("changes"), list):
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: expected a published revision ({PUBLISHED_FORMAT!r}), found {found!r}")
    return manifest


def reveal_ids(manifest: Mapping, *, key: bytes, record_ids: Sequence[str]) -> dict[str, str | None]:
    """{published id: the owner's id} for every record a published ``manifest`` names (changes, then withheld),
    found among ``record_ids`` (the dataset's ledger's ``record_ids()``); None for one not found (another
    dataset's key, or a revision published with file names, whose ids are their own)."""
    names = [c["id"] for c in manifest.get("changes", [])] + list(manifest.get("withheld", []))
    if manifest.get("ids", "file-names") != "pseudonymous":
        return {n: n for n in names}
    back = {pseudonym(i, key=key): i for i in record_ids}
    return {n: back.get(n) for n in names}


def _to_uint8(image) -> np.ndarray:
    """float (3, H, W) in [-1, 1], a torch tensor or an array -> uint8 (H, W, 3), clipped."""
    if hasattr(image, "detach"):  # a torch tensor, converted without importing torch here
        image = image.detach().cpu().float().numpy()
    x = np.asarray(image, np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ConfigError(f"expected an image of shape (3, H, W), got {tuple(x.shape)}")
    return np.clip(np.rint((x.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
