"""Face images from a folder, labelled by a CSV file; plus the image and label reading CelebA shares.

    ds = ImageFolderCSV("faces/", "faces/labels.csv", attributes=["smiling", "hat"], resolution=64)
    image, attrs = ds[0]   # (3, 64, 64) in [-1, 1], (2,) in {-1, +1}

The CSV has a header row. One column names the image files, relative to the folder: ``id_column``
if given, else the first of ``image_id``, ``id``, ``filename``, ``file`` present, else the first
column. The other columns are binary attributes written -1/1 or 0/1 (0 is read as -1). An id must
name a file inside the folder: absolute paths, ``..`` and symlinks that resolve outside it are
refused (``check_inside``), as the revision reader refuses them.
The CSV may be comma, semicolon or tab separated, UTF-8 (with or without a BOM) or UTF-16 with a BOM
(``veil.folder_files.read_label_csv``); ids match file names in Unicode NFC, so a CSV typed ``café.png``
finds the decomposed name a macOS copy writes (``veil.folder_files.find_on_disk``).
Images are decoded by ``veil.imaging`` (the server's decoder: EXIF orientation, 16-bit rescaled, transparency
over white, unsupported modes refused by name) and loaded lazily: the largest centred square is resized to
``resolution`` with Pillow's antialiased bicubic filter (``veil.imaging.model_pixels``, as the server does).
On load the files' headers are read once: a mode veil cannot decode is refused then, and one warning
(``veil.imaging.ImageWarning``) counts the images enlarged more than ``UPSCALE_WARN_FACTOR`` (naming the
worst) and those with several frames (the first is used). Every file problem raises ``DataError`` naming
the file (and the line); every bad argument raises ``ConfigError`` naming the option.
"""

from __future__ import annotations

import difflib
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from veil.errors import ConfigError, DataError
from veil.folder_files import find_on_disk, read_label_csv
from veil.folder_files import id_column as default_id_column
from veil.imaging import (
    READABLE_MODES,
    UPSCALE_WARN_FACTOR,
    ImageWarning,
    center_crop_resize,
    model_pixels,
    read_image,
    upscale_factor,
)
from veil.lightning_modules.data.grid import uint8_to_tensor

__all__ = [
    "ImageFolderCSV", "FileFaces", "BINARY_VALUES", "load_face_image", "center_crop_resize", "parse_binary",
    "select_attributes", "check_files_present", "resolve_files", "check_resolution", "check_inside",
]

BINARY_VALUES = {"1": 1.0, "-1": -1.0, "0": -1.0, "1.0": 1.0, "-1.0": -1.0, "0.0": -1.0, "+1": 1.0}


def load_face_image(path: Path, resolution: int) -> np.ndarray:
    """An image file as uint8 RGB (resolution, resolution, 3), decoded and resized as the server does
    (``veil.imaging``: ``center_crop_resize`` is re-exported from there); DataError if it is unreadable."""
    if not Path(path).exists():
        raise DataError(f"{path}: image file not found; it is listed in the labels but absent")
    return model_pixels(read_image(path).pixels, resolution=resolution)  # a writable copy


def parse_binary(text: str, *, file: Path, line: int, column: str) -> float:
    """A label cell as -1.0 or +1.0 (accepts -1, 0 and 1)."""
    try:
        return BINARY_VALUES[text.strip()]
    except KeyError:
        raise DataError(
            f"{file}, line {line}, column {column!r}: expected a binary label -1/1 or 0/1, found {text!r}"
        ) from None


def select_attributes(requested: Sequence[str] | None, available: Sequence[str], *, source: Path) -> list[int]:
    """Column positions of ``requested`` in ``available`` (all of them if None); ConfigError on unknown names."""
    if requested is None:
        return list(range(len(available)))
    if isinstance(requested, str):
        raise ConfigError(f"attributes={requested!r}: give a list of names, e.g. [{requested!r}]")
    positions = []
    for name in requested:
        if name not in available:
            close = difflib.get_close_matches(str(name), list(available), n=3, cutoff=0.5)
            hint = f"did you mean {close}?" if close else f"available: {list(available)}"
            raise ConfigError(f"attributes: {name!r} is not a column of {source}; {hint}")
        positions.append(list(available).index(name))
    if len(set(positions)) != len(positions):
        raise ConfigError(f"attributes={list(requested)!r}: a name is repeated")
    return positions


