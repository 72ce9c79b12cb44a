"""`veil prepare`: unaligned photos (a group photo, a snapshot) into the folder dataset, and released edits
pasted back into the photos.

    run_prepare(photos=["holiday/"], out="faces", size=64, margin=0.5, min_face=32, attributes=["smiling"])
        -> faces/face-<12 hex>.png   one crop per detected face, centred and scaled by its box (prepare_faces.py)
           faces/labels.csv          id,<attributes>: one row per crop; cells empty unless --csv gave them
           faces/private/prepare.json   owner-only (folder 0700, file 0600): for each photo its path, size and
                                        SHA-256, and for each face its id, index, box and crop square
    run_paste_back(dataset="faces", edits="edits", out="shared")
        -> shared/<photo stem>.png   each photo with at least one released face: a copy of the original with
                                     every released edit resized back to its square and feathered in

The crop names are random (``secrets``), never derived from a photo's name, and nothing but the owner-only
``private/prepare.json`` ties a crop to its photo or box: labels.csv and the crops can go where the dataset
goes. The folder is what ``--data folder:faces`` reads (``root=faces, csv=faces/labels.csv``; the id column is
``id``, the first of the names ``ImageFolderCSV`` looks for). labels.csv's attribute cells are left empty
for the owner to fill in (-1/1 or 0/1) unless ``csv`` gives them: a CSV with a ``photo`` column (the photo's
file name), an optional ``face`` column (0, 1, ... left to right, as printed; empty or absent: every face of
that photo) and one column per attribute. A face whose cells stay empty is refused by the loader, by line.

Paste-back reads the edit's revision (``veil edit --out E``: ``E/revision/manifest.json`` and its images,
or a published copy of it, whose pseudonymous ids are mapped back with the key in the prepared folder's
privacy database) and writes only photos with at least one released face; a face that was
refused (``withheld``) or not edited stays as in the original photo, and the summary says so. The rest of
each photo (background, other people, hair outside the square, and the feathered rim, which mixes the
original in) is the original, NOT protected. Outputs are plain PNGs: no EXIF or other metadata is carried
over. Both commands write ``--out`` all or nothing (``veil.outputs.staged_dir``).
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from PIL import Image

from veil import console
from veil.errors import ConfigError, DataError
from veil.jobs.prepare_faces import (
    DETECTOR,
    RESAMPLE,
    crop_face,
    crop_square,
    detect_faces,
    paste_face,
    read_photo,
)
from veil.outputs import check_out_dir, publish, staged_dir
from veil.privacy.locations import file_digest

__all__ = ["FORMAT", "PRIVATE_RECORD", "SIZES", "list_photos", "run_paste_back", "run_prepare"]

FORMAT = "veil-prepare/1"
PRIVATE_RECORD = "private/prepare.json"
SIZES = (32, 64)
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


# ------------------------------------------------------------------ inputs
def list_photos(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(name, path) of every photo named: a file as given, a folder's image files (by suffix, not hidden,
    sorted). ConfigError naming --photos for a missing path or two photos whose outputs would collide."""
    found: list[tuple[str, Path]] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found += [(p.name, p) for p in sorted(path.iterdir())
                      if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in PHOTO_SUFFIXES]
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise ConfigError(f"{path}: no such file or folder", option="--photos")
    found = [(unicodedata.normalize("NFC", name), p) for name, p in found]
    stems: dict[str, str] = {}
    for name, _ in found:
        stem = Path(name).stem.casefold()
        if stem in stems:
            raise ConfigError(f"{stems[stem]} and {name}: two photos with the same name stem (their pasted-back "
                              "photos would collide); rename one", option="--photos")
        stems[stem] = name
    if not found:
        raise ConfigError(f"{', '.join(map(str, paths))}: no photo there (looked for "
                          f"{', '.join(sorted(PHOTO_SUFFIXES))})", option="--photos")
    return found


