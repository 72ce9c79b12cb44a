"""CelebA read from a local copy in its official layout (veil never downloads it).

    root/
      img_align_celeba/000001.jpg ...   aligned 178x218 JPEGs
      list_attr_celeba.txt              line 1: image count; line 2: the 40 attribute names;
                                        then "000001.jpg  -1  1 ..." (whitespace separated, -1/1)
      list_eval_partition.txt           "000001.jpg 0" with 0 = train, 1 = valid, 2 = test

    ds = CelebA("/data/celeba", attributes=["Smiling", "Eyeglasses"], resolution=64, split="train")

Images are loaded lazily, centre-cropped to 178x178 and resized. ``split="all"`` keeps every image
and exposes the official partition as ``ds.partition`` (one of 0/1/2 per image, or None when the
partition file is absent) so a DataModule can split a revised copy the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from veil.errors import ConfigError, DataError
from veil.lightning_modules.data.image_folder import (
    BINARY_VALUES,
    FileFaces,
    check_files_present,
    check_resolution,
    parse_binary,
    select_attributes,
)

__all__ = ["CelebA", "CELEBA_ATTRIBUTES", "SPLITS"]

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
SPLITS = {"train": 0, "valid": 1, "test": 2, "all": None}

IMAGE_DIR, ATTR_FILE, PARTITION_FILE = "img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"
_FIX = "download CelebA's 'Align&Cropped Images' and 'Anno' files and unpack them under root"


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found; {_FIX}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: cannot read {what} ({e}); {_FIX}") from None


def read_attribute_file(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, file names, labels (N, 40) in {-1,+1}) from list_attr_celeba.txt."""
    lines = _read_lines(path, "attribute list")
    if len(lines) < 2:
        raise DataError(f"{path}: expected an image count on line 1 and the attribute names on line 2")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"{path}, line 1: expected the number of images, found {lines[0].strip()!r}") from None
    names = lines[1].split()
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != len(names) + 1:
            raise DataError(
                f"{path}, line {number}: expected {len(names) + 1} whitespace-separated fields "
                f"(file name + {len(names)} values), found {len(tokens)}"
            )
        files.append(tokens[0])
        try:
            rows.append([BINARY_VALUES[t] for t in tokens[1:]])  # the fast path: 200k lines x 40 values
        except KeyError:
            for t, n in zip(tokens[1:], names):
                parse_binary(t, file=path, line=number, column=n)  # raises, naming the bad cell
    if count != len(files):
        raise DataError(f"{path}, line 1: announces {count} images but lists {len(files)}; the file may be truncated")
    return names, files, np.array(rows, np.float32).reshape(len(files), len(names))


def read_partition_file(path: Path, files: Sequence[str]) -> list[int]:
    """The official split (0 train, 1 valid, 2 test) of each of ``files``, from list_eval_partition.txt."""
    split_of = {}
    for number, line in enumerate(_read_lines(path, "partition list"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2 or tokens[1] not in ("0", "1", "2"):
            raise DataError(f"{path}, line {number}: expected '<file name> 0|1|2', found {line.strip()!r}")
        split_of[tokens[0]] = int(tokens[1])
    missing = [f for f in files if f not in split_of]
    if missing:
        raise DataError(f"{path}: no split for {len(missing)} listed images (first: {missing[:3]}); {_FIX}")
    return [split_of[f] for f in files]


def _image_dir(root: Path) -> Path:
    folder = root / IMAGE_DIR
    if (folder / IMAGE_DIR).is_dir() and not any(folder.glob("*.jpg")):
        return folder / IMAGE_DIR  # some mirrors nest the folder in itself
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found; {_FIX}")
    return folder


class CelebA(FileFaces):
    """``ds[i] -> (image (3,R,R) in [-1,1], attrs (k,) in {-1,+1})``; ``ids`` are the file names."""

    def __init__(self, root, *, attributes: Sequence[str] | None, resolution: int = 64, split: str = "train"):
        root = Path(root)
        check_resolution(resolution)
        if split not in SPLITS:
            raise ConfigError(f"split={split!r}: choose one of {list(SPLITS)}")
        if not root.is_dir():
            raise DataError(f"{root}: CelebA root folder not found; {_FIX}")
        folder = _image_dir(root)
        names, files, labels = read_attribute_file(root / ATTR_FILE)
        picked = select_attributes(attributes, names, source=root / ATTR_FILE)
        partition_path = root / PARTITION_FILE
        partition = read_partition_file(partition_path, files) if partition_path.is_file() else None
        if SPLITS[split] is not None:
            if partition is None:
                raise DataError(
                    f"{partition_path}: needed for split={split!r} but not found; add it or use split='all'"
                )
            keep = [i for i, p in enumerate(partition) if p == SPLITS[split]]
            files, labels, partition = [files[i] for i in keep], labels[keep], [partition[i] for i in keep]
        check_files_present(folder, files, listed_in=root / ATTR_FILE)
        super().__init__(folder, files, labels[:, picked], [names[p] for p in picked], resolution)
        self.root, self.split = root, split
        self.partition: list[int] | None = partition