def check_files_present(folder: Path, names: Sequence[str], *, listed_in: Path) -> None:
    """DataError naming the first missing images if any file listed in ``listed_in`` is absent from ``folder``."""
    resolve_files(folder, names, listed_in=listed_in)


def resolve_files(folder: Path, names: Sequence[str], *, listed_in: Path) -> list[str]:
    """Each name as spelled on disk (NFC-equal names match: ``veil.folder_files.find_on_disk``); DataError
    naming the first missing images if any file listed in ``listed_in`` is absent from ``folder``."""
    found = find_on_disk(folder, names)
    missing = [n for n in names if found[n] is None]
    if missing:
        raise DataError(
            f"{folder / missing[0]}: image listed in {listed_in} is absent ({len(missing)} of {len(names)} missing, "
            f"first: {missing[:3]}); copy the images into {folder} or remove their lines from {listed_in.name}"
        )
    return [found[n] for n in names]


def check_inside(folder: Path, name: str, *, listed_in: Path, line: int) -> None:
    """DataError naming the CSV, the line and the id unless ``folder / name`` stays inside ``folder``
    (no absolute path, no ``..`` out of it, no symlink resolving outside it)."""
    if "/" not in name and os.sep not in name and name not in ("", ".", "..") and not os.path.islink(folder / name):
        return  # a plain file name in the folder: the common case, one lstat
    root = folder.resolve()
    target = (folder / name).resolve()
    if Path(name).is_absolute() or (target != root and root not in target.parents):
        raise DataError(f"{listed_in}, line {line}: id {name!r} names a file outside the image folder {folder}; "
                        "ids are paths relative to that folder (no absolute paths, '..' or links leading out of it)")


def check_resolution(resolution) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 8:
        raise ConfigError(f"resolution={resolution!r}: give an image size in pixels, at least 8")


class FileFaces(Dataset):
    """Lazy image files + a label matrix: the common body of ImageFolderCSV and CelebA."""

    def __init__(self, folder: Path, files: list[str], labels: np.ndarray, names: list[str], resolution: int,
                 ids: list[str] | None = None):
        check_resolution(resolution)
        self.folder, self.files, self.resolution = Path(folder), list(files), resolution  # files: names on disk
        self.ids = list(files) if ids is None else list(ids)  # as the labels name them
        self.attribute_names = list(names)
        self.attribute_matrix = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))  # (N, k) in {-1,+1}

    def __len__(self) -> int:
        return len(self.files)

    def image_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (H, W, 3), cropped and resized."""
        return load_face_image(self.folder / self.files[index], self.resolution)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        return uint8_to_tensor(self.image_uint8(index)), self.attribute_matrix[index].clone()


def _read_csv_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]], str]:
    """Header, (line number, cells) of each non-blank row, and the delimiter's name ("comma", ...)."""
    table = read_label_csv(csv_path)
    if len(table.header) < 2:
        raise DataError(f"{csv_path}, line 1: expected a header with an id column and at least one attribute column "
                        f"(read as {table.encoding}, {table.delimiter_name}-separated)")
    return table.header, table.rows, table.delimiter_name


def _probe(path: Path) -> tuple[float, bool]:
    """(short side, several frames) from the file's header; DataError for a file or mode veil cannot read."""
    try:
        with Image.open(path) as im:
            mode, size, animated = im.mode, im.size, bool(getattr(im, "is_animated", False))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:160]}); re-copy it or remove "
                        f"it from the labels") from None
    if mode not in READABLE_MODES:
        raise DataError(f"{path}: Pillow mode {mode!r} is not one veil reads; convert it to 8- or 16-bit RGB or "
                        f"greyscale (e.g. PNG), or remove it from the labels")
    return min(size), animated