def _face_labels(path: Path) -> tuple[list[str], dict[tuple[str, int | None], list[str]]]:
    """--csv: attribute names, and {(photo, face index or None for every face): cells}."""
    from veil.lightning_modules.data.image_folder import BINARY_VALUES

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV ({e}); expected a header photo[,face],<attributes>") from None
    header = [h.strip() for h in rows[0]] if rows else []
    if "photo" not in header:
        raise DataError(f"{path}, line 1: expected a 'photo' column (the photo's file name), found {header}")
    names = [h for h in header if h not in ("photo", "face")]
    labels: dict[tuple[str, int | None], list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: expected {len(header)} fields like the header, found {len(row)}")
        cell = dict(zip(header, (c.strip() for c in row)))
        face = cell.get("face", "")
        if face and not face.isdigit():
            raise DataError(f"{path}, line {line}: face {face!r} must be 0, 1, ... (left to right) or empty")
        bad = [n for n in names if cell[n] and cell[n] not in BINARY_VALUES]
        if bad:
            raise DataError(f"{path}, line {line}, column {bad[0]!r}: expected -1/1 or 0/1 or empty, found "
                            f"{cell[bad[0]]!r}")
        labels[(unicodedata.normalize("NFC", cell["photo"]), int(face) if face else None)] = [cell[n] for n in names]
    return names, labels


def _check_options(size, margin, min_face) -> None:
    if size not in SIZES:
        raise ConfigError(f"{size!r}: must be one of {', '.join(map(str, SIZES))}", option="--size")
    if not isinstance(margin, (int, float)) or not 0 <= margin <= 2:
        raise ConfigError(f"{margin!r}: must be between 0 and 2 (times the face box's side, each way)",
                          option="--margin")
    if not isinstance(min_face, int) or min_face < 1:
        raise ConfigError(f"{min_face!r}: must be a whole number of pixels >= 1", option="--min-face")


# ------------------------------------------------------------------ veil prepare
def run_prepare(*, photos: Sequence[str | Path], out, size: int = 64, margin: float = 0.5, min_face: int = 32,
                csv_path=None, attributes: Sequence[str] | None = None) -> dict:
    """Detect, crop and write every face of ``photos`` into the dataset folder ``out`` (module docstring).
    Unreadable photos and photos without a face are named in the result, not fatal; no face at all is a
    DataError (nothing is written). Returns the summary (what the CLI prints)."""
    _check_options(size, margin, min_face)
    listed = list_photos(photos)
    if csv_path is not None and attributes:
        raise ConfigError(": not with --csv (its columns name the attributes)", option="--attributes")
    names, labels = _face_labels(Path(csv_path)) if csv_path is not None else (list(attributes or []), {})
    if len(set(names)) != len(names) or any(n in ("", "id") for n in names):
        raise ConfigError(f"{names}: give distinct attribute names other than 'id'", option="--attributes")
    created = not Path(out).exists()
    out = check_out_dir(out, holds=("labels.csv", "private"))
    summary = {"out": str(out), "photos": len(listed), "faces": 0, "no_face": [], "unreadable": [],
               "too_small": 0, "not_kept": 0, "attributes": names, "unlabelled": 0}
    record = {"format": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "size": size,
              "margin": margin, "min_face": min_face, "detector": DETECTOR, "resample": RESAMPLE, "photos": []}
    used: set[str] = set()
    with staged_dir(out, created=created, prefix=".veil-prepare-") as stage:  # a failed run leaves no OUT
        rows = []
        for name, path in console.bar(listed, desc="photos"):
            entry = _prepare_photo(name, path, stage, size=size, margin=margin, min_face=min_face, used=used,
                                   summary=summary)
            if entry is None:
                continue
            record["photos"].append(entry)
            for face in entry["faces"]:
                cells = labels.get((name, face["index"]), labels.get((name, None)))
                summary["unlabelled"] += cells is None
                rows.append([face["id"]] + (cells or [""] * len(names)))
        summary["faces"] = len(rows)
        if not rows:
            raise DataError(f"--photos: no face found in {len(listed)} photos ({len(summary['no_face'])} without a "
                            f"face, {len(summary['unreadable'])} unreadable); nothing written")
        _write_private(stage, record)
        _write_labels(stage / "labels.csv", names, rows)
        publish(stage, out, [r[0] for r in rows] + ["private", "labels.csv"])  # labels.csv last: the folder is whole
    summary["unlisted_photos_in_csv"] = sorted({p for p, _ in labels} - {n for n, _ in listed})
    return summary


def _prepare_photo(name: str, path: Path, stage: Path, *, size, margin, min_face, used: set, summary: dict):
    """Detect and crop one photo into ``stage``; its private record entry, or None (unreadable, no face)."""
    try:
        rgb = read_photo(path)
    except DataError as e:
        summary["unreadable"].append({"photo": name, "error": str(e)})
        console.say(f"skipped: {e}")
        return None
    found = detect_faces(rgb)
    summary["not_kept"] += found.rejected
    boxes = [b for b in found.boxes if max(b[2], b[3]) >= min_face]
    summary["too_small"] += len(found.boxes) - len(boxes)
    if not boxes:
        summary["no_face"].append(name)
        small = f" ({len(found.boxes)} below --min-face {min_face} px)" if found.boxes else ""
        console.say(f"{name}: no face found{small}")
        return None
    faces = []
    for index, box in enumerate(boxes):
        face_id = _new_id(used)
        square = crop_square(box, margin=margin)
        Image.fromarray(crop_face(rgb, square, size=size)).save(stage / face_id, format="PNG")
        faces.append({"id": face_id, "index": index, "box": list(box), "square": list(square)})
    where = ", ".join(f"face {f['index']} at x={f['box'][0]}" for f in faces)
    console.say(f"{name}: {len(faces)} face{'s' * (len(faces) != 1)} (left to right: {where})")
    return {"name": name, "photo": str(path.resolve()), "sha256": file_digest(path), "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]), "faces": faces}


def _new_id(used: set) -> str:
    while True:
        face_id = f"face-{secrets.token_hex(6)}.png"  # random: says nothing of the photo or the person
        if face_id not in used:
            used.add(face_id)
            return face_id


def _write_private(stage: Path, record: dict) -> None:
    """``private/prepare.json``, owner-only: the folder 0700 and the file 0600 from the moment they exist."""
    folder = stage / "private"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)  # whatever the umask
    path = folder / "prepare.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    os.chmod(path, 0o600)


def _write_labels(path: Path, names: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id"] + names)
        writer.writerows(rows)


# ------------------------------------------------------------------ veil prepare --paste-back
def _load_record(dataset: Path) -> dict:
    path = dataset / PRIVATE_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{dataset}: holds no {PRIVATE_RECORD}; pass the folder `veil prepare --out` wrote",
                          option="--dataset") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{path}: expected format {FORMAT!r}")
    return record


def _load_edits(edits: Path, dataset: Path) -> tuple[Path, list[dict], list[str]]:
    """The revision folder, its changes (id, file) and its withheld ids: ``veil edit --out`` (its revision/),
    a revision folder, or a published revision (its pseudonyms mapped back with the key in ``dataset``'s
    privacy database)."""
    from veil.privacy.revision_manifest import FORMAT as OWNER_FORMAT
    from veil.privacy.revision_manifest import MANIFEST, PUBLISHED_FORMAT

    root = edits / "revision" if (edits / "revision" / MANIFEST).is_file() else edits
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{edits}: holds no revision ({MANIFEST} or revision/{MANIFEST}); pass the --out "
                          "folder of `veil edit`", option="--edits") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{root / MANIFEST}: not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (OWNER_FORMAT, PUBLISHED_FORMAT):
        raise DataError(f"{root / MANIFEST}: expected a revision ({OWNER_FORMAT} or {PUBLISHED_FORMAT})")
    changes = manifest.get("changes", [])
    for c in changes:
        image = (root / str(c.get("file", ""))).resolve()
        if root.resolve() not in image.parents or not image.is_file():
            raise DataError(f"{root / str(c.get('file'))}: edited image of {c.get('id')!r} is missing")
    withheld = [str(i) for i in manifest.get("withheld", [])]
    if manifest.get("format") == PUBLISHED_FORMAT and manifest.get("ids") == "pseudonymous":
        back = _owner_ids(dataset, manifest)  # r-<16 hex> -> the crop's id, unknown ones kept (then refused)
        changes = [{**c, "id": back.get(c["id"]) or c["id"]} for c in changes]
        withheld = [back.get(i) or i for i in withheld]
    return root, changes, withheld