def warn_about_images(folder: Path, files: Sequence[str], resolution: int) -> None:
    """Read each file's header once: refuse what veil cannot decode, and warn ONCE (``ImageWarning``) with the
    count of images enlarged more than ``UPSCALE_WARN_FACTOR`` (naming the worst) and of multi-frame files."""
    enlarged, frames, worst = 0, [], (0.0, "")
    for name in files:
        short, animated = _probe(folder / name)
        factor = upscale_factor((short, short), resolution=resolution)
        if factor > UPSCALE_WARN_FACTOR:
            enlarged += 1
            worst = max(worst, (factor, name))
        if animated:
            frames.append(name)
    notes = []
    if enlarged:
        notes.append(f"{enlarged} of {len(files)} images are enlarged more than {UPSCALE_WARN_FACTOR:g}x to "
                     f"{resolution}x{resolution} (the worst, {worst[1]!r} in {folder}, {worst[0]:.1f}x): the model "
                     f"sees blurry faces; use photos whose shorter side is at least {resolution} pixels")
    if frames:
        notes.append(f"{len(frames)} images have several frames and only the first is used (first: {frames[0]!r})")
    if notes:
        warnings.warn("; ".join(notes), ImageWarning, stacklevel=3)


def _id_column(header: list[str], id_column: str | None, csv_path: Path) -> int:
    if id_column is not None:
        if id_column not in header:
            raise ConfigError(f"id_column={id_column!r} is not a column of {csv_path}; columns: {header}")
        return header.index(id_column)
    return default_id_column(header)


class ImageFolderCSV(FileFaces):
    """``ds[i] -> (image (3,R,R) in [-1,1], attrs (k,) in {-1,+1})`` for the images that ``csv_path`` labels."""

    def __init__(
        self,
        folder,
        csv_path,
        *,
        attributes: Sequence[str] | None = None,
        resolution: int = 64,
        id_column: str | None = None,
    ):
        folder, csv_path = Path(folder), Path(csv_path)
        check_resolution(resolution)
        if not folder.is_dir():
            raise DataError(f"{folder}: image folder not found; pass root= the folder that holds the images")
        header, rows, delimiter = _read_csv_rows(csv_path)
        id_col = _id_column(header, id_column, csv_path)
        label_cols = [i for i in range(len(header)) if i != id_col]
        names = [header[i] for i in label_cols]
        picked = select_attributes(attributes, names, source=csv_path)
        files, labels, seen = [], [], {}
        for line, row in rows:
            if len(row) != len(header):
                raise DataError(
                    f"{csv_path}, line {line}: expected {len(header)} {delimiter}-separated fields "
                    f"like the header, found {len(row)}"
                )
            name = row[id_col].strip()
            key = unicodedata.normalize("NFC", name)  # café.png typed and café.png from a macOS copy are one file
            if key in seen:
                raise DataError(f"{csv_path}, line {line}: {name!r} is listed twice (first on line {seen[key]})")
            seen[key] = line
            check_inside(folder, name, listed_in=csv_path, line=line)
            files.append(name)
            labels.append(
                [parse_binary(row[label_cols[p]], file=csv_path, line=line, column=names[p]) for p in picked]
            )
        if not files:
            raise DataError(f"{csv_path}: no image rows after the header; expected one row per image")
        on_disk = resolve_files(folder, files, listed_in=csv_path)
        for name, disk in zip(files, on_disk):
            if disk != name:  # an NFC-equal spelling: the name opened must stay inside too
                check_inside(folder, disk, listed_in=csv_path, line=seen[unicodedata.normalize("NFC", name)])
        warn_about_images(folder, on_disk, resolution)
        super().__init__(folder, on_disk, np.array(labels, np.float32), [names[p] for p in picked], resolution,
                         ids=files)