def _owner_ids(dataset: Path, manifest: dict) -> dict:
    """A published revision's pseudonyms mapped back to the crops' ids, with the key kept in the prepared
    folder's privacy database (the owner's: only they can do this)."""
    from veil.privacy.ledger import PrivacyLedger, ledger_path_for
    from veil.privacy.revision_manifest import reveal_ids

    path = ledger_path_for({"source": "folder", "root": str(dataset)})
    if not path.exists():
        raise ConfigError(f"{dataset}: no privacy database for this folder ({path}), so the published revision's "
                          "pseudonymous ids cannot be mapped back; pass the owner's revision (veil edit's --out)",
                          option="--edits")
    with PrivacyLedger(path, create=False) as ledger:
        return reveal_ids(manifest, key=ledger.pseudonym_key(), record_ids=ledger.record_ids())


def run_paste_back(*, dataset, edits, out) -> dict:
    """Paste every released edit of ``edits`` back into a copy of its photo (module docstring); the summary."""
    dataset, edits = Path(dataset), Path(edits)
    record = _load_record(dataset)
    root, changes, withheld = _load_edits(edits, dataset)
    faces = {f["id"]: (photo, f) for photo in record["photos"] for f in photo["faces"]}
    strangers = [c["id"] for c in changes if c["id"] not in faces]
    if strangers:
        raise DataError(f"{root}: {len(strangers)} edits are not faces of {dataset} (first: {strangers[:3]}); was "
                        "the edit run on this prepared folder (--data folder:DATASET)?")
    released = {c["id"]: root / c["file"] for c in changes}
    todo = [p for p in record["photos"] if any(f["id"] in released for f in p["faces"])]
    names = [f"{Path(p['name']).stem}.png" for p in todo]
    created = not Path(out).exists()
    out = check_out_dir(out, holds=names)
    summary = {"out": str(out), "written": names, "pasted": len(released),
               "withheld": sorted(i for i in withheld if i in faces),
               "not_edited": sorted(i for i in faces if i not in released and i not in withheld),
               "not_written": [p["name"] for p in record["photos"] if p not in todo]}
    with staged_dir(out, names, created=created, prefix=".veil-paste-") as stage:
        for photo, name in zip(console.bar(todo, desc="photos"), names):
            path = Path(photo["photo"])
            if not path.is_file() or file_digest(path) != photo["sha256"]:
                raise DataError(f"{path}: the photo {photo['name']} is missing or changed since `veil prepare` "
                                f"(its SHA-256 differs); its face boxes would not fit; restore it")
            rgb = read_photo(path)
            for face in photo["faces"]:
                if face["id"] in released:
                    with Image.open(released[face["id"]]) as im:
                        edited = np.array(im.convert("RGB"), np.uint8)
                    rgb = paste_face(rgb, edited, tuple(face["square"]))
            Image.fromarray(rgb).save(stage / name, format="PNG")  # no metadata carried over
            kept = [f["index"] for f in photo["faces"] if f["id"] not in released]
            console.say(f"{photo['name']} -> {name}: {len(photo['faces']) - len(kept)} of {len(photo['faces'])} "
                        f"faces pasted" + (f"; faces {kept} left as in the original" if kept else ""))
    return summary


def paste_back_lines(summary: dict) -> list[str]:
    """The CLI's account of a paste-back."""
    lines = [(f"wrote {len(summary['written'])} photos to {summary['out']} with {summary['pasted']} released faces "
              f"pasted back (feathered)")]
    if summary["withheld"] or summary["not_edited"]:
        lines.append(f"left as in the original photo: {len(summary['withheld'])} faces refused by the check "
                     f"(withheld), {len(summary['not_edited'])} not edited")
    if summary["not_written"]:
        lines.append(f"not written (no face of theirs released): {', '.join(summary['not_written'])}")
    lines.append("not protected: everything outside the pasted faces (background, other people, hair, the "
                 "feathered rim) is the original photo")
    return lines


def prepare_lines(summary: dict) -> list[str]:
    """The CLI's account of a prepare."""
    with_faces = summary["photos"] - len(summary["no_face"]) - len(summary["unreadable"])
    lines = [(f"prepared {summary['faces']} faces from {with_faces} of {summary['photos']} photos into "
              f"{summary['out']} (labels.csv; owner-only: {PRIVATE_RECORD}, the photo and box of each face)")]
    lines += [f"no face: {name}" for name in summary["no_face"]]
    lines += [f"unreadable: {u['error']}" for u in summary["unreadable"]]
    if summary["too_small"]:
        lines.append(f"skipped {summary['too_small']} faces smaller than --min-face")
    if not summary["attributes"]:
        lines.append("labels.csv has no attribute columns yet: add them (-1/1 or 0/1), or rerun with --attributes "
                     "or --csv")
    elif summary["unlabelled"]:
        lines.append(f"{summary['unlabelled']} faces have empty attribute cells in labels.csv: fill them in "
                     "(-1/1 or 0/1) before training or editing")
    if summary.get("unlisted_photos_in_csv"):
        lines.append(f"--csv names photos that were not prepared: {', '.join(summary['unlisted_photos_in_csv'])}")
    return lines
